"""The Storage SCP's handler: take in only instances a pull waits for, de-identify them, spool them.

It runs in the SCP's worker processes (one `Receiver` each, built from a picklable
`ReceiverConfig`) or in the pull's own process for C-GET. A pull announces each series it waits for
with a marker (`layout.SpoolLayout`); anything without one is refused. Markers, spool folders and
quarantine notes are named by pseudonymous UIDs only.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, cast

from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from core import Core, Settings, SphereError, metrics
from core.optout import Register
from deid.engine import Quarantined
from deid.profile import CODES, Option
from dicom.json_model import Part
from dicom.raw import element_spans, value_span
from dicom.received import Mismatch, ReceivedInstance, Undecodable, file_meta
from dicom.status import DATASET_MISMATCH, DECODE_FAILED, REFUSED, SUCCESS
from gateway import logs
from gateway.pull.layout import SpoolLayout
from storage.series import SeriesWriter

_SERIES_UID, _SOP_UID, _PIXEL_DATA = 0x0020000E, 0x00080018, 0x7FE00010
_TEMPLATES = 64  # series followed at once per worker process
_CLEAN_PIXEL_DATA = CODES[Option.CLEAN_PIXEL_DATA]
_UNDEFINED = 0xFFFFFFFF
_ITEM, _SEQ_DELIMITER = b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Template:
    """The last instance of a series that went through the whole engine: its elements as
    received (pixel data left out) and as stored."""

    syntax: str
    sop_class: str
    context: tuple[str, str, bool]  # Deidentifier.context
    pseudo_series: str
    raw: dict[int, bytes]
    tags: frozenset[int]  # every top-level tag received, pixel data included
    out: dict[Any, Any]  # de-identified elements, pixel data left out
    parts: dict[int, Part | None]  # their encoded headers, as SeriesWriter.add returned them
    charset: Any


@dataclass(frozen=True)
class ReceiverConfig:
    """Everything a worker process needs to receive for one project's pull (picklable): it
    opens its own `Core` from these settings."""

    settings: Settings
    project: str
    spool_root: Path  # resolved by the pull, so a worker's working folder does not matter
    actor: str

    @classmethod
    def of(cls, core: Core, project: str, actor: str | None = None) -> ReceiverConfig:
        """What receivers need to receive for `project`, from the core's settings."""
        s = core.settings
        return cls(s, project, s.spool_dir.resolve(), actor or core.actor)


