"""What the CLI and the demo print: a pull's summary, a project's status. Lines fit in 80 columns
(pseudonymous study UIDs under 2.25. are 44 characters, the widest thing shown)."""

from __future__ import annotations

import textwrap
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable

from pydicom.uid import UID

from gateway.pull import PullReport
from storage.catalog import SeriesRecord

Echo = Callable[[str], None]
WIDTH = 80


def report_lines(report: PullReport) -> list[str]:
    """A pull's summary: studies, series, instances, bytes, time, where the data is."""
    rate = report.instances / report.seconds if report.seconds else 0.0
    rows = [
        ("project", report.project),
        ("studies", str(report.studies)),
        (
            "series",
            f"{report.count('complete')} stored, {report.count('skipped')} already complete, "
            f"{report.count('failed')} failed, {report.count('quarantined')} quarantined",
        ),
        ("instances", str(report.instances)),
        ("quarantined", f"{report.quarantined} instances (reported, not stored)"),
        ("pixel data", f"{report.nbytes / 1e6:.1f} MB"),
        ("time", f"{report.seconds:.1f} s ({rate:.0f} instances/s)"),
        ("unresolved items", f"{report.unresolved} cohort items the PACS does not know"),
        ("refused", f"{report.refused_unsolicited} unsolicited instances"),
        ("storage", report.storage),
    ]
    lines = [line for k, v in rows for line in field(k, v)]
    for s in report.series:
        if s.error:
            lines += _wrapped(f"{s.status} series {s.pseudo_series}: {s.error}")
    return lines


def status_lines(
    series: Iterable[SeriesRecord], *, details: bool = False, problems: bool = False
) -> list[str]:
    """A count of studies by status, then a line per study (series, instances stored/expected,
    status); with `details`, a line per series under it, and its error or quarantine note;
    with `problems`, the studies not complete only (a 10,000-study project's few failures)."""
    by_study: dict[str, list[SeriesRecord]] = defaultdict(list)
    for r in series:
        if r.status != "removed":  # a retired result series (SEG, SR) replaced by a re-run
            by_study[r.study_uid].append(r)
    if not by_study:
        return ["no series yet: `sphere pull` fetches the cohort"]
    worst = {study: _worst(rows) for study, rows in by_study.items()}
    counts = Counter(worst.values())
    counted = ", ".join(f"{counts[s]:,} {s}" for s in _WORST_FIRST[::-1] if counts[s])
    n = len(by_study)
    lines = [f"{n:,} {'study' if n == 1 else 'studies'}: {counted}"]
    lines.append(f"{'study (pseudonymous UID)':<44} {'series':>6} {'instances':>11}  status")
    for study, rows in by_study.items():
        if problems and worst[study] == "complete":
            continue
        stored = sum(r.stored for r in rows)
        expected = sum(r.expected for r in rows)
        state = _state(rows, worst[study])
        lines.append(f"{study:<44} {len(rows):>6} {f'{stored}/{expected}':>11}  {state}")
        if details:
            for r in rows:
                count = f"{r.stored}/{r.expected}"
                lines.append(f"  {r.series_uid:<44} {r.modality:<5} {count:>11}  {r.status}")
                if r.source:
                    lines.append(f"    from {r.source}")
                if r.transfer_syntax:
                    lines += _wrapped(f"came as {_syntax_names(r.transfer_syntax)}", indent="    ")
                if r.error:
                    lines += _wrapped(r.error, indent="    ")
    return lines


def _syntax_names(uids: str) -> str:
    """ "Explicit VR Little Endian (1.2.840.10008.1.2.1)" for each UID pydicom knows."""
    uids_ = [UID(u) for u in uids.split()]
    return ", ".join(f"{u.name} ({u})" if u.is_transfer_syntax else str(u) for u in uids_)


# The study's line shows its worst series status, counted; `--series` shows them all.
_WORST_FIRST = ("failed", "quarantined", "pending", "complete")


def _worst(rows: list[SeriesRecord]) -> str:
    return min((r.status for r in rows), key=_rank)


def _rank(status: str) -> int:
    return _WORST_FIRST.index(status) if status in _WORST_FIRST else -1


def _state(rows: list[SeriesRecord], worst: str) -> str:
    if worst == "complete":
        return worst
    return f"{sum(r.status == worst for r in rows)} {worst}"


def field(name: str, value: str) -> list[str]:
    """`name` and its value, wrapped at 80 columns under the value."""
    return _wrapped(f"{name:<19}{value}", subsequent=" " * 19)


def _wrapped(text: str, *, indent: str = "", subsequent: str | None = None) -> list[str]:
    return textwrap.wrap(
        text,
        WIDTH,
        initial_indent=indent,
        subsequent_indent=indent + "  " if subsequent is None else subsequent,
        break_on_hyphens=False,
    ) or [""]
