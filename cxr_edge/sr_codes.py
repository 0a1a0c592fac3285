"""The fixed vocabulary of cxr-edge's SR: the code of every finding, the procedure, Present /
Absent, and the series the SR is filed in. Shared by the highdicom reference builder and the
template (fast) path, which must write the very same content."""

from __future__ import annotations

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from cxr_edge.labels import LABELS

MANUFACTURER = "cxr-edge"
SERIES_DESCRIPTION = "cxr-edge AI findings"
SERIES_NUMBER = 9901  # high, so it sorts after the modality's own series

# Real codes only: DICOM (DCM) or SNOMED CT (SCT). Where pydicom's codedict (the
# concepts of DICOM PS3.16's context groups) has the concept we take it from there;
# the others are SNOMED CT concept ids checked against public terminology sources.
FINDING_CODES: dict[str, Code] = {
    # SNOMED CT 46621007 "Atelectasis (disorder)" (not in pydicom; pydicom only has
    # the narrower plate-like atelectasis 40779009).
    "Atelectasis": Code("46621007", "SCT", "Atelectasis"),
    # pydicom codes.SCT.Cardiomegaly (CID 12248 Cardiac Ultrasound Summary Code).
    "Cardiomegaly": codes.SCT.Cardiomegaly,
    # SNOMED CT 95436008 "Lung consolidation (disorder)" (not in pydicom).
    "Consolidation": Code("95436008", "SCT", "Lung consolidation"),
    # NIH "Edema" is pulmonary edema: pydicom codes.SCT.PulmonaryEdema (CID 3700).
    "Edema": codes.SCT.PulmonaryEdema,
    # NIH "Effusion" is pleural effusion: pydicom codes.SCT.PleuralEffusion.
    "Effusion": codes.SCT.PleuralEffusion,
    # SNOMED CT 87433001 "Pulmonary emphysema (disorder)" (not in pydicom, which
    # only has mediastinal emphysema).
    "Emphysema": Code("87433001", "SCT", "Pulmonary emphysema"),
    # pydicom codes.SCT.Fibrosis (CID 6335/6336).
    "Fibrosis": codes.SCT.Fibrosis,
    # NIH "Hernia" is almost always a hiatal hernia on a chest film:
    # SNOMED CT 84089009 "Hiatal hernia (disorder)" (not in pydicom).
    "Hernia": Code("84089009", "SCT", "Hiatal hernia"),
    # pydicom codes.DCM.Infiltrate (CID 6104 Abnormal Opacity Finding or Feature).
    "Infiltration": codes.DCM.Infiltrate,
    # pydicom codes.SCT.Mass (CID 6104).
    "Mass": codes.SCT.Mass,
    # pydicom codes.SCT.Nodule (CID 6104).
    "Nodule": codes.SCT.Nodule,
    # No SNOMED CT id for "pleural thickening" could be confirmed from a source we
    # trust, so we use its confirmed parent SNOMED CT 301256004 "Pleura finding
    # (finding)"; the tracking identifier still names the label exactly.
    "Pleural_Thickening": Code("301256004", "SCT", "Pleura finding"),
    # SNOMED CT 233604007 "Pneumonia (disorder)" (not in pydicom).
    "Pneumonia": Code("233604007", "SCT", "Pneumonia"),
    # pydicom codes.SCT.Pneumothorax (CID 6102/6105).
    "Pneumothorax": codes.SCT.Pneumothorax,
    # pydicom codes.DCM.NoAbnormality (DCM 111286 "No abnormality", CID 6030/6031).
    "No Finding": codes.DCM.NoAbnormality,
}
assert set(FINDING_CODES) == set(LABELS)

# SNOMED CT 399208008 "Plain chest X-ray (procedure)": pydicom has no chest-specific
# X-ray procedure (only LN 43468-8 "XR unspecified body region").
PROCEDURE_REPORTED = Code("399208008", "SCT", "Plain chest X-ray")

# CID 240 "Present-Absent" (pydicom codedict).
# TID 1500 row 12: the container of free-text and coded evaluations of the whole report
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
PRESENT = codes.SCT.Present
ABSENT = codes.SCT.Absent