class Receiver:
    """Accepts expected instances: de-identifies headers, spools them, then acknowledges.

    An acknowledged instance is in the spool file, safe from a crash of this process. The
    spool reaches stable storage at the end of each association (before the release is
    answered, so before the PACS reports the transfer done), or before each acknowledgement
    with `fsync_each`. A power loss in between loses only instances the pull has not verified
    yet: the re-run fetches them again from the PACS.
    """

    def __init__(self, cfg: ReceiverConfig) -> None:
        self.cfg = cfg
        self.core = Core(cfg.settings, actor=cfg.actor)
        self.layout = SpoolLayout(cfg.spool_root, cfg.project)
        try:
            self.keys = self.core.keys(cfg.project)
            self.deid = self.core.deidentifier(cfg.project)
        except SphereError as e:  # said in a worker's log, which the pull's error points to
            log.error("the receiver for %s cannot start: %s", cfg.project, e)
            raise
        self._writers: dict[str, SeriesWriter] = {}
        self._templates: OrderedDict[bytes, _Template] = OrderedDict()
        self._noted: set[tuple[str, str]] = set()  # (series, transfer syntax) told to the pull
        self._lock = threading.Lock()
        self.refused = 0
        self.optout = Register(self.core)
        self.refused_optout = 0  # since the last association's end (audited then)
        self.shortcuts = 0  # instances stored by comparison with the last of their series
        self.metrics = metrics.get()
        # Metrics name a source by its settings' name, never by what a caller calls itself.
        sources = cfg.settings.all_sources()
        self._sources = {s.ae_title: s.name for s in sources if s.protocol != "dicomweb"}
        self._sources |= {f"dicomweb:{s.name}": s.name for s in sources if s.protocol == "dicomweb"}

    def on_store(self, inst: ReceivedInstance) -> int:
        """The status for one received instance (the Storage SCP's handler; C-GET and DICOMweb
        hand theirs the same way): success only once it is spooled (or quarantined).

        The second and later instances of a series take a shortcut to the same outcome, byte
        for byte: compared with the last one as bytes, element by element, only the elements
        that changed (UIDs, position, times...) are decoded and de-identified, when they are of
        a kind that cannot affect any other (see Deidentifier.apply_changes).
        """
        calling_ae = inst.calling_ae
        source = self.source(calling_ae)
        self.metrics.received.labels(self.cfg.project, source).inc()
        self.metrics.received_bytes.labels(self.cfg.project, source).inc(len(inst.data))
        syntax = inst.transfer_syntax
        spans = None
        if syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) or syntax.is_encapsulated:
            spans = element_spans(inst.data, syntax.is_implicit_VR)
            if spans is not None:
                status = self._like_before(inst, spans)
                if status is not None:
                    return status

        try:
            ds = inst.dataset
        except Undecodable as e:
            log.warning("undecodable dataset from %s (%s)", calling_ae, e)
            return DECODE_FAILED
        except Mismatch:
            log.warning("a dataset from %s does not match its request", calling_ae)
            return DATASET_MISMATCH
        if syntax == DeflatedExplicitVRLittleEndian:
            # Inflated on receipt: what is de-identified and stored is Explicit VR LE.
            ds.file_meta = file_meta(ExplicitVRLittleEndian, inst.sop_class, inst.sop_instance)
        return self._store(ds, calling_ae, (inst, spans) if spans is not None else None, syntax)

    def store(self, ds: Dataset, calling_ae: str) -> int:
        """The whole way for a dataset already decoded (no shortcut): what `on_store` does
        when none applies."""
        self.metrics.received.labels(self.cfg.project, self.source(calling_ae)).inc()
        meta = getattr(ds, "file_meta", None)
        syntax = meta.get("TransferSyntaxUID") if meta is not None else None
        return self._store(ds, calling_ae, None, str(syntax or ""))

    def source(self, calling_ae: str) -> str:
        """The name of the source a caller is ("other" for a caller no source is)."""
        return self._sources.get(calling_ae.strip(), "other")

    def _store(
        self,
        ds: Dataset,
        calling_ae: str,
        received: tuple[ReceivedInstance, dict] | None,
        syntax: str = "",
    ) -> int:
        series_uid = str(ds.get("SeriesInstanceUID") or "")
        pseudo_series = self.keys.uid(series_uid) if series_uid else ""
        want = self.layout.expected(pseudo_series) if pseudo_series else None
        study_uid = str(ds.get("StudyInstanceUID") or "")
        if want is None or not study_uid or self.keys.uid(study_uid) != want["study"]:
            self._refuse(calling_ae)
            return REFUSED
        if self._opted_out(ds, calling_ae):
            return REFUSED
        pseudo_sop = self.keys.uid(str(ds.get("SOPInstanceUID") or ""))
        context = self.deid.context(ds) if received is not None else None
        try:
            self.deid.apply(ds)
            if want.get("patient") and ds.get("PatientID") != want["patient"]:
                # Checked here, not only in the engine: series of a study may reach other workers.
                raise Quarantined("Patient ID differs from the study's: two patients in one study")
        except Quarantined as q:
            self.layout.note_quarantine(pseudo_series, pseudo_sop, q.reason)
            self.metrics.quarantined.labels(self.cfg.project, self.source(calling_ae)).inc()
            log.warning("quarantined an instance of series %s: %s", pseudo_series, q.reason)
            return SUCCESS  # taken in charge: reported, never stored
        parts = self._writer(pseudo_series).add(ds)
        self._note_syntax(pseudo_series, syntax)
        if (
            received is not None
            and context is not None
            and self.deid.stats is None
            and not _pixels_cleaned(ds)
        ):
            self._remember(received[0], received[1], context, pseudo_series, ds, parts)
        return SUCCESS

    def _note_syntax(self, pseudo_series: str, syntax: str) -> None:
        """Tell the pull, once per series and syntax, which transfer syntax came (the shortcut
        below only takes instances of a syntax already seen here)."""
        if not syntax:
            return
        with self._lock:
            if (pseudo_series, syntax) in self._noted:
                return
            self._noted.add((pseudo_series, syntax))
        self.layout.note_syntax(pseudo_series, syntax)

    def _remember(
        self,
        inst: ReceivedInstance,
        spans: dict[int, tuple[int, int]],
        context: tuple[str, str, bool],
        pseudo_series: str,
        out: Dataset,
        parts: dict[int, Part | None],
    ) -> None:
        """Keep this instance as the one the next of its series is compared with."""
        data = inst.data
        if _SERIES_UID not in spans:
            return
        raw = {t: data[s:e] for t, (s, e) in spans.items() if t != _PIXEL_DATA}
        template = _Template(
            syntax=inst.transfer_syntax,
            sop_class=inst.sop_class,
            context=context,
            pseudo_series=pseudo_series,
            raw=raw,
            tags=frozenset(spans),
            out={t: e for t, e in out._dict.items() if t != _PIXEL_DATA},
            parts=parts,
            charset=out.original_character_set,
        )
        with self._lock:
            self._templates[raw[_SERIES_UID]] = template
            self._templates.move_to_end(raw[_SERIES_UID])
            while len(self._templates) > _TEMPLATES:
                self._templates.popitem(last=False)

    def _like_before(self, inst: ReceivedInstance, spans: dict[int, tuple[int, int]]) -> int | None:
        """Store an instance that differs from its series' template only in local elements;
        None when it does not (then it takes the whole way, which also answers refusals)."""
        data = inst.data
        span = spans.get(_SERIES_UID)
        if span is None:
            return None
        with self._lock:
            tpl = self._templates.get(data[span[0] : span[1]])
        if (
            tpl is None
            or tpl.syntax != inst.transfer_syntax
            or tpl.sop_class != inst.sop_class
            or tpl.tags != spans.keys()
        ):
            return None
        raw = tpl.raw
        changed = [t for t, (s, e) in spans.items() if t != _PIXEL_DATA and raw[t] != data[s:e]]
        implicit = inst.transfer_syntax.is_implicit_VR
        mini = read_dataset(
            BytesIO(b"".join(data[spans[t][0] : spans[t][1]] for t in changed)), implicit, True
        )
        if sorted(mini._dict) != sorted(changed):
            return None
        sop = mini.get(_SOP_UID)
        if sop is None or str(sop.value) != inst.sop_instance:
            return None  # the whole way answers a dataset that does not match its request
        if self.layout.expected(tpl.pseudo_series) is None:
            return None
        pixels = None
        if _PIXEL_DATA in spans:
            pixels = _pixel_element(data, spans[_PIXEL_DATA], implicit)
            if pixels is None:
                return None
        if not self.deid.apply_changes(mini, tpl.context):
            return None
        out = dict(tpl.out)
        elements = cast("dict[int, Any]", mini._dict)  # BaseTag keys: plain ints find them
        for t in changed:
            elem = elements.get(t)
            if elem is None:
                out.pop(t, None)
            else:
                out[t] = elem
        if pixels is not None:
            out[_PIXEL_DATA] = pixels
        ds = Dataset(out)
        ds.set_original_encoding(implicit, True, tpl.charset)
        meta = file_meta(inst.transfer_syntax, inst.sop_class, inst.sop_instance)
        self.deid.clean_meta(meta)
        ds.file_meta = meta
        fresh = set(changed)
        reuse = {t: p for t, p in tpl.parts.items() if t not in fresh}
        self._writer(tpl.pseudo_series).add(ds, reuse)
        self.shortcuts += 1
        return SUCCESS

    def on_release(self, assoc_id: Any = None) -> None:
        """At the end of an association: hand mappings to the vault, flush the spool, close
        finished series."""
        self.deid.flush()
        self._optout_refusals()
        with self._lock:
            writers = list(self._writers.values())
        for w in writers:
            w.sync()
        with self._lock:
            done = [k for k in self._writers if self.layout.expected(k) is None]
            for k in done:
                self._writers.pop(k).close()

    def close(self) -> None:
        self.deid.flush()
        self._optout_refusals()
        with self._lock:
            for w in self._writers.values():
                w.close()
            self._writers.clear()
        self.core.close()

    def _writer(self, pseudo_series: str) -> SeriesWriter:
        with self._lock:
            w = self._writers.get(pseudo_series)
            if w is None:
                w = SeriesWriter(
                    self.layout.data(pseudo_series),
                    fsync=self.cfg.settings.fsync,
                    segment=str(os.getpid()),
                    sync_each=self.cfg.settings.fsync_each,
                )
                self._writers[pseudo_series] = w
            return w

    def _opted_out(self, ds: Dataset, calling_ae: str) -> bool:
        """Whether the instance's patient opted out (checked on the original Patient ID,
        before anything is de-identified or spooled); counted, audited per association."""
        if not self.optout.refuses(str(ds.get("PatientID") or "")):
            return False
        with self._lock:
            self.refused_optout += 1
        self.metrics.refused.labels(self.cfg.project, self.source(calling_ae), "opted_out").inc()
        return True

    def _optout_refusals(self) -> None:
        """Audit the opt-out refusals since the last call (a count, never who), and read the
        register again: an objection made during a pull holds from the next association."""
        with self._lock:
            n, self.refused_optout = self.refused_optout, 0
        if n:
            log.warning("refused %d instances of patients who opted out", n)
            self.core.catalog.audit(
                self.cfg.actor, "store.refused_optout", self.cfg.project, "refused", instances=n
            )
        if self.optout.reload():
            with self._lock:
                self._templates.clear()  # their shortcut skips the check above

    def _refuse(self, calling_ae: str) -> None:
        with self._lock:
            self.refused += 1
        self.metrics.refused.labels(self.cfg.project, self.source(calling_ae), "unsolicited").inc()
        log.warning("refused an unsolicited instance from AE %r", calling_ae)
        self.core.catalog.audit(
            self.cfg.actor, "store.refused", self.cfg.project, "refused", calling_ae=calling_ae
        )


