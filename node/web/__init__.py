"""The node's HTTP server: DICOMweb (STOW-RS, QIDO-RS, WADO-RS) behind one auth model."""
