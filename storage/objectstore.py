"""One factory for the zarr stores series are written to: a local folder or S3.

`open_store("var/store")` or `open_store("file:///data/store")` gives a `LocalFolder`;
`open_store("s3://bucket/prefix", s3)` an `ObjectBucket` over obstore's S3 client, with
endpoint and credentials from `s3` (any object with the attributes of
`core.settings.S3Options`): both zarr stores and `storage.backends.Backend`s, the backend chosen
here once. Errors reaching the store surface as `StorageUnavailable`.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from obstore.store import S3Store
from zarr.abc.store import Store

from storage import backends
from storage.backends import LocalFolder, ObjectBucket
from storage.storeio import StorageUnavailable, guard, run

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig

__all__ = [
    "StorageUnavailable",
    "Upload",
    "check_store",
    "delete_keys",
    "delete_prefix",
    "guard",
    "leftovers",
    "local_path",
    "open_store",
    "run",
    "usage",
]


def open_store(
    url: str,
    s3: Any | None = None,
    *,
    read_only: bool = False,
    timeout_s: float = 30.0,
    connect_timeout_s: float = 5.0,
    retries: int = 2,
) -> LocalFolder | ObjectBucket:
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
    return LocalFolder(path, read_only=read_only)  # creates the folder on first write


def check_store(store: Store) -> None:
    """Make one cheap request to the store; raise StorageUnavailable if it fails."""
    backends.of(store).check()


def _s3_store(
    bucket: str,
    prefix: str,
    s3: Any | None,
    *,
    read_only: bool,
    timeout_s: float,
    connect_timeout_s: float,
    retries: int,
) -> ObjectBucket:
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
    return ObjectBucket(inner, read_only=read_only)


# -- what a prefix holds, and removing it (retention, opt-out) -------------------------------


def usage(store: Store, prefix: str) -> tuple[int, int]:
    """Objects and bytes under the folder `prefix` ("projects/p" never counts "projects/p2")."""
    sizes = backends.of(store).sizes(_folder(prefix))
    return len(sizes), sum(sizes)


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


# -- one large object written as a stream (exports) ------------------------------------------


class Upload:
    """An object written piece by piece, as its backend writes one (`Backend.writer`): on S3 a
    multipart upload, in a local folder a file renamed into place at `close`. `abort` leaves
    nothing behind."""

    def __init__(self, store: Store, key: str) -> None:
        self.key = key
        with guard("upload"):
            self._writer = backends.of(store).writer(key)

    def write(self, data: bytes) -> None:
        with guard("upload"):
            self._writer.write(data)

    def close(self) -> None:
        """Complete the object: it exists only from here."""
        with guard("upload"):
            self._writer.close()

    def abort(self) -> None:
        """Drop what was written (an unfinished multipart upload is never completed)."""
        self._writer.abort()


def local_path(store: Store, key: str) -> Path | None:
    """The file behind `key` in a local folder store; None for an object store."""
    return backends.of(store).file_of(_folder(key).rstrip("/"))
