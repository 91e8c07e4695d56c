"""QIDO-RS query parsing (PS3.18 8.3.4, 10.6) and a reference matcher (PS3.4 C.2.2.2).

:func:`parse_qido` turns URL query pairs into a :class:`QidoQuery` whose :class:`Match` items
carry what a SQL translation needs: the attribute tag (path, for sequence attributes), the
kind of matching, the values, SQL ``LIKE`` patterns (escape character ``\\``) and the case
rule.  :func:`matches` evaluates a query against a DICOM JSON model dataset (the oracle a SQL
implementation can be tested against) and :func:`select` keeps the attributes a response
returns.

Choices within what PS3.4 allows:

* Person names (PN) are matched case-insensitively (PS3.4 C.2.2.2.1 permits it; Orthanc and
  dcm4chee do the same by default); ``pn_case_insensitive=False`` makes them exact.  Trailing
  ``^`` are ignored.  Each component group (Alphabetic, Ideographic, Phonetic) is matched on
  its own, and the whole ``A=I=P`` value too.
* ``fuzzymatching=true`` (PS3.18 8.3.4.1): a PN query without ``^`` matches a name having a
  component (or word) that starts with it; ``Family^Given`` matches component-wise prefixes.
* Multiple values (``\\``-separated, or comma-separated for UI and CS) match any of them
  (PS3.4 C.2.2.2.2 list of UID matching, generalised as multiple value matching); a repeated
  attribute parameter is read the same way.
* ``""`` (two double quotes) is empty value matching; a value of only ``*`` is universal.
* Single value matching of DA/TM/DT is exact; ranges compare normalised values, a partial
  upper bound including its whole period (``-1000`` reaches 10:00:59.999999).  DT time zones
  are ignored.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword


class QidoError(ValueError):
    """An invalid QIDO-RS request (HTTP 400); the message says what is wrong."""


class Level(StrEnum):
    STUDY = "study"
    SERIES = "series"
    INSTANCE = "instance"


class MatchKind(StrEnum):
    UNIVERSAL = "universal"  # empty value (or "*"): no filter, attribute returned
    EMPTY = "empty"  # '""': the attribute is absent or has no value
    SINGLE = "single"  # one exact value
    WILDCARD = "wildcard"  # one value with * or ?
    RANGE = "range"  # DA/TM/DT: a-b, -b, a-
    LIST = "list"  # several values (UIDs or multiple values), any may match


def _tag(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    if tag is None:  # pragma: no cover - guarded by the test of the tables
        raise KeyError(keyword)
    return f"{tag:08X}"


# PS3.18 Table 6.7.1-2 (10.6.3.3 in later editions): attributes the origin server shall return.
STUDY_REQUIRED_KEYWORDS: tuple[str, ...] = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "InstanceAvailability",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "TimezoneOffsetFromUTC",
    "RetrieveURL",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
# PS3.18 Table 6.7.1-2a. Request Attributes Sequence is returned with its items
# (>Scheduled Procedure Step ID, >Requested Procedure ID).
SERIES_REQUIRED_KEYWORDS: tuple[str, ...] = (
    "Modality",
    "TimezoneOffsetFromUTC",
    "SeriesDescription",
    "RetrieveURL",
    "SeriesInstanceUID",
    "SeriesNumber",
    "NumberOfSeriesRelatedInstances",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "RequestAttributesSequence",
)
# PS3.18 Table 6.7.1-2b.
INSTANCE_REQUIRED_KEYWORDS: tuple[str, ...] = (
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceAvailability",
    "TimezoneOffsetFromUTC",
    "RetrieveURL",
    "InstanceNumber",
    "Rows",
    "Columns",
    "BitsAllocated",
    "NumberOfFrames",
)
# Not required by the standard but returned by default, because viewers show it and OHIF
# otherwise has to ask for it with includefield=00081030.
STUDY_EXTRA_KEYWORDS: tuple[str, ...] = ("StudyDescription",)

REQUIRED_KEYWORDS: dict[Level, tuple[str, ...]] = {
    Level.STUDY: STUDY_REQUIRED_KEYWORDS,
    Level.SERIES: SERIES_REQUIRED_KEYWORDS,
    Level.INSTANCE: INSTANCE_REQUIRED_KEYWORDS,
}
REQUIRED_TAGS: dict[Level, tuple[str, ...]] = {
    level: tuple(_tag(k) for k in keywords) for level, keywords in REQUIRED_KEYWORDS.items()
}

STUDY_INSTANCE_UID = "0020000D"
SERIES_INSTANCE_UID = "0020000E"

_DATE_TIME_VRS = frozenset({"DA", "TM", "DT"})
_NUMERIC_VRS = frozenset({"IS", "DS", "US", "SS", "UL", "SL", "FL", "FD", "SV", "UV"})
# VRs for which * and ? are not wildcards (PS3.4 C.2.2.2.4).
_NO_WILDCARD_VRS = _DATE_TIME_VRS | _NUMERIC_VRS | {"UI", "AS", "AT"}
# VRs whose values may contain a backslash, so it does not separate values.
_SINGLE_VALUED_TEXT_VRS = frozenset({"LT", "ST", "UT", "UR"})
_UNQUERYABLE_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "SQ"})
# Bounds on what a request may make us say: each unknown name is a Warning header.
MAX_INCLUDEFIELDS = 256
MAX_WARNINGS = 20
_CONTROL_PARAMS = frozenset({"limit", "offset", "fuzzymatching", "includefield", "accept"})


# ----------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Term:
    """One value to match against.

    ``exact`` terms compare by equality with ``value`` (lower-cased on both sides when the
    match is case-insensitive); others by ``likes`` (SQL LIKE patterns, escape ``\\``, any of
    which may match; already lower-cased when case-insensitive; for fuzzy PN they can match a
    superset, so rows should be re-checked with ``regex``).  ``regex`` is authoritative and is
    used with ``fullmatch``.
    """

    value: str
    exact: bool
    likes: tuple[str, ...]
    regex: re.Pattern[str]


@dataclass(frozen=True)
class Match:
    """One attribute condition. ``path`` is a tuple of tags (several for sequence items)."""

    path: tuple[str, ...]
    keyword: str
    vr: str
    kind: MatchKind
    terms: tuple[Term, ...] = ()
    lower: str | None = None  # RANGE: normalised inclusive bounds, None when open
    upper: str | None = None
    case_insensitive: bool = False
    fuzzy: bool = False

    @property
    def tag(self) -> str:
        return self.path[-1]

    @property
    def values(self) -> tuple[str, ...]:
        return tuple(t.value for t in self.terms)

    @property
    def like(self) -> str | None:
        """The LIKE pattern of a single-term WILDCARD match."""
        if len(self.terms) == 1 and self.terms[0].likes:
            return self.terms[0].likes[0]
        return None


@dataclass(frozen=True)
class QidoQuery:
    level: Level
    matches: tuple[Match, ...]
    include_all: bool = False
    include_fields: tuple[tuple[str, ...], ...] = ()  # attribute paths from includefield
    limit: int | None = None
    offset: int = 0
    fuzzy: bool = False
    warnings: tuple[str, ...] = ()
    default_tags: tuple[str, ...] = field(default=())
    capped: bool = False  # `limit` is the server's maximum, not the client's own

    @property
    def return_tags(self) -> tuple[str, ...]:
        """Top-level tags to return (unless ``include_all``), in tag order."""
        tags = set(self.default_tags)
        tags.update(m.path[0] for m in self.matches)
        tags.update(p[0] for p in self.include_fields)
        return tuple(sorted(tags))


def default_return_tags(
    level: Level | str, *, study_scoped: bool = False, series_scoped: bool = False
) -> tuple[str, ...]:
    """Tags returned by default: the level's required ones, plus those of the levels above
    when the request path does not name them (PS3.18 6.7.1.2: ``/series`` returns study
    attributes too, ``/studies/{uid}/instances`` series attributes)."""
    level = Level(level)
    keywords = list(REQUIRED_KEYWORDS[level])
    if level is Level.STUDY or not study_scoped:
        keywords += STUDY_REQUIRED_KEYWORDS + STUDY_EXTRA_KEYWORDS
    if level is Level.INSTANCE and not series_scoped:
        keywords += SERIES_REQUIRED_KEYWORDS
    return tuple(sorted({_tag(k) for k in keywords}))


# ------------------------------------------------------------------------- attributes


def resolve_attribute(name: str) -> tuple[tuple[str, ...], str, str] | None:
    """``PatientID``, ``00100020`` or ``Seq.Attr`` paths -> (tags, keyword, VR), or None."""
    tags: list[str] = []
    keyword = vr = ""
    elements = name.split(".")
    for position, element in enumerate(elements):
        element = element.strip()
        if re.fullmatch(r"[0-9A-Fa-f]{8}", element):
            number = int(element, 16)
        elif re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", element):
            found = tag_for_keyword(element)
            if found is None:
                return None
            number = found
        else:
            return None
        try:
            vr = dictionary_VR(number)
        except KeyError:
            return None
        keyword = keyword_for_tag(number) or f"{number:08X}"
        if position < len(elements) - 1 and vr != "SQ":
            return None
        tags.append(f"{number:08X}")
    if " or " in vr:  # "US or SS" and the like: compare as numbers
        vr = vr.split(" or ")[0]
    return tuple(tags), keyword, vr


# ------------------------------------------------------------------------ value parsing


def like_escape(text: str) -> str:
    """Escape SQL LIKE metacharacters with a backslash (use ``ESCAPE '\\'``)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def wildcard_to_like(value: str) -> str:
    """DICOM wildcards (``*``, ``?``) to a SQL LIKE pattern, escaping ``%``, ``_``, ``\\``."""
    return "".join("%" if c == "*" else "_" if c == "?" else like_escape(c) for c in value)


