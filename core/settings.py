"""Settings: embedded defaults, overridden by SPHERE_* environment variables or .env."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class PacsPeer(BaseModel):
    """The hospital PACS the gateway pulls from."""

    ae_title: str = "ORTHANC"
    host: str = "127.0.0.1"
    port: int = 4242
    retrieve: str = Field("move", description="'move' (C-MOVE back to us) or 'get' (C-GET)")


class S3Options(BaseModel):
    """Credentials and endpoint for S3-compatible storage (MinIO, SeaweedFS, AWS)."""

    endpoint: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    region: str = "us-east-1"
    allow_http: bool = True


class Settings(BaseSettings):
    """Everything the gateway needs to run. Paths default under `home`."""

    model_config = SettingsConfigDict(
        env_prefix="SPHERE_", env_nested_delimiter="__", env_file=".env", extra="ignore"
    )

    home: Path = Path("var")
    catalog_url: str | None = None  # default: sqlite under home
    vault_url: str | None = None  # re-identification store; default: its own sqlite under home
    storage_url: str | None = None  # folder path or s3://bucket/prefix; default: home/store
    s3: S3Options = S3Options()

    ae_title: str = "SPHERE"
    host: str = "127.0.0.1"
    port: int = 11112
    pacs: PacsPeer = PacsPeer()

    max_associations: int = 2
    receive_workers: int = 2  # Storage SCP worker processes (0: threads in the pull's process)
    timeout_s: float = 30.0
    retries: int = 3
    backoff_s: float = 1.0
    # Received instances are acknowledged once written to the spool on local disk, which is
    # flushed to stable storage (fdatasync) when each association ends; fsync_each flushes
    # before every acknowledgement instead (safe from power loss at once, far slower).
    fsync: bool = True  # off only for throwaway test data
    fsync_each: bool = False
    actor: str | None = None  # who is acting, for the audit trail; default: the OS user

    @property
    def spool_dir(self) -> Path:
        return self.home / "spool"

    def resolved_catalog_url(self) -> str:
        return self.catalog_url or f"sqlite:///{(self.home / 'catalog.db').resolve()}"

    def resolved_vault_url(self) -> str:
        return self.vault_url or f"sqlite:///{(self.home / 'vault.db').resolve()}"

    def resolved_storage_url(self) -> str:
        return self.storage_url or str((self.home / "store").resolve())
