"""DICOM helpers with no I/O policy: geometry, JSON model, synthetic studies."""
