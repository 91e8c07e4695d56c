"""Series storage in real S3 (SeaweedFS on loopback), and an object store that is down."""

from __future__ import annotations

import random
import socket
import threading
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest

from harness.seaweed import SeaweedS3
from harness.synthetic import generate
from storage.objectstore import StorageUnavailable, check_store, open_store
from storage.series import SeriesReader, SeriesWriter, list_series

pytestmark = pytest.mark.peers
KEY = "projects/demo/2.25.10/2.25.20"


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    corpus = generate(
        tmp_path_factory.mktemp("ct"), n_patients=1, series_per_study=1, slices=12, size=32
    )
    dss = [pydicom.dcmread(f) for f in corpus.files]
    random.Random(5).shuffle(dss)
    return dss


def by_position(dss):
    return sorted(dss, key=lambda d: float(d.ImagePositionPatient[2]))


def spooled(path, dss):
    writer = SeriesWriter(path, fsync=False)
    for ds in dss:
        writer.add(ds)
    return writer


def test_round_trip_through_s3(tmp_path, ct, s3_server):
    bucket = s3_server.new_bucket()
    store = open_store(s3_server.url(bucket, "research"), s3_server.options())
    check_store(store)
    info = spooled(tmp_path / "spool", ct).commit(store, KEY)
    assert info.shape == (12, 32, 32)

    reader = SeriesReader(open_store(s3_server.url(bucket, "research"), s3_server.options()), KEY)
    assert reader.complete
    src = by_position(ct)
    np.testing.assert_array_equal(reader.volume[:], np.stack([d.pixel_array for d in src]))
    np.testing.assert_array_equal(reader.instance(4).pixel_array, src[4].pixel_array)
    assert reader.instance(4).SOPInstanceUID == src[4].SOPInstanceUID
    assert reader.attrs["spacing"][0] == pytest.approx(2.5)
    assert list(list_series(store, "projects")) == [KEY]

    # Objects live under the key we gave, nothing is named after header contents.
    objects = s3_server.read_all(bucket)
    assert objects and all(k.startswith(f"research/{KEY}/") for k in objects)
    uids = {d.SOPInstanceUID for d in ct} | {ct[0].SeriesInstanceUID, ct[0].StudyInstanceUID}
    assert not any(uid in k for k in objects for uid in uids)
    assert f"research/{KEY}/zarr.json" in objects


def test_recommit_in_s3_leaves_no_stale_objects(tmp_path, ct, s3_server):
    bucket = s3_server.new_bucket()
    store = open_store(s3_server.url(bucket), s3_server.options())
    spooled(tmp_path / "a", ct).commit(store, KEY)
    before = set(s3_server.read_all(bucket))
    spooled(tmp_path / "b", by_position(ct)[:2]).commit(store, KEY)
    after = set(s3_server.read_all(bucket))
    assert after <= before
    assert SeriesReader(store, KEY).volume.shape == (2, 32, 32)


def test_stopped_s3_server_gives_storage_unavailable(tmp_path, ct, s3_server):
    with SeaweedS3(tmp_path / "own") as own:
        url, opts = own.url(prefix="p"), own.options()
        store = open_store(url, opts, timeout_s=3, retries=1)
        spooled(tmp_path / "first", ct[:3]).commit(store, KEY)
        assert SeriesReader(store, KEY).complete
    # The server is gone now.
    with pytest.raises(StorageUnavailable) as err:
        SeriesReader(store, KEY)
    assert KEY not in str(err.value)
    writer = spooled(tmp_path / "second", ct)
    with pytest.raises(StorageUnavailable):
        writer.commit(store, KEY)
    with pytest.raises(StorageUnavailable):
        check_store(store)
    # Nothing was lost: the spool is kept and the commit can go elsewhere.
    assert writer.count == 12
    healthy = open_store(s3_server.url(s3_server.new_bucket()), s3_server.options())
    assert writer.commit(healthy, KEY).n_instances == 12


def test_unresponsive_endpoint_times_out_instead_of_hanging(tmp_path, ct):
    # Accepts connections, never answers: only a timeout can end a request.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        opts = SimpleNamespace(
            endpoint=f"http://127.0.0.1:{listener.getsockname()[1]}",
            access_key="k",
            secret_key="s",
            region="us-east-1",
            allow_http=True,
        )
        store = open_store("s3://bucket/x", opts, timeout_s=1, connect_timeout_s=1, retries=0)
        with pytest.raises(StorageUnavailable):
            check_store(store)
        writer = spooled(tmp_path / "spool", ct[:2])
        with pytest.raises(StorageUnavailable):
            writer.commit(store, KEY)
        assert writer.count == 2
    finally:
        stop.set()
        thread.join()
        for s in accepted:
            s.close()
        listener.close()


def test_wrong_credentials_give_storage_unavailable(s3_server):
    opts = s3_server.options()
    opts.secret_key = "not-the-secret"
    store = open_store(s3_server.url(), opts, retries=0)
    with pytest.raises(StorageUnavailable):
        check_store(store)
