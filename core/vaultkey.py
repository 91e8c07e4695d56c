"""Where the vault key comes from, on the trusted side only.

SPHERE_VAULT_KEY (32 bytes as hex or base64), else the file SPHERE_VAULT_KEY_FILE, else the
embedded default HOME/secrets/vault.key, made (0600) when a home is created so that a demo works
as it is. In production the key lives elsewhere, readable by the trusted third party's account
only: a copy of the home then holds the vault sealed. The research side never reads it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from core.errors import VaultSealed
from core.home import make_dir
from core.settings import Settings
from deid.sealing import VaultKey, new_key_text

log = logging.getLogger(__name__)
HOW = "set SPHERE_VAULT_KEY_FILE (or SPHERE_VAULT_KEY) to the trusted third party's key"


def load(settings: Settings, *, create: bool = False) -> VaultKey:
    """The vault key; with `create`, a key file is made where none is (a new home)."""
    if settings.vault_key is not None:
        try:
            return VaultKey.from_text(settings.vault_key.get_secret_value())
        except ValueError as e:
            raise VaultSealed(f"SPHERE_VAULT_KEY: {e}") from None
    path = settings.resolved_vault_key_file()
    try:
        text = path.read_text()
    except FileNotFoundError:
        if not create:
            raise VaultSealed(f"no vault key at {path}: {HOW}") from None
        text = _write_new(path)
    except OSError as e:
        raise VaultSealed(f"the vault key file {path} cannot be read ({e.strerror})") from None
    if path.stat().st_mode & 0o077:
        log.warning("the vault key file %s is readable by others than its owner: chmod 600", path)
    try:
        return VaultKey.from_text(text)
    except ValueError as e:
        raise VaultSealed(f"the vault key file {path}: {e}") from None


def _write_new(path: Path) -> str:
    """A new key in `path` (0600, its folder 0700), unless another process made it first."""
    make_dir(path.parent)
    tmp = path.with_name(f"{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(new_key_text() + "\n")
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)  # never over a key another process made meanwhile
        log.info("vault key made at %s: keep it apart from the research data (README)", path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_text()


def keep_out_of_environment() -> None:
    """Drop the vault key's variables from this process's environment, so that the processes
    it starts (server and pipeline workers: the research side) never inherit them."""
    for name in ("SPHERE_VAULT_KEY", "SPHERE_VAULT_KEY_FILE"):
        os.environ.pop(name, None)
