"""Who may do what: the one role table (`ACTIONS`) and the one rule (`may`), for the CLI, the
web and the jobs alike.

Roles are global (held by a user: admin, data-manager, trusted-third-party; `user_roles` in the
catalog) or per project (investigator, viewer; `memberships`). A project role counts only for
actions on that project. The CLI acts as a known operator (`operator`): the user whose token is
SPHERE_TOKEN, else the user the OS account is mapped to. Every refusal is audited.
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
from collections.abc import Iterable
from typing import Any

from core.errors import NotAllowed, SphereError
from storage.catalog import Project, User

# `core` below is a `core.Core` (not imported: it imports this module).
Core = Any
TOKEN_PREFIX = "sph_"

ADMIN = "admin"
DATA_MANAGER = "data-manager"
TRUSTED_THIRD_PARTY = "trusted-third-party"
INVESTIGATOR = "investigator"
VIEWER = "viewer"
GLOBAL_ROLES = (ADMIN, DATA_MANAGER, TRUSTED_THIRD_PARTY)
PROJECT_ROLES = (INVESTIGATOR, VIEWER)
ROLES = GLOBAL_ROLES + PROJECT_ROLES

_VIEWER = {"project.read", "study.read", "results.read", "jobs.read"}
_INVESTIGATOR = _VIEWER | {"pipeline.run", "export", "project.grant", "jobs.submit", "jobs.cancel"}
_INVESTIGATOR |= {"request.submit", "request.read"}  # a study set asked for, and followed
_TRUSTED = {"project.read", "cohort.read", "cohort.values", "vault.lookup", "vault.audit"}
_TRUSTED |= {"optout.manage", "omop.export"}  # results to the warehouse: re-identifies
_DATA_MANAGER = {
    "project.create", "project.approve", "project.revoke", "project.read", "project.grant",
    "project.purge", "project.reindex", "cohort.add", "cohort.remove", "cohort.read", "pull",
    "pacs.echo", "pipeline.run", "results.read", "export", "audit.read", "audit.verify",
    "serve", "deid.files", "jobs.submit", "jobs.read", "jobs.cancel", "request.read",
    "request.decide",
}  # fmt: skip
# The admin manages users and global roles, and does what a data manager does, but never
# reads the vault: re-identification is the trusted third party's alone.
_ADMIN = _DATA_MANAGER | {"user.add", "user.map", "user.read", "user.token", "user.revoke"}
_ADMIN |= {"user.enable", "role.grant"}

_BY_ROLE = {
    ADMIN: _ADMIN,
    DATA_MANAGER: _DATA_MANAGER,
    TRUSTED_THIRD_PARTY: _TRUSTED,
    INVESTIGATOR: _INVESTIGATOR,
    VIEWER: _VIEWER,
}
# action -> the roles that may do it: the table README's governance section shows.
ACTIONS: dict[str, frozenset[str]] = {
    action: frozenset(role for role, allowed in _BY_ROLE.items() if action in allowed)
    for action in sorted(set().union(*_BY_ROLE.values()))
}


def allows(action: str, roles: Iterable[str]) -> bool:
    """Whether any of `roles` may do `action` (unknown actions: a programming error)."""
    try:
        allowed = ACTIONS[action]
    except KeyError:
        raise ValueError(f"no action '{action}' in core.access.ACTIONS") from None
    return not allowed.isdisjoint(roles)


def roles_of(core: Core, user: User, project: str | Project | None = None) -> set[str]:
    """The user's global roles, and its role in `project` when it has one."""
    held = core.catalog.user_roles(user.id)
    if project is not None:
        p = core.catalog.project(project) if isinstance(project, str) else project
        role = core.catalog.role(p.id, user.id) if p is not None else None
        if role:
            held.add(role)
    return held


def may(core: Core, user: User | None, action: str, project: str | Project | None = None) -> bool:
    """The one rule: may `user` do `action` (on `project`)? No side effect."""
    if user is None or not user.active:
        allows(action, ())  # an unknown action is still an error
        return False
    return allows(action, roles_of(core, user, project))


def require(
    core: Core,
    action: str,
    project: str | Project | None = None,
    *,
    user: User | None = None,
    **detail: object,
) -> User:
    """The acting user (default: the CLI's operator) when it may do `action`; else the refusal
    is audited and `NotAllowed` raised."""
    who = user if user is not None else core.operator
    if may(core, who, action, project):
        return who
    name = project if isinstance(project, str) or project is None else project.name
    core.catalog.audit(who.name, action, name, "refused", **detail)
    where = f" on project '{name}'" if name else ""
    roles = ", ".join(r for r in ROLES if r in ACTIONS[action]) or "none"
    raise NotAllowed(f"{who.name} may not {action}{where} (roles that may: {roles})")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def authenticate(core: Core, token: str) -> User | None:
    """The active user holding the API token `token`, or None."""
    if not token or not token.startswith(TOKEN_PREFIX) or len(token) > 128:
        return None
    digest = token_hash(token)
    user = core.catalog.user_by_token_hash(digest)
    if user is None or not hmac.compare_digest(user.token_hash or "", digest):
        return None
    return user


def operator(core: Core) -> User:
    """The sphere user the CLI acts as: SPHERE_TOKEN's, else the OS account's mapping."""
    login = _login()
    token = core.settings.token
    if token:
        user = authenticate(core, token.strip())
        how = "SPHERE_TOKEN is not the token of an active sphere user"
    else:
        user = core.catalog.user_by_os_account(login)
        how = (
            f"you are not a sphere user: OS account '{login}' is mapped to none "
            "(an admin runs `sphere user map NAME LOGIN`), and SPHERE_TOKEN is not set"
        )
        if user is not None and not user.active:
            how = f"sphere user '{user.name}' (OS account '{login}') is revoked"
            user = None
    if user is None:
        core.catalog.audit(f"os:{login}", "operator", None, "refused", reason=how.split(":")[0])
        raise NotAllowed(how)
    return user


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        raise SphereError("the OS account has no name; set SPHERE_TOKEN") from None


__all__ = [
    "ACTIONS",
    "ADMIN",
    "DATA_MANAGER",
    "GLOBAL_ROLES",
    "INVESTIGATOR",
    "PROJECT_ROLES",
    "ROLES",
    "TRUSTED_THIRD_PARTY",
    "VIEWER",
    "NotAllowed",
    "allows",
    "authenticate",
    "may",
    "operator",
    "require",
    "roles_of",
    "token_hash",
]
