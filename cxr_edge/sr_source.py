"""The part of a source image header that an SR may copy, validated value by value.

Foreign sites and old archives write headers the standard does not allow (``1965-03-02`` as
a date, ``male`` as a sex, 80-character names) and legal ones that highdicom refuses (a
Specific Character Set of ``\\ISO 2022 IR 87`` or a single ``ISO 2022 IR 100``). Copying such
values verbatim either makes highdicom refuse the SR (with an exception message that quotes
the value) or produces an SR that fails validation. :func:`validated_source_header` returns a
fresh Dataset holding only what the SR needs, every value checked against its VR:

- the four UIDs, which must be valid (an SR that cannot reference its source is worthless):
  an invalid or missing one raises :class:`SRSourceError`;
- the Type 2 attributes of the Patient and General Study modules: a malformed value is
  normalised when that is unambiguous (dates and times with separators) and else written
  empty, as Type 2 allows;
- the 1C/2C animal-patient attributes, only when present and valid;
- the few image attributes highdicom's ``from_source_image`` inspects (Modality and the
  Image Pixel description); highdicom does not copy those into the SR.

Text is decoded with the source's own Specific Character Set (pydicom does that when an
element is accessed) and the values are plain ``str``: the SR is written in UTF-8
(``ISO_IR 192``) when any of them is not ASCII, so every legal source character set works.

No header value ever appears in an exception message, a warning or a log line: they name
attributes only (keyword and tag). pydicom's own validation warnings quote values, so
element access runs with pydicom's value validation off and its warnings caught.
"""

from __future__ import annotations

import datetime
import re
import threading
import warnings
from collections.abc import Iterable

from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import UID
from pydicom.valuerep import VALIDATORS, PersonName

from cxr_edge.errors import CxrEdgeError

# What the SR takes from the source. Identifiers to reference it and to join its study
# (Type 1), the Type 2 attributes of the Patient and General Study modules (written empty if
# the source lacks them or has a malformed value), and the 1C/2C Patient attributes that are
# required for an animal patient (kept only if present and valid). Type 3 attributes such as
# Patient's Age are deliberately left out: highdicom copies every Patient/Study attribute it
# finds in the evidence, and an optional value adds risk and no use.
SOURCE_IDENTIFIERS = (
    "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID",
)  # fmt: skip
SOURCE_TYPE2 = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)  # fmt: skip
SOURCE_IF_PRESENT = (
    "PatientSpeciesDescription", "PatientSpeciesCodeSequence",
    "PatientBreedDescription", "PatientBreedCodeSequence", "BreedRegistrationSequence",
    "ResponsiblePerson", "ResponsiblePersonRole", "ResponsibleOrganization",
    "PatientSexNeutered",  # Patient Study module, 2C for an animal
)  # fmt: skip
# Read by highdicom's SourceImageFor*.from_source_image (it checks that the evidence is an
# image: any of the pixel description attributes present, Modality not SR/SEG/...). Not
# copied into the SR.
SOURCE_IMAGE = ("Modality", "Rows", "Columns", "SamplesPerPixel", "PixelRepresentation")

UTF8 = "ISO_IR 192"

_UID_NAMES = {
    "SOPClassUID": "SOP Class UID",
    "SOPInstanceUID": "SOP Instance UID",
    "SeriesInstanceUID": "Series Instance UID",
    "StudyInstanceUID": "Study Instance UID",
}
# After decoding no text value may hold a control character (ESC included: it only exists
# in the encoded form) or U+FFFD (pydicom's replacement for bytes its charset could not
# decode: the value is garbled). LT/ST/UT (only possible inside the animal sequences) may
# hold CR, LF, FF and TAB.
_BAD_CHARS = re.compile("[\x00-\x1f\x7f\ufffd]")
_BAD_TEXT_CHARS = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f\ufffd]")
_TEXT_VRS = {"LT", "ST", "UT"}
_STRING_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UC", "UI", "UR"}
_NUMBER_VRS = {"US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"}
# PS3.5 Table 6.2-1 maximum lengths (characters) that pydicom's validators do not check.
_MAX_LEN = {"AE": 16, "AS": 4, "DA": 8, "TM": 14, "DT": 26, "UC": None, "UR": None, "UT": None}

# pydicom's value validation is a process-wide setting; toggled under a lock so that two
# threads building SRs cannot restore each other's saved mode.
_VALIDATION_LOCK = threading.Lock()


class SRSourceError(CxrEdgeError):
    """A source header no SR can be built from, or content highdicom refused.

    The message names attributes only, never a value: it ends up in JSON records and logs."""


def describe(keyword: str) -> str:
    """'PatientBirthDate (0010,0030)': how messages name an attribute."""
    tag = tag_for_keyword(keyword)
    return f"{keyword} {Tag(tag)}" if tag is not None else keyword


