"""Stored pixel values of one DICOM frame, from the first decoder that can read it.

For compressed syntaxes pydicom's plugins are tried in a fixed order (pylibjpeg with libjpeg /
openjpeg / rle, pyjpegls, pydicom's own RLE, Pillow), so the decoded values, and with them the
preprocessing contract, never depend on which optional packages happen to be installed. GDCM comes
last and runs in a child process: pydicom's GDCM plugin refuses 12-bit JPEG Extended (Process
2/4) outright and libjpeg fails on some real 12-bit streams (pydicom's own JPEG-lossy.dcm) that
GDCM decodes exactly as dcmtk does, but GDCM aborts the whole process on some malformed input
(an uncaught C++ exception), and a decoder must not take its caller down with it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from .dicom_header import transfer_syntax_name
from .errors import DecodeError

PLUGIN_ORDER = ("pylibjpeg", "pyjpegls", "pydicom", "pillow")
GDCM_TIMEOUT_S = 120

# Runs in the child: decode with GDCM's own reader, print "rows cols dtype" then the raw bytes.
_GDCM_CHILD = r"""
import sys
import gdcm
for switch in (gdcm.Trace.WarningOff, gdcm.Trace.ErrorOff, gdcm.Trace.DebugOff):
    switch()
reader = gdcm.ImageReader()
reader.SetFileName(sys.argv[1])
if not reader.Read():
    sys.exit(3)
image = reader.GetImage()
fmt = image.GetPixelFormat()
dtype = {(8, 0): "u1", (8, 1): "i1", (16, 0): "<u2", (16, 1): "<i2", (32, 0): "<u4", (32, 1): "<i4"}.get(
    (fmt.GetBitsAllocated(), fmt.GetPixelRepresentation()))
if dtype is None or fmt.GetSamplesPerPixel() != 1:
    sys.exit(4)
# The SWIG binding returns the buffer as a str; surrogateescape gives back the raw bytes.
data = image.GetBuffer().encode("utf-8", errors="surrogateescape")
sys.stdout.buffer.write(f"{image.GetDimension(1)} {image.GetDimension(0)} {dtype}\n".encode() + data)
"""


def stored_pixels(ds, path: Path) -> np.ndarray:
    """The frame's stored values (before any LUT), or a DecodeError naming the syntax."""
    syntax = ds.file_meta.TransferSyntaxUID
    if not syntax.is_compressed:
        rows, cols, bits = int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated)
        if len(ds.PixelData) < (rows * cols * bits + 7) // 8:
            raise DecodeError("truncated pixel data: fewer bytes than Rows x Columns x Bits Allocated need",
                              incomplete=True)
        try:
            return ds.pixel_array
        except Exception as exc:
            raise DecodeError(f"cannot read native pixel data ({transfer_syntax_name(ds) or 'unknown transfer syntax'}): "
                              f"{_short(exc)}") from exc
    from pydicom.pixels.decoders.base import get_decoder

    failures = []
    try:
        decoder = get_decoder(syntax)
        plugins = [name for name in PLUGIN_ORDER if name in decoder.available_plugins]
    except Exception:  # pydicom has no decoder for this syntax
        plugins = []
    for name in plugins:
        try:
            array, _ = decoder.as_array(ds, decoding_plugin=name)
            return array
        except Exception as exc:
            failures.append(f"{name}: {type(exc).__name__}")
    try:
        return _gdcm_pixels(path)
    except Exception as exc:
        failures.append(f"gdcm: {exc}")
    # Decoder messages can quote header values, so the reason carries only which decoder failed how.
    raise DecodeError(f"cannot decode pixel data ({transfer_syntax_name(ds) or 'an unknown transfer syntax'}): "
                      f"no decoder could read it ({'; '.join(failures)})")


def _short(exc: Exception) -> str:
    """pydicom's native-data messages say what is wrong with the data's length; keep their first
    clause only if it quotes nothing (no quotes, no header text)."""
    text = str(exc).split("\n")[0]
    if "'" in text or '"' in text or len(text) > 160:
        return type(exc).__name__
    return text


def _gdcm_pixels(path: Path) -> np.ndarray:
    import importlib.util

    if importlib.util.find_spec("gdcm") is None:
        raise RuntimeError("not installed (pip install python-gdcm)")
    try:
        done = subprocess.run([sys.executable, "-c", _GDCM_CHILD, str(path)], capture_output=True,
                              timeout=GDCM_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"no result within {GDCM_TIMEOUT_S} s") from None
    if done.returncode != 0:
        raise RuntimeError("failed" if done.returncode > 0 else "crashed")
    header, _, data = done.stdout.partition(b"\n")
    rows, cols, dtype = header.decode().split()
    rows, cols = int(rows), int(cols)
    return np.frombuffer(data, dtype=dtype)[: rows * cols].reshape(rows, cols).copy()
