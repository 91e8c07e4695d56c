"""The QIDO-RS index in the catalog: written idempotently, and every SQL search returns what
the reference matcher (`qido.matches` on each row's whole JSON) returns, in the same order."""

from __future__ import annotations

from typing import Any

import pydicom
import pytest
from sqlalchemy import create_engine, event, inspect, text

from dicom import json_model
from dicom.json_model import first
from dicom.query import Level, Query, matches
from gateway.web.qido import parse_qido
from harness.synthetic import generate
from storage.catalog import (
    Catalog,
    IndexedInstance,
    IndexedSeries,
    IndexedStudy,
    Project,
)
from storage.catalog.db import _fresh_statistics  # noqa: PLC2701 - the control removes it


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.peers)]
)
def catalog(request, tmp_path_factory):
    base = tmp_path_factory.mktemp("index")
    corpus = generate(base / "ct", n_patients=3, slices=5, size=16, seed=3)
    by_series: dict[str, list] = {}
    for f in corpus.files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        by_series.setdefault(ds.SeriesInstanceUID, []).append(ds)
    if request.param == "sqlite":
        cat = Catalog(f"sqlite:///{base / 'catalog.db'}")
    else:
        cat = Catalog(request.getfixturevalue("pg_server").create_database("qido_index"))
    cat.add_project(Project(name="p", title=""))
    cat.add_project(Project(name="q", title=""))
    pid = cat.project("p").id
    for i, (uid, dss) in enumerate(sorted(by_series.items())):
        dss.sort(key=lambda d: float(d.ImagePositionPatient[2]))
        headers = [json_model.to_json_dict(d) for d in dss]
        if i == 0:  # one study in another project too: searches stay inside a project
            cat.index_series(cat.project("q").id, f"k/q/{uid}", headers, len(headers))
        cat.index_series(pid, f"k/{uid}", headers, len(headers))
        cat.index_series(pid, f"k/{uid}", headers, len(headers))  # a re-commit: replaced
    return cat, pid, corpus


def count(cat: Catalog, table, pid: int) -> int:
    with cat.session() as s:
        return s.query(table).filter(table.project_id == pid).count()


def test_index_is_idempotent_and_counts(catalog):
    cat, pid, corpus = catalog
    assert count(cat, IndexedStudy, pid) == len(corpus.studies)
    assert count(cat, IndexedSeries, pid) == sum(len(s.series) for s in corpus.studies)
    assert count(cat, IndexedInstance, pid) == corpus.n_instances
    hits = cat.search(pid, Query(Level.STUDY))
    by_uid = {h.study_uid: h.dataset for h in hits}
    for st in corpus.studies:
        ds = by_uid[st.study_uid]
        assert ds["00201206"]["Value"] == [len(st.series)]
        assert ds["00201208"]["Value"] == [st.n_instances]
        assert ds["00100020"]["Value"] == [st.patient_id]
        assert "0020000E" not in ds and "00080018" not in ds  # no series/instance attributes
    inst = cat.search(pid, Query(Level.INSTANCE))
    assert len({h.sop_uid for h in inst}) == corpus.n_instances
    first = inst[0].dataset  # merged: study + series + instance attributes
    assert {"00100010", "0020000E", "00080018", "00200032", "00280010"} <= set(first)


def test_unindex_removes_a_series_and_its_empty_study(catalog):
    cat, pid, corpus = catalog
    qid = cat.project("q").id
    (hit,) = cat.search(qid, Query(Level.SERIES))
    cat.unindex_series(qid, hit.series_uid)
    assert cat.search(qid, Query(Level.STUDY)) == [] and count(cat, IndexedInstance, qid) == 0