def validated_source_header(source: Dataset) -> tuple[Dataset, list[str]]:
    """(the header the SR may copy from, keywords of the attributes dropped or normalised).

    Raises SRSourceError (naming the attribute, never its value) for a missing or invalid
    SOP Class / SOP Instance / Series Instance / Study Instance UID."""
    changed: list[str] = []
    header = Dataset()
    with _VALIDATION_LOCK, config.disable_value_validation(), warnings.catch_warnings():
        # Charset warnings (unknown term, undecodable bytes) name the charset only, but
        # nothing from here may reach the caller's warning handlers: ignore them all and
        # detect undecodable values by their U+FFFD instead.
        warnings.simplefilter("ignore")
        for keyword in SOURCE_IDENTIFIERS:
            setattr(header, keyword, _uid(source, keyword))
        for keyword in SOURCE_TYPE2 + SOURCE_IF_PRESENT + SOURCE_IMAGE:
            try:
                present, original = _get(source, keyword)
                value = _clean(keyword, original) if present else None
            except Exception as exc:  # noqa: BLE001 - a converter bug must not quote a value
                raise SRSourceError(
                    f"cannot read source attribute {describe(keyword)}: {type(exc).__name__}"
                ) from None
            if present and not _same(value, original):
                changed.append(keyword)
            if value is not None:
                setattr(header, keyword, value)
            elif keyword in SOURCE_TYPE2:
                setattr(header, keyword, None)  # Type 2: present, empty
            elif keyword == "Modality":
                header.Modality = ""  # highdicom reads it; an unknown modality is allowed
    if _has_non_ascii(header):
        header.SpecificCharacterSet = UTF8
    return header, changed


# pydicom 3.0 decodes ISO 2022 IR 58 (GB 2312) fragments with Python's gb2312 codec, which
# leaves the designation escape sequence in the text: removed here (an ESC is never text).
_IR58_ESCAPE = "\x1b$)A"


def _get(source: Dataset, keyword: str):
    tag = tag_for_keyword(keyword)
    if tag is None or tag not in source:
        return False, None
    value = source[tag].value  # converts (and decodes) the raw element
    if isinstance(value, (str, PersonName)) and _IR58_ESCAPE in str(value):
        text = str(value).replace(_IR58_ESCAPE, "")
        value = PersonName(text) if isinstance(value, PersonName) else text
    return True, value


def _uid(source: Dataset, keyword: str) -> str:
    where = f"source {_UID_NAMES[keyword]} {Tag(tag_for_keyword(keyword))}"
    try:
        present, value = _get(source, keyword)
    except Exception:  # noqa: BLE001
        present, value = True, None
    if not present or value in (None, ""):
        raise SRSourceError(f"{where} is missing: no SR (an SR must reference its source)")
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    if not isinstance(value, str) or isinstance(value, MultiValue):
        value = ""
    value = value.rstrip("\0 ")
    if not (value and len(value) <= 64 and UID(value).is_valid):
        raise SRSourceError(f"{where} is not a valid UID: no SR (an SR must reference its source)")
    if keyword == "SOPClassUID":
        from highdicom._standard_utils import get_sop_class_iod_map

        if value not in get_sop_class_iod_map():
            raise SRSourceError(f"{where} is not a storage SOP class highdicom knows: no SR")
    return value


def _clean(keyword: str, value):
    """The value to copy (str, int, Sequence), or None to drop it / leave it empty."""
    vr = dictionary_VR(keyword)
    if keyword == "PatientSex":
        # Enumerated values M, F, O (PS3.3 C.7.1.1). Lower case is the only repair we make:
        # 'male', 'W', 'U' and the like are not guessed at.
        text = value.strip().upper() if isinstance(value, str) else None
        return text if text in ("M", "F", "O") else None
    if vr == "SQ":
        return _sequence(value)
    return _value(vr, value)


def _value(vr: str, value):
    if value is None or value == "":
        return None
    if isinstance(value, (MultiValue, list, tuple)):
        return None  # every attribute we copy has VM 1
    if vr in _NUMBER_VRS:
        ok, _ = VALIDATORS[vr](vr, value)
        return value if ok and isinstance(value, (int, float)) else None
    if vr == "DA":
        return _date(value)
    if vr == "TM":
        return _time(value)
    if vr == "PN":
        return _person_name(value)
    if isinstance(value, PersonName) or not isinstance(value, str):
        return None
    if vr not in _STRING_VRS | _TEXT_VRS:
        return None
    text = value.rstrip(" ") if vr in _TEXT_VRS else value.strip(" ")
    bad = _BAD_TEXT_CHARS if vr in _TEXT_VRS else _BAD_CHARS
    if not text or bad.search(text) or (vr not in _TEXT_VRS and "\\" in text):
        return None
    limit = _MAX_LEN.get(vr)
    if limit is not None and len(text) > limit:
        return None
    validator = VALIDATORS.get(vr)
    if validator is not None and not validator(vr, text)[0]:
        return None  # pydicom's message (which quotes the value) is discarded
    return text


