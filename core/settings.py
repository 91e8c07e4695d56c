"""Settings: embedded defaults, overridden by SPHERE_* environment variables or .env."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Where scripts/setup.sh puts OHIF's prebuilt files: the checkout's .viewer/ (an editable install).
DEFAULT_VIEWER_DIST = Path(__file__).resolve().parents[1] / ".viewer" / "dist"


def _check_windows(value: list[str]) -> list[str]:
    from core.windows import parse

    for w in value:
        parse(w)  # a ValueError says what is wrong
    return value


class PacsPeer(BaseModel):
    """The hospital PACS the gateway pulls from."""

    ae_title: str = "ORTHANC"
    host: str = "127.0.0.1"
    port: int = 4242
    retrieve: Literal["move", "get"] = "move"  # C-MOVE back to us, or C-GET
    cluster_limit: int | None = Field(None, ge=1)  # as Source's
    windows: list[str] = []  # as Source's

    _windows = field_validator("windows")(classmethod(lambda cls, v: _check_windows(v)))


class Source(BaseModel):
    """One PACS a cohort may be found on. DIMSE sources use `ae_title`, `host`, `port`;
    DICOMweb ones `url` (the service root, e.g. https://pacs/dicom-web) and their credentials."""

    name: str = "pacs"
    protocol: Literal["move", "get", "dicomweb"] = "move"
    ae_title: str = "ORTHANC"
    host: str = "127.0.0.1"
    port: int = 4242
    url: str | None = None
    username: str | None = None  # DICOMweb basic authentication
    password: str | None = Field(None, repr=False)
    token: str | None = Field(None, repr=False)  # DICOMweb bearer token
    ca_bundle: Path | None = None  # DICOMweb over https: the CAs to trust (default: the system's)
    # Associations or requests at once; default: max_associations.
    max_concurrent: int | None = None
    # At most this many associations (or requests) at once across every node and job (held in
    # the catalog); None: no limit beyond each node's max_concurrent.
    cluster_limit: int | None = Field(None, ge=1)
    # When it may be pulled from, local time: ["mon-fri 20:00-07:00", "sat-sun"]; [] always.
    windows: list[str] = []
    # At most this many instances a second from it, all nodes together (a bucket in the
    # catalog, taken a series at a time; up to a second's worth at once); None: no cap.
    max_rate: float | None = Field(None, gt=0)
    # A C-MOVE/C-GET answered 0xA7xx ("out of resources"): asked again after busy_backoff_s,
    # doubling, at most busy_retries times, before the series counts it as a failed attempt.
    busy_backoff_s: float = Field(30.0, ge=0)
    busy_retries: int = Field(3, ge=0)
    # The breaker: after this many calls in a row that get no answer, the source's work pauses;
    # one probe (C-ECHO, a QIDO query) every probe_s; resumes when it answers; gives up (the
    # calls waiting fail) after give_up_s.
    breaker_after: int = Field(2, ge=1)
    probe_s: float = Field(10.0, gt=0)
    give_up_s: float = Field(600.0, gt=0)

    _windows = field_validator("windows")(classmethod(lambda cls, v: _check_windows(v)))


class S3Options(BaseModel):
    """Credentials and endpoint for S3-compatible storage (MinIO, SeaweedFS, AWS)."""

    endpoint: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    region: str = "us-east-1"
    allow_http: bool = True


class WebOptions(BaseModel):
    """The DICOMweb server (`sphere serve`)."""

    host: str = "127.0.0.1"
    port: int = 8042
    workers: int = 1
    cors_origins: list[str] = []  # e.g. ["https://viewer.example.org"]; empty: no CORS
    session_hours: float = 8.0  # a sign-in cookie's lifetime
    max_results: int = 1000  # QIDO-RS results per request at most
    read_ahead_mb: int = 256  # frames read ahead from S3, kept in memory, per worker process
    # Proxies (addresses or networks, e.g. ["10.0.0.5", "10.1.0.0/16"]) whose `Forwarded` and
    # `X-Forwarded-*` headers are honoured; from anyone else they are ignored.
    trusted_proxies: list[str] = []
    max_body_kb: int = 1024  # a request body's size at most (sign-in, grants)
    header_timeout_s: float = 10.0  # a request's headers must arrive within this
    body_timeout_s: float = 30.0  # and its body within this after them
    max_failures: int = 10  # failed sign-ins or bad credentials a client address may make ...
    failure_window_s: float = 300.0  # ... in this long before it is answered 429
    search_max_rows: int = 100_000  # rows a QIDO-RS search may examine in Python at most
    search_timeout_s: float = 10.0  # and the time it may take
    # Who may read /metrics: a scraper sending this bearer token, or a client at one of these
    # addresses (networks) that came straight, not through a proxy. Nobody else.
    metrics_token: SecretStr | None = None
    metrics_from: list[str] = ["127.0.0.1", "::1"]
    # /readyz on a node that pulls (its spool folder exists): ready while the spool's disk has
    # this much free space (0: not checked).
    ready_spool_free_mb: int = 1024
    # This server's address as users reach it, for the export links `sphere export link` makes
    # on a local store (default: http://host:port).
    public_url: str | None = None


class JobOptions(BaseModel):
    """The job queue (`sphere worker`, `sphere serve`): leases, heartbeats, polling."""

    lease_s: float = 60.0  # a node silent this long loses its job to another node
    beat_s: float = 10.0  # heartbeat (and progress) interval; a cancel is noticed then
    poll_s: float = 2.0  # an idle node looks for work this often
    wait_s: float = 30.0  # a job that cannot run yet (pulled elsewhere, a peer away) waits this
    # A job node (`sphere worker`, the one `sphere serve` starts) lowers its CPU priority by
    # this (os.nice; its receive workers and pipeline runs with it): beside a web server, the
    # web answers first and the jobs take the CPU it leaves. 0: the same priority as the web.
    nice: int = Field(10, ge=0, le=19)


class Settings(BaseSettings):
    """Everything the gateway needs to run. Paths default under `home`."""

    model_config = SettingsConfigDict(
        env_prefix="SPHERE_", env_nested_delimiter="__", env_file=".env", extra="ignore"
    )

    home: Path = Path("var")
    catalog_url: str | None = None  # default: sqlite under home
    vault_url: str | None = None  # re-identification store; default: its own sqlite under home
    # The vault key (trusted side only; see core.vaultkey): 32 bytes as hex or base64, or a file.
    vault_key: SecretStr | None = None
    vault_key_file: Path | None = None  # default: home/secrets/vault.key
    storage_url: str | None = None  # folder path or s3://bucket/prefix; default: home/store
    s3: S3Options = S3Options()
    web: WebOptions = WebOptions()
    jobs: JobOptions = JobOptions()

    # This node's Storage SCP (C-MOVE destination): each node its own AE title and port, each
    # known to the PACS.
    ae_title: str = "SPHERE"
    host: str = "127.0.0.1"
    port: int = 11112
    pacs: PacsPeer = PacsPeer()
    # Several PACS: a JSON list of sources (SPHERE_SOURCES); empty means the one `pacs` above.
    sources: list[Source] = []

    max_associations: int = 2
    # Calling AE titles our Storage SCP accepts associations from (the PACS); None: any (an
    # instance nobody asked for is still refused and audited).
    allowed_callers: list[str] | None = None
    receive_workers: int = 2  # Storage SCP worker processes (0: threads in the pull's process)
    timeout_s: float = 30.0
    retries: int = 3
    backoff_s: float = 1.0
    # Received instances are acknowledged once written to the spool on local disk, which is
    # flushed to stable storage (fdatasync) when each association ends; fsync_each flushes
    # before every acknowledgement instead (safe from power loss at once, far slower).
    fsync: bool = True  # off only for throwaway test data
    spool_min_free_mb: float = 16.0  # a pull stops (cleanly) when the spool's disk has less free
    # A series' commit (or its read-back, its indexing) that the object store refuses is tried
    # again, the instances kept in the spool, for this long before the series fails.
    store_wait_s: float = Field(600.0, ge=0)
    fsync_each: bool = False
    # A project's data is kept this many days past its approval's expiry, then purged
    # (`sphere project purge --expired`, daily); `sphere project retain` sets another end.
    retention_grace_days: int = Field(90, ge=0)
    # The CLI's operator: a sphere user's API token; without it, the user the OS account is
    # mapped to (`core.access.operator`). SPHERE_ACTOR is no identity any more.
    token: str | None = Field(None, repr=False)
    viewer_dist: Path | None = DEFAULT_VIEWER_DIST  # OHIF's dist/, served at /viewer/
    log_format: Literal["text", "json"] = "text"  # json: one object per line (--log-format)

    def all_sources(self) -> list[Source]:
        """The PACS to pull from, the default first: `sources`, or the one `pacs`."""
        if self.sources:
            return list(self.sources)
        p = self.pacs
        return [
            Source(
                name="pacs",
                protocol=p.retrieve,
                ae_title=p.ae_title,
                host=p.host,
                port=p.port,
                cluster_limit=p.cluster_limit,
                windows=p.windows,
            )
        ]

    @property
    def spool_dir(self) -> Path:
        return self.home / "spool"

    def resolved_catalog_url(self) -> str:
        return self.catalog_url or f"sqlite:///{(self.home / 'catalog.db').resolve()}"

    def resolved_vault_url(self) -> str:
        return self.vault_url or f"sqlite:///{(self.home / 'vault.db').resolve()}"

    def resolved_vault_key_file(self) -> Path:
        return self.vault_key_file or self.home / "secrets" / "vault.key"

    def resolved_storage_url(self) -> str:
        return self.storage_url or str((self.home / "store").resolve())


def load_settings(home: Path | None = None) -> Settings:
    """The settings from SPHERE_* variables (and .env), `home` overriding SPHERE_HOME; a value
    that cannot be read is a `NotSetUp` naming the variable, never the value (a password)."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from core.errors import NotSetUp

    try:
        return Settings(home=home) if home else Settings()
    except SettingsError as e:  # not JSON where JSON is needed (SPHERE_SOURCES, SPHERE_WEB...)
        found = re.search(r'field "(\w+)"', str(e))
        name = f"SPHERE_{found[1].upper()}" if found else "a SPHERE_* variable"
        raise NotSetUp(f"{name} is not valid JSON (see README for its shape)") from None
    except ValidationError as e:
        wrong = "; ".join(_variable(x["loc"]) + f": {x['msg']}" for x in e.errors())
        raise NotSetUp(f"settings (SPHERE_* variables or .env): {wrong}") from None


def _variable(loc: tuple[int | str, ...]) -> str:
    """SPHERE_SOURCES (item 0, port), from a validation error's location."""
    head, rest = str(loc[0]).upper(), [str(x) for x in loc[1:]]
    inside = f" ({', '.join(f'item {x}' if x.isdigit() else x for x in rest)})" if rest else ""
    return f"SPHERE_{head}{inside}"
