"""The catalog's queries for study requests (`storage.models.StudyRequest`) and the inbox key.
Mixed into `Catalog`, so callers ask `core.catalog`."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from storage.catalog.db import Queries
from storage.models import InboxKey, StudyRequest, get_or_add


class RequestQueries(Queries):
    """Study requests."""

    def inbox_key(self) -> str | None:
        with self.session() as s:
            row = s.get(InboxKey, 1)
            return row.public_key if row else None

    def set_inbox_key(self, public_key: str) -> None:
        with self.session() as s:
            get_or_add(s, InboxKey, id=1).public_key = public_key

    def add_request(self, row: StudyRequest) -> StudyRequest:
        with self.session() as s:
            s.add(row)
            s.flush()
            s.refresh(row)
            return row

    def request(self, request_id: int) -> StudyRequest | None:
        with self.session() as s:
            return s.get(StudyRequest, request_id)

    def requests(self, project_id: int | None = None, state: str | None = None) -> list[Any]:
        """Requests, newest first (of one project, in one state)."""
        q = select(StudyRequest).order_by(StudyRequest.id.desc())
        if project_id is not None:
            q = q.where(StudyRequest.project_id == project_id)
        if state is not None:
            q = q.where(StudyRequest.state == state)
        with self.session() as s:
            return list(s.scalars(q))

    def decide_request(self, request_id: int, **values: Any) -> bool:
        """Update a pending request (its decision); False when it is no longer pending."""
        with self.session() as s:
            row = s.get(StudyRequest, request_id, with_for_update=True)
            if row is None or row.state != "pending":
                return False
            for k, v in values.items():
                setattr(row, k, v)
            return True

    def set_request_job(self, request_id: int, job_id: int) -> None:
        with self.session() as s:
            row = s.get(StudyRequest, request_id)
            if row is not None:
                row.job_id = job_id