def wildcard_to_regex(value: str) -> str:
    """DICOM wildcards to a regular expression source (for ``fullmatch``) that cannot
    backtrack without end: each part between two ``*`` is taken at its first place (an atomic
    group), which is where a wildcard match can always put it, so ``*?*?*?...Z`` costs a pass
    over the value, not one per way of splitting it."""
    parts = [_literal(p) for p in value.split("*")]
    if len(parts) == 1:
        return parts[0]
    middle = "".join(f"(?>.*?{p})" for p in parts[1:-1] if p)
    return f"{parts[0]}{middle}.*{parts[-1]}"


def _literal(part: str) -> str:
    return "".join("." if c == "?" else re.escape(c) for c in part)


def _flags(case_insensitive: bool) -> int:
    return re.DOTALL | (re.IGNORECASE if case_insensitive else 0)


def _plain_term(value: str, vr: str, case_insensitive: bool) -> Term:
    wildcard = vr not in _NO_WILDCARD_VRS and ("*" in value or "?" in value)
    pattern = wildcard_to_regex(value) if wildcard else re.escape(value)
    likes: tuple[str, ...] = ()
    if wildcard:
        like = wildcard_to_like(value)
        likes = (like.lower() if case_insensitive else like,)
    return Term(value, not wildcard, likes, re.compile(pattern, _flags(case_insensitive)))


