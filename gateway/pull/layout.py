"""Where a project's pull keeps its spool (`series/`) and the series it waits for (`expected/`).

A pull announces each series it waits for with a marker file, named by pseudonymous UID, holding
the pseudonymous study and patient it must belong to; a receiver refuses anything without one.
Quarantine notes (why an instance was held back) and the transfer syntaxes each series came in
sit beside the markers: receivers in several processes append to them, the pull reads them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class SpoolLayout:
    """Where a project's pull keeps its spool (`series/`) and its expectations (`expected/`)."""

    def __init__(self, spool_root: Path, project: str) -> None:
        self.root = Path(spool_root) / project
        self._expected_dir = os.fspath(self.root / "expected")  # a string: asked per instance
        # Markers read, by series, with the identity of the file read: asked once per instance,
        # a marker is read again only when replaced.
        self._read: dict[str, tuple[tuple[int, int, int], dict[str, str]]] = {}

    def data(self, pseudo_series: str) -> Path:
        return self.root / "series" / pseudo_series

    def _marker(self, pseudo_series: str) -> Path:
        return self.root / "expected" / f"{pseudo_series}.json"

    def _notes(self, pseudo_series: str) -> Path:
        return self.root / "expected" / f"{pseudo_series}.quarantine"

    def _syntaxes(self, pseudo_series: str) -> Path:
        return self.root / "expected" / f"{pseudo_series}.syntaxes"

    def expect(self, pseudo_series: str, pseudo_study: str, patient: str = "") -> None:
        """Open the door for one series, of one study, of one patient (pseudonyms); written
        atomically, so readers never see half a marker."""
        marker = self._marker(pseudo_series)
        marker.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = marker.with_suffix(f".{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps({"study": pseudo_study, "patient": patient}))
            os.replace(tmp, marker)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk leaves no half marker behind
            raise

    def expected(self, pseudo_series: str) -> dict[str, str] | None:
        """{"study", "patient"} the series belongs to, or None if nobody waits for it."""
        marker = f"{self._expected_dir}/{pseudo_series}.json"  # as _marker, without pathlib
        try:
            st = os.stat(marker)
            seen = (st.st_ino, st.st_mtime_ns, st.st_size)
            hit = self._read.get(pseudo_series)
            if hit is not None and hit[0] == seen:
                return hit[1]
            with open(marker, encoding="utf-8") as f:
                want = json.load(f)
        except (FileNotFoundError, ValueError):
            self._read.pop(pseudo_series, None)
            return None
        if len(self._read) > 4096:
            self._read.clear()
        self._read[pseudo_series] = (seen, want)
        return want

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

    def note_syntax(self, pseudo_series: str, uid: str) -> None:
        """Say that an instance of the series came in transfer syntax `uid` (a receiver says it
        once per series and syntax)."""
        with open(self._syntaxes(pseudo_series), "a", encoding="ascii") as f:
            f.write(f"{uid}\n")  # one short append: atomic between processes

    def syntaxes(self, pseudo_series: str) -> tuple[str, ...]:
        """The transfer syntax UIDs the series' instances came in, in the order first seen."""
        try:
            with open(self._syntaxes(pseudo_series), encoding="ascii") as f:
                return tuple(dict.fromkeys(line.strip() for line in f if line.strip()))
        except FileNotFoundError:
            return ()

    def remove_tmp(self) -> None:
        """Remove markers half written by a pull that stopped (`*.tmp`)."""
        for tmp in (self.root / "expected").glob("*.tmp"):
            tmp.unlink(missing_ok=True)

    def clear_notes(self, pseudo_series: str) -> None:
        self._notes(pseudo_series).unlink(missing_ok=True)
        self._syntaxes(pseudo_series).unlink(missing_ok=True)
