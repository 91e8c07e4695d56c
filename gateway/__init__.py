"""The edges and the orchestration: the `sphere` CLI, the pull (DIMSE retrieval, receiving), the
Python API. Everything they share (settings, catalog, vault, store, keys) comes from `core`."""
