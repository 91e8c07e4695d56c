"""The network edge and orchestration: config, CLI, projects, DIMSE, pulls."""

import pydicom.config

# pydicom's validation messages quote the offending value, which can be PHI: keep them out of logs.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
