"""One synthetic CT series in a fresh home, stored as a pull leaves it: what the export and
loader benchmarks both start from."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import pydicom

from core import projects, users
from core.core import Core
from core.settings import Settings
from harness.synthetic import generate
from storage.commit import commit_series
from storage.series import SeriesWriter, series_key

STUDY_UID, SERIES_UID = "2.25.1", "2.25.2"  # the stored series' UIDs (pseudonyms, as pulled)


@dataclass(frozen=True)
class StoredCT:
    settings: Settings
    key: str  # the series' storage key
    series_uid: str
    dicom_dir: Path  # the same series as DICOM files
    dicom_bytes: int  # their size


def stored_ct(base: Path, project: str, *, slices: int, size: int) -> StoredCT:
    """A home in `base/home` with `project` approved (the OS account its first admin) holding
    one synthetic CT series of `slices` x `size`², written as DICOM files in `base/dicom` and
    committed to the store complete and indexed."""
    dicom_dir = base / "dicom"
    corpus = generate(dicom_dir, n_patients=1, series_per_study=1, slices=slices, size=size)
    settings = Settings(home=base / "home", fsync=False)
    key = series_key(project, STUDY_UID, SERIES_UID)
    with Core(settings, create=True) as core:
        users.first_admin(core)
        projects.create(core, project)
        today = date.today()
        projects.approve(core, project, committee_ref="B", approved_on=today,
                         expires_on=today + timedelta(30))  # fmt: skip
        writer = SeriesWriter(base / "spool", fsync=False)
        for f in corpus.files:
            writer.add(pydicom.dcmread(f))
        commit_series(
            core.store,
            core.catalog,
            writer,
            key,
            project_id=core.project(project).id,
            series_uid=SERIES_UID,
            values={"study_uid": STUDY_UID, "modality": "CT"},
        )
    dicom_bytes = sum(Path(f).stat().st_size for f in corpus.files)
    return StoredCT(settings, key, SERIES_UID, dicom_dir, dicom_bytes)
