"""One factory for the zarr stores series are written to: a local folder or S3.

`open_store("var/store")` or `open_store("file:///data/store")` gives a `zarr.storage.LocalStore`;
`open_store("s3://bucket/prefix", s3)` a `zarr.storage.ObjectStore` over obstore's S3 client,
with endpoint and credentials from `s3` (any object with the attributes of
`core.settings.S3Options`). Errors reaching the store surface as `StorageUnavailable`.
"""

from __future__ import annotations

import os
from collections.abc import Coroutine, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlsplit

import obstore.exceptions as obs_errors
from obstore.store import S3Store
from zarr.abc.store import Store
from zarr.core.sync import sync
from zarr.storage import LocalStore, ObjectStore

if TYPE_CHECKING:
    from obstore import ObjectMeta
    from obstore.store import ClientConfig, RetryConfig

T = TypeVar("T")

# Failures that mean "the store cannot be used right now", as opposed to a bug in our code.
# obstore reports connection errors, timeouts and 5xx as GenericError after its retries.
_UNAVAILABLE = (obs_errors.BaseError, TimeoutError, ConnectionError)


class StorageUnavailable(RuntimeError):
    """The object store cannot be reached or refused the request (message holds no PHI)."""


def open_store(
    url: str,
    s3: Any | None = None,
    *,
    read_only: bool = False,
    timeout_s: float = 30.0,
    connect_timeout_s: float = 5.0,
    retries: int = 2,
) -> Store:
    """Open the zarr store at `url`: a folder path, `file://` URL or `s3://bucket[/prefix]`.

    For S3, `timeout_s` bounds each request, `connect_timeout_s` the connect phase and
    `retries` the retries obstore makes (with backoff) before giving up, so a store that is
    down fails within seconds instead of hanging.
    """
    parts = urlsplit(url)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError("s3 storage URL needs a bucket: s3://bucket/prefix")
        return _s3_store(
            parts.netloc,
            unquote(parts.path).strip("/"),
            s3,
            read_only=read_only,
            timeout_s=timeout_s,
            connect_timeout_s=connect_timeout_s,
            retries=retries,
        )
    if parts.scheme == "file":
        path = Path(unquote(parts.path))
    elif parts.scheme == "":
        path = Path(url)
    else:
        raise ValueError(f"unsupported storage URL scheme {parts.scheme!r}")
    return LocalStore(path, read_only=read_only)  # creates the folder on first write


def check_store(store: Store) -> None:
    """Make one cheap request to the store; raise StorageUnavailable if it fails."""
    with guard("check"):
        run(store.exists("zarr.json"))


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


def _s3_store(
    bucket: str,
    prefix: str,
    s3: Any | None,
    *,
    read_only: bool,
    timeout_s: float,
    connect_timeout_s: float,
    retries: int,
) -> ObjectStore:
    config: dict[str, Any] = {}
    for attr, key in (
        ("endpoint", "endpoint"),
        ("access_key", "access_key_id"),
        ("secret_key", "secret_access_key"),
        ("region", "region"),
    ):
        value = getattr(s3, attr, None) if s3 is not None else None
        if value:
            config[key] = value
    allow_http = bool(getattr(s3, "allow_http", False)) if s3 is not None else False
    client: ClientConfig = {
        "allow_http": allow_http,
        "timeout": timedelta(seconds=timeout_s),
        "connect_timeout": timedelta(seconds=connect_timeout_s),
    }
    retry: RetryConfig = {
        "max_retries": retries,
        "retry_timeout": timedelta(seconds=max(timeout_s, 1.0)),
        "backoff": {
            "init_backoff": timedelta(milliseconds=100),
            "max_backoff": timedelta(seconds=2),
            "base": 2,
        },
    }
    inner = S3Store(
        bucket,
        prefix=prefix or None,
        client_options=client,
        retry_config=retry,
        **config,
    )
    return ObjectStore(inner, read_only=read_only)


