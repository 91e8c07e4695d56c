"""The vault sealed: a copy of vault.db alone reveals nothing (scanned for planted identifiers),
rows are bound to their place, the research side (serve, pipelines, workers) runs without the
key and fails closed when something there asks for it, and a vault from before is sealed."""

from __future__ import annotations

import base64
import os
import sqlite3
from datetime import date, timedelta
from pathlib import Path

import psutil
import pydicom
import pytest
from sqlalchemy import create_engine, insert

from core import Core, Settings, Unavailable, VaultSealed, projects, users
from core.home import loose
from core.index import reindex
from deid.sealing import Tampered, VaultKey
from deid.vault import (
    TRUSTED_THIRD_PARTY,
    Vault,
    WrongVaultKey,
    cohort_table,
    mappings_table,
    metadata,
    secrets_table,
)
from tests.adversarial import ACCESSION, PATIENT, make_study

COHORT = ["ACC-PLANTED-0042", "IPP-PLANTED-7777"]
KEY = VaultKey(bytes(range(32)))


def forms(value: str | bytes) -> list[bytes]:
    """The ways a value may sit in a file: as is (UTF-8, UTF-16), hex, base64."""
    raw = value.encode() if isinstance(value, str) else value
    out = [raw, raw.hex().encode(), raw.hex().upper().encode()]
    out += [base64.b64encode(raw).rstrip(b"="), base64.urlsafe_b64encode(raw).rstrip(b"=")]
    if isinstance(value, str):
        out.append(value.encode("utf-16-le"))
    return out


def found(folder: Path, name: str, needles: list[str | bytes]) -> list[str | bytes]:
    """The needles in any form in the database file `name` and its -wal/-shm."""
    data = b"".join(p.read_bytes() for p in sorted(folder.glob(name + "*")))
    assert data.startswith(b"SQLite format 3")
    return [n for n in needles if any(f in data for f in forms(n))]


def plant(core: Core, tmp_path: Path) -> tuple[list[str | bytes], dict[str, str]]:
    """A project with a cohort and de-identified files (mappings): the identifiers planted,
    the project secret among them, and {pseudonym: original} of a few mappings."""
    projects.create(core, "pr")
    projects.add_cohort(core, "pr", "accession", COHORT[:1])
    projects.add_cohort(core, "pr", "patient_id", COHORT[1:])
    study = make_study(tmp_path / "study", n=2)
    deid = core.deidentifier("pr")
    pairs: dict[str, str] = {}
    for f in study.ct:
        ds = pydicom.dcmread(f)
        original = (str(ds.PatientID), str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))
        out = deid.apply(ds)
        pseudonyms = (str(out.PatientID), str(out.StudyInstanceUID), str(out.SOPInstanceUID))
        pairs |= dict(zip(pseudonyms, original, strict=True))
    deid.flush()
    core.vault.flush()
    secret = core.keys("pr")._secret
    needles: list[str | bytes] = [
        *COHORT,
        PATIENT["id"],
        ACCESSION,
        PATIENT["surname"],
        study.study_uid,
        secret,
    ]
    return needles + study.ct_sop_uids, pairs


def test_a_copy_of_the_vault_alone_reveals_nothing(tmp_path):
    core = Core(Settings(home=tmp_path / "home", fsync=False), create=True)
    needles, pairs = plant(core, tmp_path)
    home = tmp_path / "home"
    assert found(home, "vault.db", needles) == []  # open, its WAL included
    core.close()
    assert found(home, "vault.db", needles) == []
    # ... yet the trusted side reads everything back.
    again = Core(Settings(home=home))
    items = {(i.kind, i.value) for i in projects.cohort(again, "pr", purpose="test")}
    assert items == {("accession", COHORT[0]), ("patient_id", COHORT[1])}
    for pseudonym, original in pairs.items():
        assert (
            again.vault.lookup("pr", pseudonym, role=TRUSTED_THIRD_PARTY, actor="ttp") == original
        )
    assert again.keys("pr")._secret in needles  # the same secret: the same pseudonyms
    again.close()


def legacy_vault(path: Path, secret: bytes) -> list[str | bytes]:
    """A vault as written before sealing (plaintext rows); the values in it."""
    engine = create_engine(f"sqlite:///{path}")
    old = [t for t in metadata.sorted_tables if t.name != "vault_meta"]
    metadata.create_all(engine, tables=old)
    now = date.today()
    with engine.begin() as c:
        c.execute(insert(secrets_table).values(project="pr", secret=secret, created_at=now))
        c.execute(
            insert(mappings_table).values(
                project="pr", pseudonym="PSEUDO1", kind="patient", original=PATIENT["id"],
                first_seen=now,
            )
        )  # fmt: skip
        c.execute(
            insert(cohort_table).values(
                project="pr", kind="accession", digest="d1", original=ACCESSION, added_at=now
            )
        )
    engine.dispose()
    return [secret, PATIENT["id"], ACCESSION]


