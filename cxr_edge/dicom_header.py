"""Reading a DICOM header and deciding whether it is a radiograph we may analyse.

Every refusal names attributes, never their values: a header value may be a patient's name typed
into the wrong field. The only values that appear in reasons are ones checked against a closed
vocabulary first (a DICOM modality code, a photometric interpretation, a transfer syntax name)
and plain counts (rows, columns, frames).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from .errors import DecodeError

PROJECTION_MODALITIES = ("CR", "DX", "RG")
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"

# PS3.3 C.7.3.1.1.1 defined terms (current and retired), so a modality can be named in a reason
# without echoing whatever an unknown value holds.
KNOWN_MODALITIES = frozenset("""
    ANN AR ASMT AU BDUS BI BMD DMS DOC DX ECG EEG EMG EOG EPS ES FID GM HC HD IO IOL IVOCT IVUS KER
    KO LEN LS MG MR M3D NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PLAN POS PR PT PX REG RESP RF
    RG RTDOSE RTIMAGE RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT RWV SEG SM SMR SR SRF STAIN
    TEXTUREMAP TG US VA XA XAPROSTHESIS XC CR CT
    AS CD CF CP CS DD DF DG DM DS EC FA FS LP MA MS OPR ST VF
""".split())
PHOTOMETRICS = frozenset({
    "MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422",
    "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "HSV", "ARGB", "CMYK", "XYB",
})


def attr(keyword: str) -> str:
    """'Window Width (0028,1051)': how reasons name an attribute."""
    from pydicom.datadict import dictionary_description, tag_for_keyword

    tag = tag_for_keyword(keyword)
    if tag is None:
        return keyword
    return f"{dictionary_description(tag)} ({tag >> 16:04X},{tag & 0xFFFF:04X})"


def valid_uid(value) -> str | None:
    """The UID as a string if it is a valid DICOM UID (PS3.5 9.1), else None."""
    from pydicom.uid import UID

    text = str(value or "").strip("\0 ")
    return text if text and UID(text).is_valid else None


def modality_of(ds) -> str | None:
    """The Modality if it is a DICOM defined term, else None (missing or not a modality code)."""
    value = str(ds.get("Modality", "") or "").strip().upper()
    return value if value in KNOWN_MODALITIES else None


def transfer_syntax_name(ds) -> str | None:
    from pydicom.uid import UID_dictionary

    uid = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", "") or "")
    entry = UID_dictionary.get(uid)
    return entry[0] if entry and entry[1] == "Transfer Syntax" else None


def _sop_class_name(uid: str) -> str | None:
    from pydicom.uid import UID_dictionary

    entry = UID_dictionary.get(uid)
    return entry[0] if entry else None


def _check_deflate_bound(path: Path, meta, max_pixels: int) -> None:
    """A Deflated Explicit VR dataset is inflated whole by pydicom before any limit applies: a
    1.5 MB file inflating to gigabytes (a deflate bomb) is refused by inflating it here first, in
    chunks, counting, and stopping at what the pixel limit allows (8 bytes a pixel + 16 MiB)."""
    import zlib

    if "FileMetaInformationGroupLength" not in meta:
        return  # no group length to find the dataset by: pydicom decides
    with open(path, "rb") as f:
        # preamble (128) + "DICM" (4) + the group length element (12), then the rest of the meta
        f.seek(144 + int(meta.FileMetaInformationGroupLength))
        inflater, total, cap = zlib.decompressobj(-zlib.MAX_WBITS), 0, max_pixels * 8 + (16 << 20)
        while chunk := f.read(1 << 20):
            try:
                while chunk:
                    total += len(inflater.decompress(chunk, 1 << 24))
                    chunk = inflater.unconsumed_tail
                    if total > cap:
                        raise DecodeError(f"the deflated dataset inflates to more than {cap} bytes, "
                                          f"beyond what the pixel limit of {max_pixels} allows")
            except zlib.error:
                raise DecodeError("the deflated dataset is corrupt (zlib could not inflate it)") from None


def read_dataset(path: Path, has_preamble: bool, max_pixels: int):
    """The dataset (pixel data included, read lazily by pydicom); refuses what is not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import read_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    if has_preamble:
        try:
            meta = read_file_meta_info(path)
        except Exception:  # reported by the full read below
            meta = {}
        if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            _check_deflate_bound(path, meta, max_pixels)

    try:
        # force=True only for files without the DICM preamble (raw datasets, as old systems
        # write them); such a file must then still look like a DICOM header.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path, force=not has_preamble)
            if not has_preamble:
                _looks_like_a_header(ds)
        # pydicom only warns when a file ends early (and returns what it could read)
        if any("end of file" in str(w.message).lower() for w in caught):
            raise DecodeError("truncated DICOM file: the data ends before its last element is complete",
                              incomplete=True)
    except DecodeError:
        raise
    except InvalidDicomError as exc:
        raise DecodeError("not a DICOM file (no DICM preamble and no parseable header)") from exc
    except Exception as exc:  # pydicom raises many types on garbage or truncation
        if not has_preamble:
            raise DecodeError("not a DICOM file (no DICM preamble and no parseable header)") from exc
        raise DecodeError(f"corrupt or truncated DICOM header ({type(exc).__name__} while parsing)",
                          incomplete=True) from exc
    _infer_transfer_syntax(ds)  # raw datasets, and file meta that lacks it
    return ds


