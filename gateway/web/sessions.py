"""Sign-in sessions, kept server-side: the cookie holds a random value, the catalog a digest of
it (`WebSession`) with the user, an expiry and a fingerprint of the user's token digest.

Sign-out deletes the row, so the cookie is worth nothing after it even if kept; a new token
(`sphere user token`) or a revocation ends every session of that user at once (the fingerprint
or the user's state no longer matches)."""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from storage.catalog import Catalog, User, WebSession, utcnow

COOKIE = "sphere_session"
PREFIX = "ses_"


def fingerprint(token_hash: str | None) -> str:
    return (token_hash or "")[:16]


def digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()


def start(catalog: Catalog, user: User, lifetime_s: float) -> str:
    """A new session for this user, valid `lifetime_s` seconds: the cookie's value."""
    value = PREFIX + secrets.token_urlsafe(32)
    catalog.add_web_session(
        WebSession(
            digest=digest(value),
            user_id=user.id,
            token_fingerprint=fingerprint(user.token_hash),
            expires_at=utcnow() + timedelta(seconds=lifetime_s),
        )
    )
    return value


def well_formed(value: str) -> bool:
    """Whether a cookie could be one of ours (anything else is not looked up)."""
    return value.startswith(PREFIX) and len(value) < 100 and value.isascii()
