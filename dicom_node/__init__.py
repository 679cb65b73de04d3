"""The DICOM node: a door onto the core for PACS traffic (DIMSE and DICOMweb)."""
