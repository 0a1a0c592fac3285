"""The unattended service: `cxr-edge watch` (inbox + DICOM SCP -> pipeline -> SR back to the PACS)."""
