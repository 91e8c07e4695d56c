"""OMOP: cohorts read from a real PostgreSQL warehouse made with the published CDM 5.4 and Medical
Imaging extension DDL (harness/omop.py), and results written back by the trusted third party.

The end-to-end test: cohort definition -> pull from a real Orthanc -> bone density -> export ->
the measurement rows on the right persons and original dates, within the pipeline's tolerance of
the phantoms' truth; a re-export replaces its own rows only; the warehouse's keys reach nothing
on the research side (leak scan, with the warehouse itself as the positive control)."""

from __future__ import annotations

import json
import logging
from datetime import date, timedelta
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from core import SphereError, access, omop_cohort, projects, users
from core.core import Core
from core.settings import Settings
from gateway.api import Gateway
from gateway.cli import app as cli_app
from harness import omop as synth
from harness.leaks import scan_database, scan_folder, scan_store, scan_text
from harness.localpacs import free_port
from harness.phantom_dicom import PhantomStudy, write_phantom_study
from harness.phantoms import make_phantom
from processing import omop_export
from processing.bone import classify
from processing.bone_density import BoneDensity
from processing.results import result_rows, write_csv
from processing.runner import run_pipeline
from tests.orthanc_fixture import seeded_orthanc
from tests.test_pull import make_gateway

TODAY = date.today()
IMAGED = ("patient_id", "study_uid", "series_uid", "accession", "study_date")


def approve(gw: Gateway, name: str) -> None:
    gw.create_project(name, title="omop")
    gw.approve(
        name,
        committee_ref="CSE-OMOP-1",
        approved_on=TODAY - timedelta(days=1),
        expires_on=TODAY + timedelta(days=30),
    )


def rows(url: str, sql: str) -> list:
    engine = create_engine(url)
    try:
        with engine.connect() as c:
            return list(c.execute(text(sql)))
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def plain_studies() -> list[synth.Imaged]:
    return [
        synth.Imaged(f"PID-OMOP-{i}", f"1.2.826.0.1.3680043.77.{i}.1",
                     f"1.2.826.0.1.3680043.77.{i}.2", f"ACCOMOP{i}", f"202{i}0{i + 1}15")
        for i in range(3)
    ]  # fmt: skip


