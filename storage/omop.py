"""An OMOP CDM 5.4 warehouse (PostgreSQL) as sphere reads and writes it: the subjects of a cohort
definition and their imaging, the person and imaging rows behind a study, and the rows an export
writes back (then replaces, and no others). SQL only: what the rows mean is the caller's.

The warehouse's keys (person_id, visit and procedure ids, dates) come out of here only to the
export, which runs as the trusted third party and writes them back to the warehouse alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from sqlalchemy import MetaData, Table, bindparam, create_engine, func, inspect, select, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
IMAGING = ("image_occurrence", "image_feature")  # the Medical Imaging extension's tables


class OmopError(ValueError):
    """A warehouse that cannot be read or written as asked (one line, no patient value)."""


class OmopUnreachable(OmopError):
    """The warehouse's server cannot be reached or refuses the connection."""


def engine_for(url: str) -> Engine:
    """An engine for a PostgreSQL URL (postgresql://, postgres://, postgresql+psycopg://) or a
    libpq DSN ("host=... dbname=..."); psycopg 3 is the driver."""
    url = url.strip()
    if "://" not in url and "=" in url:  # a libpq key=value DSN

        def connect() -> Any:
            import psycopg

            return psycopg.connect(url)

        return create_engine("postgresql+psycopg://", creator=connect)
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            url = "postgresql+psycopg://" + url[len(prefix) :]
    if not url.startswith("postgresql+"):
        raise OmopError("the OMOP warehouse is given as a PostgreSQL URL (postgresql://...)")
    return create_engine(url)


def ident(name: str, what: str) -> str:
    """`name` when it is a plain SQL identifier (it is put in SQL text), else OmopError."""
    if not IDENT.match(name or ""):
        raise OmopError(f"{what} must be a plain SQL name (letters, digits, _): {name!r}")
    return name


@dataclass
class Link:
    """The warehouse rows behind one study (or series): whose, when, in which visit."""

    person_id: int
    date: date | None = None
    procedure_occurrence_id: int | None = None
    visit_occurrence_id: int | None = None
    image_occurrence_id: int | None = None


@dataclass
class Written:
    """One series' rows to write: measurements (without ids) and the image feature naming the
    first of them; `link` says where they belong."""

    link: Link
    study_uid: str
    series_uid: str
    measurements: list[dict[str, Any]]
    feature: dict[str, Any] | None = None


@dataclass
class Counts:
    removed: dict[str, int] = field(default_factory=dict)
    written: dict[str, int] = field(default_factory=dict)


