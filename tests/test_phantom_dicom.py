"""The phantom DICOM writer: stored values give back the HU, positions and orientation follow
the phantom's affine (a flipped axis included), header facts and planted identifiers are there."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from harness.phantom_dicom import write_phantom_study
from harness.phantoms import make_phantom

TINY = dict(shape_yx=(48, 48), pixel_mm=7.0, slice_spacing_mm=10.0, noise_sd=0.0)


@pytest.mark.parametrize("unsigned, intercept", [(False, -1024.0), (True, -1024.0), (False, 0.0)])
def test_the_series_gives_back_the_phantom(tmp_path, unsigned, intercept):
    vol, truth = make_phantom(**TINY, flip_z=True, flip_x=True)
    st = write_phantom_study(
        vol, truth, tmp_path, unsigned=unsigned, intercept=intercept, contrast=True, kvp=100.0
    )
    assert st.n_instances == vol.shape[0]
    for k, path in enumerate(st.files):
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        assert np.array_equal(hu, vol[k])
        assert ds.pixel_array.dtype == (np.uint16 if unsigned else np.int16)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        assert np.allclose(ipp, (truth.affine @ [k, 0, 0, 1])[:3], atol=1e-3)
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        assert np.allclose(iop, [-1, 0, 0, 0, 1, 0])  # x flipped: rows run toward the right
        assert [float(v) for v in ds.PixelSpacing] == [7.0, 7.0] and ds.SliceThickness == 10.0
        assert ds.KVP == 100 and ds.ContrastBolusAgent
    first, last = (pydicom.dcmread(st.files[i]) for i in (0, -1))
    assert first.ImagePositionPatient[2] > last.ImagePositionPatient[2]  # z flipped: head first
    assert {st.patient_id, st.accession, st.study_uid, st.study_date} <= set(st.phi)
    assert first.PatientName.family_name in st.phi


def test_values_that_do_not_fit_are_refused(tmp_path):
    vol, truth = make_phantom(**TINY)
    with pytest.raises(ValueError, match="does not fit"):
        write_phantom_study(vol, truth, tmp_path, unsigned=True, intercept=0.0)
