"""Results back to the OMOP warehouse, by the trusted third party: each measured series' study is
mapped through the vault to its original Patient ID (-> the warehouse's person), study date and
UIDs (-> its image occurrence, procedure and visit), then written as `measurement` rows (and
`image_feature` rows where the Medical Imaging extension is there). A re-export replaces its own
earlier rows, recognised by their source value, and no others.

Concepts: the standard ones are looked up in the warehouse's own vocabulary by code (UCUM
[hnsf'U], SNOMED classes, ...); where no standard concept fits (the L1 attenuation itself, the
class as a measurement) or the vocabulary is not loaded, local concepts >= 2,000,000,000 are used
and their `concept` rows written. README "Results back to OMOP" lists them.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from core import originals, projects
from core.core import Core
from core.errors import SphereError
from storage.omop import Link, OmopError, Warehouse, Written

LOCAL_BASE = 2_000_000_000
VOCABULARY = "sphere"
L1_HU, BONE_CLASS = LOCAL_BASE + 1, LOCAL_BASE + 2
# The classes: SNOMED CT codes looked up in the warehouse, local concepts when not loaded.
CLASSES = {
    "osteoporosis": ("64859006", LOCAL_BASE + 3),
    "osteopenia": ("312894000", LOCAL_BASE + 4),
    "normal": ("17621005", LOCAL_BASE + 5),
}
HU_UCUM = "[hnsf'U]"
EHR = 32817  # Type Concept "EHR": when "Standard algorithm" is not in the warehouse's vocabulary
SOURCE_MAX = 50  # measurement_source_value is varchar(50)


@dataclass
class ExportReport:
    """Counts only: what was written, replaced, and why some results were not."""

    written: dict[str, int] = field(default_factory=dict)
    removed: dict[str, int] = field(default_factory=dict)
    not_measured: int = 0  # refused, ineligible or failed: no value to write
    unlinked: Counter[str] = field(default_factory=Counter)  # reason -> results

    def lines(self) -> list[str]:
        w, r = self.written, self.removed
        out = [
            f"{w.get('measurement', 0)} measurement rows written "
            f"({r.get('measurement', 0)} of an earlier export replaced)",
        ]
        if "image_feature" in w:
            out.append(
                f"{w['image_feature']} image_feature and {w.get('image_occurrence', 0)} "
                "image_occurrence rows written"
            )
        if self.not_measured:
            out.append(f"{self.not_measured} series not measured (refused or ineligible): no rows")
        for why, n in sorted(self.unlinked.items()):
            out.append(f"{n} series not linked to the warehouse: {why}")
        return out


def source_prefix(project: str, pipeline: str) -> str:
    """What starts this project's and pipeline's measurement_source_value (the version follows):
    how a re-export knows its own rows. A long project name is replaced by its digest."""
    prefix = f"sphere {project} {pipeline} "
    if len(prefix) > SOURCE_MAX - 10:
        prefix = f"sphere p{hashlib.sha256(project.encode()).hexdigest()[:8]} {pipeline} "
    return prefix


def image_marker(project: str) -> str:
    """The local_path of the image_occurrence rows an export adds (the warehouse had none for
    that series): how a re-export knows them."""
    return f"sphere:{project}"


def export(
    core: Core,
    name: str,
    wh: Warehouse,
    *,
    pipeline: str = "bone-density",
    person_column: str = "person_source_value",
    accession_column: str | None = None,
    actor: str = "",
) -> ExportReport:
    """Write project `name`'s `pipeline` results to the warehouse (see the module); the caller
    has checked that `actor` is the trusted third party (action omop.export)."""
    actor = actor or core.actor
    project = projects.require_active(core, name, "omop.export", actor=actor)
    report = ExportReport()
    results = core.catalog.results(project.id, pipeline)
    measured = [
        r for r in results if r.status == "ok" and (r.values or {}).get("l1_hu") is not None
    ]
    report.not_measured = len(results) - len(measured)
    try:
        found = _link(core, name, wh, measured, person_column, accession_column, actor, report)
        concepts = _concepts(wh)
        prefix = source_prefix(name, pipeline)
        written = [
            _rows(r, link, study, series, prefix, concepts) for r, link, study, series in found
        ]
        counts = wh.replace(
            source_prefix=prefix,
            alg_prefix=prefix,
            image_marker=image_marker(name),
            concepts=_local_concepts(),
            vocabulary=_vocabulary_row(),
            written=written,
            modality_concept_id=concepts["ct"],
        )
    except OmopError as e:
        core.catalog.audit(actor, "omop.export", name, "failed", pipeline=pipeline)
        raise SphereError(str(e)) from None
    report.written, report.removed = counts.written, counts.removed
    core.catalog.audit(
        actor,
        "omop.export",
        name,
        pipeline=pipeline,
        written=report.written,
        replaced=report.removed,
        not_measured=report.not_measured,
        unlinked=sum(report.unlinked.values()),
    )
    return report


@dataclass
class _Original:
    """A measured series' originals, from the vault (None where the vault has none)."""

    result: Any
    patient_id: str
    date: date | None
    study_uid: str | None
    series_uid: str | None
    accession: str | None


