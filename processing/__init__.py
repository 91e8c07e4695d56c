"""Processing: pipelines over stored series (MONAI, Dask); bone density first."""

import dicom  # noqa: F401 - pydicom keeps values (PHI) out of its messages
