"""Stored DICOM pixel values -> what a viewer shows, as float32 in [0, 1] (1 = bright).

PS3.3's grayscale pipeline: Modality LUT (rescale or LUT) -> VOI LUT (LUT, else the first window,
else the stored bit range) -> Presentation LUT (Presentation LUT Shape, else MONOCHROME1 means
inverted). Every value a header supplies is checked before it is used, so a NaN, an infinity, a
zero width or an empty LUT becomes a refusal naming the attribute, never a NaN image.
"""

from __future__ import annotations

import math

import numpy as np

from .dicom_header import attr
from .errors import DecodeError


def _number(value, keyword: str) -> float:
    from pydicom.multival import MultiValue

    if isinstance(value, (MultiValue, list, tuple)):
        if not len(value):
            raise DecodeError(f"{attr(keyword)} is empty")
        value = value[0]  # several windows / values: the first is the default (PS3.3 C.11.2.1.2)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DecodeError(f"{attr(keyword)} is not a number") from None
    if not math.isfinite(number):
        raise DecodeError(f"{attr(keyword)} is not a finite number")
    if abs(number) > 1e30:  # beyond float32 pixel arithmetic: every pixel would overflow alike
        raise DecodeError(f"{attr(keyword)} is out of range (magnitude above 1e30)")
    return number


def _descriptor(item, sequence: str) -> tuple[int, int, int]:
    try:
        entries, first, bits = (int(v) for v in item.LUTDescriptor)
    except (AttributeError, TypeError, ValueError):
        raise DecodeError(f"{attr(sequence)} item has no valid {attr('LUTDescriptor')} (3 numbers)") from None
    if not 1 <= bits <= 16:
        raise DecodeError(f"{attr(sequence)}: {attr('LUTDescriptor')} gives {bits} bits per entry (allowed 1-16)")
    return entries or 65536, first, bits