def in_worker(cfg: ReceiverConfig) -> Receiver:
    """The receiver of a Storage SCP worker process, which logs in the pull's format."""
    logs.in_worker(cfg.settings.log_format)
    log.info("receiving for project %s", cfg.project)
    return Receiver(cfg)


def _encapsulated(data: bytes, span: tuple[int, int]) -> bool:
    """Whether the explicit OB element at `span` is of undefined length, starts with an item
    (the offset table) and ends with a sequence delimiter of length 0."""
    start, end = span
    return (
        data[start + 8 : start + 12] == b"\xff\xff\xff\xff"
        and data[start + 12 : start + 16] == _ITEM
        and data[end - 8 : end] == _SEQ_DELIMITER
    )


def _pixels_cleaned(ds: Dataset) -> bool:
    """Whether de-identification changed the pixels (burned-in text blanked: the Clean Pixel
    Data option among its methods). The shortcut takes the next instance's pixels as received,
    so it must never follow such an instance: they would be stored unblanked."""
    methods = ds.get("DeidentificationMethodCodeSequence") or []
    return any(str(item.get("CodeValue", "")) == _CLEAN_PIXEL_DATA for item in methods)


def _pixel_element(data: bytes, span: tuple[int, int], implicit: bool) -> RawDataElement | None:
    """Pixel data as a raw element: native, a view of `data` (no copy); encapsulated (explicit
    OB of undefined length), its items as pydicom reads them (up to the sequence delimiter).
    None for a form the writer should see decoded the ordinary way (odd VR or layout)."""
    vr = None if implicit else data[span[0] + 4 : span[0] + 6].decode("latin-1")
    value = value_span(data, span, implicit)
    if value is None and vr == "OB" and _encapsulated(data, span):
        start, end = span[0] + 12, span[1] - 8
        return RawDataElement(
            BaseTag(_PIXEL_DATA), vr, _UNDEFINED, data[start:end], start, False, True
        )
    if value is None or vr not in (None, "OB", "OW"):
        return None
    start, end = value
    view = memoryview(data)[start:end]
    # the view stands for the bytes (pydicom reads a raw value through the buffer protocol)
    value_bytes = cast(bytes, view)
    return RawDataElement(BaseTag(_PIXEL_DATA), vr, end - start, value_bytes, start, implicit, True)
