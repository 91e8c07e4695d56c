"""The audit trail's chain: every row carries sha256(previous row's hash + its own content),
so a row edited, inserted or deleted afterwards breaks the chain where it was (`verify`).

Rows are appended here only (`Catalog.audit`, `Catalog.audit_many`), each batch in one
transaction that first locks the chain's head (`AuditHead`), so rows written by several
processes at once still form one chain. The hash has no key: whoever can rewrite the whole
table can rewrite the chain too. `verify` prints the head hash; kept elsewhere (a ticket, a
mail), it shows such a rewrite.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from storage.models import AuditEvent, AuditHead, rowcount, utcnow

GENESIS = ""  # the "previous hash" of the chain's first row


def row_hash(prev: str, row: dict[str, Any]) -> str:
    """The hash of a row (seq, at, actor, action, project, outcome, detail text) after `prev`."""
    at: datetime = row["at"]
    content = json.dumps(
        [
            row["seq"],
            at.isoformat(sep=" ", timespec="microseconds"),
            row["actor"],
            row["action"],
            row["project"],
            row["outcome"],
            row["detail"],
        ],
        separators=(",", ":"),
    )
    return hashlib.sha256((prev + content).encode()).hexdigest()


def _naive_utc(at: datetime | None) -> datetime:
    if at is None:
        return utcnow()
    return at.astimezone(UTC).replace(tzinfo=None) if at.tzinfo else at


def append(s: Session, rows: list[dict[str, Any]]) -> None:
    """Append rows (actor, action, project, outcome, detail as JSON text, at) to the chain,
    in the session's transaction."""
    # A write first: SQLite takes its write lock now (what BEGIN IMMEDIATE would do) and
    # PostgreSQL locks the head row until commit, so the head read next is the latest and
    # no other writer reads it before this transaction ends.
    locked = s.execute(update(AuditHead).where(AuditHead.id == 1).values(seq=AuditHead.seq))
    if not rowcount(locked):
        s.add(AuditHead(id=1, seq=0, hash=GENESIS))
        s.flush()
    seq, prev = s.execute(select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == 1)).one()
    values = []
    for r in rows:
        seq += 1
        row = {
            "at": _naive_utc(r.get("at")),
            "actor": r["actor"],
            "action": r["action"],
            "project": r.get("project"),
            "outcome": r.get("outcome") or "ok",
            "detail": r["detail"],
            "seq": seq,
        }
        row["hash"] = prev = row_hash(prev, row)
        values.append(row)
    s.execute(insert(AuditEvent), values)
    s.execute(update(AuditHead).where(AuditHead.id == 1).values(seq=seq, hash=prev))


@dataclass
class ChainCheck:
    """What `verify` found: rows read, rows written before the catalog had the chain, the
    first problem (with the row it is at) or None, and the hash at the chain's end."""

    rows: int
    before_chain: int
    problem: str | None
    row_id: int | None
    head: str

    def line(self) -> str:
        if self.problem:
            where = f"audit row {self.row_id}" if self.row_id is not None else "audit trail"
            return f"{where}: {self.problem}"
        older = (
            f"; the chain starts after {self.before_chain} older rows written before it existed"
            if self.before_chain
            else ""
        )
        return f"{self.rows} rows, chain intact (head {self.head}){older}"


def verify(s: Session) -> ChainCheck:
    """Walk the trail in order and recompute each row's hash; stop at the first row that is
    not where the chain says (inserted), follows a gap (rows deleted), or no longer matches
    its hash (edited)."""
    head = s.execute(select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == 1)).first()
    n = before = 0
    prev_seq, prev, last_id = 0, GENESIS, None
    started = False
    q = select(AuditEvent).order_by(AuditEvent.id).execution_options(yield_per=2000)
    for e in s.scalars(q):
        n += 1
        if e.hash is None:
            if not started:  # written before this catalog had the chain
                before += 1
                continue
            return ChainCheck(n, before, "inserted: it has no place in the chain", e.id, prev)
        started = True
        if e.seq is None or e.seq <= prev_seq:
            return ChainCheck(n, before, "inserted: its place in the chain is taken", e.id, prev)
        if e.seq > prev_seq + 1:
            gone = e.seq - prev_seq - 1
            return ChainCheck(n, before, f"{gone} row(s) deleted just before it", e.id, prev)
        row = {
            "seq": e.seq,
            "at": e.at,
            "actor": e.actor,
            "action": e.action,
            "project": e.project,
            "outcome": e.outcome,
            "detail": e.detail,
        }
        if row_hash(prev, row) != e.hash:
            return ChainCheck(
                n, before, "edited: its content no longer matches its hash", e.id, prev
            )
        prev_seq, prev, last_id = e.seq, e.hash, e.id
    # The head was read first: rows appended meanwhile are past it, never short of it.
    if head is not None and prev_seq < head.seq:
        gone = head.seq - prev_seq
        where = f"after row {last_id}" if last_id is not None else "at the start"
        return ChainCheck(n, before, f"{gone} row(s) deleted at the end ({where})", None, prev)
    if head is not None and prev_seq == head.seq and prev != head.hash:
        return ChainCheck(n, before, "the chain's head does not match its last row", None, prev)
    return ChainCheck(n, before, None, None, prev)
