"""The Storage SCP's handler: take in only instances a pull waits for, de-identify them, spool them.

It runs in the SCP's worker processes (one `Receiver` each, built from a picklable
`ReceiverConfig`) or in the pull's own process for C-GET. A pull announces each series it waits for
with a marker file in the spool's `expected/` folder; anything without a marker is refused. Markers,
spool folders and quarantine notes are named by pseudonymous UIDs only.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import Dataset

from deid.engine import Deidentifier, Quarantined
from deid.keys import ProjectKeys
from deid.profile import Profile
from gateway.dimse.common import REFUSED_NOT_AUTHORIZED, SUCCESS
from storage.series import SeriesWriter

log = logging.getLogger(__name__)


class SpoolLayout:
    """Where a project's pull keeps its spool (`series/`) and its expectations (`expected/`)."""

    def __init__(self, spool_root: Path, project: str) -> None:
        self.root = Path(spool_root) / project

    def data(self, pseudo_series: str) -> Path:
        return self.root / "series" / pseudo_series

    def _marker(self, pseudo_series: str) -> Path:
        return self.root / "expected" / f"{pseudo_series}.json"

    def _notes(self, pseudo_series: str) -> Path:
        return self.root / "expected" / f"{pseudo_series}.quarantine"

    def expect(self, pseudo_series: str, pseudo_study: str, patient: str = "") -> None:
        """Open the door for one series, of one study, of one patient (pseudonyms); written
        atomically, so readers never see half a marker."""
        marker = self._marker(pseudo_series)
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"study": pseudo_study, "patient": patient}))
        os.replace(tmp, marker)

    def expected(self, pseudo_series: str) -> dict[str, str] | None:
        """{"study", "patient"} the series belongs to, or None if nobody waits for it."""
        try:
            return json.loads(self._marker(pseudo_series).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def forget(self, pseudo_series: str) -> None:
        """Close the door: later arrivals of this series are refused."""
        self._marker(pseudo_series).unlink(missing_ok=True)

    def note_quarantine(self, pseudo_series: str, pseudo_sop: str, reason: str) -> None:
        line = json.dumps({"sop": pseudo_sop, "reason": reason}) + "\n"
        with open(self._notes(pseudo_series), "a", encoding="utf-8") as f:
            f.write(line)  # one short append: atomic between processes

    def quarantined(self, pseudo_series: str) -> dict[str, int]:
        """Quarantine reasons and counts for a series (each instance counted once)."""
        by_sop: dict[str, str] = {}
        try:
            with open(self._notes(pseudo_series), encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        rec = json.loads(line)
                        by_sop[rec["sop"]] = rec["reason"]
        except FileNotFoundError:
            pass
        counts: dict[str, int] = {}
        for reason in by_sop.values():
            counts[reason] = counts.get(reason, 0) + 1
        return counts

    def clear_notes(self, pseudo_series: str) -> None:
        self._notes(pseudo_series).unlink(missing_ok=True)


@dataclass(frozen=True)
class ReceiverConfig:
    """Everything a worker process needs to receive for one project's pull (picklable)."""

    project: str
    secret: bytes = field(repr=False)
    profile: dict[str, Any]
    spool_root: Path
    fsync: bool
    vault_url: str
    catalog_url: str
    actor: str


class Receiver:
    """Accepts expected instances: de-identifies headers, spools durably, then acknowledges."""

    def __init__(self, cfg: ReceiverConfig) -> None:
        from deid.vault import Vault

        self.cfg = cfg
        self.layout = SpoolLayout(cfg.spool_root, cfg.project)
        self.keys = ProjectKeys(cfg.secret)
        self._vault = Vault(cfg.vault_url)
        self.deid = Deidentifier(
            Profile.from_json(cfg.profile),
            self.keys,
            sink=lambda batch: self._vault.record_many(cfg.project, batch),
        )
        self._writers: dict[str, SeriesWriter] = {}
        self._lock = threading.Lock()
        self._catalog: Any = None
        self.refused = 0

    def on_store(self, ds: Dataset, calling_ae: str) -> int:
        """The C-STORE status for one instance: success only once it is spooled (or quarantined)."""
        series_uid = str(ds.get("SeriesInstanceUID") or "")
        pseudo_series = self.keys.uid(series_uid) if series_uid else ""
        want = self.layout.expected(pseudo_series) if pseudo_series else None
        study_uid = str(ds.get("StudyInstanceUID") or "")
        if want is None or not study_uid or self.keys.uid(study_uid) != want["study"]:
            self._refuse(calling_ae)
            return REFUSED_NOT_AUTHORIZED
        pseudo_sop = self.keys.uid(str(ds.get("SOPInstanceUID") or ""))
        try:
            self.deid.apply(ds)
            if want.get("patient") and ds.get("PatientID") != want["patient"]:
                # Checked here, not only in the engine: series of a study may reach other workers.
                raise Quarantined("Patient ID differs from the study's: two patients in one study")
        except Quarantined as q:
            self.layout.note_quarantine(pseudo_series, pseudo_sop, q.reason)
            log.warning("quarantined an instance of series %s: %s", pseudo_series, q.reason)
            return SUCCESS  # taken in charge: reported, never stored
        self._writer(pseudo_series).add(ds)
        return SUCCESS

    def on_release(self, assoc_id: Any = None) -> None:
        """At the end of an association: hand mappings to the vault, close finished series."""
        self.deid.flush()
        with self._lock:
            done = [k for k in self._writers if self.layout.expected(k) is None]
            for k in done:
                self._writers.pop(k).close()

    def close(self) -> None:
        self.deid.flush()
        with self._lock:
            for w in self._writers.values():
                w.close()
            self._writers.clear()

    def _writer(self, pseudo_series: str) -> SeriesWriter:
        with self._lock:
            w = self._writers.get(pseudo_series)
            if w is None:
                w = SeriesWriter(
                    self.layout.data(pseudo_series),
                    fsync=self.cfg.fsync,
                    segment=str(os.getpid()),
                )
                self._writers[pseudo_series] = w
            return w

    def _refuse(self, calling_ae: str) -> None:
        from storage.catalog import Catalog

        with self._lock:
            self.refused += 1
            if self._catalog is None:
                self._catalog = Catalog(self.cfg.catalog_url)
        log.warning("refused an unsolicited instance from AE %r", calling_ae)
        self._catalog.audit(
            self.cfg.actor, "store.refused", self.cfg.project, "refused", calling_ae=calling_ae
        )
