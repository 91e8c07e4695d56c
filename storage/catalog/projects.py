"""The catalog's queries for projects."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from storage.catalog.db import Queries
from storage.models import Project


class DuplicateProject(Exception):
    """A project of that name exists already."""


class ProjectQueries(Queries):
    """Projects by name."""

    def project(self, name: str) -> Project | None:
        """The project of that name, or None."""
        with self.session() as s:
            return s.scalar(select(Project).where(Project.name == name))

    def projects(self) -> list[Project]:
        """Every project, by name."""
        with self.session() as s:
            return list(s.scalars(select(Project).order_by(Project.name)))

    def add_project(self, project: Project) -> None:
        """Insert a new project; `DuplicateProject` if the name is taken."""
        try:
            with self.session() as s:
                s.add(project)
        except IntegrityError:
            raise DuplicateProject(project.name) from None

    def update_project(self, name: str, **values: Any) -> bool:
        """Set columns of a project; False when there is no such project."""
        return self._update_one(Project, Project.name == name, values)
