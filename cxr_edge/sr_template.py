"""The SR without highdicom's per-call cost: its document built once, then filled in per input.

For a model and an ordered list of finding labels everything in the SR but a handful of values
is fixed. The template is the document highdicom builds (cxr_edge.sr_highdicom) for a stand-in
source, encoded once. An SR is the template's bytes with the per-input values put where
highdicom puts them:

- nested, spliced into the bytes (cxr_edge.dicom_splice): the source's UIDs (evidence and the
  two image references of every finding), the contribution date and time, and in every
  finding's group its tracking UID, probability (NUM), Present/Absent and threshold;
- at the top level, on the decoded dataset: the source's Patient / General Study attributes,
  copied as highdicom copies them, the SR's own UIDs and its creation and content dates/times.

Every SR is decoded from its own bytes (fresh objects, nothing shared with another SR), and its
untouched elements stay encoded, so writing it costs little too. tests/test_sr.py compares the
result with highdicom's own document item by item.

The cache holds templates only (bytes and offsets, no patient data) and takes no lock: a
process forked while another thread fills it inherits nothing that could block it.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from io import BytesIO

import pydicom
from highdicom import __version__ as highdicom_version
from highdicom._standard_utils import (
    get_iod_module_map, get_module_attribute_map, get_sop_class_iod_map,
)  # fmt: skip
from highdicom.enum import PatientSexValues
from highdicom.valuerep import _check_specific_character_set
from pydicom.charset import convert_encodings
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid
from pydicom.valuerep import DA, DS, DT, TM

from cxr_edge.dicom_splice import Element, elements, encode_element, splice
from cxr_edge.findings import Finding, display_probability, summary_text
from cxr_edge.outputs import dicom_bytes
from cxr_edge.sr_codes import ABSENT, PRESENT
from cxr_edge.sr_highdicom import highdicom_sr, threshold_text

# Present and Absent differ in value and meaning only: the scheme is not a hole.
assert PRESENT.scheme_designator == ABSENT.scheme_designator


def _stand_in_uid(name: str) -> str:
    return generate_uid(entropy_srcs=["cxr-edge SR template", name])


# The stand-in source the template is built for (an image in its own study) and the stand-in
# UIDs of the template itself. Every nested element that holds one of them is a hole, and none
# may be anywhere else (checked when a template is made).
STAND_IN = {
    "SOPClassUID": "1.2.840.10008.5.1.4.1.1.1",  # CR Image Storage
    "SOPInstanceUID": _stand_in_uid("source instance"),
    "SeriesInstanceUID": _stand_in_uid("source series"),
    "StudyInstanceUID": _stand_in_uid("source study"),
}
STAND_IN_TRACKING_UID = _stand_in_uid("tracking")
STAND_IN_SUMMARY = "cxr-edge summary stand-in"
_TEXT_VALUE = 0x0040A160
STAND_IN_SR = {"series_instance_uid": _stand_in_uid("series"),
               "sop_instance_uid": _stand_in_uid("instance")}
# Top-level attributes that come from the source or the call: removed from the template and set
# for every SR (the Type 2 Patient / General Study ones always, the others when there are any).
PER_INPUT_ROOT = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyInstanceUID",
    "SeriesInstanceUID", "SOPInstanceUID", "InstanceCreationDate", "InstanceCreationTime",
    "ContentDate", "ContentTime", "SpecificCharacterSet",
)  # fmt: skip
_CONTENT_SEQUENCE = 0x0040A730
_IMAGING_MEASUREMENTS = "126010"  # DCM concept name of the container of the groups

# Nested holes. The source's UIDs, wherever they are (the evidence sequence, every image
# reference): tag -> the source attribute ...
_SOURCE_HOLES = {
    0x00081150: "SOPClassUID",  # Referenced SOP Class UID
    0x00081155: "SOPInstanceUID",  # Referenced SOP Instance UID
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
}
_CONTRIBUTION_DATETIME = 0x0018A002  # highdicom's Contributing Equipment item
# ... and each finding's values, in its measurement group: name -> (tag, what the template's
# element holds there (None: any value), how many a group has).
_GROUP_HOLES = {
    "tracking_uid": (0x0040A124, lambda text: text == STAND_IN_TRACKING_UID, 1),
    "numeric_value": (0x0040A30A, None, 1),
    "floating_point_value": (0x0040A161, None, 1),
    # Algorithm Parameters text, at the group's level and the NUM's
    "threshold": (0x0040A160, lambda text: text.startswith("threshold="), 2),
    # Present/Absent: the template is all Absent
    "code_value": (0x00080100, lambda text: text == ABSENT.value, 1),
    "code_meaning": (0x00080104, lambda text: text == ABSENT.meaning, 1),
}


class TemplateError(RuntimeError):
    """highdicom's document does not have the layout the template relies on."""


