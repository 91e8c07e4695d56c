"""What a pull did: per series outcome, and the totals the CLI and the audit trail show."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SeriesOutcome:
    pseudo_series: str
    status: str  # complete|failed|skipped|quarantined
    expected: int
    stored: int
    nbytes: int = 0
    error: str | None = None  # why it failed, or what was quarantined
    quarantined: int = 0


@dataclass
class PullReport:
    project: str
    studies: int = 0
    series: list[SeriesOutcome] = field(default_factory=list)
    unresolved: int = 0  # cohort items the PACS knows nothing of
    refused_unsolicited: int = 0
    seconds: float = 0.0
    storage: str = ""

    def count(self, status: str) -> int:
        return sum(1 for s in self.series if s.status == status)

    @property
    def instances(self) -> int:
        return sum(s.stored for s in self.series if s.status == "complete")

    @property
    def quarantined(self) -> int:
        """Instances held back by de-identification: reported, never stored."""
        return sum(s.quarantined for s in self.series)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.series)

    @property
    def ok(self) -> bool:
        return all(s.status in ("complete", "skipped") for s in self.series)


@dataclass
class PullProgress:
    """Where a running pull is: counts only (what a job shows, a progress bar draws)."""

    series_total: int = 0
    series_done: int = 0  # complete, skipped, failed or quarantined
    instances_total: int = 0  # the PACS's counts, over the plan
    instances: int = 0  # in the store or spooled, skipped series included
    nbytes: int = 0  # stored by this pull
    rate: float = 0.0  # instances a second received by this pull
    phase: str = "planning"  # planning|retrieving|done

    def as_dict(self) -> dict[str, object]:
        return {
            "phase": self.phase,
            "series": self.series_done,
            "series_total": self.series_total,
            "instances": self.instances,
            "total": self.instances_total,
            "bytes": self.nbytes,
            "rate": round(self.rate, 1),
        }
