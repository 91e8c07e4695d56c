"""Streaming multipart/related writer and parser."""

from __future__ import annotations

import itertools
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.web.multipart import (
    MultipartWriter,
    Part,
    boundary_from_content_type,
    iter_parts,
    multipart_content_type,
    new_boundary,
    parse_multipart,
    write_multipart,
)

SETTINGS: dict[str, Any] = dict(
    database=None, deadline=None
)  # no example database written into the tree
OCTET = "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"


def test_writer_exact_wire_format():
    writer = MultipartWriter(
        [
            ("application/dicom", b"DICM"),
            (OCTET, iter([b"ab", b"", b"c"]), {"Content-Location": "/studies/1/frames/2"}),
        ],
        part_type="application/dicom",
        boundary="XYZ",
    )
    assert writer.content_type == 'multipart/related; type="application/dicom"; boundary=XYZ'
    assert b"".join(writer) == (
        b"--XYZ\r\nContent-Type: application/dicom\r\n\r\nDICM\r\n"
        b"--XYZ\r\nContent-Type: " + OCTET.encode() + b"\r\n"
        b"Content-Location: /studies/1/frames/2\r\n\r\nabc\r\n"
        b"--XYZ--\r\n"
    )


def test_every_part_has_a_content_type_header():
    body = b"".join(MultipartWriter([(OCTET, b"x")] * 3, part_type="application/octet-stream"))
    assert body.count(b"\r\nContent-Type: " + OCTET.encode() + b"\r\n") == 3


def test_random_boundaries():
    boundaries = {new_boundary() for _ in range(50)}
    assert len(boundaries) == 50
    assert all(re.fullmatch(r"[0-9a-f]{32}", b) for b in boundaries)
    content_type, chunks = write_multipart([(OCTET, b"1")], part_type="application/octet-stream")
    boundary = boundary_from_content_type(content_type)
    assert [p.content for p in iter_parts(chunks, boundary)] == [b"1"]


def test_content_type_helper_with_extra_parameters():
    assert multipart_content_type("application/dicom", "b", transfer_syntax="1.2") == (
        'multipart/related; type="application/dicom"; boundary=b; transfer-syntax=1.2'
    )


@pytest.mark.parametrize(
    "content_type",
    [
        'multipart/related; type="application/dicom"; boundary=abc',
        'multipart/related; type="application/dicom"; boundary="abc"',
        "Multipart/Related; boundary=abc; type=application/dicom",
    ],
)
def test_boundary_quoted_or_not(content_type):
    assert boundary_from_content_type(content_type) == "abc"
    data = b"--abc\r\nContent-Type: a/b\r\n\r\nhello\r\n--abc--"
    assert [p.content for p in iter_parts([data], content_type=content_type)] == [b"hello"]


@pytest.mark.parametrize(
    "content_type",
    ["application/dicom", "multipart/related", "multipart/related; boundary=" + "x" * 71],
)
def test_bad_content_types(content_type):
    with pytest.raises(ValueError):
        boundary_from_content_type(content_type)


def test_writer_is_lazy_for_500_parts_and_parser_streams_them():
    consumed = 0

    def parts():
        nonlocal consumed
        for i in range(500):
            consumed += 1
            yield OCTET, i.to_bytes(4, "big") * 256, {"Content-Location": f"/frames/{i + 1}"}

    writer = MultipartWriter(parts(), part_type="application/octet-stream")
    chunks = iter(writer)
    first = list(itertools.islice(chunks, 4))
    assert consumed <= 2 and first[0].startswith(b"--" + writer.boundary.encode())
    count = 0
    for index, part in enumerate(iter_parts(itertools.chain(first, chunks), writer.boundary)):
        assert part.content == index.to_bytes(4, "big") * 256
        assert part.content_location == f"/frames/{index + 1}"
        assert part.content_type == OCTET
        # Parsing keeps pace with writing: the writer is at most a part ahead.
        assert consumed <= index + 2
        count += 1
    assert count == 500 and consumed == 500


def test_writer_rejects_header_injection_and_boundary_in_body():
    with pytest.raises(ValueError):
        b"".join(MultipartWriter([("a/b\r\nX-Evil: 1", b"")], part_type="a/b"))
    with pytest.raises(ValueError):
        b"".join(MultipartWriter([("a/b", b"", {"Bad Name": "v"})], part_type="a/b"))
    for body in (b"x\r\n--B\r\n", b"--B--"):
        with pytest.raises(ValueError):
            b"".join(MultipartWriter([("a/b", body)], part_type="a/b", boundary="B"))
    with pytest.raises(TypeError):
        b"".join(MultipartWriter([("a/b", "text")], part_type="a/b"))
    with pytest.raises(ValueError):
        MultipartWriter([], part_type="a/b", boundary="")


def test_empty_multipart_round_trips():
    assert parse_multipart(b"".join(MultipartWriter([], part_type="a/b", boundary="B")), "B") == []


def test_parser_preamble_padding_folding_empty_headers_and_epilogue():
    data = (
        b"This is a preamble.\r\n--B  \t\r\n"
        b"Content-Type: application/dicom\r\nX-Long: one\r\n two\r\n\r\nfirst\r\n"
        b"--B\r\n\r\nsecond, no headers\r\n"
        b"--B--\r\nepilogue, ignored"
    )
    parts = parse_multipart(data, "B")
    assert parts == [
        Part([("Content-Type", "application/dicom"), ("X-Long", "one two")], b"first"),
        Part([], b"second, no headers"),
    ]
    assert parts[0].header("content-type") == "application/dicom"
    assert parts[1].content_type is None


