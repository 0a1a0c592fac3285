"""A corpus of real radiographs whose every patient / study / series / equipment attribute holds a
marker string, for proving that no header value ever leaves the process (tests/test_privacy.py).

Each file is one of the real sample DICOMs (the RSNA CR, JPEG baseline, and the canine DX,
uncompressed), pixel data untouched, with its header rewritten:

- valid values that contain MARKER wherever the VR allows text (names `ZZMARKER^JOHN`, IDs
  `ZZMARKER01`, descriptions, institution, station, physicians, private elements, sequences);
- malformed values: MARKER in DA / TM / DT / AS / CS / DS / IS patient and study attributes,
  over-long names and IDs, non-ASCII names in ISO_IR 192 and in ISO 2022 IR 87;
- MARKER inside malformed *technical* attributes: Modality, PhotometricInterpretation,
  WindowCenter / WindowWidth, NumberOfFrames, SOP / Study / Series Instance UIDs and the transfer
  syntax in the file meta.

Malformed values are written as raw bytes (pydicom would refuse or reformat them), so what the
file holds is exactly what is written here; `markers_in(path)` checks that with dcmdump.
File names never contain the marker: file names are not header values.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

MARKER = "ZZMARKER"

RSNA = "rsna_cr_pa_jpeg_baseline_mono2.dcm"
CANINE = "canine_thorax_dx_mono1_small.dcm"

# name -> (template, what the pipeline must make of it). "ok": findings JSON with status ok;
# ("error", words): an error record whose reason contains one of `words` (the attribute named,
# never its value); None: either, as long as the marker stays inside.
EXPECT: dict[str, object] = {
    "rsna_valid.dcm": "ok",
    "canine_valid": "ok",  # no suffix: still taken from a folder
    "rsna_utf8_name.dcm": "ok",
    "canine_iso2022_name.dcm": "ok",
    "rsna_malformed_patient.dcm": None,
    "canine_long_values.dcm": None,
    "rsna_bad_modality.dcm": ("error", ("modality",)),
    "canine_bad_photometric.dcm": ("error", ("photometric",)),
    "rsna_bad_window.dcm": None,
    "canine_bad_frames.dcm": None,
    "rsna_bad_uids.dcm": None,
    "canine_bad_transfer_syntax.dcm": ("error", ("transfer syntax", "transfersyntax")),
}

# Valid values (conformant to each VR) that carry the marker.
_VALID_TEXT = {
    # Patient
    "PatientName": f"{MARKER}^JOHN^Q", "PatientID": f"{MARKER}01", "IssuerOfPatientID": f"{MARKER} HOSPITAL",
    "OtherPatientIDs": [f"{MARKER}02", f"{MARKER}03"], "OtherPatientNames": f"{MARKER}^JACK",
    "PatientBirthName": f"{MARKER}^BIRTH", "PatientMotherBirthName": f"{MARKER}^MOTHER",
    "PatientAddress": f"1 {MARKER} Street", "PatientTelephoneNumbers": f"{MARKER}555",
    "PatientComments": f"comment {MARKER} comment", "AdditionalPatientHistory": f"history {MARKER}",
    "EthnicGroup": f"{MARKER}", "Occupation": f"{MARKER}", "MilitaryRank": f"{MARKER} RANK",
    "BranchOfService": f"{MARKER} BRANCH", "MedicalAlerts": f"{MARKER} alert", "Allergies": f"{MARKER} allergy",
    "PatientReligiousPreference": f"{MARKER}", "CountryOfResidence": f"{MARKER}LAND",
    "RegionOfResidence": f"{MARKER} REGION", "CurrentPatientLocation": f"ward {MARKER}",
    "AdmissionID": f"{MARKER}ADM", "PatientState": f"{MARKER} state", "ResponsiblePerson": f"{MARKER}^OWNER",
    "ResponsibleOrganization": f"{MARKER} ORG", "PatientSpeciesDescription": f"{MARKER} species",
    "PatientBreedDescription": f"{MARKER} breed",
    # Study
    "AccessionNumber": f"{MARKER}ACC", "StudyID": f"{MARKER}S1", "StudyDescription": f"{MARKER} chest study",
    "ReferringPhysicianName": f"{MARKER}^REFERRER", "ReferringPhysicianAddress": f"{MARKER} clinic road",
    "PhysiciansOfRecord": f"{MARKER}^RECORD", "NameOfPhysiciansReadingStudy": f"{MARKER}^READER",
    "ConsultingPhysicianName": f"{MARKER}^CONSULT", "AdmittingDiagnosesDescription": f"{MARKER} diagnosis",
    "RequestingPhysician": f"{MARKER}^REQUESTER", "RequestingService": f"{MARKER} service",
    "ReasonForStudy": f"{MARKER} reason", "RequestedProcedureDescription": f"{MARKER} procedure",
    "RequestedProcedureComments": f"{MARKER} procedure comment", "StudyComments": f"{MARKER} study comment",
    # Series / equipment / image
    "SeriesDescription": f"{MARKER} PA", "PerformedProcedureStepDescription": f"{MARKER} step",
    "PerformingPhysicianName": f"{MARKER}^PERFORMER", "OperatorsName": f"{MARKER}^OPERATOR",
    "ProtocolName": f"{MARKER} protocol", "BodyPartExamined": MARKER,  # CS allows upper case letters
    "InstitutionName": f"{MARKER} Hospital", "InstitutionAddress": f"2 {MARKER} Avenue",
    "InstitutionalDepartmentName": f"{MARKER} radiology", "StationName": f"{MARKER}ST",
    "Manufacturer": f"{MARKER} Corp", "ManufacturerModelName": f"{MARKER} X1", "DeviceSerialNumber": f"{MARKER}SN",
    "SoftwareVersions": f"{MARKER} 1.0", "DetectorID": f"{MARKER}D", "ImageComments": f"image {MARKER} comment",
    "DerivationDescription": f"{MARKER} derived", "ClinicalTrialSponsorName": f"{MARKER} sponsor",
}
# Valid dates and times (the marker cannot be in them validly; the malformed variant puts it there).
_VALID_DATES = {
    "PatientBirthDate": "19650302", "StudyDate": "20200125", "StudyTime": "104702", "SeriesDate": "20200125",
    "SeriesTime": "105000", "AcquisitionDate": "20200125", "ContentDate": "20200125", "PatientSex": "O",
    "PatientAge": "055Y",
}
# Malformed: the marker in attributes whose VR cannot hold it.
_MALFORMED = {
    "PatientBirthDate": MARKER, "PatientBirthTime": MARKER, "StudyDate": f"1965-03-02{MARKER}",
    "StudyTime": MARKER, "SeriesDate": f"2020{MARKER}", "SeriesTime": f"10:50{MARKER}",
    "AcquisitionDate": MARKER, "AcquisitionTime": MARKER, "ContentDate": f"{MARKER}01",
    "ContentTime": f"{MARKER}.1", "AcquisitionDateTime": f"2020{MARKER}", "PatientAge": MARKER,
    "PatientSex": MARKER, "PatientWeight": MARKER, "PatientSize": f"1.{MARKER}", "SmokingStatus": f"{MARKER} yes",
    "ViewPosition": f"{MARKER} pa", "PatientIdentityRemoved": f"{MARKER}", "TimezoneOffsetFromUTC": f"+{MARKER}",
    "SeriesNumber": f"{MARKER}", "InstanceNumber": f"1{MARKER}", "PerformedProcedureStepStartDate": MARKER,
}


def _settings():
    import pydicom.config

    return pydicom.config.settings


def _raw(ds, keyword: str, value: str | bytes) -> None:
    """Set `keyword` to exactly these bytes (padded to even length), whatever its VR allows."""
    from pydicom.dataelem import RawDataElement
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.tag import Tag

    tag = Tag(tag_for_keyword(keyword))
    vr = dictionary_VR(tag)
    data = value.encode("latin-1") if isinstance(value, str) else value
    if len(data) % 2:
        data += b"\0" if vr == "UI" else b" "
    ds[tag] = RawDataElement(tag, vr, len(data), data, 0, False, True)


def _set_valid(ds) -> None:
    from pydicom.dataset import Dataset

    for keyword, value in {**_VALID_TEXT, **_VALID_DATES}.items():
        setattr(ds, keyword, value)
    other = Dataset()
    other.PatientID = f"{MARKER}SEQ"
    other.IssuerOfPatientID = f"{MARKER} issuer"
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = [other]
    request = Dataset()
    request.RequestedProcedureID = f"{MARKER}RP"
    request.ScheduledProcedureStepID = f"{MARKER}SPS"
    request.ScheduledProcedureStepDescription = f"{MARKER} scheduled"
    ds.RequestAttributesSequence = [request]
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = f"{MARKER}1", "99ZZ", f"{MARKER} procedure"
    ds.ProcedureCodeSequence = [code]
    block = ds.private_block(0x0029, f"{MARKER} PRIVATE", create=True)
    block.add_new(0x10, "LO", f"private {MARKER} value")
    block.add_new(0x11, "LT", f"private {MARKER} text")


def _new_uid(ds) -> None:
    from pydicom.uid import generate_uid

    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid


def _variant(name: str, ds) -> bytes | None:
    """Apply variant `name` to `ds`; return bytes to patch into the written file, if any."""
    if name == "rsna_utf8_name.dcm":
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = f"{MARKER}^Zoë^Ångström=山田{MARKER}^太郎"
        ds.InstitutionName = f"Hôpital {MARKER} Saint-Éloi"
        ds.StudyDescription = f"Thorax {MARKER} — face"
        ds.ReferringPhysicianName = f"Müller^{MARKER}"
    elif name == "canine_iso2022_name.dcm":
        ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
        ds.PatientName = f"{MARKER}^TARO=山田^太郎=やまだ^たろう"
        ds.OtherPatientNames = f"{MARKER}^HANAKO=山田^花子"
        ds.InstitutionName = f"{MARKER} 病院"
    elif name == "rsna_malformed_patient.dcm":
        for keyword, value in _MALFORMED.items():
            _raw(ds, keyword, value)
    elif name == "canine_long_values.dcm":
        _raw(ds, "PatientID", "X" * 70 + MARKER)  # LO: 64
        _raw(ds, "AccessionNumber", f"{MARKER}-{MARKER}-{MARKER}")  # SH: 16
        _raw(ds, "StudyID", f"{MARKER}{MARKER}{MARKER}")
        _raw(ds, "StationName", f"{MARKER}{MARKER}X")
        _raw(ds, "BodyPartExamined", f"{MARKER}{MARKER}{MARKER}")  # CS: 16
        _raw(ds, "PatientSex", f"{MARKER}{MARKER}")
        _raw(ds, "OtherPatientIDs", "\\".join(f"{MARKER}{i:03d}" * 9 for i in range(5)))
        _raw(ds, "PatientName", "Z" * 100 + MARKER + "^" + "Y" * 91)  # 200 chars (PN: 64 per group)
    elif name == "rsna_bad_modality.dcm":
        _raw(ds, "Modality", MARKER)
    elif name == "canine_bad_photometric.dcm":
        _raw(ds, "PhotometricInterpretation", MARKER)
    elif name == "rsna_bad_window.dcm":
        _raw(ds, "WindowCenter", MARKER)
        _raw(ds, "WindowWidth", f"{MARKER}\\12")
        _raw(ds, "WindowCenterWidthExplanation", f"{MARKER} window")
    elif name == "canine_bad_frames.dcm":
        _raw(ds, "NumberOfFrames", MARKER)
    elif name == "rsna_bad_uids.dcm":
        ds.SOPInstanceUID = f"1.2.{MARKER}"
        ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.{MARKER}"
        ds.StudyInstanceUID = f"1.2.840.{MARKER}.1"
        ds.SeriesInstanceUID = f"1.2.{MARKER}.2.3"
        ds.FrameOfReferenceUID = f"1.2.{MARKER}.4"
    elif name == "canine_bad_transfer_syntax.dcm":
        # Written as Explicit VR Little Endian, then the 20-byte UID value in the file meta is
        # replaced by a same-length unknown one (no length fields change).
        return f"1.2.840.{MARKER}.111".encode()
    return None


def build(folder: Path, template_paths: dict[str, Path] | None = None) -> list[Path]:
    """Write the corpus into `folder`; return the files, in EXPECT order.

    `template_paths` maps "rsna" / "canine" to the real DICOMs to derive from (default: samples/).
    """
    import pydicom
    import pydicom.config

    if template_paths is None:
        samples = Path(__file__).resolve().parents[1] / "samples" / "dicom"
        template_paths = {"rsna": samples / RSNA, "canine": samples / CANINE}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    settings = _settings()
    saved = settings.writing_validation_mode, settings.reading_validation_mode
    settings.writing_validation_mode = settings.reading_validation_mode = pydicom.config.IGNORE
    written = []
    try:
        for name in EXPECT:
            ds = pydicom.dcmread(template_paths["rsna" if name.startswith("rsna") else "canine"])
            _new_uid(ds)
            _set_valid(ds)
            patch = _variant(name, ds)
            path = folder / name
            ds.save_as(path, enforce_file_format=True)
            if patch is not None:
                data = path.read_bytes()
                old = b"1.2.840.10008.1.2.1\0"
                assert len(old) == len(patch) and data.count(old) == 1, "expected one Explicit VR LE UID"
                path.write_bytes(data.replace(old, patch))
            written.append(path)
    finally:
        settings.writing_validation_mode, settings.reading_validation_mode = saved
    return written


def markers_in(path: Path) -> list[str]:
    """The lines of `dcmdump` (dcmtk) that show the marker: proof the file really holds it."""
    dump = subprocess.run(["dcmdump", "+L", str(path)], capture_output=True, text=True, errors="replace")
    return [line for line in (dump.stdout + dump.stderr).splitlines() if MARKER in line]
