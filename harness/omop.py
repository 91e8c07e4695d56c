"""A synthetic OMOP CDM 5.4 warehouse for the tests: the published PostgreSQL DDL (`omop_ddl/`,
with the Medical Imaging extension's tables or without), then a population matching the studies a
test puts in its Orthanc: a person per patient (person_source_value = the PACS's Patient ID), a
visit, a CT procedure (accession in procedure_source_value) and an image occurrence per study,
the cohort rows of a cohort definition, and decoys a cohort read must leave out.

Person, visit, procedure and image occurrence ids are distinct 10-digit numbers, so a leak scan can
look for them (`Population.needles`); like the phantoms' 10-digit Patient IDs, one could turn up
by chance inside a pseudonymous UID's digits (rare: a few in 10,000 runs by our estimate).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

from sqlalchemy import MetaData, Table

from storage.omop import engine_for

DDL = Path(__file__).parent / "omop_ddl"
CDM_FILES = ("OMOPCDM_postgresql_5.4_ddl.sql", "OMOPCDM_postgresql_5.4_primary_keys.sql")
MI_FILES = ("MICDM_postgresql_5.4_ddl.sql", "MICDM_postgresql_5.4_primary_keys.sql")
# Test stand-ins for vocabulary rows (no vocabulary is loaded): not real OMOP concept ids.
CT_ABDOMEN = 1_999_999_101  # the procedures a cohort is filtered on
XRAY_CHEST = 1_999_999_102  # a decoy procedure of another kind
HU_TEST_CONCEPT = 1_999_999_201  # stands in for UCUM [hnsf'U] in this warehouse's concept table
EHR = 32817


@dataclass(frozen=True)
class Imaged:
    """One study as the PACS has it (the warehouse's side of it is made from this)."""

    patient_id: str
    study_uid: str
    series_uid: str
    accession: str
    study_date: str  # YYYYMMDD

    @property
    def day(self) -> date:
        d = self.study_date
        return date(int(d[:4]), int(d[4:6]), int(d[6:]))


@dataclass
class Person:
    """A person of the warehouse and the rows made for its study."""

    person_id: int
    study: Imaged
    visit_id: int
    procedure_id: int
    image_occurrence_id: int
    in_cohort: bool


@dataclass
class Population:
    schema: str
    definition: int
    persons: list[Person] = field(default_factory=list)

    def person(self, patient_id: str) -> Person:
        return next(p for p in self.persons if p.study.patient_id == patient_id)

    def cohort_studies(self) -> set[str]:
        """The study UIDs a read of the cohort definition must give: its subjects', in period."""
        return {p.study.study_uid for p in self.persons if p.in_cohort}

    def needles(self) -> list[str]:
        """The warehouse's keys: person_source_values and every id made here."""
        out = set()
        for p in self.persons:
            out |= {p.study.patient_id, str(p.person_id), str(p.visit_id), str(p.procedure_id)}
            out.add(str(p.image_occurrence_id))
        return sorted(out, key=len, reverse=True)


def create_warehouse(url: str, schema: str, *, imaging: bool = True) -> None:
    """Create `schema` and the CDM tables in it (and the imaging extension's, if `imaging`)."""
    engine = engine_for(url)
    try:
        with engine.begin() as c:
            c.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {schema}")
            for name in CDM_FILES + (MI_FILES if imaging else ()):
                sql = (DDL / name).read_text().replace("@cdmDatabaseSchema", schema)
                c.exec_driver_sql(sql)
    finally:
        engine.dispose()


def populate(
    url: str,
    schema: str,
    studies: Sequence[Imaged],
    *,
    definition: int = 1,
    imaging: bool = True,
    seed: int = 17,
) -> Population:
    """Persons, visits, procedures and image occurrences for `studies` (all in cohort
    `definition`, each period around its study), plus decoys: a person outside the cohort, a
    cohort subject's study before its period, and an X-ray in its period."""
    rng = random.Random(seed)
    used: set[int] = set()

    def new_id() -> int:
        while True:
            n = rng.randrange(1_000_000_000, 2_000_000_000)
            if n not in used:
                used.add(n)
                return n

    pop = Population(schema, definition)
    for s in studies:
        ids = (new_id(), new_id(), new_id(), new_id())
        pop.persons.append(Person(ids[0], s, *ids[1:], in_cohort=True))
    outsider = Imaged(
        "OMOP-OUT-1", "1.2.826.0.1.3680043.99.1", "1.2.826.0.1.3680043.99.2", "DECOY001", "20200303"
    )
    pop.persons.append(Person(new_id(), outsider, new_id(), new_id(), new_id(), in_cohort=False))
    engine = engine_for(url)
    rows: dict[str, list[dict]] = {t: [] for t in ("person", "visit_occurrence", "cohort")}
    rows |= {"procedure_occurrence": [], "image_occurrence": [], "concept": []}
    for p in pop.persons:
        s = p.study
        rows["person"].append(
            {
                "person_id": p.person_id,
                "gender_concept_id": 0,
                "year_of_birth": 1950,
                "race_concept_id": 0,
                "ethnicity_concept_id": 0,
                "person_source_value": s.patient_id,
            }
        )
        rows["visit_occurrence"].append(
            {
                "visit_occurrence_id": p.visit_id,
                "person_id": p.person_id,
                "visit_concept_id": 0,
                "visit_start_date": s.day,
                "visit_end_date": s.day,
                "visit_type_concept_id": EHR,
            }
        )
        rows["procedure_occurrence"].append(_procedure(p.procedure_id, p, s.day, s.accession))
        rows["image_occurrence"].append(_image(p.image_occurrence_id, p, p.procedure_id, s))
        if p.in_cohort:
            start, end = s.day - timedelta(days=30), s.day + timedelta(days=30)
            rows["cohort"].append(
                {
                    "cohort_definition_id": definition,
                    "subject_id": p.person_id,
                    "cohort_start_date": start,
                    "cohort_end_date": end,
                }
            )
    # A cohort subject's CT three years before its period, and a chest X-ray within it.
    first = pop.persons[0]
    early = Imaged(
        first.study.patient_id,
        "1.2.826.0.1.3680043.99.3",
        "1.2.826.0.1.3680043.99.4",
        "DECOY002",
        (first.study.day - timedelta(days=1100)).strftime("%Y%m%d"),
    )
    proc = new_id()
    rows["procedure_occurrence"].append(_procedure(proc, first, early.day, early.accession))
    rows["image_occurrence"].append(_image(new_id(), first, proc, early))
    xray = _procedure(new_id(), first, first.study.day, "DECOY003")
    rows["procedure_occurrence"].append({**xray, "procedure_concept_id": XRAY_CHEST})
    rows["concept"].append(
        {
            "concept_id": HU_TEST_CONCEPT,
            "concept_name": "Hounsfield unit (test stand-in)",
            "domain_id": "Unit",
            "vocabulary_id": "UCUM",
            "concept_class_id": "Unit",
            "standard_concept": "S",
            "concept_code": "[hnsf'U]",
            "valid_start_date": date(1970, 1, 1),
            "valid_end_date": date(2099, 12, 31),
        }
    )
    if not imaging:
        del rows["image_occurrence"]
    try:
        with engine.begin() as c:
            meta = MetaData(schema=schema)
            for table, values in rows.items():
                c.execute(Table(table, meta, autoload_with=c).insert(), values)
            c.exec_driver_sql(
                f"INSERT INTO {schema}.cohort_definition VALUES "
                f"({definition}, 'abdominal CT, bone density', NULL, 0, NULL, 0, NULL)"
            )
    finally:
        engine.dispose()
    return pop


def _procedure(pid: int, p: Person, day: date, accession: str) -> dict:
    return {
        "procedure_occurrence_id": pid,
        "person_id": p.person_id,
        "procedure_concept_id": CT_ABDOMEN,
        "procedure_date": day,
        "procedure_type_concept_id": EHR,
        "visit_occurrence_id": p.visit_id,
        "procedure_source_value": accession,
    }


def _image(iid: int, p: Person, procedure: int, s: Imaged) -> dict:
    return {
        "image_occurrence_id": iid,
        "person_id": p.person_id,
        "procedure_occurrence_id": procedure,
        "visit_occurrence_id": p.visit_id,
        "image_occurrence_date": s.day,
        "image_study_uid": s.study_uid,
        "image_series_uid": s.series_uid,
        "modality_concept_id": 0,
    }
