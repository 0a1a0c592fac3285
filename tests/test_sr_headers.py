"""SRs from source headers as foreign sites and old archives write them.

Sources are the real radiographs in samples/ with their headers edited by pydicom: text re-encoded
in every legal Specific Character Set (pydicom encodes the str values on write, ISO 2022 escape
sequences included), malformed values (dates with dashes, 80-character names, ...) and invalid
UIDs. Each SR is written, then checked with dciodvfy (no error, whatever the source's),
dsrdump (no complaint) and highdicom (same probabilities), and its names/IDs read back.
"""

from __future__ import annotations

import logging
import random
import subprocess
import warnings
from io import BytesIO
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from cxr_edge import sr_template
from cxr_edge.findings import Finding
from cxr_edge.labels import LABELS
from cxr_edge.outputs import dicom_bytes
from cxr_edge.sr import ModelIdentity, build_sr, build_sr_reference, read_sr_findings
from cxr_edge.sr_source import UTF8, SRSourceError, validated_source_header

from .conftest import SAMPLES, need_tool

MODEL = ModelIdentity(name="cxr-densenet121", version="1.0.0", sha256="0123abcd" * 8)
RSNA = "rsna_cr_pa_jpeg_baseline_mono2.dcm"
NEMA = "nema_wg04_rg1_cr_j2k_mono1.dcm"
CANINE = "canine_thorax_dx_mono1_small.dcm"
MARKER = "ZZMARKER"


def _findings(seed: int = 7) -> list[Finding]:
    """Three findings, not fifteen: the header is what is tested here (test_sr.py covers the
    full report), and highdicom takes ~50 ms per group to build and to parse an SR."""
    rng = random.Random(seed)
    return [Finding(label, rng.random(), rng.uniform(0.2, 0.8)) for label in rng.sample(LABELS, 3)]


def _derive(tmp_path: Path, base: str, charset=None, name: str = "source.dcm", *, raw=None,
            **values) -> Path:
    """The real file `base` with `values` set (str: pydicom encodes them in `charset` on
    write; None: element removed) and `raw` ones written as the bytes given, saved to
    tmp_path and returned as a path."""
    ds = pydicom.dcmread(SAMPLES / "dicom" / base)
    path = tmp_path / name
    with config.disable_value_validation():  # malformed values on purpose
        if charset is not None:
            ds.SpecificCharacterSet = charset
        for keyword, value in values.items():
            if value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True)
    if raw:
        # Only into a dataset read with the new charset: pydicom re-encodes every raw element
        # (decoded with the charset it was read with) when the Specific Character Set changed.
        ds = pydicom.dcmread(path)
        for keyword, data in raw.items():
            data += b" " * (len(data) % 2)
            tag = Tag(tag_for_keyword(keyword))
            ds._dict[tag] = RawDataElement(tag, dictionary_VR(keyword), len(data), data, 0, False, True)
        ds.save_as(path, enforce_file_format=True)
    return path


def _header(path: Path) -> Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)  # as the pipeline reads it


def _dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run([need_tool("dciodvfy"), str(path)], capture_output=True,
                         encoding="utf-8", errors="replace")  # it echoes values raw
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def _check_sr(source_path: Path, sr: Dataset, findings: list[Finding], tmp_path: Path) -> Dataset:
    """(a) dciodvfy: no error at all (whatever the source's); (b) dsrdump: exit 0, no complaint;
    (c) highdicom reads back the same probabilities. Returns the SR as read back."""
    sr_path = tmp_path / "sr.dcm"
    sr_path.write_bytes(dicom_bytes(sr))
    sr_errors = _dciodvfy_errors(sr_path)
    assert sr_errors == [], "\n".join(sr_errors)
    run = subprocess.run([need_tool("dsrdump"), str(sr_path)], capture_output=True,
                         encoding="utf-8", errors="replace")
    assert run.returncode == 0, run.stderr
    # dcmtk's dcmsr says it cannot check the values of any set but ISO_IR 6 / ISO_IR 100
    # ("currently, the VR checker in 'dcmdata' only supports ASCII and Latin-1", dsrdoc.cc):
    # a limit of the tool, not a complaint about the SR.
    unchecked = f"W: The VR checker does not support this Specific Character Set: {UTF8}"
    complaints = [line for line in (run.stdout + run.stderr).splitlines()
                  if (line.startswith(("E:", "W:")) or "Error" in line or "Warning" in line)
                  and not (line == unchecked and sr.get("SpecificCharacterSet") == UTF8)]
    assert complaints == [], "\n".join(complaints)
    got = read_sr_findings(hd.sr.srread(sr_path))
    assert set(got) == {f.label for f in findings}
    for finding in findings:
        assert got[finding.label][0] == round(finding.probability, 3)
        assert got[finding.label][1] == finding.positive
    return pydicom.dcmread(sr_path)


