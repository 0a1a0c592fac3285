"""Test inputs generated into tmp_path from the real chest images in samples/.

Nothing here is synthetic noise: every image is a real radiograph (the canine DX, the RSNA CR,
an NIH PNG), re-encoded, rescaled or given an edited header so one decode path is exercised.
The constants name files under samples/ (present in every clone); `path(...)` gives their
location, and makes the one derived file (the RSNA CR with only its header's
PhotometricInterpretation changed) on first use.
"""

from __future__ import annotations

import atexit
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np

from .conftest import SAMPLES

CANINE_DX = ("dicom", "canine_thorax_dx_mono1_small.dcm")
NEMA_CR_J2K = ("dicom", "nema_wg04_rg1_cr_j2k_mono1.dcm")
RSNA_MONO2 = ("dicom", "rsna_cr_pa_jpeg_baseline_mono2.dcm")
# Derived (see path()): the RSNA file with its header saying MONOCHROME1, the pixel data untouched.
RSNA_MONO1_HEADER = ("derived", "rsna_cr_pa_jpeg_baseline_mono1_header.dcm")
REAL_DICOMS = (NEMA_CR_J2K, RSNA_MONO2, RSNA_MONO1_HEADER, CANINE_DX)
NIH_RGBA = ("nih", "00000100_000.png")  # RGBA, as NIH ships it
NIH_L_1 = ("nih", "00001873_000.png")  # mode L
NIH_L_2 = ("nih", "00005067_000.png")  # mode L
NIH_PNGS = (NIH_RGBA, NIH_L_1, NIH_L_2)

_DERIVED: list[Path] = []


def path(parts: tuple[str, ...]) -> Path:
    """Where the real file named by `parts` (one of the constants above) is."""
    if parts[0] != "derived":
        found = SAMPLES.joinpath(*parts)
        assert found.is_file(), f"{found} is missing from samples/"
        return found
    assert parts == RSNA_MONO1_HEADER, parts
    if not _DERIVED:
        folder = Path(tempfile.mkdtemp(prefix="cxr-edge-corpus-"))
        atexit.register(shutil.rmtree, folder, True)
        ds = read(path(RSNA_MONO2))
        ds.PhotometricInterpretation = "MONOCHROME1"
        _DERIVED.append(folder / parts[-1])
        ds.save_as(_DERIVED[0], enforce_file_format=True)
    return _DERIVED[0]

# Header elements that describe how stored values map to display; removed before a test sets
# exactly the ones it exercises.
_VOI_AND_MODALITY = (
    "WindowCenter", "WindowWidth", "WindowCenterWidthExplanation", "VOILUTFunction",
    "VOILUTSequence", "RescaleSlope", "RescaleIntercept", "RescaleType", "PresentationLUTShape",
    "ModalityLUTSequence",
)


def read(path: Path):
    import pydicom

    return pydicom.dcmread(path)