def _fuzzy_pn_term(value: str) -> Term:
    """Fuzzy person name: prefixes of name components, case-insensitive."""
    components = value.split("^")
    if len(components) == 1:
        prefix = wildcard_to_regex(value)
        pattern = rf"(?:.*[\^ ])?{prefix}.*"
        like = wildcard_to_like(value).lower()
        likes = (f"{like}%", f"%^{like}%", f"% {like}%")
    else:
        pattern = r"\^".join(wildcard_to_regex(c) + r"[^^]*" for c in components)
        pattern += r"(?:\^.*)?"
        likes = ("%^".join(wildcard_to_like(c).lower() for c in components) + "%",)
    return Term(value, False, likes, re.compile(pattern, _flags(True)))


_DA = re.compile(r"\d{8}")
_TM = re.compile(r"(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?")
_DT = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,6}))?([+-]\d{4})?")


def _norm_time(value: str, upper: bool) -> str | None:
    m = _TM.fullmatch(value.replace(":", "").strip())
    if not m:
        return None
    hh, mm, ss, frac = m.groups()
    fill = "59" if upper else "00"
    frac_fill = "9" if upper else "0"
    return f"{hh}{mm or fill}{ss or fill}.{(frac or '').ljust(6, frac_fill)}"


_DT_MAX = ("", "12", "31", "23", "59", "59")
_DT_MIN = ("", "01", "01", "00", "00", "00")


def _norm_datetime(value: str, upper: bool) -> str | None:
    m = _DT.fullmatch(value.strip())
    if not m:
        return None
    groups = m.groups()
    parts = [g or (_DT_MAX[i] if upper else _DT_MIN[i]) for i, g in enumerate(groups[:6])]
    frac = (groups[6] or "").ljust(6, "9" if upper else "0")
    return "".join(parts) + "." + frac


