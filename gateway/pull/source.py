"""What a pull knows of a source, whatever its protocol: the studies and series it holds
(`StudyHit`, `SeriesHit`), what a retrieve brought (`RetrieveResult`), the `Retriever` protocol
whose status is DICOM's (`dicom.status`, PS3.7 Annex C), as a receiver's answers are: a
C-STORE answer passes through unchanged, and a DICOMweb retrieve speaks them too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from dicom.status import is_success


@dataclass(frozen=True)
class StudyHit:
    """One study a source matched. Identifying fields are kept out of `repr`."""

    study_uid: str = field(repr=False)
    patient_id: str = field(repr=False)
    accession: str = field(repr=False)
    study_date: str = field(repr=False)
    modalities: tuple[str, ...] = ()
    n_series: int | None = None
    n_instances: int | None = None


@dataclass(frozen=True)
class SeriesHit:
    """One series of a study, with the source's instance count."""

    study_uid: str = field(repr=False)
    series_uid: str = field(repr=False)
    modality: str = ""
    series_number: int | None = None
    n_instances: int | None = None


@dataclass
class RetrieveResult:
    """What one series' retrieve reports: its final status and counts (a C-MOVE's or C-GET's
    sub-operations, a DICOMweb stream's instances)."""

    status: int | None = None  # None: no final answer arrived
    completed: int = 0
    failed: int = 0
    warning: int = 0
    remaining: int = 0
    received: int = 0  # instances handed to a receiver here (C-GET, DICOMweb)

    @property
    def ok(self) -> bool:
        """Success status and nothing failed."""
        return self.status is not None and is_success(self.status) and self.failed == 0

    def __str__(self) -> str:
        status = "none" if self.status is None else f"0x{self.status:04X}"
        return (
            f"status {status}, completed {self.completed}, failed {self.failed}, "
            f"warning {self.warning}, remaining {self.remaining}"
        )


class Retriever(Protocol):
    """A PACS the pull plans with and retrieves from. A context manager: entering makes it
    ready to receive (an SCP listening, a receiver open), leaving releases what it holds.
    Network failures raise `SourceError`."""

    name: str  # the source's name, recorded with each series pulled from it
    protocol: str  # "move", "get", "dicomweb"
    max_concurrent: int  # series retrieved at once: the source's association or request limit

    def __enter__(self) -> Retriever: ...

    def __exit__(self, *exc: object) -> None: ...

    def echo(self) -> None:
        """Check that the source answers; `SourceError` if it does not."""

    def find_studies(self, kind: str, value: str) -> list[StudyHit]:
        """Studies matching one cohort item exactly (kind: accession, patient_id, study_uid)."""

    def find_series(self, study_uid: str) -> list[SeriesHit]:
        """The series of one study, with the source's instance counts."""

    def image_size(self, study_uid: str, series_uid: str) -> tuple[int, int, int, int] | None:
        """Rows, columns, bits allocated, frames of an instance of the series (a plan's size
        estimate), or None when the source does not say."""

    def retrieve(self, study_uid: str, series_uid: str) -> RetrieveResult:
        """Bring every instance of one series to the receivers; thread-safe."""
