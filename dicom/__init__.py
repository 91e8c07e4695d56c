"""DICOM helpers with no I/O policy: geometry, the DICOM JSON model, raw element scanning.

Importing this package (as `deid`, `storage` and `processing` do) makes pydicom keep values out of
its messages: its validation warnings and errors quote the offending value, which can be PHI.
"""

import pydicom.config

pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE

# What sphere puts in the file meta of every file it writes, in place of the source's.
IMPLEMENTATION_CLASS_UID = "2.25.204614848315117468371432432104931512457"
IMPLEMENTATION_VERSION_NAME = "SPHERE_0_1"