def _originals(
    core: Core,
    name: str,
    measured: list[Any],
    with_accession: bool,
    actor: str,
    report: ExportReport,
) -> list[_Original]:
    """Each measured series' originals: the stored study's pseudonyms looked up in the vault
    (each lookup audited there), its date shifted back."""
    studies = {s.study_uid: s for s in core.catalog.indexed_studies(core.project(name).id)[0]}

    def original(pseudonym: str | None) -> str | None:
        try:
            return core.vault.lookup(name, pseudonym, actor=actor) if pseudonym else None
        except KeyError:
            return None

    out = []
    for r in measured:
        study = studies.get(r.study_uid)
        patient = original(study.patient_id) if study is not None else None
        if study is None or patient is None:
            report.unlinked["no Patient ID in the vault"] += 1
            continue
        out.append(
            _Original(
                r,
                patient,
                originals.study_date(core, name, patient, study.study_date),
                original(r.study_uid),
                original(r.series_uid),
                original(study.accession) if with_accession else None,
            )
        )
    return out


def _link(
    core: Core,
    name: str,
    wh: Warehouse,
    measured: list[Any],
    person_column: str,
    accession_column: str | None,
    actor: str,
    report: ExportReport,
) -> list[tuple[Any, Link, str, str]]:
    """(result, its warehouse link, original study UID, original series UID) for each result
    that maps to exactly one person; the others are counted in `report.unlinked`."""
    found = _originals(core, name, measured, bool(accession_column), actor, report)
    persons = wh.persons(person_column, [o.patient_id for o in found])
    by_series: dict[tuple[str | None, str | None], Any] = {}
    by_study: dict[str | None, Any] = {}
    by_accession: dict[str, Any] = {}
    if "image_occurrence" in wh.tables:
        for row in wh.image_occurrences([o.study_uid for o in found if o.study_uid]):
            if row.local_path == image_marker(name):
                continue  # written by an earlier export, which this one replaces
            by_series[(row.image_study_uid, row.image_series_uid)] = row
            by_study.setdefault(row.image_study_uid, row)
    if accession_column and "procedure_occurrence" in wh.tables:
        for row in wh.procedures(accession_column, [o.accession for o in found if o.accession]):
            by_accession[str(row[0])] = row
    out = []
    for o in found:
        person = persons.get(o.patient_id)
        if person is None:
            report.unlinked[f"no single person with that {person_column}"] += 1
            continue
        link, why = Link(person), None
        occurrence = by_series.get((o.study_uid, o.series_uid)) or by_study.get(o.study_uid)
        procedure = by_accession.get(o.accession) if o.accession else None
        for row in (occurrence, procedure):
            if row is None or link.procedure_occurrence_id is not None:
                continue
            if row.person_id != person:
                why = "the warehouse has the study under another person"
                break
            link.procedure_occurrence_id = row.procedure_occurrence_id
            link.visit_occurrence_id = row.visit_occurrence_id
            if occurrence is not None and row is occurrence:
                link.date = row.image_occurrence_date
                if row.image_series_uid == o.series_uid:
                    link.image_occurrence_id = row.image_occurrence_id
            else:
                link.date = row.procedure_date
        if o.date is not None:
            link.date = o.date  # the study's own date, when the profile kept it (shifted or not)
        if why is None and link.date is None:
            why = "no study date (dates removed, and no image occurrence or procedure)"
        if why is not None:
            report.unlinked[why] += 1
            continue
        out.append((o.result, link, o.study_uid or "", o.series_uid or ""))
    return out


