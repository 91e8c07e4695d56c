"""Sphere users, their API tokens, their global roles and their roles in projects. Every change
is audited; who may make it is `core.access`'s table, checked here for grants (the CLI and the
web make the same grant through `grant`).

A token is 32 random bytes, shown once; the catalog keeps only its SHA-256, so a copy of the
catalog signs nobody in.
"""

from __future__ import annotations

import getpass
import re
import secrets
from datetime import date
from typing import Any

from core import access
from core.access import TOKEN_PREFIX, NotAllowed, authenticate, token_hash
from core.core import Core
from core.errors import SphereError
from core.projects import NAME_RE, require_active
from storage.catalog import Project, User

ROLES = access.PROJECT_ROLES  # the roles in a project


class UserError(SphereError):
    """A user action that cannot be done (unknown user, taken name, bad role...)."""


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def add(core: Core, name: str, *, actor: str = "", os_account: str | None = None) -> str:
    """Create a user (mapped to an OS account if given); returns its first API token (shown
    once, stored hashed)."""
    if not NAME_RE.match(name):
        raise UserError(
            "user name must be 2-64 characters of lower-case letters, digits, '-' or '_'"
        )
    token = new_token()
    actor = actor or core.actor
    if not core.catalog.add_user(User(name=name, token_hash=token_hash(token), created_by=actor)):
        raise UserError(f"user '{name}' already exists")
    core.catalog.audit(actor, "user.add", None, user=name)
    if os_account:
        map_account(core, name, os_account, actor=actor)
    return token


def map_account(core: Core, name: str, login: str, *, actor: str = "") -> None:
    """Map an OS account to a user: the CLI run from that account acts as the user."""
    if not re.fullmatch(r"[A-Za-z0-9._@\\-]{1,128}", login):
        raise UserError("an OS account name is 1-128 letters, digits, '.', '_', '@', '\\' or '-'")
    user = _user(core, name)
    core.catalog.map_os_account(login, user.id)
    core.catalog.audit(actor or core.actor, "user.map", None, user=name, os_account=login)


def reissue(core: Core, name: str, *, actor: str = "") -> str:
    """A new token for an active user (the old one and its sessions stop working). A revoked
    user is refused: `enable` brings one back."""
    user = _user(core, name)
    if not user.active:
        core.catalog.audit(actor or core.actor, "user.token", None, "refused", user=name)
        raise UserError(f"user '{name}' is revoked: `sphere user enable {name}` brings it back")
    token = new_token()
    core.catalog.update_user(name, token_hash=token_hash(token))
    core.catalog.audit(actor or core.actor, "user.token", None, user=name)
    return token


def enable(core: Core, name: str, *, actor: str = "") -> str:
    """Bring a revoked user back, with a new token (returned, shown once)."""
    _user(core, name)
    token = new_token()
    core.catalog.update_user(name, token_hash=token_hash(token), active=True)
    core.catalog.audit(actor or core.actor, "user.enable", None, user=name)
    return token


def revoke(core: Core, name: str, *, actor: str = "") -> None:
    """Disable the user: its token and sessions stop working at once."""
    _user(core, name)
    core.catalog.update_user(name, active=False, token_hash=None)
    core.catalog.audit(actor or core.actor, "user.revoke", None, user=name)


def first_admin(core: Core) -> tuple[str, str] | None:
    """Make the OS account running this the home's first admin, once: when the catalog has no
    admin yet. Returns (user name, token), or None when there is an admin already."""
    if core.catalog.role_holders(access.ADMIN):
        return None
    login = getpass.getuser()
    name = re.sub(r"[^a-z0-9_-]", "-", login.lower()).strip("-")[:64]
    name = name if NAME_RE.match(name) else f"admin-{name}"[:64]
    user = core.catalog.user(name)
    if user is None:
        token = add(core, name, actor=login, os_account=login)
        user = core.catalog.user(name)
    else:  # a user of that name from before roles: it is the admin now, with a new token
        token = enable(core, name, actor=login)
        map_account(core, name, login, actor=login)
    assert user is not None
    core.catalog.add_user_role(user.id, access.ADMIN, login)
    core.catalog.audit(login, "role.grant", None, user=name, role=access.ADMIN, first=True)
    return name, token


def check_global_role(role: str) -> None:
    """`UserError` unless `role` is a global role (admin, data-manager, trusted-third-party)."""
    _known_role(role, access.GLOBAL_ROLES)


