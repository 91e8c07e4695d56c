"""Storage: catalog (SQLAlchemy), object store (local folder or S3), Zarr v3 series, spool."""

import dicom  # noqa: F401 - pydicom keeps values (PHI) out of its messages