def test_cohort_from_image_occurrence_procedures_or_a_query(tmp_path, pg_server, plain_studies):
    url = pg_server.create_database("omop_cohorts")
    synth.create_warehouse(url, "public")
    pop = synth.populate(url, "public", plain_studies)
    synth.create_warehouse(url, "plain", imaging=False)
    synth.populate(url, "plain", plain_studies, imaging=False)
    gw = Gateway(Settings(home=tmp_path / "home", fsync=False))
    approve(gw, "img")
    approve(gw, "proc")
    c = gw.core

    # With the imaging extension: the study UIDs of the definition's subjects, in period only.
    with omop_cohort.open_warehouse(url) as wh:
        assert wh.has_imaging
        found = omop_cohort.add(c, "img", wh, definition=1)
    assert found.source == "image_occurrence"
    assert (
        set(found.values["study_uid"])
        == pop.cohort_studies()
        == {s.study_uid for s in plain_studies}
    )
    assert found.added == {"study_uid": 3}
    assert len(c.catalog.cohort(c.project("img").id)) == 3  # digests: scanned below
    vault = {(e.kind, e.value) for e in projects.cohort(c, "img", purpose="t")}
    assert vault == {("study_uid", s.study_uid) for s in plain_studies}
    audit = [r for r in c.catalog.audit_trail("img", 50) if r.action == "cohort.omop"]
    detail = json.loads(audit[0].detail)
    assert (
        detail["definition"] == 1 and detail["rows"] == 3 and detail["source"] == "image_occurrence"
    )

    # A warehouse that keeps the accession number beside the study UID: both are read.
    with create_engine(url).begin() as e:
        e.exec_driver_sql("ALTER TABLE image_occurrence ADD COLUMN accession_number varchar(50)")
        for st in plain_studies:
            e.execute(
                text(
                    "UPDATE image_occurrence SET accession_number = :a WHERE image_study_uid = :s"
                ),
                {"a": st.accession, "s": st.study_uid},
            )
    with omop_cohort.open_warehouse(url) as wh:
        both = omop_cohort.read(wh, definition=1, accession_column="accession_number")
        alone = omop_cohort.read(wh, definition=1, accession_column="no_such_column")
    assert set(both.values["accession"]) == {s.accession for s in plain_studies}
    assert set(both.values["study_uid"]) == pop.cohort_studies()
    assert alone.values["accession"] == []  # a column it lacks: the study UIDs alone

    # Without it: procedure_occurrence, by the column holding the accession number.
    with omop_cohort.open_warehouse(url, "plain") as wh:
        assert not wh.has_imaging
        with pytest.raises(SphereError, match="omop-accession-column"):
            omop_cohort.read(wh, definition=1)
        with pytest.raises(SphereError, match="no column 'accession_no'"):
            omop_cohort.read(wh, definition=1, accession_column="accession_no")
        every = omop_cohort.read(wh, definition=1, accession_column="procedure_source_value")
        ct = omop_cohort.read(
            wh,
            definition=1,
            accession_column="procedure_source_value",
            procedure_concepts=[synth.CT_ABDOMEN],
        )
        # The X-ray in period is there unless the concepts filter it; the early CT never is.
        assert set(every.values["accession"]) == {s.accession for s in plain_studies} | {"DECOY003"}
        assert set(ct.values["accession"]) == {s.accession for s in plain_studies}
        found = omop_cohort.add(
            c,
            "proc",
            wh,
            definition=1,
            accession_column="procedure_source_value",
            procedure_concepts=[synth.CT_ABDOMEN],
        )
        assert found.added == {"accession": 3}

        # A query of one's own: read-only, its columns say what it returns.
        own = tmp_path / "own.sql"
        own.write_text(
            "SELECT procedure_source_value AS accession FROM plain.procedure_occurrence "
            f"WHERE procedure_concept_id = {synth.XRAY_CHEST}"
        )
        found = omop_cohort.add(c, "proc", wh, sql_file=own)
        assert found.values == {"study_uid": [], "accession": ["DECOY003"]}
        assert found.added == {"accession": 1}
        audit = [r for r in c.catalog.audit_trail("proc", 50) if r.action == "cohort.omop"]
        detail = json.loads(audit[0].detail)
        assert "query_sha256" in detail and "definition" not in detail
        own.write_text("DELETE FROM plain.person RETURNING person_source_value")
        with pytest.raises(SphereError, match="read only sql transaction"):
            omop_cohort.add(c, "proc", wh, sql_file=own)
        # A server's error names its kind, not the value it quotes.
        own.write_text("SELECT person_source_value::integer FROM plain.person")
        with pytest.raises(SphereError, match="invalid text representation") as refused:
            omop_cohort.add(c, "proc", wh, sql_file=own)
        assert "PID-OMOP" not in str(refused.value)
        cause = refused.value.__context__.__context__  # control: the server's message quotes it
        assert "PID-OMOP" in str(cause)
    assert len(rows(url, "SELECT * FROM plain.person")) == 4  # nothing deleted

    # The warehouse's keys are in the warehouse (the control) and nowhere in the catalog.
    needles = pop.needles()
    assert scan_database(url, needles)
    values = [v for s in plain_studies for v in (s.study_uid, s.accession)]
    assert scan_database(gw.settings.resolved_catalog_url(), needles + values) == []
    c.close()