def _looks_like_a_header(ds) -> None:
    """A forced read of arbitrary bytes yields junk tags: insist on the elements of a real header,
    each in the group the standard puts it in (reading them also forces pydicom to parse them)."""
    wanted = ("SOPClassUID", "Modality", "StudyInstanceUID", "Rows", "PixelData")
    present = [kw for kw in wanted if kw in ds]
    if not present:
        raise DecodeError("not a DICOM file (no DICM preamble and no parseable header)")
    for keyword in present[:-1] if present[-1] == "PixelData" else present:
        ds[keyword].value  # noqa: B018 (raises on bytes that are not a DICOM element)


def _infer_transfer_syntax(ds) -> None:
    """A raw dataset has no file meta: its transfer syntax is the encoding pydicom found it in
    (implicit/explicit VR, little/big endian). Encapsulated pixel data needs the file meta to say
    which codec (old systems wrote raw datasets uncompressed only)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    if meta.get("TransferSyntaxUID"):
        return
    if "PixelData" in ds and ds["PixelData"].is_undefined_length:
        raise DecodeError("raw dataset (no file meta) with encapsulated pixel data: "
                          "its Transfer Syntax UID (0002,0010) is needed to know the compression")
    implicit, little = ds.original_encoding
    meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                              ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def _int(ds, keyword: str, default: int) -> int:
    try:
        value = ds.get(keyword, default)
        number = float(str(value if value not in (None, "") else default))
    except (TypeError, ValueError, OverflowError):
        raise DecodeError(f"{attr(keyword)} is not a valid integer") from None
    if not number.is_integer():
        raise DecodeError(f"{attr(keyword)} is not a valid integer")
    return int(number)


def check_is_radiograph(ds, max_pixels: int) -> None:
    """A single-frame grayscale projection radiograph (CR, DX, RG), or a specific refusal."""
    meta = getattr(ds, "file_meta", {})
    sop_class = valid_uid(ds.get("SOPClassUID")) or valid_uid(meta.get("MediaStorageSOPClassUID"))
    if sop_class == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        raise DecodeError("DICOMDIR (a media directory), not an image")
    described = _sop_class_name(sop_class) if sop_class else None
    what = f"the object is {described}" if described else (
        "the object's SOP Class UID is not a standard one" if sop_class else "the object has no SOP Class UID")
    if "PixelData" not in ds:
        # An image whose pixels never arrived: image attributes, an image SOP class, or a SOP
        # Class UID cut off mid-value (an invalid UID where one was written).
        cut_short = "SOPClassUID" in ds and not valid_uid(ds.get("SOPClassUID"))
        meta_class = valid_uid(meta.get("MediaStorageSOPClassUID"))
        image_class = any("Image Storage" in (_sop_class_name(c) or "") for c in (sop_class, meta_class) if c)
        if "Rows" in ds or cut_short or image_class:
            raise DecodeError(f"truncated or incomplete DICOM: image attributes without pixel data ({what})",
                              incomplete=True)
        raise DecodeError(f"no pixel data: {what}, not an image")
    if transfer_syntax_name(ds) is None:  # pydicom cannot read pixels it has no syntax for
        raise DecodeError(f"{attr('TransferSyntaxUID')} is not a known transfer syntax")
    modality = modality_of(ds)
    if modality not in PROJECTION_MODALITIES:
        accepted = ", ".join(PROJECTION_MODALITIES)
        if modality:
            raise DecodeError(f"modality {modality} is not accepted for chest analysis (accepted: {accepted})")
        problem = "is missing" if not str(ds.get("Modality", "") or "").strip() else "is not a DICOM modality code"
        raise DecodeError(f"{attr('Modality')} {problem}; accepted for chest analysis: {accepted}")
    frames = _int(ds, "NumberOfFrames", 1)
    if frames > 1:
        raise DecodeError(f"multi-frame image ({frames} frames); expected a single radiograph")
    samples = _int(ds, "SamplesPerPixel", 1)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        if photometric not in PHOTOMETRICS:
            problem = "is missing" if not photometric else "is not a defined term"
            raise DecodeError(f"{attr('PhotometricInterpretation')} {problem}; expected MONOCHROME1 or MONOCHROME2")
        raise DecodeError(f"colour image ({photometric}, {samples} samples per pixel); "
                          "expected grayscale MONOCHROME1/MONOCHROME2")
    rows, cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    if rows <= 0 or cols <= 0:
        raise DecodeError(f"image has no {attr('Rows')} / {attr('Columns')}")
    if rows * cols > max_pixels:
        raise DecodeError(f"image is {cols}x{rows} = {rows * cols} pixels, above the limit of {max_pixels}")
    bits = _int(ds, "BitsAllocated", 0)
    if bits not in (1, 8, 16, 32, 64):
        raise DecodeError(f"{attr('BitsAllocated')} must be 1, 8, 16, 32 or 64")
    if not 1 <= _int(ds, "BitsStored", bits) <= bits:
        raise DecodeError(f"{attr('BitsStored')} must be between 1 and {attr('BitsAllocated')}")
    if _int(ds, "PixelRepresentation", 0) not in (0, 1):
        raise DecodeError(f"{attr('PixelRepresentation')} must be 0 (unsigned) or 1 (signed)")
