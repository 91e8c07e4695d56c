"""A cohort read from an OMOP CDM warehouse: the studies of a cohort definition's subjects within
their cohort periods (the Medical Imaging extension's image_occurrence when the warehouse has it,
else procedure_occurrence with the column that holds the accession number), or the study UIDs and
accession numbers a query of one's own returns. The values join the cohort as any other
(`projects.add_cohort`: vault, digests); the read is audited with the definition and the counts."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core import projects
from core.core import Core
from core.errors import ProjectError, SphereError, Unavailable
from storage.omop import OmopError, OmopUnreachable, Warehouse

UID = re.compile(r"^[0-9]+(\.[0-9]+)+$")
# A query's column that names what it returns; any other column is told apart by its values.
COLUMN_KINDS = {
    "study_uid": "study_uid",
    "image_study_uid": "study_uid",
    "study_instance_uid": "study_uid",
    "accession": "accession",
    "accession_number": "accession",
}


@dataclass
class OmopCohort:
    """What a read found (values by cohort kind), where it came from, and how many were new."""

    source: str  # image_occurrence, procedure_occurrence or query
    values: dict[str, list[str]]
    added: dict[str, int] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(len(v) for v in self.values.values())


def open_warehouse(url: str, schema: str = "public") -> Warehouse:
    """The warehouse at `url`; a user's mistake or an unreachable server as a SphereError."""
    try:
        return Warehouse(url, schema)
    except OmopUnreachable as e:
        raise Unavailable(str(e)) from None
    except OmopError as e:
        raise SphereError(str(e)) from None


def read(
    wh: Warehouse,
    *,
    definition: int | None = None,
    sql: str | None = None,
    accession_column: str | None = None,
    procedure_concepts: Sequence[int] = (),
) -> OmopCohort:
    """The cohort items of cohort definition `definition` or of the query `sql` (which may use
    :cohort_definition_id when a definition is given too)."""
    try:
        if sql is not None:
            params = {"cohort_definition_id": definition} if definition is not None else {}
            names, rows = wh.query(sql, params)
            return OmopCohort("query", _classify(names, rows))
        if definition is None:
            raise ProjectError("give a cohort definition (--cohort-definition) or --omop-sql")
        if "cohort" not in wh.tables:
            raise ProjectError(f"schema '{wh.schema}' of the warehouse has no cohort table")
        if "image_occurrence" in wh.tables:
            found = wh.cohort_studies(definition, accession_column=accession_column)
            values = {
                "study_uid": sorted({s for s, _ in found}),
                "accession": sorted({a for _, a in found if a}),
            }
            return OmopCohort("image_occurrence", values)
        if not accession_column:
            raise ProjectError(
                "the warehouse has no image_occurrence table: name the procedure_occurrence "
                "column holding the accession number (--omop-accession-column)"
            )
        accessions = wh.cohort_accessions(definition, accession_column, procedure_concepts)
        return OmopCohort("procedure_occurrence", {"accession": sorted(set(accessions))})
    except OmopError as e:
        raise SphereError(str(e)) from None


def add(
    core: Core,
    name: str,
    wh: Warehouse,
    *,
    definition: int | None = None,
    sql_file: Path | None = None,
    accession_column: str | None = None,
    procedure_concepts: Sequence[int] = (),
    actor: str = "",
) -> OmopCohort:
    """Add to project `name`'s cohort what the warehouse says (see `read`); audited with the
    definition (or the query's digest: a query may hold values) and the row count."""
    core.project(name)  # an unknown project says so before the warehouse is read
    sql = None
    if sql_file is not None:
        try:
            sql = Path(sql_file).read_text()
        except OSError as e:
            raise SphereError(f"cannot read {sql_file}: {e.strerror}") from None
    found = read(
        wh,
        definition=definition,
        sql=sql,
        accession_column=accession_column,
        procedure_concepts=procedure_concepts,
    )
    detail: dict[str, Any] = {"source": found.source, "rows": found.rows}
    if definition is not None:
        detail["definition"] = definition
    if sql is not None:
        detail["query_sha256"] = hashlib.sha256(sql.encode()).hexdigest()[:16]
    core.catalog.audit(actor or core.actor, "cohort.omop", name, **detail)
    for kind, values in found.values.items():
        if values:
            found.added[kind] = projects.add_cohort(core, name, kind, values, actor=actor)
    return found


def _classify(names: list[str], rows: list) -> dict[str, list[str]]:
    """Study UIDs and accession numbers from a query's rows: the columns named for them
    (study_uid, accession...), else the first column, each value by its form (a UID or not)."""
    out: dict[str, set[str]] = {"study_uid": set(), "accession": set()}
    kinds = [COLUMN_KINDS.get(n.lower()) for n in names]
    named = any(kinds)
    for row in rows:
        for i, value in enumerate(row):
            kind = kinds[i]
            v = "" if value is None else str(value).strip()
            if not v or (kind is None and (named or i > 0)):
                continue
            out[kind or ("study_uid" if UID.match(v) else "accession")].add(v)
    return {k: sorted(v) for k, v in out.items()}
