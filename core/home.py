"""The home is its owner's only: files 0600, folders 0700, in every sphere process.

`owner_only()` at each process entry (the CLI, `sphere serve` and its workers, pipeline workers,
the Python API) sets the umask, so whatever sphere writes there after (catalog, vault, key, spool,
store, reports, exports, results files) is created owner-only. A home made before is tightened
when it is opened: its folder (which closes everything under it) and its databases.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)
UMASK = 0o077


def owner_only() -> None:
    """Files and folders this process creates from now on: the owner's only."""
    os.umask(UMASK)


def make_dir(path: Path) -> Path:
    """`path` (and missing parents) made as 0700."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def tighten(paths: Iterable[Path]) -> list[Path]:
    """Take group and other permissions off those of `paths` that have any; the ones changed."""
    changed = []
    for p in paths:
        try:
            mode = stat.S_IMODE(p.stat().st_mode)
            if mode & 0o077:
                p.chmod(mode & 0o700)
                changed.append(p)
        except (FileNotFoundError, NotADirectoryError):  # not made yet (or cannot be)
            continue
        except PermissionError:  # not ours (a shared folder given as home): leave it, say so
            log.warning("cannot make %s owner-only: not this account's", p)
    return changed


def sqlite_files(db: Path) -> list[Path]:
    """A SQLite database's file and its write-ahead log and shared-memory files."""
    return [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]


def loose(root: Path) -> list[str]:
    """Files and folders under `root` (itself included) that group or others may use."""
    out = []
    for p in [root, *root.rglob("*")]:
        if not p.is_symlink() and stat.S_IMODE(p.lstat().st_mode) & 0o077:
            out.append(f"{oct(stat.S_IMODE(p.lstat().st_mode))} {p.relative_to(root)}")
    return out
