"""The de-identification engine: a profile's Table E.1-1 actions applied to a dataset, in place.

One walk over the dataset, recursing into sequences at any depth. Elements the profile keeps are not
decoded (raw values stay bytes); pixel data is never touched unless burned-in text must be blanked.
Free text to clean is handled after the walk, once every name, identifier and date of the instance
is known. Anything malformed or ambiguous raises `Quarantined`, whose reason holds no PHI.
"""

from __future__ import annotations

import re
import threading
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any, cast

from pydicom.charset import TEXT_VR_DELIMS, decode_bytes
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import UID_dictionary
from pydicom.valuerep import VR

from deid import iod, pixels, scrub, table
from deid.dates import shift_da, shift_dt
from deid.keys import ProjectKeys
from deid.profile import CODES, Option, Profile
from dicom import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

Mapping = tuple[str, str, str]  # (kind, original, pseudonym)

VALID_VRS = frozenset(str(v) for v in VR if len(str(v)) == 2)
TEXT_VRS = frozenset({"LO", "SH", "LT", "ST", "UT", "UC"})
_LONG_TEXT = frozenset({"LT", "ST", "UT", "UC"})
_SEMANTIC_VRS = frozenset({"SQ", "UI", "DA", "DT", "TM", "PN", "AS"})
# VRs of elements whose outcome depends on their own value only (no names, dates or text,
# which feed or undergo the free-text scrub): see `Deidentifier.is_local`.
_LOCAL_VRS = frozenset(
    {"UI", "TM", "IS", "DS", "US", "SS", "UL", "SL", "FL", "FD", "AT", "SV", "UV"}
    | {"OD", "OF", "OL", "OV"}
)
# Elements other rules read (patient, study, class, burned-in checks, character set).
_CONTEXT_TAGS = frozenset(
    {0x00080005, 0x00080008, 0x00080016, 0x00080060, 0x0020000D, 0x0020000E, 0x00100020}
)
# VRs whose values no rule looks at when the table does not list the attribute.
_PASS_VRS = frozenset(
    {"US", "SS", "UL", "SL", "FL", "FD", "DS", "IS", "CS", "AT", "SV", "UV", "OB", "OW", "OF"}
    | {"OD", "OL", "OV", "TM", "AS"}
)
_MAX_LEN = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "ST": 1024, "LT": 10240, "PN": 64}
_DUMMY = {
    "AE": "ANONYMOUS",
    "AS": "000Y",
    "CS": "ANONYMIZED",
    "DA": "19000101",
    "DT": "19000101000000",
    "TM": "000000",
    "DS": "0",
    "IS": "0",
    "LO": "ANONYMIZED",
    "LT": "ANONYMIZED",
    "SH": "ANONYMIZED",
    "ST": "ANONYMIZED",
    "UT": "ANONYMIZED",
    "UC": "ANONYMIZED",
    "PN": "ANONYMIZED",
    "UR": "http://anonymized.invalid/",
}
_DELIMS = set(TEXT_VR_DELIMS) | {0x5C, 0x5E, 0x3D}  # and value, name-part, name-group marks
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_NUMERIC_ZERO = {"US": 0, "SS": 0, "UL": 0, "SL": 0, "FL": 0.0, "FD": 0.0, "SV": 0, "UV": 0}

# Walk modes: how unlisted free text is treated inside a sequence.
NORMAL, CLEAN, DUMMY = 0, 1, 2