def normalize_temporal(vr: str, value: str, *, upper: bool = False) -> str | None:
    """Comparable form of a DA/TM/DT value (a partial upper bound covers its period)."""
    value = value.strip()
    if vr == "DA":
        return value if _DA.fullmatch(value) else None
    if vr == "TM":
        return _norm_time(value, upper)
    return _norm_datetime(value, upper)


def _split_values(value: str, vr: str) -> list[str]:
    if vr in _SINGLE_VALUED_TEXT_VRS:
        return [value]
    values = value.split("\\")
    if vr in ("UI", "CS"):
        values = [v for part in values for v in part.split(",")]
    return [v.strip() if vr in ("UI", "CS") or vr in _NUMERIC_VRS else v for v in values]


def _parse_match(
    name: str,
    raw_values: Sequence[str],
    path: tuple[str, ...],
    keyword: str,
    vr: str,
    *,
    fuzzy: bool,
    pn_case_insensitive: bool,
) -> Match:
    def bad(why: str) -> QidoError:
        return QidoError(f"invalid value for {name} ({keyword}, VR {vr}): {why}")

    if vr in _UNQUERYABLE_VRS:
        raise bad("attributes with this VR cannot be matched")
    values: list[str] = []
    for raw in raw_values:
        values += [raw] if raw in ("", '""') else _split_values(raw, vr)
    if any(v == "" or set(v) == {"*"} for v in values):
        return Match(path, keyword, vr, MatchKind.UNIVERSAL)
    if values == ['""']:
        return Match(path, keyword, vr, MatchKind.EMPTY)
    if '""' in values:
        raise bad('"" (empty value matching) cannot be combined with other values')
    case_insensitive = vr == "PN" and (pn_case_insensitive or fuzzy)

    if vr in _DATE_TIME_VRS and any("-" in v for v in values):
        if len(values) != 1:
            raise bad("a range cannot be combined with other values")
        low, sep, high = values[0].partition("-")
        if vr == "DT" and high.count("-") == 1:  # "a-b-0500": a time zone, not a range
            raise bad("time zones are not supported in DT ranges")
        if not low and not high:
            raise bad("a range needs at least one bound")
        lower = normalize_temporal(vr, low) if low else None
        upper = normalize_temporal(vr, high, upper=True) if high else None
        if (low and lower is None) or (high and upper is None) or "-" in high:
            raise bad(f"malformed {vr} range {values[0]!r}")
        return Match(path, keyword, vr, MatchKind.RANGE, lower=lower, upper=upper)

    terms: list[Term] = []
    for v in values:
        if vr in _NO_WILDCARD_VRS and ("*" in v or "?" in v):
            raise bad(f"wildcards are not allowed for VR {vr}")
        if vr in _DATE_TIME_VRS and normalize_temporal(vr, v) is None:
            raise bad(f"malformed {vr} value {v!r}")
        if vr in _NUMERIC_VRS:
            try:
                number = float(v)
            except ValueError:
                raise bad(f"not a number: {v!r}") from None
            if not math.isfinite(number):
                raise bad(f"not a finite number: {v!r}")
        if vr == "PN":
            v = v.rstrip("^ ") or v
            if fuzzy and "=" not in v:
                terms.append(_fuzzy_pn_term(v))
                continue
        terms.append(_plain_term(v, vr, case_insensitive))
    if len(terms) > 1:
        kind = MatchKind.LIST
    elif terms[0].exact:
        kind = MatchKind.SINGLE
    else:
        kind = MatchKind.WILDCARD
    return Match(
        path,
        keyword,
        vr,
        kind,
        tuple(terms),
        case_insensitive=case_insensitive,
        fuzzy=fuzzy and vr == "PN",
    )


def _shown(name: str) -> str:
    """A name a client typed, as a warning quotes it: short."""
    return repr(name[:64] + ("..." if len(name) > 64 else ""))


def _parse_int(name: str, values: list[str], minimum: int) -> int:
    if len(values) > 1:
        raise QidoError(f"{name} may be given only once")
    text = values[0].strip()
    if not re.fullmatch(r"\d{1,18}", text) or int(text) < minimum:
        raise QidoError(f"{name} must be an integer >= {minimum}, got {values[0]!r}")
    return int(text)


