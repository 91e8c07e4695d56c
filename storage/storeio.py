"""Running store calls and telling what their failures mean, for every backend.

zarr's store API is async; `run` drives it on zarr's own loop. `guard` turns the failures of
an unreachable store (obstore's errors, a full or unreadable disk) into `StorageUnavailable`,
whose message holds no key and no PHI.
"""

from __future__ import annotations

import os
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import obstore.exceptions as obs_errors
from zarr.core.sync import sync

T = TypeVar("T")

# Failures that mean "the store cannot be used right now", as opposed to a bug in our code.
# obstore reports connection errors, timeouts and 5xx as GenericError after its retries.
_UNAVAILABLE = (obs_errors.BaseError, TimeoutError, ConnectionError)


class StorageUnavailable(RuntimeError):
    """The object store cannot be reached or refused the request (message holds no PHI)."""


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a store coroutine on zarr's event loop (the one its sync API uses)."""
    return sync(coro)


@contextmanager
def guard(action: str) -> Iterator[None]:
    """Turn store access failures inside the block into StorageUnavailable (no PHI)."""
    try:
        yield
    except StorageUnavailable:
        raise
    except FileNotFoundError:
        raise
    except _UNAVAILABLE as exc:
        raise StorageUnavailable(
            f"object store unavailable during {action}: {type(exc).__name__}"
        ) from exc
    except OSError as exc:  # local folder: disk full, permissions, read-only file system
        raise StorageUnavailable(
            f"storage folder unavailable during {action}: {os.strerror(exc.errno or 0)}"
        ) from exc