@dataclass(frozen=True)
class Template:
    data: bytes  # the encoded document (file format, Explicit VR Little Endian)
    meta_length: int  # the File Meta Information Group Length highdicom set (see _file_meta)
    holes: tuple[Element, ...]  # in document order
    kinds: tuple[tuple[str, int | None], ...]  # per hole: what goes there, its group or None


def template_for(model, labels: Sequence[str]) -> Template:
    """The template for this model identity (sr.ModelIdentity: frozen, compared by value) and
    these labels, in this order (cached)."""
    return _template(model, tuple(labels))


@lru_cache(maxsize=16)
def _template(model, labels: tuple[str, ...]) -> Template:
    # Probability 0 < threshold 1: all Absent, so Present/Absent is found by its value.
    findings = [Finding(label, 0.0, 1.0) for label in labels]
    document = highdicom_sr(_stand_in_header(), findings, model, summary=STAND_IN_SUMMARY,
                            tracking_uids=[STAND_IN_TRACKING_UID] * len(labels), **STAND_IN_SR)
    for keyword in PER_INPUT_ROOT:
        if keyword in document:
            delattr(document, keyword)
    meta_length = document.file_meta.FileMetaInformationGroupLength  # before writing resets it
    data = dicom_bytes(document)
    imaging = [i for i, item in enumerate(document.ContentSequence)
               if item.ConceptNameCodeSequence[0].CodeValue == _IMAGING_MEASUREMENTS]
    if len(imaging) != 1:
        raise TemplateError("no single Imaging Measurements container")
    holes, kinds = _holes(data, imaging[0], len(labels))
    return Template(data, meta_length, holes, kinds)


def _stand_in_header() -> Dataset:
    header = Dataset()
    for keyword, uid in STAND_IN.items():
        setattr(header, keyword, uid)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                    "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        setattr(header, keyword, None)
    header.Modality = "CR"
    header.Rows = header.Columns = 1
    return header


def _holes(data: bytes, imaging: int, groups: int):
    holes, kinds = [], []
    expected = {name: count for name, (_, _, count) in _GROUP_HOLES.items()}
    counts = [dict.fromkeys(expected, 0) for _ in range(groups)]
    unique = [uid.encode() for uid in (*list(STAND_IN.values())[1:], STAND_IN_TRACKING_UID,
                                        *STAND_IN_SR.values())]  # not the (public) SOP class
    for element in elements(data, 132):  # after the preamble and 'DICM'
        if element.vr == "SQ" or element.tag >> 16 == 0x0002:
            continue  # the File Meta Information is set on the decoded dataset
        # Top-level elements are set on the decoded dataset too: no holes there.
        kind = _kind(element, imaging) if element.path else None
        if kind is None:
            if any(uid in element.value for uid in unique):
                raise TemplateError(f"a stand-in value outside the holes, in {element.tag:08X}")
            continue
        holes.append(element)
        kinds.append(kind)
        name, group = kind
        if group is not None:
            counts[group][name] += 1
    if any(count != expected for count in counts):
        raise TemplateError("measurement groups without the expected values")
    return tuple(holes), tuple(kinds)


def _kind(element: Element, imaging: int) -> tuple[str, int | None] | None:
    """(what goes in this nested element, its group or None), or None: not a hole."""
    text = element.value.rstrip(b"\0 ").decode("ascii", errors="replace")
    if element.tag in _SOURCE_HOLES:
        keyword = _SOURCE_HOLES[element.tag]
        if text != STAND_IN[keyword]:
            raise TemplateError(f"a reference to something else than the source, in {element.tag:08X}")
        return keyword, None
    if element.tag == _CONTRIBUTION_DATETIME:
        return "contribution_datetime", None
    if element.tag == _TEXT_VALUE and text == STAND_IN_SUMMARY:
        return "summary", None
    for name, (tag, holds, _) in _GROUP_HOLES.items():
        if element.tag != tag or (holds is not None and not holds(text)):
            continue
        path = element.path
        if len(path) < 2 or path[0] != (_CONTENT_SEQUENCE, imaging) or path[1][0] != _CONTENT_SEQUENCE:
            raise TemplateError(f"a finding's value ({name}) outside the measurement groups")
        return name, path[1][1]
    return None