def real_12bit(rsna_path: Path, shape: tuple[int, int] = (128, 96)) -> np.ndarray:
    """The RSNA CR (real chest) area-downsampled to `shape` (rows, cols), rescaled to 12 bits.

    Non-square on purpose (rows != columns catches swapped Rows/Columns).
    """
    import cv2

    u8 = read(rsna_path).pixel_array.astype(np.float32)
    small = cv2.resize(u8, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
    return np.round(small / 255.0 * 4095.0).astype(np.uint16)


def dx_dataset(template_path: Path, pixels: np.ndarray, bits_stored: int | None = None,
               photometric: str = "MONOCHROME2", **elements):
    """A real DX header (from `template_path`) carrying `pixels`, uncompressed, no VOI/modality LUT.

    `pixels` is uint8 (BitsAllocated 8) or uint16 (BitsAllocated 16); extra keyword arguments
    are set as DICOM keywords afterwards (RescaleSlope=2, WindowCenter=..., ...).
    """
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = read(template_path)
    for keyword in _VOI_AND_MODALITY:
        if keyword in ds:
            del ds[keyword]
    allocated = 8 if pixels.dtype == np.uint8 else 16
    stored = bits_stored or allocated
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 1
    ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, stored, stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2" if allocated == 16 else np.uint8).tobytes()
    ds["PixelData"].VR = "OW" if allocated == 16 else "OB"
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def save(ds, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def encoder_for(syntax) -> str:
    """pydicom's encoder plugin for `syntax`, never GDCM: with python-gdcm installed pydicom
    prefers it for RLE, and GDCM aborts the process on some images (an uncaught C++ exception
    in its RLE codec on the canine DX). RLE: pylibjpeg-rle; JPEG-LS: pyjpegls; J2K: openjpeg."""
    from pydicom.pixels.encoders.base import get_encoder

    plugins = get_encoder(syntax).available_plugins
    return next(name for name in ("pylibjpeg", "pyjpegls", "pydicom") if name in plugins)


def reencode(src: Path, dst: Path, syntax) -> Path:
    """`src` re-saved in transfer syntax `syntax` (compressed ones via pydicom's encoders)."""
    from pydicom.uid import ExplicitVRBigEndian

    ds = read(src)
    if syntax.is_compressed:
        ds.compress(syntax, encoding_plugin=encoder_for(syntax))
        return save(ds, dst)
    if syntax == ExplicitVRBigEndian:
        import pydicom

        arr = ds.pixel_array
        if ds.BitsAllocated > 8:
            ds.PixelData = arr.astype(">u2").tobytes()
        ds.file_meta.TransferSyntaxUID = syntax
        pydicom.dcmwrite(dst, ds, implicit_vr=False, little_endian=False, force_encoding=True)
        return dst
    ds.file_meta.TransferSyntaxUID = syntax
    return save(ds, dst)


def voi_lut_item(lut: np.ndarray, first_mapped: int, bits: int):
    """A VOI LUT Sequence item (PS3.3 C.11.2) with `lut` as LUTData (VR US)."""
    from pydicom.dataset import Dataset

    item = Dataset()
    item.LUTDescriptor = [len(lut) if len(lut) < 65536 else 0, first_mapped, bits]
    item.LUTData = [int(v) for v in lut]
    item["LUTData"].VR = "US"
    return item


def nih_small(png_path: Path, side: int = 256) -> "object":
    """The NIH PNG as an 8-bit 'L' PIL image, box-downscaled to side x side."""
    from PIL import Image

    with Image.open(png_path) as image:
        gray = image.convert("L") if image.mode != "L" else image.copy()
    return gray.resize((side, side), Image.Resampling.BOX)


def raster_variants(gray, folder: Path) -> dict[str, Path]:
    """The same real 8-bit image as L, I;16, LA, RGB, RGBA, P PNGs and a JPEG."""
    from PIL import Image

    arr = np.asarray(gray, dtype=np.uint8)
    alpha = Image.new("L", gray.size, 255)
    out = {}

    def put(name, image, fmt="PNG", **kw):
        path = folder / name
        image.save(path, fmt, **kw)
        out[name.split(".")[0]] = path

    put("L.png", gray)
    put("I16.png", Image.fromarray(arr.astype(np.uint16) * 257))  # 16-bit, same values
    put("LA.png", Image.merge("LA", (gray, alpha)))
    put("RGB.png", Image.merge("RGB", (gray, gray, gray)))
    put("RGBA.png", Image.merge("RGBA", (gray, gray, gray, alpha)))
    put("P.png", gray.convert("P"))
    put("JPEG.jpg", gray, "JPEG", quality=95)
    return out


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR claims width x height but holds almost no data (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    return path


def cut(src: Path, dst: Path, n_bytes: int) -> Path:
    dst.write_bytes(src.read_bytes()[:n_bytes])
    return dst


def element_offset(path: Path, keyword: str) -> int:
    """Byte offset of the start of top-level element `keyword`'s tag in the file."""
    import pydicom
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    data = path.read_bytes()
    needle = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    offset = data.find(needle, 132)
    assert offset > 0, f"{keyword} not found in {path}"
    # sanity: pydicom agrees the element is there
    assert keyword in pydicom.dcmread(path, stop_before_pixels=True) or keyword == "PixelData"
    return offset


def minimal_dicom(path: Path, sop_class_uid: str, modality: str, **attributes) -> Path:
    """A DICOM file with no pixels: the SOP class, a fresh instance UID, the modality and
    `attributes`, written with its file meta (a non-image object the decoder must refuse)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality = modality
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path