def _lut_data(item, entries: int, sequence: str, little_endian: bool) -> np.ndarray:
    data = item.get("LUTData")
    if isinstance(data, (bytes, bytearray)):  # VR OW: raw 16-bit words
        lut = np.frombuffer(bytes(data)[: 2 * (len(data) // 2)], dtype="<u2" if little_endian else ">u2")
    elif data is None:
        lut = np.empty(0)
    else:  # VR US: a list of ints (or one int for a 1-entry LUT)
        lut = np.atleast_1d(np.asarray(data, dtype=np.float64))
    if lut.size == 0:
        raise DecodeError(f"{attr(sequence)} item has no {attr('LUTData')}")
    if lut.size < entries:
        raise DecodeError(f"{attr(sequence)}: {attr('LUTData')} has fewer entries than its {attr('LUTDescriptor')} says")
    return lut[:entries]


def _little_endian(ds) -> bool:
    return getattr(ds, "original_encoding", (None, True))[1] is not False


def _rescale(ds) -> tuple[float, float]:
    """(Rescale Slope, Rescale Intercept); absent or empty means 1 and 0."""
    present = [ds.get(kw) not in (None, "") for kw in ("RescaleSlope", "RescaleIntercept")]
    slope = _number(ds.RescaleSlope, "RescaleSlope") if present[0] else 1.0
    intercept = _number(ds.RescaleIntercept, "RescaleIntercept") if present[1] else 0.0
    return slope, intercept


def modality_lut(raw: np.ndarray, ds) -> tuple[np.ndarray, float | None]:
    """Stored values -> modality values (float32), and the output maximum of a Modality LUT
    Sequence when one was used (its entries' bit depth), else None."""
    values = raw.astype(np.float32, copy=False)
    if "ModalityLUTSequence" in ds and len(ds.ModalityLUTSequence):
        item = ds.ModalityLUTSequence[0]
        entries, first, bits = _descriptor(item, "ModalityLUTSequence")
        lut = _lut_data(item, entries, "ModalityLUTSequence", _little_endian(ds))
        index = np.clip(np.rint(values) - first, 0, lut.size - 1).astype(np.int64)
        return lut.astype(np.float32)[index], float(2**bits - 1)
    slope, intercept = _rescale(ds)
    if slope == 0:
        raise DecodeError(f"{attr('RescaleSlope')} is zero (every pixel would have the same value)")
    if slope == 1 and intercept == 0:
        return values, None
    return values * np.float32(slope) + np.float32(intercept), None


def _stored_range(ds) -> tuple[float, float]:
    """Bits Stored and Pixel Representation were validated by dicom_header.check_is_radiograph."""
    allocated = int(ds.BitsAllocated)
    bits = int(ds.get("BitsStored", allocated) or allocated)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing straight to [0, 1]."""
    if function == "SIGMOID":
        with np.errstate(over="ignore"):  # exp overflows to inf far from the centre: 1/(1+inf) = 0
            return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width == 1.0:  # width 1 is a threshold (C.11.2.1.2.1): x <= c - 0.5 is black
        return (values > center - 0.5).astype(np.float32)
    return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def voi(values: np.ndarray, ds, lut_max: float | None) -> tuple[np.ndarray, str]:
    """Modality values -> [0, 1] by the VOI LUT, else the first window, else the stored bit range."""
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        # Indexed here rather than with pydicom's apply_voi_lut, whose index array takes the LUT's
        # dtype: with 8-bit entries over 12-bit input, inputs above 255 would wrap around.
        item = ds.VOILUTSequence[0]
        entries, first, bits = _descriptor(item, "VOILUTSequence")
        lut = _lut_data(item, entries, "VOILUTSequence", _little_endian(ds))
        index = np.clip(np.rint(values) - first, 0, lut.size - 1).astype(np.int64)
        return lut.astype(np.float32)[index] / np.float32(2**bits - 1), "lut"
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _number(ds.WindowCenter, "WindowCenter"), _number(ds.WindowWidth, "WindowWidth")
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        function = function if function in ("LINEAR", "LINEAR_EXACT", "SIGMOID") else "LINEAR"
        if width < 1.0 if function == "LINEAR" else width <= 0.0:
            raise DecodeError(f"{attr('WindowWidth')} must be {'at least 1' if function == 'LINEAR' else 'positive'} "
                              f"for VOI LUT Function {function}")
        return _window(values, center, width, function), f"window {function.lower()}"
    if lut_max is not None:  # a Modality LUT's output range is that of its entries
        low, high = 0.0, lut_max
    else:
        low, high = _stored_range(ds)
        slope, intercept = _rescale(ds)
        low, high = sorted((low * slope + intercept, high * slope + intercept))
    return (values - np.float32(low)) / np.float32(max(high - low, 1e-6)), "bit range"


def inverted(ds) -> bool:
    """Presentation LUT Shape decides when present (INVERSE / IDENTITY); otherwise MONOCHROME1
    means the minimum is white. The rule highdicom and dcm4che apply; a DX that is MONOCHROME1
    with INVERSE (as its IOD requires) is inverted once."""
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    if shape in ("INVERSE", "IDENTITY"):
        return shape == "INVERSE"
    return str(ds.PhotometricInterpretation).strip().upper() == "MONOCHROME1"


def to_display(raw: np.ndarray, ds) -> tuple[np.ndarray, str]:
    """Stored pixel values -> float32 [0, 1] as displayed, and how the VOI was chosen."""
    values, lut_max = modality_lut(raw, ds)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        pixels, how = voi(values, ds, lut_max)
    if not np.isfinite(pixels).all():
        raise DecodeError("pixel values are not finite after the Modality LUT / VOI transform (NaN or infinity)")
    pixels = np.clip(pixels, 0.0, 1.0).astype(np.float32)
    if inverted(ds):
        pixels = 1.0 - pixels
    return pixels, how
