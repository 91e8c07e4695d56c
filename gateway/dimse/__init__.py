"""DIMSE: pynetdicom SCU (C-ECHO/FIND/MOVE/GET) and Storage SCP."""