def vectors(corpus) -> list[tuple[Level, list[tuple[str, str]], dict]]:
    st = corpus.studies[0]
    date = st.study_date
    other = corpus.studies[1]
    return [
        (Level.STUDY, [("PatientID", st.patient_id)], {}),
        (Level.STUDY, [("PatientID", st.patient_id[:3] + "*")], {}),
        (Level.STUDY, [("PatientID", "?" + st.patient_id[1:])], {}),
        (Level.STUDY, [("PatientID", "nobody")], {}),
        (Level.STUDY, [("StudyDate", f"{date}-")], {}),
        (Level.STUDY, [("StudyDate", f"-{date}")], {}),
        (Level.STUDY, [("StudyDate", f"{date}-{date}")], {}),
        (Level.STUDY, [("StudyDate", date)], {}),
        (Level.STUDY, [("StudyTime", "000000-120000")], {}),
        (Level.STUDY, [("StudyTime", "12-")], {}),
        (Level.STUDY, [("StudyInstanceUID", f"{st.study_uid},{other.study_uid}")], {}),
        (Level.STUDY, [("StudyInstanceUID", f"{st.study_uid}\\{other.study_uid}")], {}),
        (Level.STUDY, [("AccessionNumber", st.accession)], {}),
        (Level.STUDY, [("AccessionNumber", '""')], {}),
        (Level.STUDY, [("PatientName", st.patient_name.lower())], {}),
        (Level.STUDY, [("PatientName", st.patient_name.split("^")[0][:4] + "*")], {}),
        (
            Level.STUDY,
            [("PatientName", st.patient_name.split("^")[1][:3]), ("fuzzymatching", "true")],
            {},
        ),
        (Level.STUDY, [("ModalitiesInStudy", "CT")], {}),
        (Level.STUDY, [("ModalitiesInStudy", "MR")], {}),
        (Level.STUDY, [("ModalitiesInStudy", "ct")], {}),  # CS: case-sensitive, no match
        (Level.STUDY, [("ModalitiesInStudy", "MR\\CT"), ("limit", "2")], {}),
        (Level.STUDY, [("ModalitiesInStudy", "C*")], {}),  # wildcard: the recheck's
        (Level.SERIES, [("ModalitiesInStudy", "CT"), ("Modality", "CT")], {}),
        (Level.STUDY, [("PatientSex", "F\\M")], {}),
        (Level.STUDY, [("limit", "2"), ("offset", "1")], {}),
        (Level.STUDY, [("StudyDescription", "*abd*")], {}),  # case-sensitive: no match
        (Level.STUDY, [("StudyDescription", "*")], {}),
        (Level.SERIES, [("Modality", "CT")], {}),
        (Level.SERIES, [("SeriesNumber", "2")], {}),
        (Level.SERIES, [("SeriesNumber", "1\\2"), ("limit", "3")], {}),
        (Level.SERIES, [("PatientID", st.patient_id)], {}),
        (Level.SERIES, [], {"study_uid": st.study_uid}),
        (Level.SERIES, [("SeriesDescription", "*")], {"study_uid": other.study_uid}),
        (Level.INSTANCE, [("InstanceNumber", "3")], {}),
        (Level.INSTANCE, [("Rows", "16"), ("limit", "4"), ("offset", "2")], {}),
        (Level.INSTANCE, [("SliceThickness", "2.5")], {}),  # no column: JSON only
        (Level.INSTANCE, [("ImageType", "ORIGINAL")], {}),
        (Level.INSTANCE, [("SOPClassUID", "1.2.840.10008.5.1.4.1.1.2")], {}),
        (Level.INSTANCE, [("NumberOfFrames", '""')], {}),
        (
            Level.INSTANCE,
            [],
            {"study_uid": st.study_uid, "series_uid": st.series[0].series_uid},
        ),
    ]


def test_sql_search_equals_the_reference_matcher(catalog):
    cat, pid, corpus = catalog
    everything = {lvl: cat.search(pid, Query(lvl)) for lvl in Level}
    seen_nonempty = 0
    for level, params, scope in vectors(corpus):
        query = parse_qido(params, level, **scope)
        got = cat.search(pid, query)
        oracle = [h for h in everything[level] if matches(query, h.dataset)]
        oracle = oracle[query.offset :][: query.limit]
        key = {Level.STUDY: "study_uid", Level.SERIES: "series_uid", Level.INSTANCE: "sop_uid"}
        assert [getattr(h, key[level]) for h in got] == [getattr(h, key[level]) for h in oracle], (
            level,
            params,
        )
        seen_nonempty += bool(got)
    assert seen_nonempty >= 20  # the vectors select something, mostly


