"""Download links to an export that stop working after their time.

A link is a URL signed with the home's link key (`secrets/export-links.key`, made on first use),
served by `sphere serve` at `/exports/{id}/download`, which checks the signature, the time and
the project, and audits each download (or refusal). On a local folder the route streams the
zip; on S3 it redirects to a fresh presigned GET (the MinIO SDK) that lives a few minutes at
most (never past the link's own time), so the bytes still come straight from the bucket.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from core import Core, SphereError, access, home, projects
from storage.models import Export

MAX_HOURS = 24 * 7  # a week, S3's longest presigned URL too
REDIRECT_SECONDS = 300  # the presigned GET a download is sent to
KEY_FILE = "secrets/export-links.key"


def _secret(core: Core) -> bytes:
    path = Path(core.settings.home) / KEY_FILE
    if not path.exists():
        home.make_dir(path.parent)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # made by another process meanwhile
            pass
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
    return path.read_bytes()


def signature(core: Core, export_id: str, expires: int) -> str:
    msg = f"{export_id}:{expires}".encode()
    return hmac.new(_secret(core), msg, hashlib.sha256).hexdigest()


def valid(core: Core, export_id: str, expires: str, sig: str) -> bool:
    """Whether a link's signature is right and its time not over."""
    try:
        when = int(expires)
    except ValueError:
        return False
    right = hmac.compare_digest(signature(core, export_id, when), sig or "")
    return right and time.time() < when


def link(
    core: Core, export_id: str, hours: float, *, user: Any = None, base_url: str | None = None
) -> tuple[str, int]:
    """(URL, expiry as a Unix time) of a finished export, for `export` on its project (which
    must be active). Audited, as is each download through it."""
    row = core.catalog.export(export_id)
    if row is None:
        raise SphereError(f"no export '{export_id}' (see `sphere export list PROJECT`)")
    who = access.require(core, "export", row.project, user=user, export=export_id)
    projects.require_active(core, row.project, "export", actor=who.name)
    if row.state != "done":
        raise SphereError(f"export '{export_id}' is {row.state}: only a finished one has links")
    if not 0 < hours <= MAX_HOURS:
        raise SphereError(f"--hours is more than 0 and at most {MAX_HOURS}")
    expires = int(time.time() + hours * 3600)
    base = base_url or _public_url(core)
    query = urlencode({"expires": expires, "sig": signature(core, row.id, expires)})
    out = f"{base}/exports/{row.id}/download?{query}"
    core.catalog.audit(who.name, "export.link", row.project, export=row.id, hours=hours)
    return out, expires


def _public_url(core: Core) -> str:
    web = core.settings.web
    return (web.public_url or f"http://{web.host}:{web.port}").rstrip("/")


def presigned(core: Core, row: Export, expires: int) -> str | None:
    """A presigned GET of an export in an S3 store, living REDIRECT_SECONDS at most and never
    past `expires` (the link's time); None if the object is gone."""
    from minio import Minio
    from minio.error import S3Error

    url = core.settings.resolved_storage_url()
    if not url.startswith("s3://"):
        return None
    s3 = core.settings.s3
    parts = urlsplit(url)
    prefix = parts.path.strip("/")
    endpoint = urlsplit(s3.endpoint or "https://s3.amazonaws.com")
    client = Minio(
        endpoint.netloc,
        access_key=s3.access_key,
        secret_key=s3.secret_key,
        secure=endpoint.scheme == "https",
        region=s3.region,
    )
    key = f"{prefix}/{row.key}" if prefix else row.key
    try:
        client.stat_object(parts.netloc, key)
    except S3Error as e:
        if e.code in ("NoSuchKey", "NoSuchBucket"):
            return None
        raise
    seconds = max(1, min(REDIRECT_SECONDS, expires - int(time.time())))
    return client.presigned_get_object(parts.netloc, key, expires=timedelta(seconds=seconds))
