"""Processing pipelines (MONAI, Dask). Nothing yet."""