def _concepts(wh: Warehouse) -> dict[str, int]:
    """The standard concepts, from the warehouse's vocabulary (0 or a local one when absent)."""
    found = {
        "hu": wh.concept("UCUM", code=HU_UCUM),
        "type": wh.concept("Type Concept", name="Standard algorithm") or EHR,
        "ct": wh.concept("DICOM", code="CT"),
        "procedure_field": wh.concept("CDM", name="procedure_occurrence.procedure_occurrence_id"),
        "measurement_field": wh.concept("CDM", name="measurement.measurement_id"),
    }
    for cls, (snomed, local) in CLASSES.items():
        found[cls] = wh.concept("SNOMED", code=snomed) or local
    return found


def _rows(
    r: Any, link: Link, study_uid: str, series_uid: str, prefix: str, concepts: dict[str, int]
) -> Written:
    values = r.values or {}
    common = {
        "person_id": link.person_id,
        "measurement_date": link.date,
        "measurement_type_concept_id": concepts["type"],
        "visit_occurrence_id": link.visit_occurrence_id,
        "measurement_source_value": (prefix + r.version)[:SOURCE_MAX],
    }
    if link.procedure_occurrence_id is not None:
        common["measurement_event_id"] = link.procedure_occurrence_id
        common["meas_event_field_concept_id"] = concepts["procedure_field"]
    rows = [
        {
            **common,
            "measurement_concept_id": L1_HU,
            "measurement_source_concept_id": L1_HU,
            "value_as_number": round(float(values["l1_hu"]), 1),
            "unit_concept_id": concepts["hu"],
            "unit_source_value": HU_UCUM,
        }
    ]
    cls = values.get("class")
    if cls in CLASSES:
        rows.append(
            {
                **common,
                "measurement_concept_id": BONE_CLASS,
                "measurement_source_concept_id": BONE_CLASS,
                "value_as_concept_id": concepts[cls],
                "value_source_value": cls,
            }
        )
    model = (r.provenance or {}).get("model_checksum") or "none"
    feature = {
        "image_feature_event_field_concept_id": concepts["measurement_field"],
        "image_feature_concept_id": L1_HU,
        "image_feature_type_concept_id": concepts["type"],
        "alg_system": f"{prefix}{r.version} model {model}",
    }
    return Written(link, study_uid, series_uid, rows, feature)


def _local_concepts() -> list[dict[str, Any]]:
    """The `concept` rows of sphere's local concepts (written when missing)."""
    names = {
        LOCAL_BASE: ("sphere local concepts", "Metadata", "Vocabulary", "sphere"),
        L1_HU: (
            "L1 vertebral trabecular attenuation on CT (HU)",
            "Measurement",
            "Clinical Observation",
            "l1-trabecular-hu",
        ),
        BONE_CLASS: (
            "Bone density class from L1 trabecular attenuation on CT",
            "Measurement",
            "Clinical Observation",
            "l1-bone-class",
        ),
        **{
            local: (f"{cls} (L1 trabecular attenuation)", "Meas Value", "Qualifier Value", cls)
            for cls, (_, local) in CLASSES.items()
        },
    }
    return [
        {
            "concept_id": cid,
            "concept_name": concept_name,
            "domain_id": domain,
            "vocabulary_id": VOCABULARY,
            "concept_class_id": concept_class,
            "standard_concept": None,
            "concept_code": code,
            "valid_start_date": date(2026, 1, 1),
            "valid_end_date": date(2099, 12, 31),
            "invalid_reason": None,
        }
        for cid, (concept_name, domain, concept_class, code) in names.items()
    ]


def _vocabulary_row() -> dict[str, Any]:
    return {
        "vocabulary_id": VOCABULARY,
        "vocabulary_name": "sphere imaging gateway local concepts",
        "vocabulary_reference": "sphere README, Results back to OMOP",
        "vocabulary_version": "1",
        "vocabulary_concept_id": LOCAL_BASE,
    }