def parse_qido(
    params: Iterable[tuple[str, str]] | Mapping[str, str | Sequence[str]],
    level: Level | str,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    max_limit: int | None = None,
    pn_case_insensitive: bool = True,
) -> QidoQuery:
    """Parse QIDO-RS query parameters for a query at ``level``.

    ``params`` are the decoded URL query pairs in order (or a mapping to a value or values).
    ``study_uid`` / ``series_uid`` come from the request path (``/studies/{uid}/series``);
    they add exact UID matches and narrow the default attributes.  ``max_limit`` caps
    ``limit`` (with a warning when the client asked for more) and is the limit when none is
    given.  Unknown parameters and attributes become ``warnings``; invalid values raise
    :class:`QidoError`.
    """
    level = Level(level)
    if isinstance(params, Mapping):
        pairs: list[tuple[str, str]] = []
        for key, value in params.items():
            pairs += [(key, value)] if isinstance(value, str) else [(key, v) for v in value]
    else:
        pairs = list(params)

    control: dict[str, list[str]] = {}
    attributes: dict[tuple[str, ...], tuple[str, str, str, list[str]]] = {}
    warnings: list[str] = []
    for key, value in pairs:
        if key.lower() in _CONTROL_PARAMS:
            control.setdefault(key.lower(), []).append(value)
            continue
        resolved = resolve_attribute(key)
        if resolved is None:
            warnings.append(f"unknown query parameter or attribute {_shown(key)} was ignored")
            continue
        path, keyword, vr = resolved
        entry = attributes.setdefault(path, (key, keyword, vr, []))
        entry[3].append(value)

    fuzzy = False
    if "fuzzymatching" in control:
        values = control["fuzzymatching"]
        if len(values) > 1 or values[0].strip().lower() not in ("true", "false"):
            raise QidoError(f"fuzzymatching must be true or false, got {values!r}")
        fuzzy = values[0].strip().lower() == "true"

    limit = _parse_int("limit", control["limit"], 1) if "limit" in control else None
    offset = _parse_int("offset", control["offset"], 0) if "offset" in control else 0
    capped = max_limit is not None and (limit is None or limit > max_limit)
    if max_limit is not None:
        if limit is not None and limit > max_limit:
            warnings.append(
                f"limit {limit} exceeds the maximum of {max_limit} results per request; "
                f"at most {max_limit} are returned"
            )
        limit = max_limit if limit is None else min(limit, max_limit)

    include_all = False
    include_fields: list[tuple[str, ...]] = []
    items = [i for value in control.get("includefield", []) for i in value.split(",")]
    if len(items) > MAX_INCLUDEFIELDS:
        raise QidoError(f"at most {MAX_INCLUDEFIELDS} includefield attributes may be given")
    for item in items:
        item = item.strip()
        if not item:
            continue
        if item.lower() == "all":
            include_all = True
            continue
        resolved = resolve_attribute(item)
        if resolved is None:
            warnings.append(f"unknown includefield attribute {_shown(item)} was ignored")
        elif resolved[0] not in include_fields:
            include_fields.append(resolved[0])

    if len(warnings) > MAX_WARNINGS:  # each would be a response header
        raise QidoError(
            f"{len(warnings)} unknown parameters or attributes; at most {MAX_WARNINGS} are ignored"
        )
    matches: list[Match] = []
    for path, (name, keyword, vr, values) in attributes.items():
        matches.append(
            _parse_match(
                name,
                values,
                path,
                keyword,
                vr,
                fuzzy=fuzzy,
                pn_case_insensitive=pn_case_insensitive,
            )
        )
    for uid, tag, keyword in (
        (study_uid, STUDY_INSTANCE_UID, "StudyInstanceUID"),
        (series_uid, SERIES_INSTANCE_UID, "SeriesInstanceUID"),
    ):
        if uid is not None:
            term = _plain_term(uid, "UI", False)
            matches.append(Match((tag,), keyword, "UI", MatchKind.SINGLE, (term,)))

    return QidoQuery(
        level=level,
        matches=tuple(matches),
        include_all=include_all,
        include_fields=tuple(include_fields),
        limit=limit,
        offset=offset,
        fuzzy=fuzzy,
        warnings=tuple(warnings),
        default_tags=default_return_tags(
            level, study_scoped=study_uid is not None, series_scoped=series_uid is not None
        ),
        capped=capped,
    )


