"""Web users, their API tokens and their roles in projects. Every change is audited.

A token is 32 random bytes, shown once; the catalog keeps only its SHA-256, so a copy of the
catalog signs nobody in. Roles are per project: an investigator may also grant the viewer
role in that project; a data manager (the CLI) grants either.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from core.core import Core
from core.errors import SphereError
from core.projects import NAME_RE
from storage.catalog import User

ROLES = ("investigator", "viewer")
TOKEN_PREFIX = "sph_"


class UserError(SphereError):
    """A user action that cannot be done (unknown user, taken name, bad role...)."""


class NotAllowed(SphereError):
    """The acting user's role does not allow this."""


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def add(core: Core, name: str, *, actor: str = "") -> str:
    """Create a user; returns its first API token (shown once, stored hashed)."""
    if not NAME_RE.match(name):
        raise UserError(
            "user name must be 2-64 characters of lower-case letters, digits, '-' or '_'"
        )
    token = new_token()
    actor = actor or core.actor
    if not core.catalog.add_user(User(name=name, token_hash=token_hash(token), created_by=actor)):
        raise UserError(f"user '{name}' already exists")
    core.catalog.audit(actor, "user.add", None, user=name)
    return token


def reissue(core: Core, name: str, *, actor: str = "") -> str:
    """A new token for the user (the old one and its sessions stop working); re-activates."""
    _user(core, name)
    token = new_token()
    core.catalog.update_user(name, token_hash=token_hash(token), active=True)
    core.catalog.audit(actor or core.actor, "user.token", None, user=name)
    return token


def revoke(core: Core, name: str, *, actor: str = "") -> None:
    """Disable the user: its token and sessions stop working at once."""
    _user(core, name)
    core.catalog.update_user(name, active=False, token_hash=None)
    core.catalog.audit(actor or core.actor, "user.revoke", None, user=name)


def authenticate(core: Core, token: str) -> User | None:
    """The active user holding `token`, or None."""
    if not token or not token.startswith(TOKEN_PREFIX) or len(token) > 128:
        return None
    digest = token_hash(token)
    user = core.catalog.user_by_token_hash(digest)
    if user is None or not hmac.compare_digest(user.token_hash or "", digest):
        return None
    return user


def grant(
    core: Core,
    project: str,
    name: str,
    role: str,
    *,
    actor: str = "",
    by_user: User | None = None,
) -> None:
    """Give `name` a role in `project`. `by_user` (a web user acting) must be an investigator
    of the project and may grant only the viewer role; without it the actor is a data manager."""
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}")
    p = core.project(project)
    actor = actor or (by_user.name if by_user else core.actor)
    if by_user is not None:
        mine = core.catalog.role(p.id, by_user.id)
        if mine != "investigator" or role != "viewer":
            core.catalog.audit(
                actor, "project.grant", project, "refused", user=name, role=role, by_role=mine
            )
            raise NotAllowed("only an investigator of the project may grant, and only 'viewer'")
    user = _user(core, name)
    core.catalog.grant(p.id, user.id, role, actor)
    core.catalog.audit(actor, "project.grant", project, user=name, role=role)


def _user(core: Core, name: str) -> User:
    user = core.catalog.user(name)
    if user is None:
        raise UserError(f"no user named '{name}' (see `sphere user add`)")
    return user


__all__ = [
    "ROLES",
    "NotAllowed",
    "UserError",
    "add",
    "authenticate",
    "grant",
    "reissue",
    "revoke",
    "token_hash",
]
