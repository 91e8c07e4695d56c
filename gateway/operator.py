"""The CLI's core and its operator's check, for every command module: `acting(ctx, action,
project)` is the core once the operator (SPHERE_TOKEN's user, else the OS account's) may do
`action` by `core.access`'s table; a refusal is audited and is one line, exit 2."""

from __future__ import annotations

from typing import Any

import typer

from core import Core, access


def core(ctx: typer.Context, *, create: bool = False) -> Core:
    """The core for this command; `create` only for commands that may start a new home."""
    return Core(ctx.find_root().obj["settings"], create=create)


def acting(ctx: typer.Context, action: str, project: str | None = None, **detail: Any) -> Core:
    """The core, once the CLI's operator may do `action` (on `project`)."""
    c = core(ctx)
    access.require(c, action, project, **detail)
    return c