def warning_headers(query: QidoQuery, agent: str = "sphere") -> list[str]:
    """``Warning`` header values (code 299, RFC 7234 5.5) for the query's warnings."""
    values = []
    for text in query.warnings:
        text = text.encode("ascii", "backslashreplace").decode()  # a header is latin-1 at most
        quoted = text.replace("\\", "\\\\").replace('"', '\\"')
        values.append(f'299 {agent} "{quoted}"')
    return values


# --------------------------------------------------------------------------- matching


def _pn_strings(value: Any) -> list[str]:
    if isinstance(value, str):
        groups = value.split("=")
    elif isinstance(value, Mapping):
        groups = [str(value.get(k) or "") for k in ("Alphabetic", "Ideographic", "Phonetic")]
    else:
        return []
    groups = [g.rstrip("^ ") for g in groups]
    whole = "=".join(groups).rstrip("=")
    return [g for g in groups if g] + ([whole] if whole else [])


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _term_matches(match: Match, term: Term, value: Any) -> bool:
    if value is None:
        return False
    if match.vr == "PN":
        return any(term.regex.fullmatch(s) for s in _pn_strings(value))
    if match.vr in _NUMERIC_VRS:
        number, wanted = _number(value), float(term.value)
        return number is not None and number == wanted
    if match.vr in ("TM", "DT"):
        return str(value).replace(":", "").strip() == term.value.replace(":", "").strip()
    return term.regex.fullmatch(str(value)) is not None


def _value_matches(match: Match, value: Any) -> bool:
    if match.kind is MatchKind.RANGE:
        if value is None:
            return False
        normal = normalize_temporal(match.vr, str(value))
        if normal is None:
            return False
        if match.lower is not None and normal < match.lower:
            return False
        return match.upper is None or normal <= match.upper
    return any(_term_matches(match, term, value) for term in match.terms)


def _element_values(element: Mapping[str, Any] | None) -> list[Any]:
    if not element:
        return []
    values = element.get("Value")
    return [v for v in values if v is not None and v != ""] if values else []


def _elements(dataset: Mapping[str, Any], path: tuple[str, ...]) -> list[Mapping[str, Any]]:
    """The elements at ``path`` (several when it goes through sequence items)."""
    datasets: list[Mapping[str, Any]] = [dataset]
    for tag in path[:-1]:
        items: list[Mapping[str, Any]] = []
        for ds in datasets:
            items += [i for i in _element_values(ds.get(tag)) if isinstance(i, Mapping)]
        datasets = items
    return [ds[path[-1]] for ds in datasets if path[-1] in ds]


def match_one(match: Match, dataset_json: Mapping[str, Any]) -> bool:
    """Whether one condition holds for a DICOM JSON model dataset."""
    if match.kind is MatchKind.UNIVERSAL:
        return True
    elements = _elements(dataset_json, match.path)
    if match.kind is MatchKind.EMPTY:
        return not any(_element_values(e) for e in elements)
    return any(_value_matches(match, v) for e in elements for v in _element_values(e))


def matches(query: QidoQuery, dataset_json: Mapping[str, Any]) -> bool:
    """Whether a DICOM JSON model dataset satisfies every condition of the query."""
    return all(match_one(m, dataset_json) for m in query.matches)


def select(
    query: QidoQuery, dataset_json: Mapping[str, Any], *, fill_missing: bool = False
) -> dict[str, Any]:
    """The attributes of ``dataset_json`` a QIDO-RS response returns, in tag order.

    Default (required) attributes, query keys and includefield attributes are kept (sequence
    paths keep their whole top-level sequence); ``includefield=all`` keeps everything.  With
    ``fill_missing``, absent ones are added as empty elements (``{"vr": ...}``) except
    Retrieve URL, which the server adds itself.
    """
    if query.include_all:
        keep = sorted(set(dataset_json) | set(query.return_tags))
    else:
        keep = list(query.return_tags)
    result: dict[str, Any] = {}
    for tag in keep:
        if tag in dataset_json:
            result[tag] = dataset_json[tag]
        elif fill_missing and tag != _tag("RetrieveURL"):
            try:
                vr = dictionary_VR(int(tag, 16))
            except (KeyError, ValueError):
                continue
            result[tag] = {"vr": vr.split(" or ")[0]}
    return result