class Warehouse:
    """One OMOP CDM schema on a PostgreSQL server."""

    def __init__(self, url: str, schema: str = "public") -> None:
        self.schema = ident(schema, "the OMOP schema")
        self.engine = engine_for(url)
        try:
            with self.engine.connect() as c:
                names = inspect(c).get_table_names(schema=self.schema)
        except SQLAlchemyError as e:
            self.engine.dispose()
            raise OmopUnreachable(f"the OMOP warehouse cannot be reached: {_why(e)}") from None
        self.tables = {n.lower() for n in names}
        if "person" not in self.tables:
            self.engine.dispose()
            raise OmopError(f"schema '{self.schema}' of the warehouse has no OMOP person table")

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Warehouse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def has_imaging(self) -> bool:
        """Whether the Medical Imaging extension's tables are there."""
        return all(t in self.tables for t in IMAGING)

    def columns(self, table: str) -> set[str]:
        with self.engine.connect() as c:
            return {col["name"] for col in inspect(c).get_columns(table, schema=self.schema)}

    def _t(self, table: str) -> str:
        return f"{self.schema}.{table}"

    def _read(self, sql: str, params: dict[str, Any], *expanding: str) -> list[Any]:
        """Rows of a query run in a read-only transaction (a query of one's own changes
        nothing); `expanding` names the parameters that are lists (`IN :name`)."""
        q = text(sql)
        if expanding:
            q = q.bindparams(*(bindparam(n, expanding=True) for n in expanding))
        try:
            with self.engine.connect() as c:
                c.exec_driver_sql("SET TRANSACTION READ ONLY")
                return list(c.execute(q, params))
        except SQLAlchemyError as e:
            raise OmopError(f"the OMOP query failed: {_why(e)}") from None

    # -- cohorts ------------------------------------------------------------------------------

    def cohort_studies(
        self, definition: int, *, accession_column: str | None = None
    ) -> list[tuple[str, str | None]]:
        """(study UID, accession or None) of the image occurrences of cohort definition
        `definition`'s subjects, each within its subject's cohort period."""
        acc = "NULL"
        if accession_column:
            col = ident(accession_column, "the accession column")
            if col in self.columns("image_occurrence"):
                acc = f"io.{col}"
        sql = (
            f"SELECT DISTINCT io.image_study_uid, {acc} FROM {self._t('cohort')} c "
            f"JOIN {self._t('image_occurrence')} io ON io.person_id = c.subject_id "
            "AND io.image_occurrence_date BETWEEN c.cohort_start_date AND c.cohort_end_date "
            "WHERE c.cohort_definition_id = :d"
        )
        return [(r[0], r[1]) for r in self._read(sql, {"d": definition}) if r[0]]

    def cohort_accessions(
        self, definition: int, accession_column: str, concepts: Sequence[int] = ()
    ) -> list[str]:
        """The accession numbers (in `accession_column` of procedure_occurrence) of cohort
        definition `definition`'s subjects' procedures within their cohort periods, of
        `concepts` only when given."""
        col = ident(accession_column, "the accession column")
        if col not in self.columns("procedure_occurrence"):
            raise OmopError(f"procedure_occurrence has no column '{col}'")
        where = " AND po.procedure_concept_id IN :concepts" if concepts else ""
        sql = (
            f"SELECT DISTINCT po.{col} FROM {self._t('cohort')} c "
            f"JOIN {self._t('procedure_occurrence')} po ON po.person_id = c.subject_id "
            "AND po.procedure_date BETWEEN c.cohort_start_date AND c.cohort_end_date "
            f"WHERE c.cohort_definition_id = :d AND po.{col} IS NOT NULL{where}"
        )
        params: dict[str, Any] = {"d": definition}
        if concepts:
            params["concepts"] = [int(x) for x in concepts]
            rows = self._read(sql, params, "concepts")
        else:
            rows = self._read(sql, params)
        return [str(r[0]) for r in rows if r[0] is not None and str(r[0]).strip()]

    def query(self, sql: str, params: dict[str, Any] | None = None) -> tuple[list[str], list[Any]]:
        """A query of one's own, read-only: (column names, rows)."""
        rows = self._read(sql, params or {})
        return (list(rows[0]._fields) if rows else []), rows

    # -- the way back -------------------------------------------------------------------------

    def persons(self, column: str, values: Iterable[str]) -> dict[str, int]:
        """{value: person_id} of the persons whose `column` holds one of `values`; a value two
        persons hold is left out (which of them is not ours to guess)."""
        col = ident(column, "the person column")
        wanted = sorted(set(values))
        if not wanted:
            return {}
        rows = self._in(f"SELECT {col}, person_id FROM {self._t('person')} WHERE {col}", wanted)
        seen: dict[str, set[int]] = {}
        for value, pid in rows:
            seen.setdefault(str(value), set()).add(int(pid))
        return {v: next(iter(p)) for v, p in seen.items() if len(p) == 1}

    def image_occurrences(self, study_uids: Iterable[str]) -> list[Any]:
        """The image_occurrence rows of these studies."""
        cols = (
            "image_occurrence_id, person_id, procedure_occurrence_id, visit_occurrence_id, "
            "image_occurrence_date, image_study_uid, image_series_uid, local_path"
        )
        sql = f"SELECT {cols} FROM {self._t('image_occurrence')} WHERE image_study_uid"
        return self._in(sql, sorted(set(study_uids)))

    def procedures(self, column: str, accessions: Iterable[str]) -> list[Any]:
        """(accession, procedure_occurrence_id, person_id, visit_occurrence_id, procedure_date)
        of the procedures whose `column` holds one of `accessions`."""
        col = ident(column, "the accession column")
        sql = (
            f"SELECT {col}, procedure_occurrence_id, person_id, visit_occurrence_id, "
            f"procedure_date FROM {self._t('procedure_occurrence')} WHERE {col}"
        )
        return self._in(sql, sorted(set(accessions)))

    def concept(self, vocabulary: str, *, code: str | None = None, name: str | None = None) -> int:
        """The concept_id of a vocabulary's code (or name) in the warehouse's own vocabulary;
        0 ("no matching concept") when it is not loaded there."""
        if "concept" not in self.tables:
            return 0
        by, value = ("concept_code", code) if code is not None else ("concept_name", name)
        sql = (
            f"SELECT concept_id FROM {self._t('concept')} "
            f"WHERE vocabulary_id = :v AND {by} = :x ORDER BY concept_id LIMIT 1"
        )
        rows = self._read(sql, {"v": vocabulary, "x": value})
        return int(rows[0][0]) if rows else 0

    def _in(self, sql: str, values: list[str]) -> list[Any]:
        return self._read(sql + " IN :values", {"values": values}, "values") if values else []

    def replace(
        self,
        *,
        source_prefix: str,
        alg_prefix: str,
        image_marker: str,
        concepts: list[dict[str, Any]],
        vocabulary: dict[str, Any] | None,
        written: list[Written],
        modality_concept_id: int = 0,
    ) -> Counts:
        """In one transaction: remove the rows an earlier export wrote (measurements whose
        measurement_source_value starts with `source_prefix`, image features whose alg_system
        starts with `alg_prefix`, image occurrences marked `image_marker` no feature uses any
        more), add the local concepts missing, then write `written`. Nothing else is touched."""
        counts = Counts()
        try:
            with self.engine.begin() as c:
                meta = MetaData(schema=self.schema)
                names = ["measurement", *(IMAGING if self.has_imaging else ())]
                for name in names:  # ids are max + 1: no other writer meanwhile
                    c.exec_driver_sql(f"LOCK TABLE {self._t(name)} IN EXCLUSIVE MODE")
                t = {n: Table(n, meta, autoload_with=c) for n in names}
                m = t["measurement"]
                mine = func.substr(m.c.measurement_source_value, 1, len(source_prefix))
                counts.removed["measurement"] = c.execute(
                    m.delete().where(mine == source_prefix)
                ).rowcount
                if self.has_imaging:
                    f, io = t["image_feature"], t["image_occurrence"]
                    feats = func.substr(f.c.alg_system, 1, len(alg_prefix)) == alg_prefix
                    counts.removed["image_feature"] = c.execute(f.delete().where(feats)).rowcount
                    used = select(f.c.image_occurrence_id)
                    counts.removed["image_occurrence"] = c.execute(
                        io.delete().where(
                            io.c.local_path == image_marker, io.c.image_occurrence_id.not_in(used)
                        )
                    ).rowcount
                self._add_concepts(c, meta, concepts, vocabulary)
                counts.written = self._write(c, t, written, image_marker, modality_concept_id)
        except SQLAlchemyError as e:
            raise OmopError(f"the OMOP export failed (nothing written): {_why(e)}") from None
        return counts

    def _add_concepts(
        self,
        c: Connection,
        meta: MetaData,
        concepts: list[dict[str, Any]],
        vocabulary: dict[str, Any] | None,
    ) -> None:
        if "concept" not in self.tables:
            return
        concept = Table("concept", meta, autoload_with=c)
        have = set(c.scalars(select(concept.c.concept_id).where(
            concept.c.concept_id.in_([x["concept_id"] for x in concepts])
        )))  # fmt: skip
        fresh = [x for x in concepts if x["concept_id"] not in have]
        if fresh:
            c.execute(concept.insert(), fresh)
        if vocabulary and "vocabulary" in self.tables:
            vocab = Table("vocabulary", meta, autoload_with=c)
            vid = vocabulary["vocabulary_id"]
            if c.scalar(select(func.count()).where(vocab.c.vocabulary_id == vid)) == 0:
                c.execute(vocab.insert(), [vocabulary])

    def _write(
        self,
        c: Connection,
        t: dict[str, Table],
        written: list[Written],
        image_marker: str,
        modality_concept_id: int,
    ) -> dict[str, int]:
        def next_id(table: Table, col: str) -> int:
            return int(c.scalar(select(func.coalesce(func.max(table.c[col]), 0))) or 0) + 1

        m = t["measurement"]
        mid = next_id(m, "measurement_id")
        rows, features, occurrences = [], [], []
        fid = next_id(t["image_feature"], "image_feature_id") if self.has_imaging else 0
        oid = next_id(t["image_occurrence"], "image_occurrence_id") if self.has_imaging else 0
        for w in written:
            first = mid
            for values in w.measurements:
                rows.append({**values, "measurement_id": mid})
                mid += 1
            if not (self.has_imaging and w.feature is not None):
                continue
            occurrence = w.link.image_occurrence_id
            if occurrence is None:
                if w.link.procedure_occurrence_id is None or w.link.date is None:
                    continue  # image_occurrence needs both: no feature for this one
                occurrence, oid = oid, oid + 1
                w.link.image_occurrence_id = occurrence
                occurrences.append(
                    {
                        "image_occurrence_id": occurrence,
                        "person_id": w.link.person_id,
                        "procedure_occurrence_id": w.link.procedure_occurrence_id,
                        "visit_occurrence_id": w.link.visit_occurrence_id,
                        "image_occurrence_date": w.link.date,
                        "image_study_uid": w.study_uid,
                        "image_series_uid": w.series_uid,
                        "modality_concept_id": modality_concept_id,
                        "local_path": image_marker,
                    }
                )
            features.append(
                {
                    **w.feature,
                    "image_feature_id": fid,
                    "person_id": w.link.person_id,
                    "image_occurrence_id": occurrence,
                    "image_feature_event_id": first,
                }
            )
            fid += 1
        for table, batch in ((m, rows), (t.get("image_occurrence"), occurrences)):
            if batch and table is not None:
                c.execute(table.insert(), _uniform(batch))
        if features:
            c.execute(t["image_feature"].insert(), _uniform(features))
        if not self.has_imaging:
            return {"measurement": len(rows)}
        return {
            "measurement": len(rows),
            "image_occurrence": len(occurrences),
            "image_feature": len(features),
        }


def _uniform(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same keys in every row (None where a row has none): one executemany."""
    keys = {k for r in rows for k in r}
    return [{k: r.get(k) for k in keys} for r in rows]


def _why(e: SQLAlchemyError) -> str:
    """What went wrong, without a value of the rows: a server's error by its kind and SQLSTATE
    (its message may quote a value, "invalid input syntax ...: <value>"); a connection failure
    by the driver's first line (a DSN's password is never in it)."""
    orig = getattr(e, "orig", None) or e
    state = getattr(orig, "sqlstate", None)
    if state:
        kind = re.sub(r"(?<!^)(?=[A-Z])", " ", type(orig).__name__).lower()
        return f"{kind} (SQLSTATE {state})"
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0][:200]
