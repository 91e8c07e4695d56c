"""The receiver's shortcut for the second and later instances of a series: it must store
exactly what the whole engine stores, and step aside whenever an identity could be involved."""

from __future__ import annotations

from dataclasses import replace

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from core.settings import Settings
from dicom.received import ReceivedInstance
from dicom.status import DATASET_MISMATCH, SUCCESS
from dicom.status import REFUSED as REFUSED_NOT_AUTHORIZED
from gateway.api import Gateway
from gateway.pull.receiver import Receiver, ReceiverConfig
from harness.synthetic import generate
from storage.series import SeriesWriter


@pytest.fixture
def pair(tmp_path):
    """A series, and two receivers of one project: `fast` gets encoded instances (on_store),
    `whole` decoded ones (store, the whole engine every time)."""
    corpus = generate(tmp_path / "corpus", n_patients=1, series_per_study=1, slices=12, size=32)
    gw = Gateway(Settings(home=tmp_path / "gw", fsync=False))
    gw.create_project("short")
    cfg = ReceiverConfig.of(gw.core, "short")
    fast, whole = Receiver(cfg), Receiver(replace(cfg, spool_root=tmp_path / "spool-whole"))
    st = corpus.studies[0]
    se = st.series[0]
    for r in (fast, whole):
        pseudo = r.keys.uid(se.series_uid)
        r.layout.expect(pseudo, r.keys.uid(st.study_uid), r.keys.pseudonym(st.patient_id))
    return corpus, fast, whole, fast.keys.uid(se.series_uid)


def encoded(ds: pydicom.Dataset, syntax) -> ReceivedInstance:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, syntax.is_implicit_VR
    write_dataset(buf, ds)
    return ReceivedInstance(ds.SOPClassUID, ds.SOPInstanceUID, syntax, buf.getvalue(), "ORTHANC")


def stored(receiver: Receiver, pseudo: str) -> dict[str, tuple[bytes, bytes, dict]]:
    """{pseudonymous SOP UID: (header JSON, pixel bytes, record meta without its time)}."""
    writer = SeriesWriter(receiver.layout.data(pseudo), fsync=False)
    spool = writer._spool
    out = {}
    for e in spool.entries():
        pixels = bytearray(e.pixel_len)
        spool.read_pixels_into(e, memoryview(pixels))
        meta = {k: v for k, v in e.meta.items() if k != "t"}
        out[e.meta["sop"]] = (spool.read_header(e), bytes(pixels), meta)
    writer.close()
    return out


def feed(corpus, fast, whole, syntax, change=None) -> None:
    for i, f in enumerate(sorted(corpus.files)):
        ds = pydicom.dcmread(f)
        if change:
            change(i, ds)
        inst = encoded(ds, syntax)
        assert fast.on_store(inst) == SUCCESS
        assert whole.store(inst.decode(), "ORTHANC") == SUCCESS


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_the_shortcut_stores_what_the_whole_engine_stores(pair, syntax):
    corpus, fast, whole, pseudo = pair
    feed(corpus, fast, whole, syntax)
    n = len(corpus.files)
    assert fast.shortcuts == n - 1  # all but the first instance
    got, want = stored(fast, pseudo), stored(whole, pseudo)
    assert len(got) == n and got == want  # headers, pixels and slice metadata, byte for byte
    headers = b"".join(h for h, _, _ in got.values())
    assert not [p for p in corpus.phi if p.encode() in headers]


def test_changed_identities_or_text_take_the_whole_way(pair):
    corpus, fast, whole, pseudo = pair
    n = len(corpus.files)

    def change(i, ds):
        ds.WindowCenter = 40 + i  # a number: local, never a reason to step aside
        if i >= n // 2:  # then a name and free text that change from instance to instance
            ds.OperatorsName = f"Operator^{i}"
            ds.ImageComments = f"slice read by {corpus.phi[0]} {i}"

    feed(corpus, fast, whole, ExplicitVRLittleEndian, change)
    assert fast.shortcuts == n // 2 - 1
    got, want = stored(fast, pseudo), stored(whole, pseudo)
    assert got == want
    headers = b"".join(h for h, _, _ in got.values())
    assert corpus.phi[0].encode() not in headers and b"Operator^" not in headers