PATIENT_NAME, PATIENT_ID, ACCESSION = 0x00100010, 0x00100020, 0x00080050
STUDY_UID, SERIES_UID, SOP_UID, SOP_CLASS = 0x0020000D, 0x0020000E, 0x00080018, 0x00080016
FRAME_UID = 0x00200052
CODE_SEQUENCES_KEPT = frozenset({0x0040A043, 0x004008EA, 0x0040A168})  # concept names, units, codes
CODING_SCHEME = frozenset({0x00080102, 0x00080103})
CODE_VALUES = frozenset({0x00080100, 0x00080119, 0x00080120})  # only scanned, even when cleaning
DEFLATED = "1.2.840.10008.1.2.1.99"
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
ENCAPSULATED_DOC_PREFIX = "1.2.840.10008.5.1.4.1.1.104."
_KIND = {STUDY_UID: "study", SERIES_UID: "series", SOP_UID: "sop", FRAME_UID: "frame"}
# UIDs that say what an object is, not whose: a private SOP class or transfer syntax is a
# vendor's, kept as is (PS3.15 keeps SOP Class UID; rewriting it changes what the object is).
CLASS_UIDS = frozenset(
    {
        0x00020002,  # Media Storage SOP Class UID
        0x00020010,  # Transfer Syntax UID
        0x00041510,  # Referenced SOP Class UID in File
        0x00041512,  # Referenced Transfer Syntax UID in File
        0x0004151A,  # Referenced Related General SOP Class UID in File
        0x00080016,  # SOP Class UID
        0x0008001A,  # Related General SOP Class UID
        0x0008001B,  # Original Specialized SOP Class UID
        0x00080062,  # SOP Classes in Study
        0x00081150,  # Referenced SOP Class UID
    }
)
_META_DROP = (0x00020016, 0x00020017, 0x00020018, 0x00020100, 0x00020102)

_ID_NAME = re.compile(
    r"\b(ID|IDs|Identifier|Number|Numbers|Name|Names|Address|Telephone|Serial|Station|"
    r"Institution|Department|Locator|Phone)\b|Accession|Residence",
    re.IGNORECASE,
)
_NOT_ID = re.compile(r"Protocol Name|ROI Name|Plan Name|Set Name|Template Name|Montage|Entity")


class Quarantined(Exception):
    """The instance cannot be de-identified safely; `reason` says why and holds no PHI."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _by_int(ds: Dataset) -> dict[int, Any]:
    """`ds`'s elements looked up by plain int (a BaseTag is an int: same hash, same entries)."""
    return cast("dict[int, Any]", ds._dict)


@lru_cache(maxsize=4096)
def _dict_vrs(tag: int) -> frozenset[str] | None:
    """The VRs the data dictionary allows for a standard tag, or None when it is unknown."""
    try:
        return frozenset(v.strip() for v in dictionary_VR(tag).split(" or "))
    except KeyError:
        return None


def _identity_tags() -> frozenset[int]:
    """Table rows holding identifiers whose values are looked for in free text."""
    out = set()
    for r in table.load():
        if r.exact and _ID_NAME.search(r.name) and not _NOT_ID.search(r.name):
            vrs = _dict_vrs(r.value)
            if vrs is None or not vrs & {"PN", "SQ", "UI", "OB", "UN"}:
                out.add(r.value)
    return frozenset(out)


ID_TAGS = _identity_tags()


class _Run:
    """The state of one `apply` call (the engine itself is shared between threads)."""

    __slots__ = (
        "pseudonym",
        "shift",
        "tokens",
        "deferred",
        "family",
        "stats",
        "mappings",
        "blanked",
    )

    def __init__(
        self, pseudonym: str, shift: int | None, family: str | None, stats: Counter | None
    ) -> None:
        self.pseudonym = pseudonym
        self.shift = shift
        self.family = family
        self.stats = stats
        self.tokens: set[str] = set()
        self.deferred: list[tuple[Dataset, BaseTag, str, bool]] = []
        self.mappings: list[Mapping] = []
        self.blanked = False