# -- what a prefix holds, and removing it (retention, opt-out) -------------------------------


def usage(store: Store, prefix: str) -> tuple[int, int]:
    """Objects and bytes under the folder `prefix` ("projects/p" never counts "projects/p2")."""
    folder = _folder(prefix)
    with guard("list"):
        if isinstance(store, ObjectStore):  # one listing gives the sizes: no request per object
            metas = run(_object_metas(store, folder))
            return len(metas), sum(int(m["size"]) for m in metas)
        keys = run(_keys(store, folder))
        return len(keys), sum(run(store.getsize(k)) for k in keys)


def leftovers(store: Store, prefix: str) -> list[str]:
    """Every key still under the folder `prefix`: empty once it is deleted."""
    with guard("list"):
        return sorted(run(_keys(store, _folder(prefix))))


def delete_prefix(store: Store, prefix: str) -> tuple[int, int]:
    """Remove every object under the folder `prefix`; returns the objects and bytes removed.
    Checked after: a key still there raises `StorageUnavailable` (named by count, not key)."""
    counted = usage(store, prefix)
    with guard("delete"):
        run(store.delete_dir(_folder(prefix)))
    left = leftovers(store, prefix)
    if left:
        raise StorageUnavailable(f"{len(left)} objects still under a deleted prefix")
    return counted


def delete_keys(store: Store, keys: Iterable[str]) -> tuple[int, int]:
    """Remove these objects (those that exist); returns the objects and bytes removed."""
    n = nbytes = 0
    with guard("delete"):
        for key in keys:
            if run(store.exists(key)):
                nbytes += run(store.getsize(key))
                run(store.delete(key))
                n += 1
    return n, nbytes


def _folder(prefix: str) -> str:
    parts = prefix.strip("/").split("/")
    if not prefix.strip("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError("a prefix must be a relative folder like projects/p")
    return "/".join(parts) + "/"


async def _keys(store: Store, folder: str) -> list[str]:
    return [k async for k in store.list_prefix(folder) if k.startswith(folder)]


async def _object_metas(store: ObjectStore, folder: str) -> Sequence[ObjectMeta]:
    import obstore as obs

    return await obs.list(store.store, prefix=folder).collect_async()


# -- one large object written as a stream (exports) ------------------------------------------


class Upload:
    """An object written piece by piece: on S3 a multipart upload (obstore), in a local folder
    a file renamed into place at `close`. `abort` leaves nothing behind."""

    def __init__(self, store: Store, key: str) -> None:
        self.key = key
        self._path: Path | None = None
        with guard("upload"):
            if isinstance(store, ObjectStore):
                import obstore as obs

                self._writer: Any = obs.open_writer(store.store, key)
            else:
                self._path = _root(store) / key
                self._path.parent.mkdir(parents=True, exist_ok=True)
                self._writer = open(self._path.with_name(self._path.name + ".part"), "wb")  # noqa: SIM115

    def write(self, data: bytes) -> None:
        with guard("upload"):
            self._writer.write(data)

    def close(self) -> None:
        """Complete the object: it exists only from here."""
        with guard("upload"):
            self._writer.close()
            if self._path is not None:
                os.replace(self._path.with_name(self._path.name + ".part"), self._path)

    def abort(self) -> None:
        """Drop what was written (an unfinished multipart upload is never completed)."""
        if self._path is not None:
            self._writer.close()
            self._path.with_name(self._path.name + ".part").unlink(missing_ok=True)


def local_path(store: Store, key: str) -> Path | None:
    """The file behind `key` in a local folder store; None for an object store."""
    if isinstance(store, ObjectStore):
        return None
    return _root(store) / _folder(key).rstrip("/")


def _root(store: Store) -> Path:
    """The folder of a local store (every store here that is not an ObjectStore)."""
    if not isinstance(store, LocalStore):
        raise TypeError(f"not a folder store: {type(store).__name__}")
    return Path(store.root)