def test_a_vault_from_before_is_sealed_in_place_and_the_scan_sees_plaintext(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    secret = bytes(range(100, 132))
    planted = legacy_vault(home / "vault.db", secret)
    # Positive control: the same scan finds every planted value in the plaintext vault.
    assert found(home, "vault.db", planted) == planted
    core = Core(Settings(home=home))  # no key yet: one is made, the vault sealed with it
    vault = core.vault
    assert found(home, "vault.db", planted) == []  # free pages and WAL wiped too
    assert (home / "secrets" / "vault.key").stat().st_mode & 0o777 == 0o600
    assert vault.project_secret("pr") == secret
    assert vault.cohort("pr", actor="dm", purpose="t") == {("accession", "d1"): ACCESSION}
    assert vault.lookup("pr", "PSEUDO1", role=TRUSTED_THIRD_PARTY, actor="ttp") == PATIENT["id"]
    core.close()
    with pytest.raises(WrongVaultKey):  # sealed with the key made, no other
        Vault(f"sqlite:///{home / 'vault.db'}", KEY)


def test_a_wrong_key_or_a_moved_row_does_not_open(tmp_path):
    url = f"sqlite:///{tmp_path / 'vault.db'}"
    with Vault(url, KEY) as v:
        v.record_many("pr", [("patient", "MRN-A", "PA"), ("patient", "MRN-B", "PB")])
    with pytest.raises(WrongVaultKey):
        Vault(url, VaultKey.generate())
    # Swap the two sealed originals: each row's seal names its pseudonym, so neither opens.
    with sqlite3.connect(tmp_path / "vault.db") as c:
        q = "select original from vault_mappings where pseudonym=?"
        a, b = (c.execute(q, (p,)).fetchone()[0] for p in ("PA", "PB"))
        c.execute("update vault_mappings set original=? where pseudonym='PA'", (b,))
        c.execute("update vault_mappings set original=? where pseudonym='PB'", (a,))
    with Vault(url, KEY) as v, pytest.raises(Tampered):
        v.lookup("pr", "PA", role=TRUSTED_THIRD_PARTY, actor="ttp")
    # Through the core, a wrong key is one clear line that says what to check.
    home = tmp_path / "home"
    Core(Settings(home=home), create=True).vault.close()
    other = Settings(home=home, vault_key=base64.b64encode(bytes(32)).decode())
    with pytest.raises(VaultSealed, match="SPHERE_VAULT_KEY"):
        Core(other).vault  # noqa: B018
    with pytest.raises(VaultSealed, match="no vault key at"):
        Core(Settings(home=home, vault_key_file=tmp_path / "nowhere.key")).vault  # noqa: B018


def test_the_research_side_fails_closed_when_it_asks_for_the_vault(tmp_path):
    settings = Settings(home=tmp_path, fsync=False)
    with Core(settings, create=True) as core:
        projects.create(core, "pr")
        projects.add_cohort(core, "pr", "accession", COHORT[:1])
    research = Core(settings, research=True)  # the key file is right there: still never read
    assert research.project("pr").name == "pr"  # the catalog works
    with pytest.raises(VaultSealed, match="test_the_research_side_fails_closed"):
        research.vault  # noqa: B018
    with pytest.raises(VaultSealed, match="core.projects.cohort"):
        projects.cohort(research, "pr", purpose="test")
    with pytest.raises(VaultSealed, match="research side"):
        research.keys("pr")
    # A pipeline worker's core is the research side, and gets no key in its settings.
    from processing.worker import _core

    worker = _core(Settings(home=tmp_path, vault_key="x" * 44).model_dump_json())
    assert worker.research and worker.settings.vault_key is not None
    with pytest.raises(VaultSealed):
        worker.deidentifier("pr")


@pytest.fixture
def trusted(tmp_path, monkeypatch) -> tuple[Settings, Settings]:
    """A home whose vault key is kept apart (not under the home), with one stored series:
    (the trusted side's settings, the research side's, which have no key)."""
    from tests.processing_data import body_volume, ct_series, store_series

    for name in ("SPHERE_VAULT_KEY", "SPHERE_VAULT_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    ttp = Settings(home=home, vault_key_file=tmp_path / "ttp" / "vault.key", fsync=False)
    with Core(ttp, create=True) as core:
        projects.create(core, "pr")
        projects.add_cohort(core, "pr", "accession", COHORT[:1])
        today = date.today()
        projects.approve(
            core, "pr", committee_ref="C1", approved_on=today, expires_on=today + timedelta(9)
        )
    store_series(ttp, "pr", ct_series(body_volume(), seed=3), tmp_path / "spool")
    with Core(ttp) as core:
        reindex(core, "pr")
    research = Settings(home=home, fsync=False)
    assert not research.resolved_vault_key_file().exists()
    with pytest.raises(VaultSealed, match="no vault key"):  # positive control: no key here
        Core(research).vault  # noqa: B018
    return ttp, research


def test_serve_and_a_pipeline_run_without_the_vault_key(trusted, tmp_path, monkeypatch):
    from distributed import Client

    from harness.localpacs import free_port
    from harness.serve import start_sphere
    from processing.body_hu import BodyHu
    from processing.runner import local_cluster, run_pipeline
    from tests.web_server import fetch

    ttp, research = trusted
    with Core(ttp) as core:
        token = users.add(core, "reader")
        users.grant(core, "pr", "reader", "viewer")
    port = free_port()
    # Given a key by mistake, `sphere serve` never reads it and its workers don't inherit it.
    monkeypatch.setenv("SPHERE_VAULT_KEY", base64.b64encode(bytes(32)).decode())
    proc = start_sphere(research, port, workers=2)
    try:
        base = f"http://127.0.0.1:{port}"
        assert fetch(f"{base}/healthz").status == 200
        studies = fetch(f"{base}/projects/pr/dicom-web/studies", token)
        assert studies.status == 200 and len(studies.json()) == 1
        server = psutil.Process(proc.pid)
        assert "SPHERE_VAULT_KEY" in server.environ()  # positive control: it was given
        # Its job node (`sphere worker`: pulls, the trusted side) is started with the key;
        # the web's worker processes are not.
        nodes = [p for p in server.children() if "--parent" in p.cmdline()]
        trusted = {p.pid for n in nodes for p in [n, *n.children(recursive=True)]}
        web = [p for p in server.children(recursive=True) if p.pid not in trusted]
        assert web and not [w for w in web if "SPHERE_VAULT_KEY" in w.environ()]
    finally:
        proc.terminate()
        proc.wait(30)
    report = run_pipeline(research, "pr", BodyHu(), workers=1, progress=False)
    assert report.counts() == {"ok": 1}
    # The pipeline's own workers never see the key this process was given (still given after).
    cluster = local_cluster(workers=1)
    try:
        with Client(cluster) as client:
            # (A lambda: os.environ.get would be pickled with this process's environment.)
            seen = client.run(lambda: os.environ.get("SPHERE_VAULT_KEY"))
    finally:
        cluster.close()
    assert list(seen.values()) == [None] and "SPHERE_VAULT_KEY" in os.environ


def test_the_home_is_owner_only_and_a_home_made_before_is_tightened(tmp_path, umask_022):
    from tests.test_cli import sphere

    home = tmp_path / "home"
    study = make_study(tmp_path / "in", n=2)
    sphere("project", "create", "pr", home=home)
    sphere("cohort", "add", "pr", "--accession", ACCESSION, home=home)
    # an export is of an approved project only (projects.require_active)
    sphere("project", "approve", "pr", "--committee-ref", "C1", "--expires-on", "2099-01-01",
           home=home)  # fmt: skip
    out = home / "exports" / "deid"
    sphere("deid", *map(str, study.files), "--project", "pr", "--out", str(out), home=home)
    sphere("results", "pr", "--csv", str(home / "results.csv"), home=home)
    made = {p.relative_to(home).parts[0] for p in home.rglob("*")}
    assert {"catalog.db", "vault.db", "secrets", "exports", "results.csv"} <= made
    assert loose(home) == []
    # Positive control: a file others may read is what the same walk reports.
    (home / "exports" / "open.txt").touch()
    (home / "exports" / "open.txt").chmod(0o644)
    assert loose(home) == ["0o644 exports/open.txt"]

    # A home made before (a 0755 folder, 0644 databases) is made owner-only when next opened.
    home.chmod(0o755)
    for db in ("catalog.db", "vault.db"):
        (home / db).chmod(0o644)
    shown = sphere("cohort", "add", "pr", "--accession", "ACC-2", home=home)
    assert "made owner-only" in shown.stderr
    assert [m for m in loose(home) if "exports" not in m] == []
    # A local store kept outside the home is made owner-only when opened, as the home is.
    outside = tmp_path / "store"
    outside.mkdir(mode=0o755)
    outside.chmod(0o755)
    Core(Settings(home=home, storage_url=str(outside))).store  # noqa: B018
    assert loose(outside) == []


def test_a_store_folder_is_reported_tightened_only_when_it_was_loose(tmp_path, caplog):
    """The warning says what changed: once for a 0755 store folder, nothing on a later open
    (already 0700) or for a folder made owner-only from the start."""
    loose_dir, tight_dir = tmp_path / "loose", tmp_path / "tight"
    loose_dir.mkdir()
    loose_dir.chmod(0o755)
    tight_dir.mkdir(mode=0o700)
    opened = []
    for folder in (loose_dir, loose_dir, tight_dir):
        caplog.clear()
        with caplog.at_level("WARNING", logger="core.home"):
            Core(Settings(home=tmp_path / "home", storage_url=str(folder))).store  # noqa: B018
        opened.append([r.getMessage() for r in caplog.records if "owner-only" in r.getMessage()])
    assert opened == [[f"made owner-only (0700): the store's folder {loose_dir}"], [], []]


def test_with_postgresql_the_vault_has_its_own_database_and_role(pg_server, tmp_path):
    import psycopg

    with pg_server.connect() as c:
        for role in ("sphere_catalog", "sphere_vault"):
            c.execute(f"CREATE ROLE {role} LOGIN")
            c.execute(f"CREATE DATABASE {role} OWNER {role}")
            c.execute(f"REVOKE ALL ON DATABASE {role} FROM PUBLIC")

    def url(role: str, database: str) -> str:
        return f"postgresql+psycopg://{role}@127.0.0.1:{pg_server.port}/{database}"

    def connect(role: str, database: str) -> psycopg.Connection:
        return psycopg.connect(
            f"host=127.0.0.1 port={pg_server.port} user={role} dbname={database}"
        )

    # The research side's role cannot even connect to the vault's database...
    with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
        connect("sphere_catalog", "sphere_vault")
    connect("sphere_vault", "sphere_vault").close()  # positive control: its own role can
    settings = Settings(
        home=tmp_path,
        catalog_url=url("sphere_catalog", "sphere_catalog"),
        vault_url=url("sphere_vault", "sphere_vault"),
    )
    with Core(settings, create=True) as core:
        projects.create(core, "pr")
        projects.add_cohort(core, "pr", "accession", COHORT[:1])
        assert [i.value for i in projects.cohort(core, "pr", purpose="test")] == COHORT[:1]
    # ... nor can sphere given the catalog's role for the vault: one clear line.
    wrong = settings.model_copy(update={"vault_url": url("sphere_catalog", "sphere_vault")})
    with pytest.raises(Unavailable, match="permission denied"):
        Core(wrong).vault  # noqa: B018
    # What the vault's role wrote is sealed there too.
    with connect("sphere_vault", "sphere_vault") as c:
        rows = c.execute("select original from vault_cohort").fetchall()
    assert rows and COHORT[0] not in str(rows)


def test_a_key_file_others_may_read_is_named_and_a_bad_key_is_one_line(tmp_path, caplog):
    from core import vaultkey

    path = tmp_path / "vault.key"
    path.write_text(bytes(range(32)).hex())
    path.chmod(0o600)
    vaultkey.load(Settings(home=tmp_path, vault_key_file=path))
    assert "readable by others" not in caplog.text  # positive control below
    path.chmod(0o644)
    vaultkey.load(Settings(home=tmp_path, vault_key_file=path))
    assert "readable by others" in caplog.text
    path.write_text("not a key")
    with pytest.raises(VaultSealed, match="32 bytes"):
        vaultkey.load(Settings(home=tmp_path, vault_key_file=path))
    with pytest.raises(VaultSealed, match="SPHERE_VAULT_KEY: a vault key is 32 bytes"):
        vaultkey.load(Settings(home=tmp_path, vault_key="abcd"))


def test_a_postgresql_vault_from_before_is_sealed_and_its_old_rows_go(pg_server):
    url = pg_server.create_database("legacyvault")
    engine = create_engine(url)
    old = [t for t in metadata.sorted_tables if t.name != "vault_meta"]
    metadata.create_all(engine, tables=old)
    with engine.begin() as c:
        c.execute(
            insert(cohort_table).values(
                project="pr", kind="patient_id", digest="d1", original=PATIENT["id"],
                added_at=date.today(),
            )
        )  # fmt: skip

    def heap() -> bytes:  # the table's file on disk, as PostgreSQL wrote it
        with pg_server.connect() as c:
            c.execute("CHECKPOINT")
            root = c.execute("SHOW data_directory").fetchone()[0]
        with engine.connect() as c:
            path = c.exec_driver_sql("SELECT pg_relation_filepath('vault_cohort')").scalar()
        return (Path(root) / path).read_bytes()

    assert PATIENT["id"].encode() in heap()  # positive control: the plaintext is on disk
    with Vault(url, KEY) as vault:
        assert vault.cohort("pr", actor="dm", purpose="t") == {("patient_id", "d1"): PATIENT["id"]}
    assert PATIENT["id"].encode() not in heap()
    engine.dispose()