def test_positive_control_a_wrong_sql_translation_is_caught(catalog):
    """The oracle comparison fails when a search ignores a condition."""
    cat, pid, corpus = catalog
    query = parse_qido([("PatientID", corpus.studies[0].patient_id)], Level.STUDY)
    ignoring = cat.search(pid, Query(Level.STUDY))
    oracle = [h for h in ignoring if matches(query, h.dataset)]
    assert len(ignoring) != len(oracle)


def test_inline_pixel_data_is_not_indexed_and_is_served_as_bulk_data(tmp_path):
    import base64

    from gateway.web import wado

    cat = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    cat.add_project(Project(name="seg", title=""))
    pid = cat.project("seg").id
    pixels = bytes(range(256)) * 8
    header = {
        "0020000D": {"vr": "UI", "Value": ["2.25.1"]},
        "0020000E": {"vr": "UI", "Value": ["2.25.2"]},
        "00080018": {"vr": "UI", "Value": ["2.25.3"]},
        "00080060": {"vr": "CS", "Value": ["SEG"]},
        "7FE00010": {"vr": "OB", "InlineBinary": base64.b64encode(pixels).decode()},
    }
    cat.index_series(pid, "projects/seg/2.25.1/2.25.2", [header], 0)
    (hit,) = cat.search(pid, Query(Level.INSTANCE))
    assert hit.sop_uid == "2.25.3" and "7FE00010" not in hit.dataset
    with cat.session() as s:
        assert not any("InlineBinary" in i.dataset for i in s.query(IndexedInstance))
    meta = wado.metadata(header, "http://gw/projects/seg/dicom-web", "2.25.1", "2.25.2", False, 8)
    assert meta["7FE00010"] == {
        "vr": "OB",
        "BulkDataURI": "http://gw/projects/seg/dicom-web/studies/2.25.1/series/2.25.2"
        "/instances/2.25.3/bulkdata/7FE00010",
    }
    assert wado.inline_pixels(header) == pixels
    assert wado.inline_pixels({}) is None


def test_access_version_changes_with_access_and_index_only(catalog):
    """The web caches stay valid while this number is unchanged: every change to projects,
    users, roles and the index (ORM or bulk statement) must move it; audit rows must not."""
    from storage.catalog import Membership, User

    cat, pid, corpus = catalog
    seen = [cat.access_version()]

    def moved() -> bool:
        seen.append(cat.access_version())
        return seen[-1] != seen[-2]

    cat.audit("tester", "nothing.changes", None)
    cat.audit_many([{"actor": "t", "action": "a", "project": None, "outcome": "ok", "detail": {}}])
    assert not moved()  # the control: a write that is not watched
    cat.add_project(Project(name="v", title=""))
    assert moved()
    cat.update_project("v", status="revoked")
    assert moved()
    assert cat.add_user(User(name="vic", token_hash="0" * 64))
    assert moved()
    cat.grant(cat.project("v").id, cat.user("vic").id, "viewer", "tester")
    assert moved()
    cat.update_user("vic", active=False)
    assert moved()
    (hit, *_) = cat.search(pid, Query(Level.SERIES))
    cat.unindex_series(pid, hit.series_uid)  # a bulk delete, then an ORM delete
    assert moved()
    with pytest.raises(RuntimeError), cat.session() as s:  # rolled back: nothing changed
        s.add(Membership(project_id=pid, user_id=cat.user("vic").id, role="viewer"))
        s.flush()
        raise RuntimeError
    assert not moved()
    # Put the series back as it was (the other tests of this module search it).
    uid = hit.series_uid
    dss = sorted(
        (pydicom.dcmread(f, stop_before_pixels=True) for f in corpus.files),
        key=lambda d: float(d.ImagePositionPatient[2]),
    )
    headers = [json_model.to_json_dict(d) for d in dss if d.SeriesInstanceUID == uid]
    cat.index_series(pid, f"k/{uid}", headers, len(headers))  # bulk inserts
    assert moved()


