"""Keyed pseudonyms, UIDs and date shifts: HMAC-SHA256 under one secret per project.

The same input gives the same output in every run and pull of a project; without the secret the
outputs of two projects cannot be linked, nor the originals guessed from them.
"""

from __future__ import annotations

import base64
import hmac
import re
import uuid
from functools import lru_cache

_ROOT = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.$")
SHIFT_MAX_DAYS = 365  # shifts fall in -365..-1: never zero, intervals kept


class ProjectKeys:
    """Keyed derivations for one project. Results are memoised (bounded) for the hot path."""

    def __init__(self, secret: bytes, uid_root: str = "2.25.") -> None:
        if len(secret) < 16:
            raise ValueError("the project secret must be at least 16 bytes")
        if not _ROOT.match(uid_root) or len(uid_root) > 44:
            raise ValueError("uid_root must be a UID prefix ending with '.', at most 44 characters")
        self._secret = bytes(secret)
        self.uid_root = uid_root
        # Digits left for the keyed part; 2.25. takes a UUID's integer (up to 39 digits).
        self._digits = min(39, 64 - len(uid_root))
        self.uid = lru_cache(maxsize=1 << 16)(self._uid)
        self.pseudonym = lru_cache(maxsize=1 << 14)(self._pseudonym)
        self.date_shift_days = lru_cache(maxsize=1 << 14)(self._date_shift_days)
        self.accession = lru_cache(maxsize=1 << 14)(self._accession)

    def mac(self, domain: str, value: str) -> bytes:
        """HMAC-SHA256 of `value` in a named domain (domains keep derivations independent)."""
        msg = domain.encode() + b"\x00" + value.encode("utf-8", "surrogateescape")
        return hmac.digest(self._secret, msg, "sha256")

    def cohort_digest(self, kind: str, value: str) -> str:
        """What the catalog keeps of a cohort item: a keyed digest (32 hex digits). Accession
        numbers are short enough to guess; without the secret, the digest tells nothing."""
        return self.mac("cohort", f"{kind}\x00{value.strip()}").hex()[:32]

    def _uid(self, original_uid: str) -> str:
        """A valid UID (<= 64 characters) under `uid_root` standing for `original_uid`."""
        digest = self.mac("uid", original_uid.strip().rstrip("\x00"))
        if self.uid_root == "2.25.":
            return "2.25." + str(uuid.UUID(bytes=digest[:16], version=4).int)
        return self.uid_root + str(int.from_bytes(digest[:17], "big") % 10**self._digits)

    def _pseudonym(self, patient_id: str) -> str:
        """The patient's pseudonym: 'P' and 16 base32 characters."""
        digest = self.mac("patient", patient_id.strip())
        return "P" + base64.b32encode(digest[:10]).decode()

    def _accession(self, accession: str) -> str:
        """An accession number's stand-in: 'A' and 13 base32 characters (fits SH)."""
        digest = self.mac("accession", accession.strip())
        return "A" + base64.b32encode(digest[:8]).decode().rstrip("=")

    def _date_shift_days(self, patient_id: str) -> int:
        """The patient's date shift in days, in -365..-1: the same for all their studies."""
        digest = self.mac("date-shift", patient_id.strip())
        return -(1 + int.from_bytes(digest[:8], "big") % SHIFT_MAX_DAYS)
