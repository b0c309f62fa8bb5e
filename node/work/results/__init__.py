"""Pipeline results as DICOM: a Segmentation and a TID 1500 Comprehensive 3D SR (highdicom)."""