def test_a_catalog_made_before_an_index_existed_gets_it_when_opened(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    Catalog(url).dispose()
    engine = create_engine(url)
    with engine.begin() as conn:  # as a catalog made by an older sphere would be
        conn.execute(text("DROP INDEX ix_qido_studies_order"))

    def names() -> set[str]:
        return {i["name"] for i in inspect(engine).get_indexes("qido_studies")}

    assert "ix_qido_studies_order" not in names()
    Catalog(url).dispose()
    Catalog(url).dispose()  # and again: nothing to do, no error
    assert "ix_qido_studies_order" in names()


def _plans(cat: Catalog, search) -> str:  # noqa: ANN001
    """SQLite's query plans for the statements `search()` runs."""
    seen: list[tuple[str, Any]] = []

    def record(conn, cursor, statement, params, context, executemany):  # noqa: ANN001
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, params))

    event.listen(cat.engine, "before_cursor_execute", record)
    try:
        search()
    finally:
        event.remove(cat.engine, "before_cursor_execute", record)
    with cat.engine.connect() as conn:
        return " | ".join(
            row[3]
            for sql, p in seen
            for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, p)
        )


def test_sqlite_plans_use_the_selective_index(tmp_path):
    """Indexing keeps SQLite's statistics fresh, so an accession number is found by its index,
    not by walking every study in the search order (how it went at 10,000 studies), also in a
    server that opened the catalog when it was small and keeps its connections."""
    corpus = generate(tmp_path / "ct", n_patients=6, slices=2, size=8, seed=4)
    url = f"sqlite:///{tmp_path / 'c.db'}"
    cat = Catalog(url)
    cat.add_project(Project(name="p", title=""))
    pid = cat.project("p").id
    by_series: dict[str, list] = {}
    for f in corpus.files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        by_series.setdefault(ds.SeriesInstanceUID, []).append(ds)
    query = parse_qido([("AccessionNumber", corpus.studies[0].accession)], Level.STUDY)

    def search(c: Catalog):
        return lambda: c.search(pid, query)

    server = Catalog(url)
    stale = Catalog(url)  # control: a server that keeps its first connection's statistics
    event.remove(stale.engine, "checkout", _fresh_statistics)
    for i, (uid, dss) in enumerate(by_series.items()):
        cat.index_series(pid, f"k/{uid}", [json_model.to_json_dict(d) for d in dss], len(dss))
        if i == 0:  # the servers search while the catalog holds one series
            server.search(pid, Query(Level.STUDY))
            stale.search(pid, Query(Level.STUDY))
    assert len(search(cat)()) == 1
    assert "ix_qido_studies_accession" in _plans(cat, search(cat))
    assert "ix_qido_studies_accession" in _plans(server, search(server))
    assert "ix_qido_studies_accession" not in _plans(stale, search(stale))
    # Control: without the statistics, the plan walks the order index (the check can fail).
    for c in (cat, server, stale):
        c.dispose()
    with create_engine(url).begin() as conn:
        conn.exec_driver_sql("DELETE FROM sqlite_stat1")
    blind = Catalog(url)
    assert "ix_qido_studies_accession" not in _plans(blind, search(blind))


def test_computed_attributes_come_from_the_index_not_a_stored_header(tmp_path):
    """A header claiming ModalitiesInStudy MR\\CT on an MR-only study: the index says MR,
    and the SQL search and the reference matcher agree on it at every level."""
    cat = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    cat.add_project(Project(name="p", title=""))
    pid = cat.project("p").id
    header = {
        "0020000D": {"vr": "UI", "Value": ["2.25.1"]},
        "0020000E": {"vr": "UI", "Value": ["2.25.2"]},
        "00080018": {"vr": "UI", "Value": ["2.25.3"]},
        "00080060": {"vr": "CS", "Value": ["MR"]},
        "00080061": {"vr": "CS", "Value": ["MR", "CT"]},
        "00201208": {"vr": "IS", "Value": [99]},
    }
    cat.index_series(pid, "k/1", [header], 1)
    (study,) = cat.search(pid, Query(Level.STUDY))
    assert study.dataset["00080061"]["Value"] == ["MR"]
    assert study.dataset["00201208"]["Value"] == [1]
    for level in (Level.STUDY, Level.SERIES, Level.INSTANCE):
        query = parse_qido([("ModalitiesInStudy", "CT")], level)
        everything = cat.search(pid, Query(level))
        assert [h for h in everything if matches(query, h.dataset)] == []
        assert cat.search(pid, query) == []


