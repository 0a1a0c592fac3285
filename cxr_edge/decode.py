"""Decode a chest radiograph (DICOM, PNG or JPEG) to grayscale float32 in [0, 1], 1 = bright.

Everything refused raises `DecodeError` with a specific reason. The decoded image carries the
DICOM header (without pixel data) so the SR writer can reference the source.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DecodeError

# Above this a file is refused before its pixels are decoded (decompression bombs).
DEFAULT_MAX_PIXELS = 50_000_000
PROJECTION_MODALITIES = frozenset({"CR", "DX", "RG"})
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass
class DecodedImage:
    pixels: np.ndarray  # float32 (H, W) in [0, 1], 0 = dark (air), 1 = bright (bone)
    format: str  # "dicom" | "png" | "jpeg"
    info: dict = field(default_factory=dict)  # rows, columns, bits, photometric, ...
    dicom_header: object | None = None  # pydicom Dataset without pixel data, for the SR


def sniff_format(path: Path) -> str | None:
    """Format from the file's magic bytes (not its name); None when unrecognised."""
    with open(path, "rb") as f:
        head = f.read(132)
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(PNG_MAGIC):
        return "png"
    if head.startswith(JPEG_MAGIC):
        return "jpeg"
    return None


def decode_file(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DecodeError(f"cannot read file: {exc.strerror}") from exc
    if size == 0:
        raise DecodeError("empty file (0 bytes)")
    kind = sniff_format(path)
    if kind in ("png", "jpeg"):
        return decode_raster(path, kind, max_pixels)
    if kind == "dicom" or path.suffix.lower() in (".dcm", ".dicom", "") or path.name == "DICOMDIR":
        return decode_dicom(path, max_pixels, has_preamble=kind == "dicom")
    raise DecodeError("not a DICOM, PNG or JPEG file (unrecognised content)")


# --- PNG / JPEG -----------------------------------------------------------------------------


def decode_raster(path: Path, kind: str, max_pixels: int) -> DecodedImage:
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            width, height = image.size  # header only, nothing decoded yet
            if width * height > max_pixels:
                raise DecodeError(
                    f"image is {width}x{height} = {width * height} pixels, above the limit of {max_pixels}"
                )
            image.load()
    except DecodeError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise DecodeError(f"corrupt or truncated {kind.upper()}: {exc}") from exc
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        pixels = np.asarray(image, dtype=np.float32) / 65535.0
        bits = 16
    elif mode == "F":
        raise DecodeError("floating-point images are not supported")
    else:
        if mode in ("LA", "RGBA", "PA"):
            # Alpha carries no X-ray information (NIH ships some RGBA PNGs with opaque alpha).
            image = image.convert("RGB") if mode != "LA" else image.getchannel("L")
        if image.mode != "L":
            image = image.convert("L")  # RGB -> luma (ITU-R 601), palette/1-bit -> 8-bit
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        bits = 8
    return DecodedImage(
        pixels=np.ascontiguousarray(pixels, dtype=np.float32),
        format=kind,
        info={"rows": height, "columns": width, "bits": bits, "mode": mode},
    )


# --- DICOM ----------------------------------------------------------------------------------


def _read_dataset(path: Path, has_preamble: bool):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        # force=True only for files without the DICM preamble (raw datasets); such a file must
        # then still look like an image header, or it is not DICOM at all.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path, force=not has_preamble)
        # pydicom only warns when a file ends early (and returns what it could read)
        cut_short = [str(w.message) for w in caught if "end of file" in str(w.message).lower()]
        if cut_short:
            raise DecodeError(f"truncated DICOM file: {cut_short[0]}")
        if not has_preamble:
            ds.SOPClassUID  # raises if the bytes did not parse into a dataset
    except DecodeError:
        raise
    except InvalidDicomError as exc:
        raise DecodeError(f"not a DICOM file: {exc}") from exc
    except Exception as exc:  # pydicom raises many types on garbage or truncation
        if not has_preamble:
            raise DecodeError("not a DICOM file (no DICM preamble and no parseable header)") from exc
        raise DecodeError(f"corrupt or truncated DICOM header: {type(exc).__name__}: {exc}") from exc
    return ds


def _check_dicom_is_radiograph(ds, max_pixels: int) -> None:
    from pydicom.uid import UID

    sop_class = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
    if sop_class == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        raise DecodeError("DICOMDIR (a media directory), not an image")
    if "PixelData" not in ds:
        meta_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "")) if hasattr(ds, "file_meta") else ""
        name = UID(sop_class).name if sop_class else "unknown SOP class"
        # An image whose pixels never arrived: image attributes, an image SOP class in the
        # header or the file meta, or a SOP Class UID cut off mid-value.
        cut_short = bool(sop_class) and not UID(sop_class).is_valid
        if "Rows" in ds or cut_short or any("Image Storage" in UID(c).name for c in (sop_class, meta_class) if c):
            name = UID(meta_class).name if meta_class and (cut_short or not sop_class) else name
            raise DecodeError(f"truncated or incomplete DICOM: a {name} without its pixel data")
        raise DecodeError(f"no pixel data: a {name} object, not an image")
    modality = str(ds.get("Modality", "")).upper()
    if modality not in PROJECTION_MODALITIES:
        raise DecodeError(
            f"modality {modality or '(missing)'} is not a projection radiograph "
            f"(accepted: {', '.join(sorted(PROJECTION_MODALITIES))})"
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DecodeError(f"multi-frame image ({frames} frames); expected a single radiograph")
    samples = int(ds.get("SamplesPerPixel", 1))
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DecodeError(
            f"colour image ({photometric or 'no photometric interpretation'}, {samples} samples "
            "per pixel); expected grayscale MONOCHROME1/MONOCHROME2"
        )
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if rows * cols == 0:
        raise DecodeError("image has no Rows/Columns")
    if rows * cols > max_pixels:
        raise DecodeError(f"image is {cols}x{rows} = {rows * cols} pixels, above the limit of {max_pixels}")


def _stored_range(ds) -> tuple[float, float]:
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing straight to [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width <= 1.0:  # width 1 is a threshold (C.11.2.1.2.1): x <= c - 0.5 is black
        return (values > center - 0.5).astype(np.float32)
    return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def _first(value) -> float:
    from pydicom.multival import MultiValue

    return float(value[0] if isinstance(value, (MultiValue, list, tuple)) else value)


def _apply_voi_lut_sequence(values: np.ndarray, ds) -> np.ndarray:
    """The first VOI LUT (PS3.3 C.11.2.1.1) straight to [0, 1].

    Indexed here rather than with pydicom's apply_voi_lut, whose index array takes the LUT's
    dtype: with 8-bit entries over 12-bit input, inputs above 255 would wrap around.
    """
    item = ds.VOILUTSequence[0]
    n_entries, first_mapped, bits = (int(v) for v in item.LUTDescriptor)
    n_entries = n_entries or 65536
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):  # VR OW: raw 16-bit words
        little = ds.file_meta._tsyntax_encoding[1] if hasattr(ds, "file_meta") else True
        lut = np.frombuffer(bytes(data), dtype="<u2" if little is not False else ">u2")[:n_entries]
    else:  # VR US: a list of ints (or one int for a 1-entry LUT)
        lut = np.atleast_1d(np.asarray(data, dtype=np.float64))[:n_entries]
    if lut.size == 0:
        raise DecodeError("VOI LUT Sequence has no LUT data")
    index = np.clip(np.rint(values) - first_mapped, 0, lut.size - 1).astype(np.int64)
    return lut.astype(np.float32)[index] / float(2**bits - 1)


def dicom_to_unit_range(raw: np.ndarray, ds) -> tuple[np.ndarray, str]:
    """Modality LUT -> VOI LUT or window (or stored bit range) -> MONOCHROME1 inversion."""
    from pydicom.pixels import apply_modality_lut

    values = apply_modality_lut(raw, ds).astype(np.float32, copy=False)
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        pixels, voi = _apply_voi_lut_sequence(values, ds), "lut"
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        pixels = _window(values, _first(ds.WindowCenter), _first(ds.WindowWidth), function)
        voi = f"window {function.lower()}"
    else:
        low, high = _stored_range(ds)
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        low, high = sorted((low * slope + intercept, high * slope + intercept))
        pixels, voi = (values - low) / max(high - low, 1e-6), "bit range"
    pixels = np.clip(pixels, 0.0, 1.0).astype(np.float32)
    if str(ds.PhotometricInterpretation) == "MONOCHROME1":
        pixels = 1.0 - pixels  # MONOCHROME1: the minimum value is white
    return pixels, voi


def decode_dicom(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS, has_preamble: bool = True) -> DecodedImage:
    ds = _read_dataset(path, has_preamble)
    _check_dicom_is_radiograph(ds, max_pixels)
    try:
        raw = ds.pixel_array
    except Exception as exc:
        syntax = ds.file_meta.get("TransferSyntaxUID")
        syntax_name = syntax.name if syntax else "unknown transfer syntax"
        raise DecodeError(f"cannot decode pixel data ({syntax_name}): {type(exc).__name__}: {exc}") from exc
    if raw.ndim != 2:
        raise DecodeError(f"unexpected pixel array shape {raw.shape}; expected one grayscale frame")
    pixels, voi = dicom_to_unit_range(raw, ds)
    header = ds.copy()
    del header.PixelData  # the SR needs the header only; don't ship pixels between processes
    syntax = ds.file_meta.get("TransferSyntaxUID")
    info = {
        "rows": int(ds.Rows),
        "columns": int(ds.Columns),
        "bits": int(ds.get("BitsStored", 0)),
        "photometric": str(ds.PhotometricInterpretation),
        "modality": str(ds.Modality),
        "transfer_syntax": syntax.name if syntax else None,
        "voi": voi,
    }
    return DecodedImage(pixels=pixels, format="dicom", info=info, dicom_header=header)
