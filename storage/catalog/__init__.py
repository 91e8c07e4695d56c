"""The catalog (SQLAlchemy; SQLite or PostgreSQL) and every query made on it, by what it returns.

The tables are in `storage.models`; the database (engine, sessions, the access version) in
`storage.catalog.db`; the queries in one module per domain beside it. Callers (the pull, the CLI,
the web server, pipelines) hold one `Catalog` and ask it instead of writing their own `select`,
so a query has one definition and one name.
"""

from __future__ import annotations

from storage.catalog.audit import AuditQueries
from storage.catalog.cohorts import CohortQueries
from storage.catalog.db import Database
from storage.catalog.exports import ExportQueries
from storage.catalog.governance import GovernanceQueries
from storage.catalog.index import IndexQueries
from storage.catalog.jobs import JobQueries
from storage.catalog.locks import PullLockQueries
from storage.catalog.projects import DuplicateProject, ProjectQueries
from storage.catalog.requests import RequestQueries
from storage.catalog.results import ResultQueries
from storage.catalog.series import SeriesQueries
from storage.catalog.users import UserQueries
from storage.index import Hit
from storage.models import (
    AuditEvent,
    CohortItem,
    IndexedInstance,
    IndexedSeries,
    IndexedStudy,
    Job,
    Membership,
    PipelineResult,
    Project,
    PullLock,
    SeriesRecord,
    User,
    UserRole,
    WebSession,
    utcnow,
)

__all__ = [
    "AuditEvent",
    "Catalog",
    "CohortItem",
    "DuplicateProject",
    "Hit",
    "IndexedInstance",
    "IndexedSeries",
    "IndexedStudy",
    "Job",
    "Membership",
    "PipelineResult",
    "Project",
    "PullLock",
    "SeriesRecord",
    "User",
    "UserRole",
    "WebSession",
    "utcnow",
]


class Catalog(
    Database,
    ProjectQueries,
    CohortQueries,
    SeriesQueries,
    PullLockQueries,
    IndexQueries,
    UserQueries,
    ResultQueries,
    AuditQueries,
    GovernanceQueries,
    JobQueries,
    ExportQueries,
    RequestQueries,
):
    """Opens the catalog database; its methods are the queries the gateway makes."""