def test_a_warehouse_that_is_not_one_is_one_line(pg_server):
    url = pg_server.create_database("not_omop")
    with pytest.raises(SphereError, match="no OMOP person table"):
        omop_cohort.open_warehouse(url, "public")
    dsn = f"host=127.0.0.1 port={pg_server.port} user=postgres dbname=not_omop"
    with pytest.raises(SphereError, match="no OMOP person table"):  # a libpq DSN reaches it
        omop_cohort.open_warehouse(dsn)
    with pytest.raises(SphereError, match="plain SQL name"):
        omop_cohort.open_warehouse(url, "public; drop")
    with pytest.raises(SphereError, match="cannot be reached"):
        omop_cohort.open_warehouse("postgresql://postgres@127.0.0.1:9/none")


# -- end to end: OMOP cohort -> pull -> bone density -> export ---------------------------------

SMALL = dict(shape_yx=(160, 160), pixel_mm=2.0)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> list[tuple[PhantomStudy, bool]]:
    """(study, measurable): two measurable L1s of different density, one fractured."""
    out = tmp_path_factory.mktemp("omop-phantoms")
    cases: list[tuple[dict[str, Any], bool]] = [
        (dict(slice_spacing_mm=2.5, trabecular_hu=135.0, seed=1), True),
        (dict(slice_spacing_mm=2.5, trabecular_hu=80.0, seed=4), True),
        (dict(slice_spacing_mm=2.5, fracture_l1=True, seed=3), False),
    ]
    studies = []
    for i, (kw, measurable) in enumerate(cases):
        vol, truth = make_phantom(**SMALL, **kw)
        studies.append((write_phantom_study(vol, truth, out / str(i), index=i), measurable))
    return studies


@pytest.fixture(scope="module")
def scp_port():
    return free_port()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, phantoms, scp_port):
    files = [f for st, _ in phantoms for f in st.files]
    with seeded_orthanc(tmp_path_factory.mktemp("omop-orthanc"), files, scp_port) as orthanc:
        yield orthanc


def cli(home, token: str, *words: str):
    env = {"SPHERE_HOME": str(home), "SPHERE_TOKEN": token, "SPHERE_FSYNC": "false"}
    return CliRunner().invoke(cli_app, list(words), env=env)


SPHERE_ROWS = (
    "SELECT measurement_id, person_id, measurement_concept_id, measurement_date, value_as_number,"
    " value_as_concept_id, unit_concept_id, visit_occurrence_id, measurement_event_id,"
    " measurement_source_value FROM measurement WHERE measurement_source_value LIKE 'sphere %'"
    " ORDER BY measurement_id"
)


