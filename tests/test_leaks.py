"""The leak scanner catches leaks: positive controls for every place the pull tests scan.

A series committed without de-identification must be reported, on a local folder and on S3, and
only a scan of the decoded arrays is sure to see it (the header chunks are compressed).
"""

from __future__ import annotations

import logging

import pydicom
import pytest

from harness.leaks import scan_bytes, scan_database, scan_folder, scan_store, scan_text
from harness.synthetic import generate
from storage.catalog import Catalog
from storage.objectstore import open_store
from storage.series import SeriesWriter, series_key

KEY = series_key("leaky", "2.25.1", "2.25.2")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return generate(
        tmp_path_factory.mktemp("corpus"), n_patients=1, series_per_study=1, slices=6, size=32
    )


def commit_raw(corpus, store, spool) -> None:
    """What a gateway with a broken de-identifier would store: the originals."""
    writer = SeriesWriter(spool, fsync=False)
    for f in corpus.files:
        writer.add(pydicom.dcmread(f))
    writer.commit(store, KEY)


def raw_objects(store) -> dict[str, bytes]:
    from zarr.core.buffer import default_buffer_prototype

    from storage.objectstore import run

    async def everything() -> dict[str, bytes]:
        out = {}
        async for k in store.list_prefix(""):
            buf = await store.get(k, default_buffer_prototype())
            out[k] = buf.to_bytes()
        return out

    return run(everything())


def check_reported(corpus, store) -> set[str]:
    """The leaks the scan reports in the decoded header arrays; returns the needles a scan of
    the raw objects would have missed."""
    leaks = scan_store(store, corpus.phi)
    st = corpus.studies[0]
    found = {leak.needle for leak in leaks if leak.where.endswith("headers (decoded)")}
    assert {st.patient_id, st.accession, st.study_uid} <= found
    seen_raw = {n for data in raw_objects(store).values() for n in corpus.phi if n.encode() in data}
    return found - seen_raw


def test_a_series_stored_without_deidentification_is_reported_on_a_local_folder(tmp_path, corpus):
    store = open_store(str(tmp_path / "store"))
    commit_raw(corpus, store, tmp_path / "spool")
    check_reported(corpus, store)  # raw bytes show them too here: the volume shard is the spool


@pytest.mark.peers
def test_a_series_stored_without_deidentification_is_reported_on_s3(tmp_path, corpus, s3_server):
    store = open_store(s3_server.url(s3_server.new_bucket(), "research"), s3_server.options())
    commit_raw(corpus, store, tmp_path / "spool")
    # Decode before you scan: in S3's compressed chunks a raw scan misses leaks the decoded sees.
    assert check_reported(corpus, store)


def test_an_identifier_in_an_object_key_is_reported(tmp_path, corpus):
    store = open_store(str(tmp_path / "store"))
    writer = SeriesWriter(tmp_path / "spool", fsync=False)
    ds = pydicom.dcmread(corpus.files[0])
    writer.add(ds)
    writer.commit(store, series_key("p", corpus.studies[0].accession, "2.25.9"))
    assert any(leak.where.startswith("key ") for leak in scan_store(store, corpus.phi))


def test_an_identifier_in_the_catalog_is_reported_by_row_and_by_file(tmp_path):
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    catalog = Catalog(url)
    catalog.audit("dm", "oops", "p", detail="PLANTED-NAME-DURAND")
    catalog.dispose()
    where = {leak.where.split(" ")[0] for leak in scan_database(url, ["PLANTED-NAME-DURAND"])}
    assert where == {"table", "file"}
    assert scan_database(url, ["NOT-THERE-ANYWHERE"]) == []


def test_an_identifier_in_the_logs_or_the_spool_is_reported(tmp_path, caplog):
    log = logging.getLogger("gateway.test")
    with caplog.at_level(logging.INFO, logger="gateway"):
        log.info("series of patient %s", "PLANTED-ID-4242")
    assert scan_text("logs", caplog.text, ["PLANTED-ID-4242"])
    (tmp_path / "spool" / "x").mkdir(parents=True)
    (tmp_path / "spool" / "x" / "seg").write_bytes(b"\x00\x01PLANTED-ID-4242\x00")
    assert scan_folder(tmp_path / "spool", ["PLANTED-ID-4242"])
    assert scan_bytes("b", "JÉRÔME".encode("latin-1"), ["JÉRÔME"])  # either encoding
