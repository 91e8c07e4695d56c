"""Accept-header parsing and DICOMweb content negotiation (PS3.18 8.7)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.web.accept import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    Negotiated,
    NotAcceptable,
    Resource,
    negotiate,
    negotiate_bulkdata,
    negotiate_dicom,
    negotiate_metadata,
    negotiate_rendered,
    parse_accept,
    parse_media_type,
    split_unquoted,
)

SETTINGS: dict[str, Any] = dict(
    database=None, deadline=None
)  # no example database written into the tree
EVRLE = EXPLICIT_VR_LITTLE_ENDIAN
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"

# Headers as real clients send them.
OHIF_METADATA = (
    "application/dicom+json, multipart/related; type=application/octet-stream; transfer-syntax=*"
)
OHIF_FRAMES = "multipart/related; type=application/octet-stream; transfer-syntax=*"
DWC_FRAMES = 'multipart/related; type="application/octet-stream"; transfer-syntax="' + EVRLE + '"'
DWC_INSTANCE = 'multipart/related; type="application/dicom"; transfer-syntax="' + EVRLE + '"'
DWC_ANY_FRAMES = 'multipart/related; type="*/*"'
BROWSER_IMG = "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"
BROWSER_PAGE = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


# ---------------------------------------------------------------------- parsing


def test_split_unquoted_ignores_separators_inside_quotes():
    assert split_unquoted('a; b="x;y"; c', ";") == ["a", ' b="x;y"', " c"]
    assert split_unquoted('a="q\\"," , b', ",") == ['a="q\\"," ', " b"]


def test_parse_accept_keeps_a_comma_inside_a_quoted_parameter():
    ranges = parse_accept('multipart/related; type="application/dicom"; x="a,b", application/json')
    assert [r.media_type for r in ranges] == ["multipart/related", "application/json"]
    assert ranges[0].params == {"type": "application/dicom", "x": "a,b"}


def test_parse_accept_quoted_and_unquoted_parameters_are_equal():
    quoted = parse_accept(DWC_FRAMES)[0]
    unquoted = parse_accept(
        f"multipart/related; type=application/octet-stream; transfer-syntax={EVRLE}"
    )[0]
    assert (
        quoted.params
        == unquoted.params
        == {
            "type": "application/octet-stream",
            "transfer-syntax": EVRLE,
        }
    )


def test_parse_accept_q_values_case_and_invalid_entries():
    ranges = parse_accept("IMAGE/PNG; Q=0.5, image/jpeg;q=2, text/plain;q=abc, garbage, */*;q=-1")
    assert [(r.media_type, r.q) for r in ranges] == [
        ("image/png", 0.5),
        ("image/jpeg", 1.0),
        ("*/*", 0.0),
    ]
    assert "q" not in ranges[0].params
    assert [r.index for r in ranges] == [0, 1, 4]


def test_parse_accept_several_header_lines_and_bare_star():
    ranges = parse_accept(["image/png", "*"])
    assert [r.media_type for r in ranges] == ["image/png", "*/*"]
    assert parse_accept(None) == [] and parse_accept("") == []


def test_parse_media_type_escaped_quote_and_rejects():
    assert parse_media_type('a/b; x="1\\"2"') == ("a", "b", {"x": '1"2'})
    assert parse_media_type("*/json") is None
    assert parse_media_type("nosubtype") is None
    assert parse_media_type("a/b; novalue") is None


# ------------------------------------------------------------------ metadata


def test_ohif_combined_metadata_header_answers_dicom_json():
    assert negotiate_metadata(OHIF_METADATA) == Negotiated("application/dicom+json", None, False)


@pytest.mark.parametrize("header", [None, "", "*/*", "application/*", BROWSER_PAGE])
def test_metadata_defaults_to_dicom_json(header):
    assert negotiate_metadata(header).media_type == "application/dicom+json"


def test_metadata_plain_json_when_asked_or_when_dicom_json_excluded():
    assert negotiate_metadata("application/json").media_type == "application/json"
    excluded = "application/dicom+json;q=0, */*"
    assert negotiate_metadata(excluded).media_type == "application/json"


def test_metadata_406_lists_what_can_be_produced():
    with pytest.raises(NotAcceptable) as info:
        negotiate_metadata("application/xml")  # plain XML is not the DICOM model
    message = str(info.value)
    assert "application/dicom+json" in message and "application/xml" in message
    assert info.value.available == (
        "application/dicom+json",
        "application/json",
        'multipart/related; type="application/dicom+xml"',
    )


@pytest.mark.parametrize(
    "header",
    [
        'multipart/related; type="application/dicom+xml"',
        "multipart/related; type=application/dicom+xml",
        "application/dicom+xml",  # bare: XML datasets come as multipart parts all the same
        "application/dicom+json;q=0.5, application/dicom+xml",
    ],
)
def test_metadata_as_dicom_xml_is_multipart(header):
    chosen = negotiate_metadata(header)
    assert (chosen.media_type, chosen.multipart) == ("application/dicom+xml", True)
    assert chosen.content_type("b") == 'multipart/related; type="application/dicom+xml"; boundary=b'


# -------------------------------------------------------------- DICOM resources


@pytest.mark.parametrize(
    "header",
    [
        None,
        "*/*",
        "multipart/*",
        "multipart/related",
        'multipart/related; type="application/dicom"',
        "multipart/related; type=application/dicom; transfer-syntax=*",
        DWC_INSTANCE,
        'multipart/related; type="application/*"',
    ],
)
def test_dicom_retrieval_is_multipart_application_dicom(header):
    assert negotiate_dicom(header) == Negotiated("application/dicom", EVRLE, True)


def test_dicom_compressed_syntax_only_is_406_with_a_helpful_message():
    header = f'multipart/related; type="application/dicom"; transfer-syntax={JPEG_BASELINE}'
    with pytest.raises(NotAcceptable) as info:
        negotiate_dicom(header)
    assert f'multipart/related; type="application/dicom"; transfer-syntax={EVRLE}' in str(
        info.value
    )


def test_dicom_falls_back_to_a_later_acceptable_range():
    header = (
        f'multipart/related; type="application/dicom"; transfer-syntax={JPEG_BASELINE}, '
        'multipart/related; type="application/dicom"; q=0.5'
    )
    assert negotiate_dicom(header).transfer_syntax == EVRLE


def test_dicom_bare_application_dicom_needs_single_part_allowed():
    with pytest.raises(NotAcceptable):
        negotiate_dicom("application/dicom")
    assert negotiate_dicom("application/dicom", allow_single_part=True) == Negotiated(
        "application/dicom", EVRLE, False
    )


def test_dicom_bulk_media_type_is_not_acceptable_for_instances():
    with pytest.raises(NotAcceptable):
        negotiate_dicom(OHIF_FRAMES)


def test_transfer_syntax_star_means_as_stored_and_absent_means_default():
    kwargs = dict(
        stored_transfer_syntax=IMPLICIT_VR_LITTLE_ENDIAN,
        supported_transfer_syntaxes=(EVRLE, IMPLICIT_VR_LITTLE_ENDIAN),
    )
    star = negotiate(
        "multipart/related; type=application/dicom; transfer-syntax=*", "dicom", **kwargs
    )
    assert star.transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    default = negotiate('multipart/related; type="application/dicom"', "dicom", **kwargs)
    assert default.transfer_syntax == EVRLE


# ----------------------------------------------------------------- frames/bulk


@pytest.mark.parametrize(
    "header",
    [OHIF_FRAMES, DWC_FRAMES, DWC_ANY_FRAMES, None, "*/*", "multipart/related", OHIF_METADATA],
)
def test_frames_are_multipart_octet_stream(header):
    assert negotiate_bulkdata(header) == Negotiated("application/octet-stream", EVRLE, True)


def test_frames_single_part_octet_stream():
    result = negotiate_bulkdata("application/octet-stream")
    assert result == Negotiated("application/octet-stream", EVRLE, False)
    assert result.content_type() == f"application/octet-stream; transfer-syntax={EVRLE}"
    with pytest.raises(NotAcceptable):
        negotiate_bulkdata("application/octet-stream", allow_single_part=False)


@pytest.mark.parametrize(
    "header",
    [
        f"multipart/related; type=image/jpeg; transfer-syntax={JPEG_BASELINE}",
        'multipart/related; type="image/jls"',
        f"multipart/related; type=application/octet-stream; transfer-syntax={JPEG_BASELINE}",
        "multipart/related; type=application/octet-stream; q=0",
        "*/*;q=0",
        "application/dicom+json",
    ],
)
def test_frames_406(header):
    with pytest.raises(NotAcceptable) as info:
        negotiate_bulkdata(header)
    assert "application/octet-stream" in str(info.value)


def test_frames_compressed_preferred_but_uncompressed_accepted_at_lower_q():
    header = (
        f"multipart/related; type=image/jpeg; transfer-syntax={JPEG_BASELINE}, "
        "multipart/related; type=application/octet-stream; transfer-syntax=*; q=0.3"
    )
    assert negotiate_bulkdata(header).multipart


def test_more_specific_q0_excludes_a_broader_range():
    header = (
        "multipart/*, "
        f"multipart/related; type=application/octet-stream; transfer-syntax={EVRLE};q=0"
    )
    with pytest.raises(NotAcceptable):
        negotiate_bulkdata(header, allow_single_part=False)


def test_multipart_content_type_with_boundary():
    result = negotiate_bulkdata(OHIF_FRAMES)
    assert result.content_type("abc") == (
        'multipart/related; type="application/octet-stream"; boundary=abc'
    )
    assert result.part_content_type == f"application/octet-stream; transfer-syntax={EVRLE}"


# -------------------------------------------------------------------- rendered


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, "image/jpeg"),
        ("*/*", "image/jpeg"),
        ("image/*", "image/jpeg"),
        ("image/png", "image/png"),
        ("image/jpeg;q=0.5, image/png", "image/png"),
        ("image/png;q=0.5, */*;q=0.8", "image/jpeg"),
        ("image/*, image/jpeg;q=0", "image/png"),
        (BROWSER_IMG, "image/jpeg"),
        ("image/png, image/jpeg", "image/png"),
    ],
)
def test_rendered(header, expected):
    assert negotiate_rendered(header) == Negotiated(expected, None, False)


def test_rendered_406_and_accept_query_parameter_overrides_header():
    with pytest.raises(NotAcceptable) as info:
        negotiate_rendered("image/gif")
    assert "image/jpeg" in str(info.value) and "image/png" in str(info.value)
    assert negotiate_rendered("image/gif", accept_query="image/png").media_type == "image/png"
    assert negotiate_metadata("image/png", accept_query="application/json").media_type == (
        "application/json"
    )
    with pytest.raises(NotAcceptable):
        negotiate_bulkdata("*/*", accept_query="image/png")


def test_kind_given_as_string():
    assert negotiate(None, "rendered").media_type == "image/jpeg"
    assert Resource("bulkdata") is Resource.BULKDATA


@settings(suppress_health_check=[HealthCheck.too_slow], **SETTINGS)
@given(st.text(max_size=200))
def test_arbitrary_headers_never_crash(header):
    for kind in Resource:
        try:
            result = negotiate(header, kind)
        except NotAcceptable:
            continue
        assert isinstance(result, Negotiated)