def fill(
    template: Template,
    header: Dataset,
    findings: Sequence[Finding],
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    tracking_uids: Sequence[str],
    now: datetime.datetime,
) -> Dataset:
    """The SR for `header` (validated, cxr_edge.sr_source) and `findings` (the template's
    labels, in its order; float probabilities)."""
    values = {(kind, None): header[kind].value for kind in _SOURCE_HOLES.values()}
    values["contribution_datetime", None] = DT(now)
    values["summary", None] = summary_text(findings)
    for group, (finding, uid) in enumerate(zip(findings, tracking_uids, strict=True)):
        values.update(((name, group), value) for name, value in _group_values(finding, uid).items())
    encoded: dict[tuple[str, int | None], bytes] = {}  # a value in several holes: encoded once
    for hole, kind in zip(template.holes, template.kinds):
        if kind not in encoded:
            encoded[kind] = encode_element(hole.tag, hole.vr, values[kind])
    data = splice(template.data, template.holes, [encoded[kind] for kind in template.kinds])
    sr = pydicom.dcmread(BytesIO(data))
    _file_meta(sr, template, sop_instance_uid)
    _root(sr, header, series_instance_uid, sop_instance_uid, now)
    return sr


def _group_values(finding: Finding, tracking_uid: str) -> dict[str, object]:
    presence = PRESENT if finding.positive else ABSENT
    shown = display_probability(finding.probability)
    probability = DS(shown, auto_format=True)
    return {
        "tracking_uid": tracking_uid,
        "numeric_value": getattr(probability, "original_string", str(probability)),
        "floating_point_value": shown,
        "threshold": threshold_text(finding),
        "code_value": presence.value,
        "code_meaning": presence.meaning,
    }


def _file_meta(sr: Dataset, template: Template, sop_instance_uid: str) -> None:
    meta = sr.file_meta
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.ImplementationVersionName = f"highdicom{highdicom_version}"
    # highdicom stores the length of the whole meta information as written (the group length
    # element included): the template's, for a UID of another length.
    meta.FileMetaInformationGroupLength = (
        template.meta_length + _even(len(sop_instance_uid)) - _even(len(STAND_IN_SR["sop_instance_uid"])))


def _even(n: int) -> int:
    return n + n % 2


def _root(sr: Dataset, header: Dataset, series_uid: str, sop_uid: str, now: datetime.datetime) -> None:
    # As highdicom's SOPClass sets them from the first evidence dataset ...
    sr.PatientID = header.PatientID
    sr.PatientName = header.PatientName
    sr.PatientBirthDate = DA(header.PatientBirthDate)
    sex = header.PatientSex
    sr.PatientSex = PatientSexValues(sex).value if sex not in (None, "") else sex
    sr.StudyInstanceUID = str(header.StudyInstanceUID)
    sr.AccessionNumber = header.AccessionNumber
    sr.StudyID = header.StudyID
    sr.StudyDate = DA(header.StudyDate) if header.StudyDate is not None else None
    sr.StudyTime = TM(header.StudyTime) if header.StudyTime is not None else None
    sr.ReferringPhysicianName = header.get("ReferringPhysicianName")
    sr.SeriesInstanceUID = str(series_uid)
    sr.SOPInstanceUID = str(sop_uid)
    sr.InstanceCreationDate = DA(now.date())
    sr.InstanceCreationTime = TM(now.time())
    charset = header.get("SpecificCharacterSet")
    if charset is not None:
        sr.SpecificCharacterSet = _check_specific_character_set(charset)
        # The template's text is ASCII, the same bytes in every set the SR can have (UTF-8):
        # its elements are written as they are, not decoded and encoded again.
        sr.set_original_encoding(False, True, convert_encodings(sr.SpecificCharacterSet))
    sr.ContentDate = DA(now.date())
    sr.ContentTime = TM(now.time())
    # ... then it copies the source's own elements of its IOD's Patient and Study modules.
    for tag in _patient_and_study_tags(header.SOPClassUID):
        if tag in header:
            sr.add(header[tag])


@lru_cache(maxsize=64)
def _patient_and_study_tags(sop_class_uid: str) -> tuple[int, ...]:
    """Top-level attributes of the Patient and Study modules of this SOP class's IOD, in the
    order highdicom's copy_patient_and_study_information copies them."""
    iod_modules = get_iod_module_map()[get_sop_class_iod_map()[sop_class_uid]]
    attributes = get_module_attribute_map()
    tags = []
    for ie in ("Patient", "Study"):
        for module in iod_modules:
            if module["ie"] == ie:
                tags += [tag_for_keyword(item["keyword"]) for item in attributes[module["key"]]
                         if len(item["path"]) == 0]
    return tuple(tag for tag in tags if tag is not None)
