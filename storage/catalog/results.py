"""The catalog's queries for pipeline results (one row per project, series and pipeline)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from storage.catalog.db import Queries
from storage.models import PipelineResult, get_or_add


class ResultQueries(Queries):
    """Pipeline results and the series pipelines derived."""

    def upsert_result(self, project_id: int, series_uid: str, pipeline: str, **values: Any) -> None:
        """Create or replace the result of `pipeline` for a series (one row per project,
        series and pipeline): columns not given are reset, so nothing of a previous run stays."""
        fresh: dict[str, Any] = {
            "reason": None,
            "values": {},
            "provenance": {},
            "sr_series_uid": None,
            "seg_series_uid": None,
            "report_key": None,
        }
        with self.session() as s:
            row = get_or_add(
                s, PipelineResult, project_id=project_id, series_uid=series_uid, pipeline=pipeline
            )
            for k, v in {**fresh, **values}.items():
                setattr(row, k, v)

    def results(self, project_id: int, pipeline: str | None = None) -> list[PipelineResult]:
        """Pipeline results of a project (of one pipeline), by study and series."""
        with self.session() as s:
            q = select(PipelineResult).where(PipelineResult.project_id == project_id)
            if pipeline is not None:
                q = q.where(PipelineResult.pipeline == pipeline)
            order = (PipelineResult.study_uid, PipelineResult.series_uid, PipelineResult.pipeline)
            return list(s.scalars(q.order_by(*order)))

    def result_states(self, project_id: int, pipeline: str) -> dict[str, tuple[str, str]]:
        """{series UID: (version, status)} of a pipeline's results in a project."""
        with self.session() as s:
            q = select(
                PipelineResult.series_uid, PipelineResult.version, PipelineResult.status
            ).where(PipelineResult.project_id == project_id, PipelineResult.pipeline == pipeline)
            return {uid: (v, st) for uid, v, st in s.execute(q).all()}

    def derived_series_uids(self, project_id: int) -> set[str]:
        """UIDs of the series pipelines made (SR, SEG): outputs, never inputs."""
        with self.session() as s:
            q = select(PipelineResult.sr_series_uid, PipelineResult.seg_series_uid).where(
                PipelineResult.project_id == project_id
            )
            return {uid for row in s.execute(q).all() for uid in row if uid}