# A date with separators, 4-digit year first (1965-03-02, 1965.03.02, 1965/3/2): the only
# order that is unambiguous. 02.03.1965 could be either day or month first: dropped.
_DATE_SEPARATED = re.compile(r"(\d{4})([-./])(\d{1,2})\2(\d{1,2})")
_DATE = re.compile(r"(\d{4})(\d{2})(\d{2})")
_TIME = re.compile(r"(\d{2})(?:(\d{2})(?:(\d{2})(\.\d{1,6})?)?)?")
_TIME_COLONS = re.compile(r"(\d{2}):(\d{2})(?::(\d{2})(\.\d{1,6})?)?")


def _date(value) -> str | None:
    if isinstance(value, datetime.date):  # pydicom's DA with datetime_conversion on
        return value.strftime("%Y%m%d") if value.year >= 1 else None
    if not isinstance(value, str):
        return None
    text = value.strip()
    match = _DATE.fullmatch(text)
    if match:
        year, month, day = match.groups()
    else:
        match = _DATE_SEPARATED.fullmatch(text)
        if not match:
            return None  # 'unknown', a range, day-first, two-digit years: dropped
        year, _, month, day = match.groups()
    try:
        return datetime.date(int(year), int(month), int(day)).strftime("%Y%m%d")
    except ValueError:  # 19650230, 00000000
        return None


def _time(value) -> str | None:
    if isinstance(value, datetime.time):
        text = value.strftime("%H%M%S")
        return f"{text}.{value.microsecond:06d}" if value.microsecond else text
    if not isinstance(value, str):
        return None
    text = value.strip()
    match = _TIME.fullmatch(text) or _TIME_COLONS.fullmatch(text)
    if not match:
        return None
    hours, minutes, seconds, fraction = match.groups()
    if int(hours) > 23 or (minutes and int(minutes) > 59) or (seconds and int(seconds) > 60):
        return None  # 60: a leap second, which DICOM TM allows
    return "".join(part for part in (hours, minutes, seconds, fraction) if part)


def _person_name(value) -> PersonName | None:
    """A new PersonName from the decoded text (no encoded bytes of the source carried along).

    Up to 3 component groups (alphabetic, ideographic, phonetic), each of up to 5 components
    and 64 characters (PS3.5 6.2). A name over the limit is dropped, not truncated: a cut
    name is a value no other system holds for this patient (a PACS reconciling names would
    see a *different* name, which is worse than an absent Type 2 one that it fills from the
    study), and where to cut (family name? given names? the ideographic group?) would be a
    guess. The SR is still filed by Patient ID and Study Instance UID."""
    if isinstance(value, PersonName):
        text = str(value)
    elif isinstance(value, str):
        text = value
    else:
        return None
    text = text.rstrip(" ")
    if not text or "\\" in text or _BAD_CHARS.search(text):
        return None
    groups = text.split("=")
    if len(groups) > 3:
        return None
    for group in groups:
        if len(group) > 64 or len(group.split("^")) > 5:
            return None
    if not VALIDATORS["PN"]("PN", text)[0]:
        return None
    return PersonName(text)


def _sequence(value) -> Sequence | None:
    """A copy of a code sequence (species, breed, breed registration), or None if any value
    in it is malformed: a half-copied code item would be invalid content."""
    if not isinstance(value, Iterable) or isinstance(value, (str, bytes)):
        return None
    items = []
    for item in value:
        clean = _item(item)
        if clean is None:
            return None
        items.append(clean)
    return Sequence(items)  # empty: a Type 2C sequence present and empty


def _item(item: Dataset) -> Dataset | None:
    out = Dataset()
    for elem in item:
        if elem.tag.is_private:
            continue  # private tags are not ours to copy
        if elem.VR == "SQ":
            cleaned = _sequence(elem.value)
            if cleaned is None:
                return None
            out[elem.tag] = _new_element(elem.tag, "SQ", cleaned)
            continue
        if elem.is_empty:
            out[elem.tag] = _new_element(elem.tag, elem.VR, None)
            continue
        values = list(elem.value) if isinstance(elem.value, (MultiValue, list)) else [elem.value]
        cleaned_values = [_value(elem.VR, v) for v in values]
        if any(v is None for v in cleaned_values):
            return None
        out[elem.tag] = _new_element(
            elem.tag, elem.VR, cleaned_values[0] if len(cleaned_values) == 1 else cleaned_values
        )
    return out


def _new_element(tag, vr, value):
    from pydicom.dataelem import DataElement

    return DataElement(tag, vr, value)


def _same(value, original) -> bool:
    if value is None:
        return original is None or original == ""
    if isinstance(value, Sequence):
        return True  # copied whole or dropped (dropped is reported via value None)
    return str(value) == str(original)


def _has_non_ascii(ds: Dataset) -> bool:
    for elem in ds:
        if elem.VR == "SQ":
            if any(_has_non_ascii(item) for item in elem.value):
                return True
        elif isinstance(elem.value, (str, PersonName)) and not str(elem.value).isascii():
            return True
        elif isinstance(elem.value, MultiValue) and not all(str(v).isascii() for v in elem.value):
            return True
    return False