class Deidentifier:
    """Applies a `Profile` with a project's `ProjectKeys`. Thread-safe; share one per project.

    Mappings (original -> pseudonym) for the vault are collected as the engine goes: they are
    handed to `sink` in batches when one is given, else kept for `drain_mappings()`.
    """

    def __init__(
        self,
        profile: Profile,
        keys: ProjectKeys,
        *,
        sink: Callable[[list[Mapping]], None] | None = None,
        report: bool = False,
        batch: int = 512,
        track_studies: int = 100_000,
    ) -> None:
        self.profile, self.keys = profile, keys
        self._plan = profile.actions
        masked = {r.tag: profile.action(r) for r in table.load() if not r.exact}
        # Bitmaps (curves, overlays) cannot be cleaned of text here: C removes them too.
        self._curve = "X" if masked["(50XX,XXXX)"] == "C" else masked["(50XX,XXXX)"]
        self._overlay_data = "X" if masked["(60XX,3000)"] == "C" else masked["(60XX,3000)"]
        self._overlay_comments = masked["(60XX,4000)"]
        opts = profile.options
        self._modified = Option.RETAIN_LONG_MODIFIED_DATES in opts
        self._full_dates = Option.RETAIN_LONG_FULL_DATES in opts
        self._retain_uids = Option.RETAIN_UIDS in opts
        self._safe_private = profile.safe_private if Option.RETAIN_SAFE_PRIVATE in opts else None
        self.stats: Counter | None = Counter() if report else None
        self._sink, self._batch = sink, batch
        # Without a sink, a bounded backlog (oldest dropped): pass `sink` to keep every mapping.
        self._pending: deque[Mapping] = deque(maxlen=200_000)
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self._study_patient: OrderedDict[str, str] = OrderedDict()
        self._passthrough: dict[int, bool] = {}
        self._track = track_studies
        codes = profile.method_codes()
        self._codes = _code_sequence(codes)
        pixel = (CODES[Option.CLEAN_PIXEL_DATA], Option.CLEAN_PIXEL_DATA.value)
        self._codes_blanked = _code_sequence(sorted([*codes, pixel]))

    # -- public -----------------------------------------------------------------------------

    def apply(self, ds: Dataset) -> Dataset:
        """De-identify `ds` in place (headers; pixel data untouched) and return it.

        Raises `Quarantined` when the instance must not be stored; `ds` is then left half-done
        and must be discarded.
        """
        meta = getattr(ds, "file_meta", None)
        sop_class = self._text(ds, SOP_CLASS) or ""
        self._check_input(ds, meta, sop_class)
        patient_id = self._text(ds, PATIENT_ID)
        if not patient_id:
            raise Quarantined("no Patient ID: the instance cannot be tied to a pseudonym")
        study_uid = self._text(ds, STUDY_UID) or ""
        self._check_study(study_uid, patient_id)
        shift = self.keys.date_shift_days(patient_id) if self._modified else None
        has_pixels = any(t in ds._dict for t in pixels.PIXEL_TAGS)
        pseudonym = self.keys.pseudonym(patient_id)
        run = _Run(pseudonym, shift, iod.family(sop_class, has_pixels), self.stats)
        if has_pixels:
            self._burned_in(ds, sop_class, run)
        run.mappings.append(("patient", patient_id, pseudonym))
        try:
            self._walk(run, ds, None, NORMAL)
            self._finish_text(run)
        except Quarantined:
            raise
        except Exception as e:  # malformed data deep inside: report it, let the run go on
            # Only the type: pydicom's messages may quote values.
            raise Quarantined(f"malformed data ({type(e).__name__})") from None
        self._stamp(ds, run)
        if meta is not None:
            self.clean_meta(meta)
        if getattr(ds, "preamble", None):
            ds.preamble = b"\x00" * 128
        self._keep_mappings(run.mappings)
        return ds

    def context(self, ds: Dataset) -> tuple[str, str, bool]:
        """(Patient ID, SOP class, has pixels) of an instance, read before `apply` changes it:
        what `apply_changes` needs to know of the instance it follows."""
        has_pixels = any(t in ds._dict for t in pixels.PIXEL_TAGS)
        return self._text(ds, PATIENT_ID) or "", self._text(ds, SOP_CLASS) or "", has_pixels

    def is_local(self, tag: int, vr: str | None) -> bool:
        """Whether an element's outcome depends on its own value only and no other rule reads
        it: then it can be de-identified alone (see `apply_changes`)."""
        group = tag >> 16
        if group & 1 or not tag & 0xFFFF or group == 0x0002 or group & 0xFF00 in (0x5000, 0x6000):
            return False
        if (group == 0x0028 and tag & 0xFFFF < 0x1000) or tag in _CONTEXT_TAGS or tag in ID_TAGS:
            return False  # image pixel description, burned-in flag, identities
        vrs = _dict_vrs(tag) if vr is None or vr == "UN" else frozenset({vr})
        return bool(vrs and vrs <= _LOCAL_VRS)

    def apply_changes(self, changed: Dataset, context: tuple[str, str, bool]) -> bool:
        """De-identify in place the elements in which an instance differs from an earlier one
        of its series that went through `apply`, every other element being byte for byte the
        same (same patient, class and transfer syntax too): the rest of its output is the earlier
        one's. `context` is the earlier one's `context`.

        False when that is not safe for these elements (`changed` is then to be thrown away
        and the instance given to `apply`): one is not local, or the walk noted identities or
        deferred text, or found something to quarantine.
        """
        if self.stats is not None:
            return False  # a per-rule report counts every instance in full
        if not all(self.is_local(int(t), e.VR) for t, e in changed._dict.items()):
            return False
        patient_id, sop_class, has_pixels = context
        shift = self.keys.date_shift_days(patient_id) if self._modified else None
        family = iod.family(sop_class, has_pixels)
        run = _Run(self.keys.pseudonym(patient_id), shift, family, None)
        try:
            self._walk(run, changed, None, NORMAL)
        except Exception:  # Quarantined or malformed: `apply` decides, with the whole instance
            return False
        if run.tokens or run.deferred:
            return False
        self._keep_mappings(run.mappings)
        return True

    def drain_mappings(self) -> list[Mapping]:
        """Mappings collected since the last call (when no sink was given), for the vault."""
        with self._lock:
            out = list(self._pending)
            self._pending.clear()
        return out

    def flush(self) -> None:
        """Hand any pending mappings to the sink (call at the end of a series or a pull)."""
        if self._sink is None:
            return
        batch = self.drain_mappings()
        if batch:
            self._sink(batch)

    # -- checks before any change -----------------------------------------------------------

    def _check_input(self, ds: Dataset, meta: Dataset | None, sop_class: str) -> None:
        if meta is not None:
            ts = self._text(meta, 0x00020010) or ""
            if ts == DEFLATED:
                raise Quarantined("deflated transfer syntax: not accepted")
            if (self._text(meta, 0x00020002) or "") == DICOMDIR_CLASS:
                raise Quarantined("a DICOMDIR, not an instance")
        if 0x00041220 in ds._dict or sop_class == DICOMDIR_CLASS:
            raise Quarantined("a DICOMDIR, not an instance")
        if sop_class.startswith(ENCAPSULATED_DOC_PREFIX):
            raise Quarantined("encapsulated document: its content cannot be checked")

    def _check_study(self, study_uid: str, patient_id: str) -> None:
        """Two Patient IDs in one study are ambiguous: the later one is quarantined."""
        if not study_uid:
            return
        key, pid = self.keys.uid(study_uid), self.keys.pseudonym(patient_id)  # memoised
        with self._lock:
            seen = self._study_patient.get(key)
            if seen is None:
                self._study_patient[key] = pid
                if len(self._study_patient) > self._track:
                    self._study_patient.popitem(last=False)
            elif seen != pid:
                raise Quarantined("two Patient IDs in one study")

    def _burned_in(self, ds: Dataset, sop_class: str, run: _Run) -> None:
        modality = (self._text(ds, 0x00080060) or "").upper()
        reason = pixels.burned_in_reason(sop_class, modality, lambda t: self._text(ds, t))
        if reason is None:
            return
        if self.profile.burned_in != "blank":
            raise Quarantined(reason)
        why_not = pixels.blank_regions(ds, self.profile.regions)
        if why_not:
            raise Quarantined(why_not)
        run.blanked = True

    # -- the walk ---------------------------------------------------------------------------

    def _walk(self, run: _Run, ds: Dataset, parent: int | None, mode: int) -> None:
        d = ds._dict  # read and delete through the dict: Dataset's own accessors cost far more
        plan = self._plan
        stats = run.stats
        keep_private = None
        passthrough = self._passthrough
        action: str | None
        for tag in list(d):
            elem = d[tag]
            t = int(tag)  # plain int: BaseTag's __eq__ is Python code, slow in dict lookups
            vr = elem.VR
            # Fast path: numbers, codes, times, pixel data... that no rule touches.
            known = passthrough.get(t)
            if known is None:
                known = passthrough[t] = self._is_passthrough(t)
            if known and (vr is None or vr in _PASS_VRS):
                if stats is not None:
                    stats[(t, "K")] += 1
                continue
            if vr is not None and vr not in VALID_VRS:
                raise Quarantined(f"invalid VR at {_tag(t)}")
            if t & 0x10000:  # odd group: private
                if keep_private is None:
                    keep_private = self._private_to_keep(ds)
                if t in keep_private:
                    if elem.VR == "SQ":
                        self._recurse(run, ds, tag, mode)
                    action = "K"
                else:
                    del d[tag]
                    action = "X"
                if stats is not None:
                    stats[("private", action)] += 1
                continue
            vrs = _dict_vrs(t)
            if vr is None or vr == "UN":
                vr = min(vrs) if vrs else "UN"
            elif vrs and vr not in vrs and (vr in _SEMANTIC_VRS or vrs & _SEMANTIC_VRS):
                raise Quarantined(f"VR does not match the data dictionary at {_tag(t)}")
            if not t & 0xFFFF:  # group length: stale once anything changes
                del d[tag]
                continue
            action = plan.get(t)
            if action is None:
                group = t >> 16
                if group & 0xFF00 in (0x5000, 0x6000) and not group & 1:
                    action = self._masked(t)
            if action is not None and "/" in action:
                action = iod.resolve(action, iod.attribute_type(run.family, parent, t))
            if action is None:
                action = self._unlisted(run, ds, tag, elem, vr, parent, mode)
            else:
                self._act(run, ds, tag, elem, vr, action, parent, mode)
            if stats is not None:
                stats[(t, action)] += 1
        if keep_private is not None:
            ds._private_blocks = {}  # creators may be gone: pydicom's cache must not see them

    def _is_passthrough(self, t: int) -> bool:
        """Whether a tag is kept as is whatever its value: not listed, not private or masked,
        and of a VR that holds neither text, names, dates, UIDs nor sequences."""
        group = t >> 16
        if t in self._plan or group & 1 or not t & 0xFFFF or group & 0xFF00 in (0x5000, 0x6000):
            return False
        vrs = _dict_vrs(t)
        return bool(vrs and vrs <= _PASS_VRS)

    def _masked(self, tag: int) -> str | None:
        """Curves (50xx,xxxx) and overlays (60xx,eeee): an overlay goes or stays as a whole."""
        if tag >> 24 == 0x50:
            return self._curve
        if tag & 0xFFFF == 0x4000:
            return self._overlay_comments
        if self._overlay_data == "X":
            return "X"
        return None

    def _private_to_keep(self, ds: Dataset) -> frozenset[int]:
        """Private tags on the safe list, with their creators; empty without the option."""
        safe = self._safe_private
        if not safe:
            return frozenset()
        creators: dict[tuple[int, int], str] = {}
        for tag in ds._dict:
            if tag & 0x10000 and 0x10 <= tag & 0xFFFF <= 0xFF:
                creators[(tag >> 16, tag & 0xFF)] = (self._text(ds, tag) or "").strip()
        keep: set[int] = set()
        for tag in ds._dict:
            if tag & 0x10000 and tag & 0xFFFF >= 0x1000:
                group, block = tag >> 16, (tag >> 8) & 0xFF
                creator = creators.get((group, block))
                if creator and (creator, (group << 16) | (tag & 0xFF)) in safe:
                    keep.update((tag, (group << 16) | block))
        return frozenset(keep)

    def _unlisted(
        self,
        run: _Run,
        ds: Dataset,
        tag: BaseTag,
        elem: DataElement | RawDataElement,
        vr: str,
        parent: int | None,
        mode: int,
    ) -> str:
        """Attributes Table E.1-1 does not list: kept, but UIDs, dates, names and free text are
        still looked at. Returns the action taken, for the report."""
        if vr == "SQ":
            self._recurse(run, ds, tag, mode)
            return "K"
        if vr == "UI":
            return self._uids(run, ds, tag, elem, parent, keep=self._retain_uids)
        if vr in ("DA", "DT"):
            return self._act(run, ds, tag, elem, vr, self._date_action(), parent, mode)
        if vr == "PN":
            return self._act(run, ds, tag, elem, vr, "D" if mode == DUMMY else "Z", parent, mode)
        if vr in TEXT_VRS:
            # Coded concepts (SR concept names, units, coded values) are vocabulary, not text.
            t = int(tag)
            coded = t in CODING_SCHEME or (parent in CODE_SEQUENCES_KEPT and vr not in _LONG_TEXT)
            if mode == CLEAN and not coded and t not in CODE_VALUES:
                run.deferred.append((ds, tag, vr, True))
                return "C"
            if mode == DUMMY and not coded:
                return self._act(run, ds, tag, elem, vr, "D", parent, mode)
            run.deferred.append((ds, tag, vr, False))  # retained text: scanned for identities
        return "K"

    def _date_action(self) -> str:
        """Dates Table E.1-1 does not list follow the date options: shifted, kept, or emptied."""
        return "C" if self._modified else "K" if self._full_dates else "Z"

    def _recurse(self, run: _Run, ds: Dataset, tag: BaseTag, mode: int) -> None:
        seq = ds[tag].value
        for item in seq:
            self._walk(run, item, int(tag), mode)

    def _act(
        self,
        run: _Run,
        ds: Dataset,
        tag: BaseTag,
        elem: DataElement | RawDataElement,
        vr: str,
        action: str,
        parent: int | None,
        mode: int,
    ) -> str:
        """Apply one resolved action (X, Z, D, K, C, U) to one element."""
        d = ds._dict
        if action == "K":
            if vr == "SQ":
                self._recurse(run, ds, tag, mode)
            elif vr == "UI":  # retained, but still checked
                self._uids(run, ds, tag, elem, parent, keep=True)
            return action
        if action == "U" or (vr == "UI" and action in ("D", "C")):
            if vr == "SQ":  # X/Z/U* resolved to U: keep, UIDs inside replaced
                self._recurse(run, ds, tag, mode)
                return "U"
            if vr == "UI":
                return self._uids(run, ds, tag, elem, parent, keep=False)
            action = "D"
        if vr == "SQ":
            if action == "C":
                self._recurse(run, ds, tag, CLEAN)
            elif action == "D":
                self._recurse(run, ds, tag, DUMMY)
            else:
                self._collect(run, ds, tag)
                if action == "X":
                    del d[tag]
                else:
                    ds[tag] = DataElement(tag, "SQ", Sequence())
            return action
        if action == "C":
            return self._clean(run, ds, tag, elem, vr)
        self._note(run, tag, elem, vr, ds)
        if action == "X":
            del d[tag]
        elif action == "Z":
            d[tag] = self._zero(run, tag, vr, elem, ds, parent)
        else:  # D
            d[tag] = self._dummy(run, tag, vr, elem, ds, parent)
        return action

    def _clean(self, run: _Run, ds: Dataset, tag: BaseTag, elem, vr: str) -> str:
        """C: dates shifted (modified dates), text scrubbed after the walk, other values kept."""
        if vr in ("DA", "DT"):
            self._note(run, tag, elem, vr, ds)
            if run.shift is None:  # C without the modified-dates option (never from the table)
                return "K"
            text = self._value_text(ds, tag, elem)
            if text:
                fn = shift_da if vr == "DA" else shift_dt
                try:
                    new = "\\".join(fn(v, run.shift) if v.strip() else "" for v in text.split("\\"))
                except ValueError:
                    raise Quarantined(f"invalid {vr} value at {_tag(tag)}") from None
                ds._dict[tag] = _raw(tag, vr, new)
            return "C"
        if vr in TEXT_VRS or vr in ("PN", "AE"):
            if vr == "PN":
                self._note(run, tag, elem, vr, ds)
                ds._dict[tag] = _raw(tag, vr, _DUMMY["PN"])
                return "D"
            run.deferred.append((ds, tag, vr, True))
        return "C"

    def _uids(
        self, run: _Run, ds: Dataset, tag: BaseTag, elem, parent: int | None, *, keep: bool
    ) -> str:
        """UIDs: checked; replaced by keyed UIDs unless registered by DICOM or `keep` (Retain
        UIDs, for UIDs the table does not list; listed ones follow their row)."""
        text = self._value_text(ds, tag, elem)
        if not text:
            return "K"
        values = text.split("\\")
        for v in values:
            if v and (len(v) > 64 or not _UID.match(v)):
                raise Quarantined(f"a UI value that is not a UID at {_tag(tag)}")
        if keep or int(tag) in CLASS_UIDS:
            return "K"
        if all(not v or v in UID_dictionary or v.startswith("1.2.840.10008.") for v in values):
            return "K"
        new = []
        for v in values:
            if not v or v in UID_dictionary or v.startswith("1.2.840.10008."):
                new.append(v)
                continue
            pseudo = self.keys.uid(v)
            new.append(pseudo)
            kind = _KIND.get(int(tag), "uid") if parent is None else "uid"
            run.mappings.append((kind, v, pseudo))
        ds._dict[tag] = _raw(tag, "UI", "\\".join(new))
        return "U"

    def _zero(self, run: _Run, tag: BaseTag, vr: str, elem, ds: Dataset, parent: int | None):
        """Z: empty, except the patient's name and ID (their pseudonym, at the top level) and
        accession numbers (a keyed stand-in), which keep the data linkable within the project."""
        t = int(tag)
        if t == ACCESSION:
            text = self._value_text(ds, tag, elem)
            if text:
                pseudo = self.keys.accession(text)
                run.mappings.append(("accession", text, pseudo))
                return _raw(tag, vr, pseudo)
        if parent is None and t in (PATIENT_ID, PATIENT_NAME):
            return _raw(tag, vr, run.pseudonym)
        return _raw(tag, vr, "")

    def _dummy(self, run: _Run, tag: BaseTag, vr: str, elem, ds: Dataset, parent: int | None):
        """D: a dummy value of the VR (the pseudonym for the patient's ID and name)."""
        if int(tag) in (PATIENT_ID, PATIENT_NAME, ACCESSION):
            z = self._zero(run, tag, vr, elem, ds, parent)
            if z.value.strip():
                return z
        if vr in _DUMMY:
            return _raw(tag, vr, _DUMMY[vr])
        if vr in _NUMERIC_ZERO:
            return DataElement(tag, vr, _NUMERIC_ZERO[vr])
        if vr in _BINARY_VRS:
            return DataElement(tag, vr, b"\x00\x00" if vr != "OD" and vr != "OV" else b"\0" * 8)
        if vr == "AT":
            return elem
        return _raw(tag, vr, "")

    def _collect(self, run: _Run, ds: Dataset, tag: BaseTag) -> None:
        """Note the names, identifiers and dates inside a sequence about to be removed."""
        for item in ds[tag].value:
            for t, e in list(item._dict.items()):
                if t & 0x10000:
                    continue
                vr = e.VR
                if vr is None or vr == "UN":
                    vrs = _dict_vrs(int(t))
                    vr = min(vrs) if vrs else "UN"
                if vr == "SQ":
                    self._collect(run, item, t)
                elif vr in ("PN", "DA", "DT") or int(t) in ID_TAGS:
                    self._note(run, t, e, vr, item)

    def _note(self, run: _Run, tag: int, elem, vr: str, ds: Dataset) -> None:
        """Remember identifying strings, to cut them out of free text after the walk."""
        if vr not in ("PN", "DA", "DT") and int(tag) not in ID_TAGS:
            return
        text = self._value_text(ds, tag, elem)
        if not text:
            return
        tokens = run.tokens
        for v in text.split("\\"):
            v = v.strip()
            if not v:
                continue
            if vr == "PN":
                tokens.update(scrub.name_tokens(v))
            elif vr in ("DA", "DT"):
                tokens.update(scrub.date_tokens(v))
            elif len(v) >= 3:
                tokens.add(v)

    def _finish_text(self, run: _Run) -> None:
        """Clean (C) and scan (retained) free text, now that every identity string is known."""
        if not run.deferred:
            return
        tokens = frozenset(run.tokens)
        clean = scrub.cleaner(tokens)
        scan = scrub.scanner(tokens)
        for ds, tag, vr, is_clean in run.deferred:
            fn = clean if is_clean else scan
            if fn is None:
                continue
            elem = ds._dict.get(tag)
            if elem is None:
                continue
            text = self._value_text(ds, tag, elem)
            if not text:
                continue
            new = fn(text)
            if new != text:
                limit = _MAX_LEN.get(vr)
                if limit:
                    new = "\\".join(v[:limit] for v in new.split("\\"))
                if new.isascii():
                    ds._dict[tag] = _raw(tag, vr, new)
                else:
                    ds[tag] = DataElement(tag, vr, new)

    # -- output marks -----------------------------------------------------------------------

    def _stamp(self, ds: Dataset, run: _Run) -> None:
        """PatientIdentityRemoved, LongitudinalTemporalInformationModified and the CID 7050
        codes of what was done."""
        d = ds._dict
        d[BaseTag(0x00120062)] = _raw(0x00120062, "CS", "YES")
        temporal = "MODIFIED" if self._modified else "UNMODIFIED" if self._full_dates else "REMOVED"
        d[BaseTag(0x00280303)] = _raw(0x00280303, "CS", temporal)
        d[BaseTag(0x00120063)] = _raw(0x00120063, "LO", "PS3.15 E.1-1 " + table.EDITION)
        # One read-only element shared by all instances: building items costs more than the rest.
        d[BaseTag(0x00120064)] = self._codes_blanked if run.blanked else self._codes

    def clean_meta(self, meta: Dataset) -> None:
        """De-identify file meta information in place (done by `apply` for `ds.file_meta`)."""
        d = _by_int(meta)
        for t in _META_DROP:
            d.pop(t, None)
        elem = d.get(0x00020003)
        if elem is not None and not self._retain_uids:
            v = self._value_text(meta, 0x00020003, elem)
            if v and not v.startswith("1.2.840.10008."):
                d[BaseTag(0x00020003)] = _raw(0x00020003, "UI", self.keys.uid(v))
        # The file is ours now: the source's implementation would tell where it came from.
        d[BaseTag(0x00020012)] = _raw(0x00020012, "UI", IMPLEMENTATION_CLASS_UID)
        d[BaseTag(0x00020013)] = _raw(0x00020013, "SH", IMPLEMENTATION_VERSION_NAME)

    def _keep_mappings(self, mappings: Iterable[Mapping]) -> None:
        fresh = [m for m in mappings if m[2] not in self._seen]
        if not fresh:
            return
        with self._lock:
            if len(self._seen) > 1_000_000:
                self._seen.clear()
            for m in fresh:
                if m[2] not in self._seen:
                    self._seen.add(m[2])
                    self._pending.append(m)
            ready = len(self._pending) >= self._batch and self._sink is not None
        if ready:
            self.flush()

    # -- reading values without converting the dataset --------------------------------------

    @staticmethod
    def _value_text(ds: Dataset, tag: int, elem) -> str:
        """An element's value as one string (multiple values joined by backslash)."""
        v = elem.value
        if isinstance(v, bytes):
            if v.isascii():
                return v.decode("ascii").strip("\x00 ")
            # Decoded here, not by pydicom: its validation warnings would quote the value.
            encodings = ds._character_set
            if isinstance(encodings, str):
                encodings = [encodings]
            return decode_bytes(v, encodings, _DELIMS).strip("\x00 ")
        if v is None:
            return ""
        if isinstance(v, MultiValue | list | tuple):
            return "\\".join(str(x) for x in v)
        return str(v).strip("\x00 ")

    def _text(self, ds: Dataset, tag: int) -> str | None:
        elem = _by_int(ds).get(tag)
        if elem is None:
            return None
        if elem.VR == "SQ" or elem.VR in _BINARY_VRS and not isinstance(elem.value, bytes):
            return None
        return self._value_text(ds, tag, elem)


def _raw(tag: int, vr: str, value: str) -> RawDataElement:
    """An element from an ASCII value we made: written as is, never decoded or validated."""
    return _raw_cached(int(tag), vr, value)


@lru_cache(maxsize=1 << 13)
def _raw_cached(tag: int, vr: str, value: str) -> RawDataElement:
    # Immutable, so shared: the same pseudonym, shifted date or empty value recurs per series.
    data = value.encode("ascii")
    if len(data) & 1:
        data += b"\x00" if vr == "UI" else b" "
    return RawDataElement(BaseTag(tag), vr, len(data), data, 0, False, True)


def _code_sequence(codes: list[tuple[str, str]]) -> DataElement:
    """DeidentificationMethodCodeSequence with one CID 7050 item per code."""
    items = []
    for value, meaning in codes:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        items.append(item)
    return DataElement(0x00120064, "SQ", Sequence(items))
