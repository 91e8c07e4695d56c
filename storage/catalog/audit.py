"""The catalog's queries for the audit trail, a hash chain (`storage.audit`)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from storage import audit as chain
from storage.catalog.db import Queries
from storage.models import AuditEvent


def audit_values(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Audit rows as `storage.audit.append` takes them: the detail dict as JSON text."""
    return [
        {**r, "detail": json.dumps(r.get("detail") or {}, default=str, sort_keys=True)}
        for r in rows
    ]


class AuditQueries(Queries):
    """Append to, read and verify the audit trail."""

    def audit(
        self, actor: str, action: str, project: str | None, outcome: str = "ok", **detail: Any
    ) -> None:
        """Append one audit row in its own transaction, so a failed action is still recorded."""
        self.audit_many(
            [
                {
                    "actor": actor,
                    "action": action,
                    "project": project,
                    "outcome": outcome,
                    "detail": detail,
                }
            ]
        )

    def audit_many(self, rows: Iterable[dict[str, Any]]) -> None:
        """Append audit rows (actor, action, project, outcome, detail dict, at) in one go,
        chained (`storage.audit`)."""
        values = audit_values(rows)
        if values:
            with self.session() as s:
                chain.append(s, values)

    def audit_trail(
        self,
        project: str | None = None,
        limit: int = 100,
        *,
        actor: str | None = None,
        action: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[AuditEvent]:
        """The most recent audit rows, newest first: of one project (or all), one actor, one
        action (or, ending in `*`, those starting so), at or after `since`, before `until`."""
        with self.session() as s:
            q = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
            if project is not None:
                q = q.where(AuditEvent.project == project)
            if actor is not None:
                q = q.where(AuditEvent.actor == actor)
            if action is not None and action.endswith("*"):
                q = q.where(AuditEvent.action.startswith(action[:-1], autoescape=True))
            elif action is not None:
                q = q.where(AuditEvent.action == action)
            if since is not None:
                q = q.where(AuditEvent.at >= since)
            if until is not None:
                q = q.where(AuditEvent.at < until)
            return list(s.scalars(q))

    def audited_project(self, project: str) -> bool:
        """Whether any audit row names this project (one that no longer exists, too)."""
        with self.session() as s:
            q = select(AuditEvent.id).where(AuditEvent.project == project).limit(1)
            return s.scalar(q) is not None

    def verify_audit(self) -> chain.ChainCheck:
        """Walk the audit chain: the first row edited, inserted or deleted, if any."""
        with self.session() as s:
            return chain.verify(s)

    def refusals_since(self, project: str, since: datetime) -> int:
        """Unsolicited instances refused for a project since `since`."""
        with self.session() as s:
            q = select(func.count()).where(
                AuditEvent.project == project,
                AuditEvent.action == "store.refused",
                AuditEvent.at >= since,
            )
            return int(s.scalar(q) or 0)
