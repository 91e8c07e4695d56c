"""pydicom's own sample files, for tests that need real-world encodings."""

from __future__ import annotations

import warnings

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset


def pydicom_sample(name: str) -> Dataset:
    """A sample file shipped with pydicom (its odd values may warn: they are the point)."""
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} not available")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path)