def test_the_shortcut_still_refuses_and_checks_requests(pair):
    corpus, fast, _, pseudo = pair
    files = sorted(corpus.files)
    first, second, third = (pydicom.dcmread(f) for f in files[:3])
    assert fast.on_store(encoded(first, ExplicitVRLittleEndian)) == SUCCESS
    wrong = encoded(second, ExplicitVRLittleEndian)
    wrong = replace(wrong, sop_instance=third.SOPInstanceUID)  # request and dataset disagree
    assert fast.on_store(wrong) == DATASET_MISMATCH
    fast.layout.forget(pseudo)  # the pull closed the door on the series
    late = encoded(third, ExplicitVRLittleEndian)
    assert fast.on_store(late) == REFUSED_NOT_AUTHORIZED
    assert fast.shortcuts == 0 and fast.refused == 1


def test_instances_whose_text_is_blanked_never_take_the_shortcut(tmp_path):
    """With burned-in text blanked (profile 'blank'), every instance of a series is blanked:
    the shortcut, which stores the next instance's pixels as received, must not follow a
    blanked one (it did: the first was blanked, the others stored with their text)."""
    import numpy as np

    from deid.profile import Profile, Region
    from storage.objectstore import open_store
    from storage.series import SeriesReader
    from tests.adversarial import secondary_capture

    gw = Gateway(Settings(home=tmp_path / "gw", fsync=False))
    profile = Profile(burned_in="blank", regions=(Region(0, 0, 32, 6, rows=32, columns=32),))
    gw.create_project("blanked", profile=profile)
    fast = Receiver(ReceiverConfig.of(gw.core, "blanked"))
    path = secondary_capture(tmp_path / "sc.dcm", burned_in="YES")  # text: 200 everywhere
    first = pydicom.dcmread(path)
    pseudo = fast.keys.uid(first.SeriesInstanceUID)
    study, patient = fast.keys.uid(first.StudyInstanceUID), fast.keys.pseudonym(first.PatientID)
    fast.layout.expect(pseudo, study, patient)
    for i in range(3):
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID, ds.InstanceNumber = f"{ds.SOPInstanceUID}.{i}", i + 1
        assert fast.on_store(encoded(ds, ExplicitVRLittleEndian)) == SUCCESS
    fast.on_release()
    store = open_store(str(tmp_path / "store"))
    SeriesWriter(fast.layout.data(pseudo), fsync=False).commit(store, "projects/blanked/a/b")
    volume = SeriesReader(store, "projects/blanked/a/b").volume[:]
    assert volume.shape[0] == 3
    assert np.all(volume[:, :6] == 0) and np.all(volume[:, 6:] == 200)  # each one blanked
    assert fast.shortcuts == 0
    fast.close()


@pytest.mark.parametrize(
    "name", ["jpeg-lossless-sv1", "jpeg-ls", "j2k-lossless", "rle", "jpeg-baseline", "j2k-lossy"]
)
def test_compressed_instances_take_the_shortcut_to_the_same_result(pair, tmp_path, name):
    """Encapsulated pixel data (the dataset itself is Explicit VR LE) goes the same way: only
    the changed elements de-identified, the pixels decoded by the writer as they came; stored
    byte for byte as the whole engine stores them (a lossy one's ratio included). dcmtk writes
    each image's compression ratio into DerivationDescription (free text: the whole way each
    time); a modality compressing its images does not, so it is left out here."""
    from pydicom.uid import UID

    from tests.compressed import BY_NAME, reference

    corpus, fast, whole, pseudo = pair
    syntax = BY_NAME[name]
    for f in sorted(corpus.files):
        _, enc = reference(pydicom.dcmread(f), syntax, tmp_path / name)
        ds = pydicom.dcmread(enc)
        ds.pop("DerivationDescription", None)
        inst = encoded(ds, UID(syntax.uid))
        assert fast.on_store(inst) == SUCCESS
        assert whole.store(inst.decode(), "ORTHANC") == SUCCESS
    if syntax.how[0] != "dcmcjpeg" or not syntax.lossy:  # dcmtk's lossy images get new
        assert fast.shortcuts == len(corpus.files) - 1  # UIDs and a Source Image Sequence
    got, want = stored(fast, pseudo), stored(whole, pseudo)
    assert len(got) == len(corpus.files) and got == want
