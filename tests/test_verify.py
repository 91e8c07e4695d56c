"""Completeness is checked, not guessed: a PACS's 'success' does not make a series complete."""

from __future__ import annotations

from typing import Any, cast

import pytest

from gateway.pull.puller import SeriesJob, verify
from gateway.pull.source import RetrieveResult
from storage.series import SeriesWriter


def job_with(tmp_path, expected: int, spooled: int, quarantined: int = 0) -> SeriesJob:
    from harness.synthetic import ct_series

    writer = SeriesWriter(tmp_path / "spool", fsync=False)
    sops = [f"1.2.3.{i}" for i in range(max(spooled, 1))]
    patient = {
        "id": "1",
        "name": "A^B",
        "surname": "A",
        "given": "B",
        "birth_date": "19500101",
        "sex": "F",
        "address": "x",
        "phone": "1",
        "other_id": "IPP1",
        "referrer": "C^D",
    }
    study = {"uid": "1.2.3", "accession": "ACC1", "date": "20200101"}
    for ds in list(
        ct_series(
            patient=patient,
            study=study,
            series_uid="1.2.3.9",
            series_number=1,
            slices=spooled,
            size=8,
            frame_uid="1.2.3.8",
            sop_uids=sops,
        )
    ):
        writer.add(ds)
    job = SeriesJob(
        "p",
        "1.2.3",
        "1.2.3.9",
        "2.25.1",
        "2.25.2",
        "P1",
        "CT",
        expected,
        writer,
        source=cast(Any, None),  # nothing is retrieved here
    )
    job.quarantined = {"burned-in annotation": quarantined} if quarantined else {}
    return job


@pytest.mark.parametrize(
    ("expected", "spooled", "quarantined", "result", "problem"),
    [
        (4, 4, 0, RetrieveResult(0, completed=4), ""),
        (4, 3, 1, RetrieveResult(0, completed=4), ""),  # quarantined ones are accounted for
        (4, 3, 0, RetrieveResult(0, completed=4), "received 3 of 4"),  # 'success', one missing
        (4, 0, 0, RetrieveResult(0, completed=0), "received 0 of 4"),  # 'success', nothing
        (4, 4, 0, RetrieveResult(0xB000, completed=3, failed=1), "1 failed"),
        (4, 4, 0, RetrieveResult(0, completed=2, warning=1), "completed 2 of 4"),
    ],
)
def test_verify(tmp_path, expected, spooled, quarantined, result, problem):
    job = job_with(tmp_path, expected, spooled, quarantined)
    error = verify(job, result)
    assert (problem in error) if problem else error == ""
