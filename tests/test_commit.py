"""Committing a series is one operation (`storage.commit.commit_series`): the index is built
from the headers the writer had (no chunk read back from S3), the catalog part is one
transaction (SQLite and PostgreSQL), and it indexes exactly what `reindex` rebuilds from the
store."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from core.core import Core
from core.index import index_stored, reindex
from core.settings import S3Options, Settings
from dicom.query import Level, Query
from harness.storecount import chunks, counting
from harness.synthetic import generate
from storage.catalog import (
    AuditEvent,
    Catalog,
    IndexedInstance,
    IndexedSeries,
    IndexedStudy,
    Project,
    SeriesRecord,
)
from storage.commit import commit_series
from storage.objectstore import open_store
from storage.series import SeriesWriter, series_key

PROJECT = "c"


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> list[list[Dataset]]:
    """One study of two CT series (12 slices of 16² each), each series in stack order."""
    corpus = generate(
        tmp_path_factory.mktemp("ct"), n_patients=1, series_per_study=2, slices=12, size=16
    )
    by_series: dict[str, list[Dataset]] = {}
    for f in corpus.files:
        ds = pydicom.dcmread(f)
        by_series.setdefault(ds.SeriesInstanceUID, []).append(ds)
    return [by_series[uid] for uid in sorted(by_series)]


def key_of(dss: Sequence[Dataset]) -> str:
    return series_key(PROJECT, dss[0].StudyInstanceUID, dss[0].SeriesInstanceUID)


def commit(store: Any, catalog: Catalog, dss: Sequence[Dataset], spool: Any) -> Any:
    """`commit_series` of `dss` as the pull calls it: values, an audit row."""
    uid = str(dss[0].SeriesInstanceUID)
    writer = SeriesWriter(spool / uid, fsync=False)
    for ds in dss:
        writer.add(ds)
    return commit_series(
        store,
        catalog,
        writer,
        key_of(dss),
        project_id=project_id(catalog),
        series_uid=uid,
        values={"study_uid": str(dss[0].StudyInstanceUID), "modality": "CT"},
        audit={
            "actor": "test",
            "action": "series.stored",
            "project": PROJECT,
            "detail": {"series": uid},
        },
    )


def project_id(catalog: Catalog) -> int:
    project = catalog.project(PROJECT)
    assert project is not None
    return project.id


def site(tmp_path, **settings: Any) -> Core:
    core = Core(Settings(home=tmp_path / "home", fsync=False, **settings), create=True)
    core.catalog.add_project(Project(name=PROJECT, title=""))
    return core


def searches(catalog: Catalog) -> dict[Level, list[Any]]:
    """Every QIDO-RS result of the project, at each level."""
    pid = project_id(catalog)
    return {level: catalog.search(pid, Query(level)) for level in Level}


@pytest.mark.peers
def test_a_commit_to_s3_reads_no_chunk_back_for_the_index(tmp_path, study, s3_server):
    core = site(
        tmp_path,
        storage_url=s3_server.url(s3_server.new_bucket(), "research"),
        s3=S3Options(**vars(s3_server.options())),
    )
    store, gets = counting(core.store)
    dss = study[0]
    info = commit(store, core.catalog, dss, tmp_path / "spool")
    assert info.n_instances == len(dss)
    assert gets, "the counter sees the read-back check's metadata reads"
    assert chunks(gets) == []
    pid = project_id(core.catalog)
    hits = core.catalog.search(pid, Query(Level.INSTANCE))
    assert len(hits) == len(dss)

    # Positive control: indexing from the store (what the pull did, and reindex does)
    # reads the headers' chunk back, and the same counter catches it.
    gets.clear()
    core.store = store
    index_stored(core, pid, key_of(dss))
    assert chunks(gets) and all("/headers/" in k for k in chunks(gets))
    core.close()


def test_the_index_a_commit_writes_is_the_one_reindex_rebuilds(tmp_path, study):
    core = site(tmp_path)
    infos = [commit(core.store, core.catalog, dss, tmp_path / "spool") for dss in study]
    committed = searches(core.catalog)
    assert len(committed[Level.SERIES]) == 2
    assert len(committed[Level.INSTANCE]) == sum(len(dss) for dss in study)

    pid = project_id(core.catalog)
    for dss in study:
        core.catalog.unindex_series(pid, str(dss[0].SeriesInstanceUID))
    assert searches(core.catalog)[Level.STUDY] == []
    assert reindex(core, PROJECT) == 2
    assert searches(core.catalog) == committed

    # Positive control: an index missing one instance's header differs from the rebuilt one.
    core.catalog.index_series(pid, key_of(study[1]), list(infos[1].headers[:-1]), 1)
    assert searches(core.catalog) != committed
    core.close()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.peers)])
def catalog(request, tmp_path):
    if request.param == "sqlite":
        cat = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    else:
        cat = Catalog(request.getfixturevalue("pg_server").create_database("commit_atomic"))
    cat.add_project(Project(name=PROJECT, title=""))
    yield cat
    cat.dispose()


REFUSE_AUDIT = {
    "sqlite": [
        "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit "
        "BEGIN SELECT RAISE(ABORT, 'audit refused'); END"
    ],
    "postgresql": [
        "CREATE FUNCTION refuse_audit() RETURNS trigger AS "
        "$$ BEGIN RAISE EXCEPTION 'audit refused'; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit "
        "FOR EACH ROW EXECUTE FUNCTION refuse_audit()",
    ],
}


def refuse_audit(cat: Catalog, on: bool) -> None:
    """The database itself refuses audit rows (a trigger), or no longer does."""
    dialect = cat.engine.dialect.name
    with cat.engine.begin() as conn:
        if on:
            for sql in REFUSE_AUDIT[dialect]:
                conn.exec_driver_sql(sql)
        else:
            on_table = "" if dialect == "sqlite" else " ON audit"
            conn.exec_driver_sql("DROP TRIGGER refuse_audit" + on_table)


def kept(cat: Catalog, series_uid: str) -> list[str]:
    """What of a series' commit the catalog holds: index rows, a complete row, audit rows."""
    pid = project_id(cat)
    out = []
    with cat.session() as s:
        for table in (IndexedInstance, IndexedSeries):
            q = select(func.count()).where(table.project_id == pid, table.series_uid == series_uid)
            out += [table.__tablename__] * bool(s.scalar(q))
        if s.scalar(select(func.count()).where(IndexedStudy.project_id == pid)):
            out.append(IndexedStudy.__tablename__)
        row = s.scalar(select(SeriesRecord).where(SeriesRecord.series_uid == series_uid))
        if row is not None and row.status == "complete":
            out.append("complete")
        q = select(func.count()).where(AuditEvent.action == "series.stored")
        out += ["audit"] * bool(s.scalar(q))
    return out


