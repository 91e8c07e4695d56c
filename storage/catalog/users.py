"""The catalog's queries for users: accounts, web sessions, global roles, OS accounts and
project memberships."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from storage.catalog.db import Queries
from storage.models import (
    Membership,
    OsAccount,
    Project,
    User,
    UserRole,
    WebSession,
    get_or_add,
    utcnow,
)


class UserQueries(Queries):
    """Users and who may do what."""

    def user(self, name: str) -> User | None:
        with self.session() as s:
            return s.scalar(select(User).where(User.name == name))

    def user_by_token_hash(self, token_hash: str) -> User | None:
        """The active user holding this token digest, or None."""
        with self.session() as s:
            return s.scalar(
                select(User).where(User.token_hash == token_hash, User.active.is_(True))
            )

    def user_by_id(self, user_id: int) -> User | None:
        with self.session() as s:
            return s.get(User, user_id)

    # -- web sessions -------------------------------------------------------------------------

    def add_web_session(self, row: WebSession) -> None:
        """Keep a new sign-in (and forget the expired ones)."""
        with self.session() as s:
            s.execute(delete(WebSession).where(WebSession.expires_at < utcnow()))
            s.add(row)

    def web_session(self, digest: str) -> WebSession | None:
        """The unexpired session of that digest, or None."""
        with self.session() as s:
            row = s.scalar(select(WebSession).where(WebSession.digest == digest))
            return row if row is not None and row.expires_at > utcnow() else None

    def end_web_session(self, digest: str) -> None:
        with self.session() as s:
            s.execute(delete(WebSession).where(WebSession.digest == digest))

    def add_user(self, user: User) -> bool:
        """Insert a new user; False when the name is taken."""
        try:
            with self.session() as s:
                s.add(user)
        except IntegrityError:
            return False
        return True

    def update_user(self, name: str, **values: Any) -> bool:
        """Set columns of a user; False when there is no such user."""
        return self._update_one(User, User.name == name, values)

    def users(self) -> list[User]:
        """Every user, by name."""
        with self.session() as s:
            return list(s.scalars(select(User).order_by(User.name)))

    def user_roles(self, user_id: int) -> set[str]:
        """The global roles a user holds (admin, data-manager, trusted-third-party)."""
        with self.session() as s:
            return set(s.scalars(select(UserRole.role).where(UserRole.user_id == user_id)))

    def add_user_role(self, user_id: int, role: str, by: str) -> bool:
        """Give a user a global role; False when it held it already."""
        with self.session() as s:
            held = s.scalar(
                select(UserRole).where(UserRole.user_id == user_id, UserRole.role == role)
            )
            if held is None:
                s.add(UserRole(user_id=user_id, role=role, granted_by=by))
            return held is None

    def remove_user_role(self, user_id: int, role: str) -> bool:
        """Take a global role away; False when the user did not hold it."""
        with self.session() as s:
            held = s.scalar(
                select(UserRole).where(UserRole.user_id == user_id, UserRole.role == role)
            )
            if held is not None:
                s.delete(held)
            return held is not None

    def role_holders(self, role: str) -> list[User]:
        """The users holding a global role."""
        with self.session() as s:
            q = (
                select(User)
                .join(UserRole, UserRole.user_id == User.id)
                .where(UserRole.role == role)
            )
            return list(s.scalars(q.order_by(User.name)))

    def user_by_os_account(self, login: str) -> User | None:
        """The user an OS account is mapped to, or None."""
        with self.session() as s:
            q = select(User).join(OsAccount, OsAccount.user_id == User.id)
            return s.scalar(q.where(OsAccount.login == login))

    def map_os_account(self, login: str, user_id: int) -> None:
        """Map an OS account to a user (replacing that account's and that user's mapping)."""
        with self.session() as s:
            for old in s.scalars(
                select(OsAccount).where((OsAccount.login == login) | (OsAccount.user_id == user_id))
            ):
                s.delete(old)
            s.flush()
            s.add(OsAccount(login=login, user_id=user_id))

    def os_account(self, user_id: int) -> str | None:
        with self.session() as s:
            return s.scalar(select(OsAccount.login).where(OsAccount.user_id == user_id))

    def grant(self, project_id: int, user_id: int, role: str, by: str) -> None:
        """Give a user a role in a project (replacing the one it had)."""
        with self.session() as s:
            m = get_or_add(s, Membership, project_id=project_id, user_id=user_id)
            m.role, m.granted_by, m.granted_at = role, by, utcnow()

    def role(self, project_id: int, user_id: int) -> str | None:
        """The user's role in the project, or None when not a member."""
        with self.session() as s:
            return s.scalar(
                select(Membership.role).where(
                    Membership.project_id == project_id, Membership.user_id == user_id
                )
            )

    def membership(self, project: str, user_id: int) -> tuple[Project, str] | None:
        """The project of that name and the user's role in it; None unless both exist."""
        with self.session() as s:
            q = (
                select(Project, Membership.role)
                .join(Membership, Membership.project_id == Project.id)
                .where(Project.name == project, Membership.user_id == user_id)
            )
            row = s.execute(q).first()
            return (row[0], row[1]) if row is not None else None

    def user_projects(self, user_id: int) -> list[tuple[Project, str]]:
        """The projects a user is a member of, with the role, by name."""
        with self.session() as s:
            q = (
                select(Project, Membership.role)
                .join(Membership, Membership.project_id == Project.id)
                .where(Membership.user_id == user_id)
                .order_by(Project.name)
            )
            return [(p, r) for p, r in s.execute(q)]