def set_role(core: Core, name: str, role: str, *, by_user: User, remove: bool = False) -> None:
    """Give (or take away) a global role: an admin's act, never on oneself (audited)."""
    _known_role(role, access.GLOBAL_ROLES)
    detail: dict[str, Any] = {"target": name, "role": role, "remove": remove or None}
    detail = {k: v for k, v in detail.items() if v is not None}
    access.require(core, "role.grant", user=by_user, **detail)
    target = _user(core, name)
    if target.id == by_user.id and not remove:
        _refuse(core, by_user, "role.grant", None, "nobody grants themselves a role", **detail)
    if remove:
        admins = core.catalog.role_holders(access.ADMIN)
        if role == access.ADMIN and [u.id for u in admins] == [target.id]:
            raise UserError("that would leave the home without an admin")
        core.catalog.remove_user_role(target.id, role)
    else:
        core.catalog.add_user_role(target.id, role, by_user.name)
    core.catalog.audit(by_user.name, "role.grant", None, **detail)


def grant(core: Core, project: str, name: str, role: str, *, by_user: User | None = None) -> bool:
    """Give `name` a role in `project`, as `by_user`, by the role table: a data manager (or
    admin) grants investigator or viewer; an investigator of the project grants viewer only,
    and never changes an investigator's role (its own included); nobody grants themselves.
    Without `by_user` (the Python API, trusted in-process code) no rule is applied.

    Returns False when `name` is no user and `by_user` may not manage users: the refusal is
    audited, and the caller answers as for a grant made, so names cannot be probed."""
    if by_user is not None and role in access.GLOBAL_ROLES:
        set_role(core, name, role, by_user=by_user)
        return True
    _known_role(role, access.PROJECT_ROLES if by_user is None else access.ROLES)
    p = core.project(project)
    if by_user is None:
        core.catalog.grant(p.id, _user(core, name).id, role, core.actor)
        core.catalog.audit(core.actor, "project.grant", p.name, user=name, role=role)
        return True
    access.require(core, "project.grant", p, user=by_user, target=name, role=role)
    roles = access.roles_of(core, by_user, p)
    manager = bool(roles & {access.ADMIN, access.DATA_MANAGER})
    if not manager and role != access.VIEWER:
        _refuse(
            core,
            by_user,
            "project.grant",
            p,
            "an investigator grants 'viewer' only",
            user=name,
            role=role,
        )
    target = core.catalog.user(name)
    if target is None:
        core.catalog.audit(
            by_user.name, "project.grant", p.name, "refused", role=role, reason="no such user"
        )
        if access.may(core, by_user, "user.add"):
            raise UserError(f"no user named '{name}' (see `sphere user add`)")
        return False
    if target.id == by_user.id:
        _refuse(
            core,
            by_user,
            "project.grant",
            p,
            "nobody grants themselves a role",
            user=name,
            role=role,
        )
    if not manager and core.catalog.role(p.id, target.id) == access.INVESTIGATOR:
        _refuse(
            core,
            by_user,
            "project.grant",
            p,
            "only a data manager changes an investigator's role",
            user=name,
            role=role,
        )
    if p.state(date.today()) != "declared":  # members may be named before the approval
        require_active(core, p.name, "project.grant", actor=by_user.name)
    core.catalog.grant(p.id, target.id, role, by_user.name)
    core.catalog.audit(by_user.name, "project.grant", p.name, user=name, role=role)
    return True


def _refuse(
    core: Core, by: User, action: str, project: Project | None, why: str, /, **detail: object
) -> None:
    core.catalog.audit(
        by.name, action, project.name if project else None, "refused", reason=why, **detail
    )
    raise NotAllowed(why)


def _known_role(role: str, allowed: tuple[str, ...]) -> None:
    if role not in allowed:
        raise UserError(f"unknown role '{role}': one of {', '.join(allowed)}")


def _user(core: Core, name: str) -> User:
    user = core.catalog.user(name)
    if user is None:
        raise UserError(f"no user named '{name}' (see `sphere user add`)")
    return user


__all__ = [
    "ROLES",
    "TOKEN_PREFIX",
    "NotAllowed",
    "UserError",
    "add",
    "authenticate",
    "check_global_role",
    "enable",
    "first_admin",
    "grant",
    "map_account",
    "reissue",
    "revoke",
    "set_role",
    "token_hash",
]
