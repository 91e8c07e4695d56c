"""Every transfer syntax a PACS sends, made from the same CT slices by real encoders, stored
and read back: lossless ones equal to the uncompressed reference, lossy ones close and marked."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from dicom import lossy
from dicom.json_model import first
from gateway.dimse.common import STORAGE_TRANSFER_SYNTAXES
from gateway.dimse.scp import StorageSCP
from harness.synthetic import generate
from processing.pipeline import SeriesFacts
from storage import pixels
from storage.objectstore import open_store
from storage.series import SeriesReader, SeriesWriter
from tests.compressed import SYNTAXES, reference
from tests.samples import pydicom_sample

KEY = "projects/demo/2.25.1/2.25.2"


@pytest.fixture(scope="module")
def slices(tmp_path_factory) -> list[pydicom.Dataset]:
    corpus = generate(
        tmp_path_factory.mktemp("ct"), n_patients=1, series_per_study=1, slices=3, size=64
    )
    return [pydicom.dcmread(f) for f in corpus.files]


def hu(arr: np.ndarray, header: dict) -> np.ndarray:
    slope = float(first(header, "00281053") or 1)
    icpt = float(first(header, "00281052") or 0)
    return arr.astype(np.float64) * slope + icpt


def test_the_storage_scp_accepts_every_syntax(tmp_path, slices):
    """Each sample sent over DIMSE (pynetdicom as the sender, proposing that syntax alone):
    accepted, received as sent, decoded as from the file (HTJ2K included, which Debian's
    Orthanc cannot send)."""
    assert {s.uid for s in SYNTAXES} <= set(STORAGE_TRANSFER_SYNTAXES)
    got: list[pydicom.Dataset] = []
    scp = StorageSCP("SPHERE", "127.0.0.1", 0, lambda ev: got.append(ev.dataset) or 0, timeout_s=10)
    scp.start()
    try:
        for syntax in SYNTAXES:
            _, enc = reference(slices[0], syntax, tmp_path / syntax.name)
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context(CTImageStorage, [syntax.uid])
            assoc = ae.associate("127.0.0.1", scp.port, ae_title="SPHERE")
            assert assoc.is_established, syntax.name
            try:
                (cx,) = assoc.accepted_contexts
                assert cx.transfer_syntax == [syntax.uid]
                assert assoc.send_c_store(enc).Status == 0, syntax.name
            finally:
                assoc.release()
            ds = got.pop()
            assert ds.file_meta.TransferSyntaxUID == syntax.uid
            want = pixels.extract(pydicom.dcmread(enc))
            received = pixels.extract(ds)
            assert bytes(received[1]) == bytes(want[1]) and received[2] == want[2], syntax.name
    finally:
        scp.stop()


@pytest.mark.parametrize("syntax", SYNTAXES, ids=[s.name for s in SYNTAXES])
def test_each_syntax_is_stored_decoded(tmp_path, slices, syntax):
    pairs = [reference(ds, syntax, tmp_path / "files") for ds in slices]
    encoded = [pydicom.dcmread(enc) for _, enc in pairs]
    assert {str(d.file_meta.TransferSyntaxUID) for d in encoded} == {syntax.uid}
    writer = SeriesWriter(tmp_path / "spool", fsync=False)
    for ds in encoded:
        writer.add(ds)
    store = open_store(str(tmp_path / "store"))
    writer.commit(store, KEY)
    reader = SeriesReader(store, KEY)
    refs = sorted(
        (pydicom.dcmread(ref) for ref, _ in pairs), key=lambda d: float(d.ImagePositionPatient[2])
    )
    stored = reader.volume[:]
    headers = reader.headers()
    for i, ref in enumerate(refs):
        header, want = headers[i], ref.pixel_array
        marked = header.get(lossy.LOSSY, {}).get("Value")
        if not syntax.lossy:
            assert np.array_equal(stored[i], want), f"{syntax.name}: slice {i} differs"
            assert marked != ["01"]
            continue
        # Lossy: close in HU (dcmtk's lossy JPEG may rescale), not equal, and marked as such.
        got, exp = hu(stored[i], header), hu(want, ref.to_json_dict())
        rmse = float(np.sqrt(np.mean((got - exp) ** 2)))
        assert 0 < rmse < 0.02 * (1 << int(ref.BitsStored)), f"{syntax.name}: rmse {rmse}"
        assert marked == ["01"]
        assert header[lossy.METHOD]["Value"] == [lossy.METHODS[syntax.uid]]
        assert float(header[lossy.RATIO]["Value"][0]) > 1
    # What the bone-density pipeline reads to flag its result (and the control: not lossless).
    assert SeriesFacts.from_reader(reader).lossy is syntax.lossy
    sent = {str(d.get("LossyImageCompressionRatio")) for d in encoded}
    if syntax.lossy and sent != {"None"}:  # what the sender wrote is kept
        assert {str(h[lossy.RATIO]["Value"][0]) for h in headers} == sent


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_jp2klossless.dcm",  # GDCM's JPEG 2000
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_expb.dcm",
        "MR_small_implicit.dcm",
    ],
)
def test_other_encoders_samples_equal_their_uncompressed_original(name):
    """pydicom's shipped samples, made by other encoders from one signed 16-bit MR image."""
    layout, raw, _ = pixels.extract(pydicom_sample(name))
    got = np.frombuffer(bytes(raw), dtype=layout.dtype).reshape(layout.shape)
    assert np.array_equal(got, pydicom_sample("MR_small.dcm").pixel_array)


@pytest.mark.parametrize("options", [("+e1",), ("+el", "+sv", "6")], ids=["sv1", "sv6"])
def test_colour_jpeg_lossless_decodes_to_its_rgb(tmp_path, options):
    """JPEG Lossless goes to libjpeg-turbo (dicom/decoders.py, asked first: 3-4x GDCM's speed);
    a colour cine made lossless by dcmtk comes back as its RGB frames, no colour transform."""
    import subprocess

    from pydicom.uid import JPEGLossless, JPEGLosslessSV1

    from dicom import decoders
    from harness.multiframe import write_samples
    from harness.phantoms import make_phantom

    assert decoders.plugin_for(JPEGLosslessSV1, 16) == decoders.plugin_for(JPEGLossless, 8)
    assert decoders.plugin_for(JPEGLossless, 8) == decoders.LABEL
    volume, truth = make_phantom(shape_yx=(32, 32), pixel_mm=10.0, slice_spacing_mm=10.0)
    cine = write_samples(volume, truth, tmp_path, only=("us_cine_rgb",)).samples["us_cine_rgb"]
    enc = tmp_path / "lossless.dcm"
    subprocess.run(["dcmcjpeg", *options, str(cine.path), str(enc)], check=True)
    layout, raw, _ = pixels.extract(pydicom.dcmread(enc))
    got = np.frombuffer(bytes(raw), dtype=layout.dtype).reshape(cine.pixels.shape)
    assert np.array_equal(got, cine.pixels)