def test_a_failing_audit_row_leaves_nothing_of_the_commit_in_the_catalog(tmp_path, study, catalog):
    store = open_store(str(tmp_path / "store"))
    dss = study[0]
    uid = str(dss[0].SeriesInstanceUID)
    refuse_audit(catalog, True)
    with pytest.raises(SQLAlchemyError, match="audit refused"):
        commit(store, catalog, dss, tmp_path / "spool")
    assert kept(catalog, uid) == []

    # Positive control: the same steps one after another (index, complete, then the audit
    # row, as before) leave the index and the complete flag behind, which `kept` sees.
    info = commit_writer_only(store, dss, tmp_path / "spool2")
    pid = project_id(catalog)
    catalog.index_series(pid, key_of(dss), list(info.headers), info.n_images)
    catalog.mark_complete(pid, uid, key_of(dss), info, study_uid=str(dss[0].StudyInstanceUID))
    with pytest.raises(SQLAlchemyError, match="audit refused"):
        catalog.audit("test", "series.stored", PROJECT, series=uid)
    assert "complete" in kept(catalog, uid) and "qido_instances" in kept(catalog, uid)

    refuse_audit(catalog, False)  # and once the database takes it, all of it is there
    commit(store, catalog, dss, tmp_path / "spool3")
    assert kept(catalog, uid) == [
        "qido_instances", "qido_series", "qido_studies", "complete", "audit",
    ]  # fmt: skip


def commit_writer_only(store: Any, dss: Sequence[Dataset], spool: Any) -> Any:
    writer = SeriesWriter(spool, fsync=False)
    for ds in dss:
        writer.add(ds)
    return writer.commit(store, key_of(dss))