# --- character sets -------------------------------------------------------------------------
# (Specific Character Set, Patient's Name, Referring Physician's Name, Patient ID); names from
# PS3.5 Annexes H-K where the standard gives one. Every one is legal; highdicom refuses some
# of the sets themselves (see cxr_edge/sr_source.py) and the SR is written in UTF-8 instead.
CHARSETS = {
    "ir87-japanese": (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう", "Sato^Hanako=佐藤^花子=さとう^はなこ", "JP001"),
    "ir13-ir87-japanese": (["ISO 2022 IR 13", "ISO 2022 IR 87"], "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう", "ｻﾄｳ^ﾊﾅｺ", "JP002"),
    "ir149-korean": (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동", "Kim^Minsu=金^民秀=김^민수", "KR001"),
    "ir58-chinese": (["", "ISO 2022 IR 58"], "Zhang^XiaoDong=张^小东", "Li^Hua=李^华", "CN001"),
    "gb18030": ("GB18030", "Wang^XiaoDong=王^小东", "Chen^Jing=陈^静", "病人-18030"),
    "gbk": ("GBK", "Wang^XiaoDong=王^小东", "Zhou^Min=周^敏", "CN-GBK"),
    "utf8": ("ISO_IR 192", "Wang^XiaoDong=王^小東", "Müller^Jürgen", "ÜID-ß-1"),
    "single-2022-ir100": ("ISO 2022 IR 100", "Buc^Jérôme", "Größe^Jürgen", "FR-é01"),
    "ir6-ir100-ir126": (["ISO 2022 IR 6", "ISO 2022 IR 100", "ISO 2022 IR 126"], "Buc^Jérôme=Διονυσιος", "Müller^Anna", "MIX01"),
    "ir100-latin1": ("ISO_IR 100", "Buc^Jérôme", "Ørsted^Hans", "DK-Ø1"),
    "ir101-latin2": ("ISO_IR 101", "Wałęsa^Lech", "Dvořák^Antonín", "PL-ł1"),
    "ir109-latin3": ("ISO_IR 109", "Ġużeppi^Ħanna", "Borg^Ġorġ", "MT01"),
    "ir110-latin4": ("ISO_IR 110", "Ķēniņš^Jānis", "Ozoliņa^Anna", "LV01"),
    "ir144-cyrillic": ("ISO_IR 144", "Люкceмбург^Гaрнет", "Иванов^Иван", "RU-Ж1"),
    "ir127-arabic": ("ISO_IR 127", "قباني^لنزار", "حداد^سامي", "AR01"),
    "ir126-greek": ("ISO_IR 126", "Διονυσιος", "Παπαδόπουλος^Γιώργος", "GR-Ω1"),
    "ir138-hebrew": ("ISO_IR 138", "שרון^דבורה", "כהן^משה", "IL01"),
    "ir148-turkish": ("ISO_IR 148", "Çelik^Ağa", "Yıldız^Şükrü", "TR-ğ1"),
    "ir13-katakana": ("ISO_IR 13", "ﾔﾏﾀﾞ^ﾀﾛｳ", "ｻﾄｳ^ﾊﾅｺ", "JP-ｱ1"),
    "ir166-thai": ("ISO_IR 166", "สมชาย^ใจดี", "สมหญิง^รักไทย", "TH01"),
}
# The encoded source must really use the set's own bytes, not UTF-8 or ASCII fallbacks.
ENCODED = {
    "ir87-japanese": b"\x1b$B",  # ESC $ B: JIS X 0208 into G0
    "ir13-ir87-japanese": b"\x1b$B",
    "ir149-korean": b"\x1b$)C",  # ESC $ ) C: KS X 1001 into G1
    "ir58-chinese": b"\x1b$)A",  # ESC $ ) A: GB 2312 into G1
    "ir6-ir100-ir126": b"\x1b-F",  # ESC - F: ISO 8859-7 into G1
    "gb18030": "王".encode("gb18030"),
    "utf8": "王".encode(),
    "ir100-latin1": "é".encode("latin-1"),
    "ir144-cyrillic": "Ж".encode("iso8859_5"),
    "ir166-thai": "ส".encode("tis-620"),
}
BASES = [RSNA, NEMA, CANINE]
IR58 = "\x1b$)A"


def _decoded(value) -> str:
    """The source's value as pydicom decodes it, except that pydicom 3.0 leaves the ISO 2022
    IR 58 designation (ESC $ ) A) in the text; cxr_edge.sr_source removes it too."""
    return str(value).replace(IR58, "")


def _ir58(text: str) -> bytes:
    """ISO 2022 IR 58 as PS3.5 K.2 writes it: GB 2312 designated into G1 (ESC $ ) A) anew after
    every '^' and '=' (the delimiters return to the first set)."""
    def component(c: str) -> bytes:
        return c.encode("ascii") if c.isascii() else b"\x1b$)A" + c.encode("gb2312")
    return b"=".join(b"^".join(component(c) for c in g.split("^")) for g in text.split("="))


# pydicom 3.0 cannot encode these two (it writes ISO 2022 IR 58 as bare GB 2312 bytes without
# the escape sequence, and ISO_IR 13 half-width katakana as '?'): written as raw bytes instead.
RAW_ENCODERS = {"ir58-chinese": _ir58, "ir13-katakana": lambda text: text.encode("shift_jis")}


@pytest.mark.parametrize("case", list(CHARSETS), ids=str)
def test_every_character_set(case, tmp_path):
    charset, name, referring, patient_id = CHARSETS[case]
    base = BASES[list(CHARSETS).index(case) % len(BASES)]
    texts = {"PatientName": name, "ReferringPhysicianName": referring, "PatientID": patient_id}
    encoder = RAW_ENCODERS.get(case)
    if encoder:
        path = _derive(tmp_path, base, charset, raw={k: encoder(v) for k, v in texts.items()},
                       StudyID="S1", AccessionNumber="ACC-1")
    else:
        path = _derive(tmp_path, base, charset, StudyID="S1", AccessionNumber="ACC-1", **texts)
    if case in ENCODED:
        assert ENCODED[case] in path.read_bytes()
    source = _header(path)
    # The source decodes to what was written (pydicom's own round trip) ...
    decoded = [_decoded(source.PatientName), _decoded(source.ReferringPhysicianName), _decoded(source.PatientID)]
    assert decoded == [name, referring, patient_id]
    findings = _findings()
    sr = _check_sr(path, build_sr(source, findings, MODEL), findings, tmp_path)
    # ... and the SR, written in UTF-8, reads back the very same characters.
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    assert [str(sr.PatientName), str(sr.ReferringPhysicianName), sr.PatientID] == decoded
    assert (sr.StudyID, sr.AccessionNumber) == ("S1", "ACC-1")
    assert sr.StudyInstanceUID == source.StudyInstanceUID


def test_ascii_source_keeps_default_repertoire(tmp_path):
    """All-ASCII values need no Specific Character Set (what old PACS read best)."""
    path = _derive(tmp_path, RSNA, "ISO 2022 IR 100", PatientName="Doe^John")
    sr = build_sr(_header(path), _findings(), MODEL)
    assert "SpecificCharacterSet" not in sr
    assert str(sr.PatientName) == "Doe^John"


def test_japanese_pn_is_decoded_not_copied_as_bytes(tmp_path):
    path = _derive(tmp_path, RSNA, ["", "ISO 2022 IR 87"], PatientName=CHARSETS["ir87-japanese"][1])
    header, changed = validated_source_header(_header(path))
    assert header.PatientName.components == ("Yamada^Tarou", "山田^太郎", "やまだ^たろう")
    assert "PatientName" not in changed
    assert header.SpecificCharacterSet == "ISO_IR 192"
    # Written as UTF-8, with no ISO 2022 escape left over from the source.
    sr_bytes = dicom_bytes(build_sr(_header(path), _findings(), MODEL))
    assert "山田^太郎=やまだ^たろう".encode() in sr_bytes and b"\x1b" not in sr_bytes


def test_animal_patient_attributes_are_kept(tmp_path):
    species = Dataset()
    species.CodeValue, species.CodingSchemeDesignator = "448771007", "SCT"
    species.CodeMeaning = "Canis lupus familiaris"
    breed = Dataset()
    breed.CodeValue, breed.CodingSchemeDesignator, breed.CodeMeaning = "132519007", "SCT", "Épagneul breton"
    path = _derive(tmp_path, CANINE, "ISO_IR 100", PatientSpeciesDescription="Chien",
                   PatientSpeciesCodeSequence=[species], PatientBreedDescription="Épagneul breton",
                   PatientBreedCodeSequence=[breed], BreedRegistrationSequence=[],
                   PatientSexNeutered="UNALTERED",
                   ResponsiblePerson="Dupont^Hélène", ResponsiblePersonRole="OWNER",
                   ResponsibleOrganization="Clinique vétérinaire")
    source = _header(path)
    findings = _findings()
    sr = _check_sr(path, build_sr(source, findings, MODEL), findings, tmp_path)
    assert sr.PatientSpeciesCodeSequence[0].CodeValue == "448771007"
    assert sr.PatientBreedCodeSequence[0].CodeMeaning == "Épagneul breton"
    assert (sr.PatientBreedDescription, str(sr.ResponsiblePerson)) == ("Épagneul breton", "Dupont^Hélène")
    assert (sr.ResponsiblePersonRole, sr.ResponsibleOrganization) == ("OWNER", "Clinique vétérinaire")
    assert sr.BreedRegistrationSequence == [] and sr.PatientSexNeutered == "UNALTERED"


# --- malformed values -----------------------------------------------------------------------
# keyword, value in the source, value expected in the SR ("" = written empty, Type 2)
MALFORMED = [
    ("PatientBirthDate", "1965-03-02", "19650302"),
    ("PatientBirthDate", "1965.03.02", "19650302"),
    ("PatientBirthDate", "1965/3/2", "19650302"),
    ("PatientBirthDate", "02.03.1965", ""),  # day or month first? dropped
    ("PatientBirthDate", "unknown", ""),
    ("PatientBirthDate", "19650230", ""),
    ("StudyDate", MARKER, ""),
    ("StudyTime", "12:30:45", "123045"),
    ("StudyTime", "12:30:45.25", "123045.25"),
    ("StudyTime", "25:00", ""),
    ("StudyTime", MARKER, ""),
    ("PatientSex", "male", ""),
    ("PatientSex", "f", "F"),
    ("PatientSex", MARKER, ""),
    ("PatientName", "Verylongfamilyname" * 4 + "^Anna", ""),  # 80 characters
    ("PatientName", "A^B=C^D=E^F=G^H", ""),  # 4 component groups
    ("ReferringPhysicianName", "Smith^John^^^^Extra", ""),  # 6 components
    ("PatientID", "P" * 70, ""),
    ("PatientID", "A\\B", ""),  # VM 2
    ("StudyID", "S" * 20, ""),
    ("AccessionNumber", "ACC\tNUMBER", ""),  # control character
    ("ReferringPhysicianName", "NoCaret", "NoCaret"),  # legal, though highdicom warns
]


@pytest.mark.parametrize("keyword, value, expected", MALFORMED,
                         ids=[f"{k}={v[:14]}" for k, v, _ in MALFORMED])
def test_malformed_values_are_dropped_or_normalised(keyword, value, expected, tmp_path):
    base = BASES[[k for k, _, _ in MALFORMED].index(keyword) % len(BASES)]
    path = _derive(tmp_path, base, None, **{keyword: value})
    source = _header(path)
    header, changed = validated_source_header(source)
    assert (keyword in changed) == (expected != value)
    findings = _findings()
    sr = _check_sr(path, build_sr(source, findings, MODEL), findings, tmp_path)
    assert keyword in sr  # Type 2: present even when emptied
    assert str(sr[keyword].value if sr[keyword].value is not None else "") == expected


def test_all_malformed_at_once(tmp_path):
    values = {k: v for k, v, e in MALFORMED if e == ""}
    path = _derive(tmp_path, NEMA, ["", "ISO 2022 IR 87"], **values)
    findings = _findings()
    sr = _check_sr(path, build_sr(_header(path), findings, MODEL), findings, tmp_path)
    for keyword in values:
        assert sr[keyword].is_empty, keyword


# --- invalid UIDs ---------------------------------------------------------------------------
BAD_UIDS = ["1.2.3.abc", "1.2.03", "1." + "2" * 68, "1.2..3"]
UID_NAMES = {
    "SOPInstanceUID": "SOP Instance UID (0008,0018)",
    "StudyInstanceUID": "Study Instance UID (0020,000D)",
    "SeriesInstanceUID": "Series Instance UID (0020,000E)",
    "SOPClassUID": "SOP Class UID (0008,0016)",
}


@pytest.mark.parametrize("bad", BAD_UIDS, ids=["letters", "leading-zero", "70-chars", "empty-component"])
@pytest.mark.parametrize("keyword", list(UID_NAMES))
def test_invalid_uid_is_refused_by_name(keyword, bad):
    source = pydicom.dcmread(SAMPLES / "dicom" / RSNA, stop_before_pixels=True)
    with config.disable_value_validation():
        setattr(source, keyword, bad)
    with pytest.raises(SRSourceError) as caught:
        build_sr(source, _findings(), MODEL)
    message = str(caught.value)
    assert UID_NAMES[keyword] in message and "is not a valid UID" in message
    assert bad not in message and "abc" not in message


@pytest.mark.parametrize("keyword", list(UID_NAMES))
def test_missing_uid_is_refused_by_name(keyword):
    source = pydicom.dcmread(SAMPLES / "dicom" / RSNA, stop_before_pixels=True)
    delattr(source, keyword)
    with pytest.raises(SRSourceError, match=UID_NAMES[keyword].replace("(", r"\(").replace(")", r"\)")):
        build_sr(source, _findings(), MODEL)


# --- privacy --------------------------------------------------------------------------------
MARKED = {  # every copied attribute carries the marker: valid and malformed variants
    "PatientName": f"{MARKER}^Valid",
    "PatientID": f"{MARKER}-ID",
    "PatientBirthDate": f"1965-{MARKER}",
    "PatientSex": MARKER,
    "StudyDate": MARKER,
    "StudyTime": f"12:{MARKER}",
    "ReferringPhysicianName": MARKER * 9,  # too long
    "StudyID": MARKER,
    "AccessionNumber": f"{MARKER}\\2",
    "PatientSpeciesDescription": f"{MARKER} dog",
    "PatientBreedDescription": MARKER * 9,  # too long
    "ResponsiblePerson": MARKER,  # one component: legal, highdicom would warn
    "ResponsibleOrganization": f"{MARKER}\x07",
}


def _no_marker_anywhere(caplog, caught):
    assert not [r for r in caplog.records if MARKER in r.getMessage()]
    assert not [w for w in caught if MARKER in str(w.message)]


@pytest.mark.parametrize("charset", [None, ["", "ISO 2022 IR 87"]], ids=["default", "ir87"])
def test_no_header_value_in_logs_or_warnings(charset, tmp_path, caplog):
    path = _derive(tmp_path, CANINE, charset, **MARKED)
    source = _header(path)
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sr = build_sr(source, _findings(), MODEL)
        written = dicom_bytes(sr)
    _no_marker_anywhere(caplog, caught)
    # The SR carries the valid values (it must be filed in this patient's study) and only those.
    assert (str(sr.PatientName), sr.PatientID, sr.StudyID) == (f"{MARKER}^Valid", f"{MARKER}-ID", MARKER)
    assert str(sr.ResponsiblePerson) == MARKER
    assert written.count(MARKER.encode()) == 5  # name, ID, study ID, species, responsible person
    # What was dropped is logged by attribute name.
    assert any("PatientBirthDate (0010,0030)" in r.getMessage() for r in caplog.records)


def test_no_header_value_in_errors(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = _derive(tmp_path, RSNA, None, **MARKED, SOPInstanceUID=f"1.2.{MARKER}")
        with pytest.raises(SRSourceError) as bad_uid:
            build_sr(_header(path), _findings(), MODEL)
        # A dataset that is no image (Modality SR): highdicom's own ValueError, wrapped.
        path = _derive(tmp_path, RSNA, None, "other.dcm", **MARKED, Modality="SR")
        with pytest.raises(SRSourceError) as refused:
            build_sr(_header(path), _findings(), MODEL)
        with pytest.raises(SRSourceError) as refused_reference:
            build_sr_reference(_header(path), _findings(), MODEL)
        # Whatever highdicom (or the template path) raises, with whatever it quotes, only its
        # type gets out.
        def quoting(*args, **kwargs):
            raise ValueError(f"invalid value {MARKER}")

        path = _derive(tmp_path, RSNA, None, "third.dcm", **MARKED)
        monkeypatch.setattr(hd.sr, "ComprehensiveSR", quoting)
        with pytest.raises(SRSourceError) as quoted:
            build_sr_reference(_header(path), _findings(), MODEL)
        monkeypatch.setattr(sr_template, "fill", quoting)
        with pytest.raises(SRSourceError) as quoted_template:
            build_sr(_header(path), _findings(), MODEL)
    assert MARKER not in str(bad_uid.value) and "SOP Instance UID" in str(bad_uid.value)
    for error in (refused, refused_reference, quoted, quoted_template):
        assert str(error.value) == "highdicom refused the SR content: ValueError"
    for error in (quoted, quoted_template):
        assert error.value.__cause__ is None and error.value.__suppress_context__
    _no_marker_anywhere(caplog, caught)


def test_source_dataset_is_not_modified(tmp_path):
    path = _derive(tmp_path, RSNA, None, PatientBirthDate="1965-03-02")
    source = _header(path)
    before = BytesIO()
    source.save_as(before)
    build_sr(source, _findings(), MODEL)
    after = BytesIO()
    source.save_as(after)
    assert before.getvalue() == after.getvalue()
