"""Sending result objects to their destinations: DIMSE C-STORE or DICOMweb STOW-RS."""
