"""DICOMweb (PS3.18) protocol pieces: content negotiation, multipart, QIDO queries, rendering."""
