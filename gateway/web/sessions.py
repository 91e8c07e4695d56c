"""Sign-in sessions: a cookie signed with a secret kept under SPHERE_HOME, nothing stored.

The cookie names the user, an expiry and a fingerprint of the user's current token digest, so
a new token (`sphere user token`) or a revocation ends every session of that user at once.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

COOKIE = "sphere_session"
SECRET_FILE = "web-secret"


def load_secret(home: Path) -> bytes:
    """The signing secret, created on first use (readable by the gateway's user only)."""
    path = Path(home) / SECRET_FILE
    try:
        return path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
    # Written aside and linked into place: a worker starting at the same time reads it whole.
    tmp = path.with_name(f"{SECRET_FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # another process made it first: use theirs
    finally:
        tmp.unlink()
    return path.read_bytes()


def fingerprint(token_hash: str | None) -> str:
    return (token_hash or "")[:16]


def make(secret: bytes, user_id: int, token_hash: str | None, lifetime_s: float) -> str:
    """A cookie value for this user, valid `lifetime_s` seconds."""
    body = f"{user_id}.{int(time.time() + lifetime_s)}.{fingerprint(token_hash)}"
    return f"{body}.{_sign(secret, body)}"


def read(secret: bytes, value: str) -> tuple[int, str] | None:
    """(user id, token fingerprint) of a valid, unexpired cookie; None otherwise."""
    body, _, sig = value.rpartition(".")
    if not body or not hmac.compare_digest(sig, _sign(secret, body)):
        return None
    try:
        user, expires, fp = body.split(".")
        if int(expires) < time.time():
            return None
        return int(user), fp
    except ValueError:
        return None


def _sign(secret: bytes, body: str) -> str:
    return hmac.new(secret, body.encode(), hashlib.sha256).hexdigest()
