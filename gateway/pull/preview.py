"""`sphere pull P --plan`: what a pull would fetch (studies, series, instances, bytes per
source) without fetching it. The same plan as the pull (`puller.plan`, opted-out patients
left out alike); no port is opened, nothing is retrieved; the cohort's resolution is kept
(so `sphere status P --problems` lists the items no source knows) and the plan is audited.

A PACS's study and series answers give instance counts, not sizes: the size is estimated as
instances x rows x columns x bits x frames of one instance of each modality on each source,
as its image-level query answers; a typical image of the modality where it does not say.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import date

from core import Core, Unavailable
from gateway.pull.puller import Planned, Puller
from gateway.pull.retrievers import Retriever, SourceError, open_retrievers

log = logging.getLogger(__name__)

# Rows, columns and bits of a typical image of a modality, where the source does not say.
TYPICAL = {
    "CT": (512, 512, 16),
    "MR": (256, 256, 16),
    "PT": (128, 128, 16),
    "NM": (128, 128, 16),
    "CR": (2048, 2048, 16),
    "DX": (2048, 2048, 16),
    "MG": (3328, 2560, 16),
    "US": (600, 800, 8),
}
DEFAULT = TYPICAL["CT"]


@dataclass
class SourcePlan:
    """What would be pulled from one source."""

    name: str
    studies: set[str] = field(default_factory=set)  # original UIDs, in memory only
    series: int = 0
    instances: int = 0
    unknown_counts: int = 0  # series whose instance count the source did not give
    nbytes: int = 0  # estimated
    typical: int = 0  # series whose size is a typical image's (the source gave none)
    stored: int = 0  # series already complete: a pull skips them


@dataclass
class PullPlan:
    project: str
    items: int
    unresolved: int
    sources: list[SourcePlan]


class Sizes:
    """Bytes per instance by (source, modality): asked once of each source per modality."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, str], int | None] = {}

    def per_instance(self, source: Retriever, p: Planned) -> int | None:
        """Bytes of one instance as the source describes one; None where it does not."""
        modality = (p.series.modality or "").upper()
        key = (source.name, modality)
        if key not in self._known:
            try:
                size = source.image_size(p.study.study_uid, p.series.series_uid)
            except (SourceError, ValueError) as e:  # a PACS without image-level queries
                log.info("plan: %s gave no image size (%s)", source.name, e)
                size = None
            rows, cols, bits, frames = size or (0, 0, 0, 0)
            self._known[key] = rows * cols * bits * frames // 8 or None
        return self._known[key]


def typical_bytes(modality: str) -> int:
    rows, cols, bits = TYPICAL.get(modality.upper(), DEFAULT)
    return rows * cols * bits // 8


def pull_plan(
    core: Core, name: str, *, actor: str | None = None, today: date | None = None
) -> PullPlan:
    """Plan a project's pull on every source and count it; `PullRefused` as a pull would be."""
    puller = Puller(core, name, actor=actor)
    puller.check_allowed(today)
    sources = open_retrievers(core, name, actor=puller.actor)
    try:
        items, planned, found = puller.resolve(sources, purpose="pull plan")
    except SourceError as e:
        core.catalog.audit(puller.actor, "pull.plan", name, "error", reason=str(e))
        raise Unavailable(f"cannot be queried: {e}") from None
    core.catalog.record_resolution(
        {i: [puller.keys.uid(u) for u in uids] for i, uids in found.items()}
    )
    done = core.catalog.complete_series(puller.project.id)
    by_source = {s.name: SourcePlan(s.name) for s in sources}
    sizes = Sizes()
    for p in planned:
        sp = by_source[p.source.name]
        if puller.keys.uid(p.series.series_uid) in done:
            sp.stored += 1
            continue
        sp.studies.add(p.study.study_uid)
        sp.series += 1
        sp.instances += p.series.n_instances or 0
        sp.unknown_counts += p.series.n_instances is None
        each = sizes.per_instance(p.source, p)
        if each is None:
            each = typical_bytes(p.series.modality or "")
            sp.typical += 1
        sp.nbytes += (p.series.n_instances or 0) * each
    result = PullPlan(
        name, len(items), sum(1 for u in found.values() if not u), list(by_source.values())
    )
    core.catalog.audit(
        puller.actor,
        "pull.plan",
        name,
        items=len(items),
        unresolved_items=result.unresolved,
        sources={
            s.name: {"studies": len(s.studies), "series": s.series, "instances": s.instances}
            for s in result.sources
        },
    )
    return result


def plan_lines(p: PullPlan) -> list[str]:
    """The plan, a line per source and a total, in 80 columns."""
    lines = [f"pull plan for {p.project}: nothing is retrieved"]
    lines.append(f"{'source':<16} {'studies':>8} {'series':>7} {'instances':>10} {'size':>10}")
    total = SourcePlan("total")
    for s in p.sources:
        lines.append(_line(s))
        total.studies |= s.studies
        total.series += s.series
        total.instances += s.instances
        total.nbytes += s.nbytes
        total.stored += s.stored
        total.unknown_counts += s.unknown_counts
        total.typical += s.typical
    if len(p.sources) > 1:
        lines.append(_line(total))
    lines.append("size: an estimate, instances x rows x columns x bits of one instance of each")
    lines.append("modality, as the source describes it")
    if total.typical:
        lines.append(f"{total.typical} series sized as a typical image (the source did not say)")
    if total.unknown_counts:
        lines.append(f"{total.unknown_counts} series without an instance count from the PACS")
    if total.stored:
        lines.append(f"{total.stored} series already stored (a pull skips them)")
    lines.append(
        f"cohort: {p.items} items, {p.unresolved} no source knows"
        + (f" (`sphere status {p.project} --problems` lists them)" if p.unresolved else "")
    )
    return lines


def _line(s: SourcePlan) -> str:
    size = f"~{s.nbytes / 1e6:,.0f} MB" if s.nbytes >= 1e6 else f"~{s.nbytes / 1e3:,.0f} kB"
    return f"{s.name:<16} {len(s.studies):>8} {s.series:>7} {s.instances:>10} {size:>10}"
