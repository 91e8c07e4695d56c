"""Storage: catalog (SQLAlchemy), object store (local folder or S3), Zarr v3 series."""