def _header(series_uid: str, number: int, modality: str, **study: str) -> dict[str, Any]:
    tags = {"StudyDescription": "00081030", "StudyTime": "00080030"}
    vrs = {"00081030": "LO", "00080030": "TM", "00080090": "PN"}
    h = {
        "0020000D": {"vr": "UI", "Value": ["2.25.10"]},
        "0020000E": {"vr": "UI", "Value": [series_uid]},
        "00080018": {"vr": "UI", "Value": [series_uid + ".1"]},
        "00080060": {"vr": "CS", "Value": [modality]},
        "00200011": {"vr": "IS", "Value": [number]},
        "00080090": {"vr": "PN"},  # present, empty, as an SR made elsewhere has it
    }
    for name, value in study.items():
        tag = tags.get(name, "00080090")
        h[tag] = {"vr": vrs[tag], "Value": [{"Alphabetic": value} if tag == "00080090" else value]}
    return h


def test_a_study_keeps_attributes_its_last_series_lacks(tmp_path):
    """A CT series carries StudyDescription, StudyTime and ReferringPhysicianName; an SR
    indexed after it carries none (or empty ones). The study is still found by each, its
    answer carries them, and indexing in the other order gives the same row."""
    ct = _header("2.25.11", 1, "CT", StudyDescription="CT chest", StudyTime="101500", Ref="Doe^J")
    sr = _header("2.25.12", 2, "SR")
    rows = []
    for name, order in (("a", [ct, sr]), ("b", [sr, ct])):
        cat = Catalog(f"sqlite:///{tmp_path / name}.db")
        cat.add_project(Project(name="p", title=""))
        pid = cat.project("p").id
        for h in order:
            cat.index_series(pid, "k/" + first(h, "0020000E"), [h], 1)
        for params in (
            [("StudyDescription", "CT*")],
            [("StudyTime", "100000-110000")],
            [("ReferringPhysicianName", "Doe*")],
        ):
            query = parse_qido(params, Level.STUDY)
            (hit,) = cat.search(pid, query)
            assert matches(query, hit.dataset)  # the answer says what the search matched
        assert hit.dataset["00081030"]["Value"] == ["CT chest"]
        assert hit.dataset["00201206"]["Value"] == [2]
        with cat.session() as s:
            (st,) = s.query(IndexedStudy).filter(IndexedStudy.project_id == pid)
            rows.append((st.dataset, st.study_description, st.study_time, st.referring_physician))
    assert rows[0] == rows[1]
    # Forgetting the CT series leaves the SR's (empty) attributes, and the counts follow.
    cat.unindex_series(pid, "2.25.11")
    (hit,) = cat.search(pid, Query(Level.STUDY))
    assert "Value" not in hit.dataset.get("00081030", {})
    assert hit.dataset["00201206"]["Value"] == [1]


def test_a_series_indexed_before_study_attributes_were_kept_leaves_them(tmp_path):
    """A catalog from before: the CT series has no study_dataset. Indexing an SR after it
    keeps the study row's attributes (a reindex then rebuilds them from the series)."""
    cat = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    cat.add_project(Project(name="p", title=""))
    pid = cat.project("p").id
    cat.index_series(pid, "k/1", [_header("2.25.11", 1, "CT", StudyDescription="CT chest")], 1)
    with cat.session() as s:
        s.query(IndexedSeries).update({IndexedSeries.study_dataset: None})
    cat.index_series(pid, "k/2", [_header("2.25.12", 2, "SR")], 1)
    query = parse_qido([("StudyDescription", "CT*")], Level.STUDY)
    assert len(cat.search(pid, query)) == 1