@pytest.mark.peers
def test_omop_cohort_to_measurements_on_the_right_persons(
    tmp_path, pg_server, pacs, scp_port, phantoms, caplog, capfd
):
    caplog.set_level(logging.INFO)
    url = pg_server.create_database("omop_e2e")
    synth.create_warehouse(url, "public")
    studies = [
        synth.Imaged(st.patient_id, st.study_uid, st.series_uid, st.accession, st.study_date)
        for st, _ in phantoms
    ]
    pop = synth.populate(url, "public", studies)
    gw = make_gateway(tmp_path / "home", pacs, scp_port)
    approve(gw, "bones")
    with Core(gw.settings) as c:
        tess, dan = users.add(c, "tess"), users.add(c, "dan")
        c.catalog.add_user_role(c.catalog.user("tess").id, access.TRUSTED_THIRD_PARTY, "t")
        c.catalog.add_user_role(c.catalog.user("dan").id, access.DATA_MANAGER, "t")
    outputs = []

    # The cohort, read from the warehouse by the data manager (the CLI, as it is run).
    out = cli(gw.settings.home, dan, "cohort", "add", "bones", "--omop", url,
              "--cohort-definition", "1")  # fmt: skip
    assert out.exit_code == 0, out.output
    outputs.append(out.output)
    assert "3 new study_uid item(s)" in out.output
    pulled = gw.pull("bones")
    assert pulled.ok and pulled.instances == sum(st.n_instances for st, _ in phantoms)
    run = run_pipeline(gw.settings, "bones", BoneDensity(), workers=2, progress=False)
    assert run.counts() == {"ok": 2, "unmeasurable": 1}, run.outcomes

    # A row the warehouse's own ETL wrote for the first person: no export touches it.
    first = pop.person(studies[0].patient_id)
    with create_engine(url).begin() as c:
        c.execute(
            text(
                "INSERT INTO measurement (measurement_id, person_id, measurement_concept_id,"
                " measurement_date, measurement_type_concept_id, value_as_number,"
                " measurement_source_value) VALUES (1, :p, 3000000, '2020-01-01', 32817, 7, 'LAB')"
            ),
            {"p": first.person_id},
        )
        # The second study's series is not the one the warehouse lists: the export adds an
        # image occurrence of its own for it (same procedure and visit), marked as sphere's.
        second = pop.person(studies[1].patient_id)
        c.execute(
            text("UPDATE image_occurrence SET image_series_uid = '1.2.3.4' WHERE person_id = :p"),
            {"p": second.person_id},
        )

    # Only the trusted third party exports.
    out = cli(gw.settings.home, dan, "omop", "export", "bones", "--to", url)
    assert out.exit_code == 2 and "may not omop.export" in out.output
    for attempt in (1, 2):  # the second replaces the first's rows, and only those
        out = cli(gw.settings.home, tess, "omop", "export", "bones", "--to", url)
        assert out.exit_code == 0, out.output
        outputs.append(out.output)
        assert "4 measurement rows written" in out.output
        assert f"({4 if attempt == 2 else 0} of an earlier export replaced)" in out.output
        assert "2 image_feature and 1 image_occurrence rows written" in out.output
        ours = rows(url, "SELECT * FROM image_occurrence WHERE local_path = 'sphere:bones'")
        assert [(o.person_id, o.procedure_occurrence_id, o.image_series_uid) for o in ours] == [
            (second.person_id, second.procedure_id, studies[1].series_uid)
        ]
        assert "1 series not measured" in out.output
        got = rows(url, SPHERE_ROWS)
        assert len(got) == 4
        assert rows(url, "SELECT value_as_number FROM measurement WHERE measurement_id = 1")

    by_person = {}
    for r in got:
        by_person.setdefault(r.person_id, []).append(r)
    for st, measurable in phantoms:
        person = pop.person(st.patient_id)
        if not measurable:
            assert person.person_id not in by_person  # refused: no value written
            continue
        mine = {r.measurement_concept_id: r for r in by_person[person.person_id]}
        hu, cls = mine[omop_export.L1_HU], mine[omop_export.BONE_CLASS]
        day = synth.Imaged(*[getattr(st, f) for f in IMAGED]).day
        assert hu.measurement_date == cls.measurement_date == day  # the original date
        assert float(hu.value_as_number) == pytest.approx(st.truth.l1_hu, abs=10.0)
        assert hu.unit_concept_id == synth.HU_TEST_CONCEPT  # found in the warehouse's vocabulary
        assert hu.visit_occurrence_id == person.visit_id
        assert hu.measurement_event_id == person.procedure_id
        assert hu.measurement_source_value == "sphere bones bone-density " + BoneDensity.version
        # SNOMED is not loaded here: the class is the local concept of classify(truth)
        local = omop_export.CLASSES[classify(st.truth.l1_hu)][1]
        assert cls.value_as_concept_id == local
        features = rows(url, f"SELECT * FROM image_feature WHERE person_id = {person.person_id}")
        assert len(features) == 1
        f = features[0]
        mine = person.image_occurrence_id if person is not second else ours[0].image_occurrence_id
        assert f.image_occurrence_id == mine
        assert f.image_feature_event_id == hu.measurement_id
        assert f.alg_system.startswith("sphere bones bone-density ")
    concepts = rows(url, "SELECT concept_id FROM concept WHERE vocabulary_id = 'sphere'")
    assert {r.concept_id for r in concepts} >= {omop_export.L1_HU, omop_export.BONE_CLASS}

    # A warehouse without the imaging extension: linked through the procedure's accession.
    synth.create_warehouse(url, "plain", imaging=False)
    plain = synth.populate(url, "plain", studies, imaging=False, seed=18)
    # Two persons with the second study's Patient ID: which one is not guessed.
    twin = plain.person(studies[1].patient_id)
    with create_engine(url).begin() as c:
        c.execute(
            text(
                "INSERT INTO plain.person (person_id, gender_concept_id, year_of_birth,"
                " race_concept_id, ethnicity_concept_id, person_source_value)"
                " VALUES (5, 0, 1950, 0, 0, :v)"
            ),
            {"v": studies[1].patient_id},
        )
    out = cli(gw.settings.home, tess, "omop", "export", "bones", "--to", url, "--schema", "plain",
              "--accession-column", "procedure_source_value")  # fmt: skip
    assert out.exit_code == 0, out.output
    outputs.append(out.output)
    assert "2 measurement rows written" in out.output and "image_feature" not in out.output
    assert "1 series not linked to the warehouse: no single person with that" in out.output
    linked = rows(url, SPHERE_ROWS.replace("FROM measurement", "FROM plain.measurement"))
    expect = {
        (p.person_id, p.visit_id, p.procedure_id, p.study.day)
        for p, (_, measurable) in zip(plain.persons, phantoms, strict=False)
        if measurable and p is not twin
    }
    assert {
        (r.person_id, r.visit_occurrence_id, r.measurement_event_id, r.measurement_date)
        for r in linked
    } == expect

    # A warehouse whose procedure for the first study is another person's: not written there.
    synth.create_warehouse(url, "swapped", imaging=False)
    swapped = synth.populate(url, "swapped", studies, imaging=False, seed=19)
    a, b = (swapped.person(s.patient_id) for s in studies[:2])
    with create_engine(url).begin() as c:
        c.execute(
            text("UPDATE swapped.procedure_occurrence SET person_id = :b WHERE person_id = :a"),
            {"a": a.person_id, "b": b.person_id},
        )
    out = cli(gw.settings.home, tess, "omop", "export", "bones", "--to", url, "--schema",
              "swapped", "--accession-column", "procedure_source_value")  # fmt: skip
    assert out.exit_code == 0, out.output
    outputs.append(out.output)
    assert "1 series not linked to the warehouse: the warehouse has the study under another" in (
        out.output
    )
    written = rows(url, SPHERE_ROWS.replace("FROM measurement", "FROM swapped.measurement"))
    assert {r.person_id for r in written} == {b.person_id}

    with Core(gw.settings) as c:
        audits = [r for r in c.catalog.audit_trail("bones", 200) if r.action.startswith("omop")]
        done = [json.loads(r.detail) for r in audits if r.outcome == "ok"]
        assert [d["written"]["measurement"] for d in done] == [2, 2, 4, 4]  # newest first
        assert [d["unlinked"] for d in done] == [1, 1, 0, 0]
        assert any(r.outcome == "refused" and r.actor == "dan" for r in audits)
        cohort = [r for r in c.catalog.audit_trail("bones", 200) if r.action == "cohort.omop"]
        assert json.loads(cohort[0].detail)["rows"] == 3
        # The research side never sees the warehouse's keys: store, catalog, exports, logs.
        days = [synth.Imaged(*[getattr(st, f) for f in IMAGED]).day for st, _ in phantoms]
        needles = (
            pop.needles() + plain.needles() + swapped.needles() + [d.isoformat() for d in days]
        )
        csv = tmp_path / "export"
        csv.mkdir()
        write_csv(result_rows(c, "bones"), csv / "results.csv")
        assert scan_store(c.store, needles) == []
        assert scan_folder(csv, needles) == []
    assert scan_database(gw.settings.resolved_catalog_url(), needles) == []
    out, err = capfd.readouterr()
    assert scan_text("logs", caplog.text + out + err + "".join(outputs), needles) == []
    # Control: the same scan finds the keys where they are, the warehouse's rows.
    found = scan_database(url, needles)
    assert any(x.where == "table measurement" and x.needle == str(first.person_id) for x in found)
