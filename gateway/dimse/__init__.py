"""DIMSE: SCU (C-ECHO/FIND/MOVE/GET) and Storage SCP on a lean upper layer of our own."""
