"""Decode a chest radiograph (DICOM, PNG or JPEG) to grayscale float32 in [0, 1], 1 = bright.

Everything refused raises `DecodeError` with a specific reason. The decoded image carries the
DICOM header (without pixel data) so the SR writer can reference the source.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DecodeError, InputError, os_error_kind
from .limits import DEFAULT_MAX_PIXELS, MIN_CONTRAST, MIN_SIDE  # noqa: F401 (re-exported)


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


def decode_file(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 0) -> DecodedImage:
    """Decode one file; refuse it (DecodeError) when it is not an image we can analyse."""
    path = Path(path)
    size = require_regular_file(path)
    if size == 0:
        raise DecodeError("empty file (0 bytes)")
    kind = sniff_format(path)
    if kind in ("png", "jpeg"):
        image = decode_raster(path, kind, max_pixels)
    else:
        try:
            image = decode_dicom(path, max_pixels, has_preamble=kind == "dicom")
        except DecodeError as exc:
            # a raw dataset (no preamble) may have any name; other unparseable files are not ours
            named_dicom = path.suffix.lower() in (".dcm", ".dicom", ".dic", "") or path.name == "DICOMDIR"
            if kind is None and not named_dicom and exc.reason.startswith("not a DICOM file"):
                raise DecodeError("not a DICOM, PNG or JPEG file (unrecognised content)") from exc
            raise
    check_content(image.pixels, min_side)
    return image


def require_regular_file(path: Path) -> int:
    """The file's size; refuses what is not a regular file (after symlinks): reading a FIFO blocks
    for ever and a device such as /dev/zero never ends."""
    import stat

    try:
        info = path.stat()
    except OSError as exc:  # a missing file is permanent; a permission or I/O error may clear
        raise InputError("read", f"cannot read file: {exc.strerror}", os_error_kind(exc)) from exc
    if not stat.S_ISREG(info.st_mode):
        raise DecodeError("not a regular file (a FIFO, socket or device)" if not stat.S_ISDIR(info.st_mode)
                          else "a folder, not a file")
    return info.st_size


def check_content(pixels: np.ndarray, min_side: int = 0) -> None:
    """Refuse images too small to analyse and images without content (blank, constant)."""
    rows, cols = pixels.shape
    if min(rows, cols) < min_side:
        raise DecodeError(f"image is {cols}x{rows} pixels, below the minimum of {min_side} pixels a side")
    step = max(1, int(np.sqrt(rows * cols / 262_144)))  # percentiles of ~256k samples are plenty
    low, high = np.percentile(pixels[::step, ::step], (1, 99))
    if not high - low >= MIN_CONTRAST:
        raise DecodeError("no image content: the pixel values are constant or nearly so "
                          f"(1st-99th percentile range below {MIN_CONTRAST:.0%} of the display range)")


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
        # PIL's messages quote the file's path (folder names are often patients' names)
        message = str(exc).replace(str(path), "the file").replace(path.name, "the file")
        raise DecodeError(f"corrupt or truncated {kind.upper()}: {message}", incomplete=True) from exc
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


# --- DICOM ---------------------------------------------------------------------------------


def decode_dicom(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS, has_preamble: bool = True) -> DecodedImage:
    from .codestream import check_frame_size
    from .dicom_decoders import stored_pixels
    from .dicom_display import to_display
    from .dicom_header import check_is_radiograph, modality_of, read_dataset, transfer_syntax_name

    ds = read_dataset(path, has_preamble, max_pixels)
    check_is_radiograph(ds, max_pixels)
    check_frame_size(ds, max_pixels)  # the encoded frame's own size, before a decoder allocates it
    raw = stored_pixels(ds, path)
    if raw.ndim != 2 or raw.shape != (int(ds.Rows), int(ds.Columns)):
        raise DecodeError("decoded pixel array does not have the shape Rows x Columns of one grayscale frame")
    pixels, voi = to_display(raw, ds)
    header = ds.copy()
    del header.PixelData  # the SR needs the header only; don't ship pixels between processes
    info = {
        "rows": int(ds.Rows),
        "columns": int(ds.Columns),
        "bits": int(ds.get("BitsStored", 0) or 0),
        "photometric": str(ds.PhotometricInterpretation).strip(),
        "modality": modality_of(ds),
        "transfer_syntax": transfer_syntax_name(ds),
        "voi": voi,
    }
    return DecodedImage(pixels=pixels, format="dicom", info=info, dicom_header=header)
