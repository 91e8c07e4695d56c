"""QIDO-RS query parsing and the reference matcher (PS3.18 8.3.4, PS3.4 C.2.2.2)."""

from __future__ import annotations

import re
import sqlite3
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.web.qido import (
    INSTANCE_REQUIRED_KEYWORDS,
    REQUIRED_TAGS,
    SERIES_REQUIRED_KEYWORDS,
    STUDY_REQUIRED_KEYWORDS,
    Level,
    MatchKind,
    QidoError,
    default_return_tags,
    matches,
    parse_qido,
    resolve_attribute,
    select,
    warning_headers,
    wildcard_to_like,
    wildcard_to_regex,
)

SETTINGS: dict[str, Any] = dict(
    database=None, deadline=None
)  # no example database written into the tree


def study(
    *,
    uid="1.2.3",
    name="DOE^JOHN",
    pid="PID-1",
    date="20210315",
    time="101500",
    accession="ACC-123",
    description="CT Chest with contrast",
    modalities=("CT", "SR"),
):
    return {
        "00080020": {"vr": "DA", "Value": [date]},
        "00080030": {"vr": "TM", "Value": [time]},
        "00080050": {"vr": "SH", "Value": [accession]},
        "00080061": {"vr": "CS", "Value": list(modalities)},
        "00080090": {"vr": "PN"},
        "00081030": {"vr": "LO", "Value": [description]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": name}]},
        "00100020": {"vr": "LO", "Value": [pid]},
        "00100030": {"vr": "DA", "Value": ["19700101"]},
        "0020000D": {"vr": "UI", "Value": [uid]},
        "00201206": {"vr": "IS", "Value": [2]},
        "00201208": {"vr": "IS", "Value": [120]},
        "00321060": {"vr": "LO", "Value": ["not returned by default"]},
    }


def q(query: str, level: str = "study", **kwargs):
    pairs = [cast("tuple[str, str]", tuple(p.split("=", 1))) for p in query.split("&") if p]
    return parse_qido(pairs, level, **kwargs)


def hits(query: str, dataset: dict, **kwargs) -> bool:
    return matches(q(query, **kwargs), dataset)


# ---------------------------------------------------------------- OHIF vectors


def test_ohif_study_list_query():
    query = q(
        "PatientName=*doe*&00100020=*PID*&AccessionNumber=*ACC*&StudyDescription=*Chest*"
        "&ModalitiesInStudy=CT&StudyDate=20210101-20211231"
        "&limit=101&offset=0&fuzzymatching=false&includefield=00081030,00080060"
    )
    assert query.warnings == ()
    assert (query.limit, query.offset, query.fuzzy) == (101, 0, False)
    kinds = {m.keyword: m.kind for m in query.matches}
    assert kinds == {
        "PatientName": MatchKind.WILDCARD,
        "PatientID": MatchKind.WILDCARD,
        "AccessionNumber": MatchKind.WILDCARD,
        "StudyDescription": MatchKind.WILDCARD,
        "ModalitiesInStudy": MatchKind.SINGLE,
        "StudyDate": MatchKind.RANGE,
    }
    assert query.include_fields == (("00081030",), ("00080060",))
    assert matches(query, study())
    assert not matches(query, study(date="20220101"))
    assert not matches(query, study(modalities=("MR",)))
    assert not matches(query, study(description="ct chest"))  # LO is case-sensitive


def test_attribute_by_keyword_or_tag():
    by_tag = q("00100020=PID-1").matches[0]
    by_keyword = q("PatientID=PID-1").matches[0]
    assert by_tag == by_keyword
    assert (by_tag.tag, by_tag.keyword, by_tag.vr) == ("00100020", "PatientID", "LO")
    assert q("0020000d=1.2.3").matches[0].tag == "0020000D"
    assert resolve_attribute("RequestAttributesSequence.RequestedProcedureID") == (
        ("00400275", "00401001"),
        "RequestedProcedureID",
        "SH",
    )
    assert resolve_attribute("PatientID.PatientName") is None  # PatientID is not a sequence
    assert resolve_attribute("NoSuchKeyword") is None
    assert resolve_attribute("00091010") is None  # private


# --------------------------------------------------------------- single value


def test_single_value_is_exact_and_case_sensitive_except_pn():
    assert hits("PatientID=PID-1", study())
    assert not hits("PatientID=pid-1", study())
    assert not hits("PatientID=PID", study())
    assert hits("PatientName=doe^john", study())  # PN: case-insensitive
    assert not hits("PatientName=doe^john", study(), pn_case_insensitive=False)
    assert hits("PatientName=DOE^JOHN^^", study())  # trailing component delimiters ignored
    assert not hits("PatientName=DOE", study())


def test_pn_component_groups():
    ds = study()
    ds["00100010"]["Value"] = [{"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎"}]
    assert hits("PatientName=山田^太郎", ds)
    assert hits("PatientName=Yamada^Tarou=山田^太郎", ds)
    assert hits("PatientName=yamada*", ds)


def test_numeric_single_value_compares_numbers():
    assert hits("NumberOfStudyRelatedSeries=2", study())
    assert hits("NumberOfStudyRelatedSeries=2.0", study())
    assert not hits("NumberOfStudyRelatedSeries=3", study())
    with pytest.raises(QidoError, match="not a number"):
        q("NumberOfStudyRelatedSeries=two")


# ------------------------------------------------------------------- wildcard


def test_wildcards_like_pattern_and_regex():
    match = q("AccessionNumber=A?C*1%_\\x").matches[0]
    # the backslash separates values, so this is a list of two
    assert match.kind is MatchKind.LIST
    match = q("StudyDescription=50%_off*").matches[0]
    assert match.kind is MatchKind.WILDCARD
    assert match.like == "50\\%\\_off%"
    assert match.terms[0].regex.fullmatch("50%_off sale")
    assert not match.terms[0].regex.fullmatch("50x_off sale")
    assert wildcard_to_like("a?b*") == "a_b%"
    assert re.fullmatch(wildcard_to_regex("a.b?"), "a.bc")
    assert not re.fullmatch(wildcard_to_regex("a.b?"), "axbc")


def test_wildcard_matching():
    assert hits("AccessionNumber=ACC-1??", study())
    assert not hits("AccessionNumber=ACC-1?", study())
    assert hits("StudyDescription=CT*contrast", study())
    assert hits("PatientName=*JOHN", study())
    assert hits("PatientName=*john", study())  # PN wildcards are case-insensitive too
    pn = q("PatientName=*John*").matches[0]
    assert pn.case_insensitive and pn.like == "%john%"


def test_wildcards_are_not_allowed_for_dates_uids_and_numbers():
    for query in ("StudyDate=2021*", "StudyInstanceUID=1.2.*", "NumberOfStudyRelatedSeries=1?"):
        with pytest.raises(QidoError, match="wildcards"):
            q(query)


def test_star_alone_and_empty_value_are_universal():
    for query in ("PatientName=", "PatientName=*", "StudyDate=", "StudyInstanceUID=**"):
        query_obj = q(query)
        assert query_obj.matches[0].kind is MatchKind.UNIVERSAL
        assert matches(query_obj, {})


def test_empty_value_matching():
    assert q('ReferringPhysicianName=""').matches[0].kind is MatchKind.EMPTY
    assert hits('ReferringPhysicianName=""', study())  # present, no value
    assert hits('IssuerOfPatientID=""', study())  # absent
    assert not hits('PatientID=""', study())


# ---------------------------------------------------------------------- range


@pytest.mark.parametrize(
    ("value", "lower", "upper", "inside", "outside"),
    [
        ("20210101-20211231", "20210101", "20211231", "20211231", "20220101"),
        ("-20210315", None, "20210315", "19990101", "20210316"),
        ("20210315-", "20210315", None, "20210315", "20210314"),
    ],
)
def test_date_ranges(value, lower, upper, inside, outside):
    match = q(f"StudyDate={value}").matches[0]
    assert (match.kind, match.lower, match.upper) == (MatchKind.RANGE, lower, upper)
    assert hits(f"StudyDate={value}", study(date=inside))
    assert not hits(f"StudyDate={value}", study(date=outside))


def test_time_range_partial_upper_bound_covers_its_period():
    match = q("StudyTime=09-1015").matches[0]
    assert (match.lower, match.upper) == ("090000.000000", "101559.999999")
    assert hits("StudyTime=09-1015", study(time="101530.5"))
    assert hits("StudyTime=09-1015", study(time="09"))
    assert not hits("StudyTime=09-1015", study(time="1016"))
    assert hits("StudyTime=10:00-10:20", study(time="10:15:00"))


def test_datetime_range():
    ds = {"0040A032": {"vr": "DT", "Value": ["20210315101500.123"]}}
    assert matches(q("ObservationDateTime=2021-2021"), ds)
    assert matches(q("ObservationDateTime=20210315-20210315"), ds)
    assert not matches(q("ObservationDateTime=202104-"), ds)


@pytest.mark.parametrize(
    "value", ["-", "2021-01-01", "20210101-2021123", "abc-", "20210101\\20210102-20210103"]
)
def test_bad_ranges_are_errors(value):
    with pytest.raises(QidoError, match="StudyDate"):
        q(f"StudyDate={value}")


def test_single_date_must_be_valid():
    assert hits("StudyDate=20210315", study())
    with pytest.raises(QidoError):
        q("StudyDate=2021-03-15x")


# ----------------------------------------------------------------------- lists


@pytest.mark.parametrize("sep", ["\\", ","])
def test_uid_list(sep):
    query = q(f"StudyInstanceUID=9.9{sep}1.2.3{sep}4.5")
    match = query.matches[0]
    assert match.kind is MatchKind.LIST and match.values == ("9.9", "1.2.3", "4.5")
    assert matches(query, study())
    assert not matches(q(f"StudyInstanceUID=9.9{sep}1.2"), study())


def test_multiple_values_for_modalities_in_study():
    assert hits("ModalitiesInStudy=MR\\SR", study(modalities=("CT", "SR")))
    assert hits("ModalitiesInStudy=MR,CT", study())
    assert not hits("ModalitiesInStudy=MR\\PT", study())
    assert hits("ModalitiesInStudy=MR&ModalitiesInStudy=CT", study())  # repeated parameter


def test_comma_is_literal_for_descriptions():
    match = q("StudyDescription=Chest, abdomen").matches[0]
    assert match.kind is MatchKind.SINGLE and match.values == ("Chest, abdomen",)


# ---------------------------------------------------------------- fuzzy names


def test_fuzzy_matching_matches_component_prefixes():
    assert hits("PatientName=jo&fuzzymatching=true", study())
    assert hits("PatientName=do&fuzzymatching=true", study())
    assert not hits("PatientName=oh&fuzzymatching=true", study())
    assert not hits("PatientName=jo&fuzzymatching=false", study())
    assert hits("PatientName=do^jo&fuzzymatching=TRUE", study())
    assert not hits("PatientName=jo^do&fuzzymatching=true", study())
    assert hits("PatientName=van&fuzzymatching=true", study(name="de la Cruz^Maria van"))
    match = q("PatientName=Jo&fuzzymatching=true").matches[0]
    assert match.fuzzy and match.case_insensitive
    assert match.terms[0].likes == ("jo%", "%^jo%", "% jo%")


def test_fuzzy_does_not_change_non_pn_matching():
    assert not hits("PatientID=PID&fuzzymatching=true", study())


@pytest.mark.parametrize("value", ["yes", "1", ""])
def test_bad_fuzzymatching_is_an_error(value):
    with pytest.raises(QidoError, match="fuzzymatching"):
        q(f"fuzzymatching={value}")


# ------------------------------------------------------------ paging, warnings


@pytest.mark.parametrize(
    "query",
    ["limit=-1", "limit=0", "limit=abc", "limit=1.5", "offset=-1", "offset=x", "limit=1&limit=2"],
)
def test_bad_paging_is_an_error(query):
    with pytest.raises(QidoError, match="limit|offset"):
        q(query)


def test_paging_and_max_limit():
    assert (q("").limit, q("").offset) == (None, 0)
    assert q("offset=20&limit=5").offset == 20
    capped = q("limit=5000", max_limit=1000)
    assert capped.limit == 1000 and "maximum" in capped.warnings[0]
    assert q("", max_limit=1000).limit == 1000 and q("", max_limit=1000).warnings == ()
    assert q("limit=10", max_limit=1000).limit == 10


def test_unknown_parameters_and_attributes_are_warnings():
    query = q("PatientNam=x&_=1699999999&PatientID=PID-1&includefield=Bogus&accept=x")
    assert len(query.warnings) == 3
    assert "PatientNam" in query.warnings[0] and "Bogus" in query.warnings[2]
    assert [m.keyword for m in query.matches] == ["PatientID"]
    headers = warning_headers(query)
    assert headers[0].startswith('299 sphere "') and headers[0].endswith('"')


def test_warning_header_quotes_are_escaped():
    query = q('Bad"Name=1')
    assert warning_headers(query, "gw") == [
        '299 gw "unknown query parameter or attribute \'Bad\\"Name\' was ignored"'
    ]


def test_unqueryable_vr_is_an_error():
    with pytest.raises(QidoError):
        q("PixelData=1")


# --------------------------------------------------------- returned attributes


def test_required_attribute_tables():
    assert len(STUDY_REQUIRED_KEYWORDS) == 16
    assert REQUIRED_TAGS[Level.STUDY][:3] == ("00080020", "00080030", "00080050")
    assert {"00080061", "00100010", "00100020", "0020000D", "00201206", "00201208"} <= set(
        REQUIRED_TAGS[Level.STUDY]
    )
    assert {"Modality", "SeriesInstanceUID", "RequestAttributesSequence"} <= set(
        SERIES_REQUIRED_KEYWORDS
    )
    assert {"SOPClassUID", "SOPInstanceUID", "Rows", "Columns", "NumberOfFrames"} <= set(
        INSTANCE_REQUIRED_KEYWORDS
    )


def test_default_return_tags_depend_on_the_path():
    all_series = set(default_return_tags("series"))
    study_series = set(default_return_tags("series", study_scoped=True))
    assert "00100010" in all_series and "00100010" not in study_series
    assert "0008103E" in study_series
    instances = set(default_return_tags("instance", study_scoped=True, series_scoped=True))
    assert "0020000E" not in instances and "00080018" in instances
    assert "0020000E" in set(default_return_tags("instance", study_scoped=True))
    assert "00081030" in default_return_tags("study")  # StudyDescription, extra


def test_select_keeps_defaults_query_keys_and_includefields():
    ds = study()
    ds["00081032"] = {"vr": "SQ", "Value": [{"00080100": {"vr": "SH", "Value": ["X"]}}]}
    ds["00101010"] = {"vr": "AS", "Value": ["050Y"]}
    plain = select(q("PatientID=PID-1"), ds)
    assert "00321060" not in plain and "00101010" not in plain
    assert list(plain) == sorted(plain)
    assert plain["00100020"] == ds["00100020"]
    with_query_key = select(q("PatientAge="), ds)
    assert "00101010" in with_query_key
    included = select(q("includefield=PatientAge&includefield=00321060,00081032.00080100"), ds)
    assert {"00101010", "00321060", "00081032"} <= set(included)
    assert select(q("includefield=all"), ds) == dict(sorted(ds.items()))


def test_select_fill_missing():
    filled = select(q(""), {}, fill_missing=True)
    assert filled["00100010"] == {"vr": "PN"}
    assert filled["00201206"] == {"vr": "IS"}
    assert "00081190" not in filled  # Retrieve URL is the server's to add
    assert select(q(""), {}) == {}


def test_path_uids_scope_the_query():
    query = q("SeriesNumber=1", "instance", study_uid="1.2.3", series_uid="1.2.3.4")
    assert [m.keyword for m in query.matches] == [
        "SeriesNumber",
        "StudyInstanceUID",
        "SeriesInstanceUID",
    ]
    instance = {
        "0020000D": {"vr": "UI", "Value": ["1.2.3"]},
        "0020000E": {"vr": "UI", "Value": ["1.2.3.4"]},
        "00200011": {"vr": "IS", "Value": [1]},
    }
    assert matches(query, instance)
    instance["0020000E"]["Value"] = ["1.2.3.5"]
    assert not matches(query, instance)


def test_sequence_attribute_matching():
    series = {
        "00400275": {
            "vr": "SQ",
            "Value": [
                {"00401001": {"vr": "SH", "Value": ["RP-1"]}},
                {"00401001": {"vr": "SH", "Value": ["RP-2"]}},
            ],
        }
    }
    assert matches(q("RequestAttributesSequence.RequestedProcedureID=RP-2", "series"), series)
    assert matches(q("00400275.00401001=RP-*", "series"), series)
    assert not matches(q("00400275.00401001=RP-3", "series"), series)


def test_mapping_params():
    query = parse_qido({"PatientID": "PID-1", "includefield": ["a", "PatientAge"]}, Level.STUDY)
    assert query.matches[0].keyword == "PatientID"
    assert query.include_fields == (("00101010",),) and len(query.warnings) == 1


# -------------------------------------------------- LIKE agrees with the regex

alphabet = st.sampled_from(list("ab%_\\*?^ "))


def sqlite_like(value: str, pattern: str) -> bool:
    db = sqlite3.connect(":memory:")
    db.execute("PRAGMA case_sensitive_like = ON")
    return bool(db.execute("SELECT ? LIKE ? ESCAPE '\\'", (value, pattern)).fetchone()[0])


@settings(suppress_health_check=[HealthCheck.too_slow], **SETTINGS)
@given(st.text(alphabet, max_size=8), st.text(alphabet, min_size=1, max_size=6))
def test_like_pattern_agrees_with_regex_in_sqlite(value, query_value):
    match = q(f"StudyDescription={query_value}").matches[0]
    if match.kind is not MatchKind.WILDCARD:
        return
    regex_hit = match.terms[0].regex.fullmatch(value) is not None
    assert sqlite_like(value, match.like) == regex_hit


@settings(suppress_health_check=[HealthCheck.too_slow], **SETTINGS)
@given(
    st.text(st.sampled_from(list("abAB^ ")), max_size=10),
    st.text(st.sampled_from(list("abAB^*")), min_size=1, max_size=4),
)
def test_fuzzy_like_patterns_are_a_superset_of_the_regex(name, query_value):
    query = q(f"PatientName={query_value}&fuzzymatching=true")
    match = query.matches[0]
    if match.kind is MatchKind.UNIVERSAL:
        return
    ds = {"00100010": {"vr": "PN", "Value": [{"Alphabetic": name}]}}
    if matches(query, ds):
        stripped = name.rstrip("^ ").lower()
        assert any(sqlite_like(stripped, like) for like in match.terms[0].likes)
