"""The catalog's queries for cohorts: the items a project pulls, by keyed digest."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import func, select

from storage.catalog.db import Queries
from storage.models import CohortItem


class CohortQueries(Queries):
    """Cohort items (originals are in the vault, digests here)."""

    def cohort(self, project_id: int) -> list[CohortItem]:
        """The cohort items of a project (kind and keyed digest; originals are in the vault)."""
        with self.session() as s:
            q = select(CohortItem).where(CohortItem.project_id == project_id)
            return list(s.scalars(q.order_by(CohortItem.id)))

    def add_cohort_items(self, project_id: int, kind: str, digests: Iterable[str]) -> list[str]:
        """Add cohort items by digest; returns the digests that were new."""
        wanted = sorted(set(digests))
        with self.session() as s:
            have = set(
                s.scalars(
                    select(CohortItem.digest).where(
                        CohortItem.project_id == project_id, CohortItem.kind == kind
                    )
                )
            )
            new = [d for d in wanted if d not in have]
            s.add_all(CohortItem(project_id=project_id, kind=kind, digest=d) for d in new)
        return new

    def cohort_counts(self, project_id: int) -> dict[str, int]:
        """Cohort items of a project by kind."""
        with self.session() as s:
            q = (
                select(CohortItem.kind, func.count())
                .where(CohortItem.project_id == project_id)
                .group_by(CohortItem.kind)
            )
            return dict(s.execute(q).all())

    def record_resolution(self, studies: dict[int, list[str]]) -> None:
        """Remember the studies (pseudonymous UIDs) each cohort item (by id) matched at the
        last pull or plan."""
        with self.session() as s:
            for item_id, uids in studies.items():
                item = s.get(CohortItem, item_id)
                if item is not None:
                    item.studies_found, item.studies = len(uids), sorted(uids)

    def remove_cohort_items(self, project_id: int, kind: str, digests: Iterable[str]) -> list[str]:
        """Remove cohort items by digest; returns the digests that were there."""
        wanted = set(digests)
        with self.session() as s:
            q = select(CohortItem).where(
                CohortItem.project_id == project_id, CohortItem.kind == kind
            )
            gone = [i for i in s.scalars(q) if i.digest in wanted]
            for item in gone:
                s.delete(item)
            return [i.digest for i in gone]
