"""Committing a series is one operation: store it, check it reads back, then index it, mark it
complete and audit it in one catalog transaction.

The index is built from the headers the writer had in memory (`SeriesInfo.headers`), never by
reading the series back from the store (on S3 a GET per headers chunk). Only the cheap
read-back check (`storage.series.unreadable`: the group's and arrays' metadata) reads, so a
series is never complete unless it opens whole. Rebuilding the index from the store is
`core.index.reindex`'s job.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from sqlalchemy.exc import SQLAlchemyError
from zarr.abc.store import Store

from storage.catalog import Catalog
from storage.series import SeriesError, SeriesInfo, SeriesWriter, delete_series, unreadable

T = TypeVar("T")


class Retry(Protocol):
    """How a store step is run: once, or again while the store is down (the pull's)."""

    def __call__(self, fn: Callable[[], T], what: str, /) -> T: ...


class SeriesUnreadable(SeriesError):
    """The stored series does not read back whole; it was removed again."""


class IndexingFailed(Exception):
    """The catalog part failed on the series' headers (not the database): nothing of it was
    kept, the stored series removed again."""


def once(fn: Callable[[], T], what: str, /) -> T:
    """Run a store step once (`Retry` without retries)."""
    return fn()


def commit_series(
    store: Store,
    catalog: Catalog,
    writer: SeriesWriter,
    key: str,
    *,
    project_id: int,
    series_uid: str,
    values: dict[str, Any],
    audit: dict[str, Any] | None = None,
    retry: Retry = once,
) -> SeriesInfo:
    """Store the writer's series at `key`, then, in one catalog transaction, index it from the
    headers the writer had, mark its row complete (with `values`: study, modality, ...) and
    append `audit` (its detail given the instances stored). Raises SeriesError (not one
    volume: the spool kept), SeriesUnreadable, the store's errors (the spool kept),
    SQLAlchemyError (the database) or IndexingFailed.
    A failure in the catalog part keeps nothing of it there (no index rows, not complete, no
    audit row); on IndexingFailed the stored series is removed too. On a database error it
    stays (the transaction may have committed as the connection was lost); a re-commit
    replaces it."""
    info = retry(lambda: writer.commit(store, key), "commit")
    try:
        problem = retry(lambda: unreadable(store, key, info.n_instances), "read-back")
    except Exception as e:
        problem = f"storage failed ({type(e).__name__})"
    if problem:
        _remove(store, key)
        raise SeriesUnreadable(problem)
    if audit is not None:  # what was stored, known now
        audit = {**audit, "detail": {**audit.get("detail", {}), "instances": info.n_instances}}
    row = {
        "expected": info.n_instances,  # unless `values` says what a source announced
        **values,
        "stored": info.n_instances,
        "nbytes": info.nbytes,
        "shape": list(info.shape),
    }
    try:
        catalog.commit_series(project_id, series_uid, key, info.headers, info.n_images, row, audit)
    except SQLAlchemyError:  # may have ended in COMMIT (a lost connection): the series kept
        raise
    except Exception as e:  # raised inside the transaction: certainly rolled back
        _remove(store, key)
        raise IndexingFailed(type(e).__name__) from e
    return info


def _remove(store: Store, key: str) -> None:
    """Not left looking whole to a store listing (best effort: the store may be down)."""
    with contextlib.suppress(Exception):
        delete_series(store, key)