def test_content_may_contain_near_boundaries():
    tricky = b"\r\n--\r\n--Bx--B\r\n-B\r\r\n--"
    data = b"".join(
        MultipartWriter([("a/b", tricky), ("a/b", b"")], part_type="a/b", boundary="BB")
    )
    assert [p.content for p in parse_multipart(data, "BB")] == [tricky, b""]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "truncated"),
        (b"--B\r\nContent-Type: a/b\r\n\r\nabc", "truncated"),
        (b"--B\r\nContent-Type: a/b\r\n\r\nabc\r\n--B", "truncated"),
        (b"--B\r\nContent-Type: a/b", "truncated"),
        (b"--B\r\nnot a header\r\n\r\nabc\r\n--B--", "malformed"),
        (b"--B\r\n: empty name\r\n\r\nabc\r\n--B--", "malformed"),
        (b"--Bgarbage\r\n\r\nabc\r\n--B--", "unexpected bytes"),
        (b"<html>404 Not Found</html>", "truncated"),
    ],
)
def test_malformed_input_raises(data, message):
    with pytest.raises(ValueError, match=message):
        parse_multipart(data, "B")


def test_endless_garbage_fails_instead_of_hanging():
    with pytest.raises(ValueError, match="preamble"):
        list(iter_parts(itertools.repeat(b"garbage " * 128), "B"))


def test_endless_part_fails_at_max_part_size():
    stream = itertools.chain([b"--B\r\nContent-Type: a/b\r\n\r\n"], itertools.repeat(b"x" * 4096))
    with pytest.raises(ValueError, match="part body exceeds 100000 bytes"):
        list(iter_parts(stream, "B", max_part_size=100_000))


def test_endless_headers_fail():
    stream = itertools.chain([b"--B\r\n"], itertools.repeat(b"X-A: b\r\n"))
    with pytest.raises(ValueError, match="part headers exceed"):
        list(iter_parts(stream, "B"))


def test_part_exactly_at_max_size_is_accepted():
    data = b"--B\r\n\r\n" + b"x" * 100 + b"\r\n--B--"
    assert parse_multipart(data, "B", max_part_size=100)[0].content == b"x" * 100
    with pytest.raises(ValueError):
        parse_multipart(data, "B", max_part_size=99)


# --------------------------------------------------------------------- properties

TRICKY = [
    b"\r\n",
    b"--",
    b"\r\n--",
    b"--B",
    b"\r\n--B",
    b"\r\n--BOUNDAR",
    b"BOUNDARY",
    b"\r",
    b"\n",
    b"-",
]
contents = (
    st.lists(st.one_of(st.binary(max_size=40), st.sampled_from(TRICKY)), max_size=8)
    .map(b"".join)
    .filter(lambda c: b"\r\n--BOUNDARY" not in b"\r\n" + c)
)
part_specs = st.lists(
    st.tuples(
        st.sampled_from(["application/dicom", OCTET, "image/jpeg"]),
        contents,
        st.one_of(
            st.none(), st.builds(lambda n: {"Content-Location": f"/frames/{n}"}, st.integers(1, 9))
        ),
    ),
    max_size=6,
)


def rechunk(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], **SETTINGS)
@given(part_specs, st.lists(st.integers(0, 10_000), max_size=30), st.booleans())
def test_round_trip_with_random_chunking(specs, cuts, quoted):
    writer = MultipartWriter(specs, part_type="application/dicom", boundary="BOUNDARY")
    data = b"".join(writer)
    content_type = (
        writer.content_type.replace("boundary=BOUNDARY", 'boundary="BOUNDARY"')
        if quoted
        else writer.content_type
    )
    parts = list(iter_parts(rechunk(data, cuts), content_type=content_type))
    assert len(parts) == len(specs)
    for part, (ctype, content, extra) in zip(parts, specs, strict=True):
        assert part.content == content
        assert part.content_type == ctype
        assert part.content_location == (extra or {}).get("Content-Location")


@settings(max_examples=300, **SETTINGS)
@given(part_specs, st.lists(st.integers(0, 10_000), max_size=10), st.data())
def test_any_truncation_is_an_error(specs, cuts, data):
    body = b"".join(MultipartWriter(specs, part_type="application/dicom", boundary="BOUNDARY"))
    # The close delimiter is complete 2 bytes before the end (its trailing CRLF is optional).
    cut = data.draw(st.integers(0, len(body) - 3))
    with pytest.raises(ValueError):
        list(iter_parts(rechunk(body[:cut], cuts), "BOUNDARY"))


@settings(suppress_health_check=[HealthCheck.too_slow], **SETTINGS)
@given(st.binary(max_size=300), st.lists(st.integers(0, 1000), max_size=10))
def test_random_bytes_terminate(data, cuts):
    try:
        parts = list(iter_parts(rechunk(data, cuts), "B", max_preamble_size=1000))
    except ValueError:
        return
    # Only possible if the random bytes happen to form a valid multipart body.
    assert b"--B" in data and all(isinstance(p, Part) for p in parts)
