"""QIDO-RS query parsing (PS3.18 8.3.4, 10.6) and what a response returns.

The query model (levels, matches, terms, the date/time normaliser and the reference matcher,
PS3.4 C.2.2.2) lives in `dicom.query`, beneath this layer and the index; it is re-exported here.
:func:`parse_qido` turns URL query pairs into a :class:`QidoQuery` whose :class:`Match` items
carry what a SQL translation needs: the attribute tag (path, for sequence attributes), the
kind of matching, the values, SQL ``LIKE`` patterns (escape character ``\\``) and the case
rule.  :func:`matches` evaluates a query against a DICOM JSON model dataset (the oracle a SQL
implementation is tested against) and :func:`select` keeps the attributes a response
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
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from dicom.query import (
    DATE_TIME_VRS,
    NO_WILDCARD_VRS,
    NUMERIC_VRS,
    Level,
    Match,
    MatchKind,
    Query,
    Term,
    match_one,
    matches,
    normalize_temporal,
)

__all__ = [  # the query model lives in dicom.query; parsing and responses here
    "Level",
    "Match",
    "MatchKind",
    "QidoError",
    "QidoQuery",
    "Term",
    "match_one",
    "matches",
    "normalize_temporal",
    "parse_qido",
    "select",
    "warning_headers",
]


class QidoError(ValueError):
    """An invalid QIDO-RS request (HTTP 400); the message says what is wrong."""


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

# VRs whose values may contain a backslash, so it does not separate values.
_SINGLE_VALUED_TEXT_VRS = frozenset({"LT", "ST", "UT", "UR"})
_UNQUERYABLE_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "SQ"})
# Bounds on what a request may make us say: each unknown name is a Warning header.
MAX_INCLUDEFIELDS = 256
MAX_WARNINGS = 20
_CONTROL_PARAMS = frozenset({"limit", "offset", "fuzzymatching", "includefield", "accept"})


# ----------------------------------------------------------------------------- model


@dataclass(frozen=True)
class QidoQuery(Query):
    """A parsed QIDO-RS request: the search (`dicom.query.Query`) and what to answer with."""

    include_all: bool = False
    include_fields: tuple[tuple[str, ...], ...] = ()  # attribute paths from includefield
    fuzzy: bool = False
    warnings: tuple[str, ...] = ()
    default_tags: tuple[str, ...] = ()
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
    wildcard = vr not in NO_WILDCARD_VRS and ("*" in value or "?" in value)
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
        likes: tuple[str, ...] = (f"{like}%", f"%^{like}%", f"% {like}%")
    else:
        pattern = r"\^".join(wildcard_to_regex(c) + r"[^^]*" for c in components)
        pattern += r"(?:\^.*)?"
        likes = ("%^".join(wildcard_to_like(c).lower() for c in components) + "%",)
    return Term(value, False, likes, re.compile(pattern, _flags(True)))


def _split_values(value: str, vr: str) -> list[str]:
    if vr in _SINGLE_VALUED_TEXT_VRS:
        return [value]
    values = value.split("\\")
    if vr in ("UI", "CS"):
        values = [v for part in values for v in part.split(",")]
    return [v.strip() if vr in ("UI", "CS") or vr in NUMERIC_VRS else v for v in values]


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

    if vr in DATE_TIME_VRS and any("-" in v for v in values):
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
        if vr in NO_WILDCARD_VRS and ("*" in v or "?" in v):
            raise bad(f"wildcards are not allowed for VR {vr}")
        if vr in DATE_TIME_VRS and normalize_temporal(vr, v) is None:
            raise bad(f"malformed {vr} value {v!r}")
        if vr in NUMERIC_VRS:
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


# ------------------------------------------------------------------------- responses


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
