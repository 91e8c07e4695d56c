"""The opt-out register: patients who object to any research use of their images.

It holds keyed digests of Patient IDs (HMAC-SHA256 under a register key of its own, kept in the
vault like a project's secret and unlike any of them), never an ID in clear. The pull consults it
when a cohort is resolved and the receivers again for every instance (`Register.refuses`);
`gateway.purge` removes what was stored of such a patient before.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from core.core import Core
from core.errors import SphereError
from core.projects import read_cohort_csv
from deid.keys import ProjectKeys

# The vault secret the digests are keyed with: not a project's name (those start [a-z0-9]).
REGISTER_SECRET = "_optout-register"


class Register:
    """The register as read once (`reload` reads it again): which Patient IDs are refused."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self._keys = ProjectKeys(core.vault.project_secret(REGISTER_SECRET))
        self.digests: set[str] = self.core.catalog.optout_digests()

    def reload(self) -> bool:
        """Read the register again; returns whether it changed."""
        fresh = self.core.catalog.optout_digests()
        changed, self.digests = fresh != self.digests, fresh
        return changed

    def digest(self, patient_id: str) -> str:
        """The keyed digest the register keeps of a Patient ID (64 hex digits)."""
        return self._keys.mac("optout", patient_id.strip()).hex()

    def refuses(self, patient_id: str | None) -> bool:
        """Whether this patient has opted out (an empty ID never matches)."""
        pid = (patient_id or "").strip()
        return bool(pid and self.digests) and self.digest(pid) in self.digests


def add(core: Core, patient_ids: Iterable[str], *, actor: str = "") -> tuple[list[str], int]:
    """Register patients' objection; returns the IDs given (cleaned) and how many were new.
    Audited with counts only."""
    ids = _clean(patient_ids)
    register = Register(core)
    new = core.catalog.add_optouts((register.digest(i) for i in ids), by=actor or core.actor)
    core.catalog.audit(actor or core.actor, "optout.add", None, given=len(ids), new=new)
    return ids, new


def remove(core: Core, patient_ids: Iterable[str], *, actor: str = "") -> int:
    """Withdraw objections (the patient agrees again); returns how many were in the register."""
    ids = _clean(patient_ids)
    register = Register(core)
    n = core.catalog.remove_optouts(register.digest(i) for i in ids)
    core.catalog.audit(actor or core.actor, "optout.remove", None, given=len(ids), removed=n)
    return n


def read_ids(path: Path) -> list[str]:
    """Patient IDs from a file: a CSV whose header names a patient ID column, or one ID a line."""
    try:
        columns = read_cohort_csv(path)
    except SphereError:
        columns = None  # no header naming a cohort kind: one ID a line
    except (OSError, UnicodeError) as e:
        raise SphereError(f"cannot read {path.name}: {e}") from None
    if columns is not None:
        if "patient_id" not in columns:
            raise SphereError(f"{path.name}: the CSV has no patient ID column")
        return _clean(columns["patient_id"])
    with open(path, encoding="utf-8-sig") as f:
        return _clean(f)


def _clean(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(v.strip() for v in values if v and v.strip()))
