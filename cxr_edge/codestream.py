"""The real size of an encapsulated frame, read from its codestream before anything decodes it.

The JPEG / JPEG-LS / JPEG 2000 decoders behind pydicom allocate what the codestream's own size
marker says, not what Rows/Columns say: a header that under-states a frame passes the Rows x
Columns limit in decode.py and the decoder then allocates gigabytes. So the first frame's header
is parsed here, from the encapsulated fragments in place (nothing is decoded or copied beyond the
few bytes each marker needs), and compared with the limit and with Rows/Columns.

Reasons name the marker and DICOM attributes and carry only dimensions and counts.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from collections.abc import Iterator

from pydicom.uid import JPEGLSTransferSyntaxes, RLELossless

from .errors import DecodeError

# SOFn markers; C4 (DHT), C8 (reserved JPG) and CC (DAC) share the range but are not frame headers.
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_LS_SOF55 = 0xF7
# Markers with no length field (PS3 / ISO 10918-1 B.1.1.3): TEM and RSTn.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"  # the JP2 signature box (I.5.1)
# Real files reach their size marker within a few dozen segments / boxes; the cap keeps a file of
# megabytes of fill bytes or empty segments from costing seconds of Python before it is refused.
_MAX_STEPS = 10_000


@dataclass(frozen=True)
class FrameSize:
    codec: str  # "JPEG", "JPEG-LS", "JPEG 2000"
    source: str  # where the size came from: "SOF marker", "SOF55 marker", "SIZ marker", "JP2 ihdr box"
    width: int
    height: int  # 0 in a JPEG SOF: to be defined by a DNL marker after the first scan
    components: int
    precision: int | None = None  # bits per sample in a JPEG / JPEG-LS frame header


class _Cut(Exception):
    """The frame's bytes ended before the parser found what it needed."""


class _Frame:
    """The first frame's bytes, pulled fragment by fragment only as far as the parser reads.

    Fragments stay memoryviews of the Pixel Data: a frame split over many fragments is read
    across their boundaries without joining them (a joined 20 MB frame would be a 20 MB copy).
    """

    def __init__(self, fragments: Iterator[memoryview]):
        self._fragments = fragments
        self._pieces: list[tuple[int, memoryview]] = []
        self._end = 0

    def read(self, offset: int, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            pos = offset + len(out)
            while pos >= self._end:
                piece = next(self._fragments, None)
                if piece is None:
                    raise _Cut
                self._pieces.append((self._end, piece))
                self._end += len(piece)
            for start, piece in reversed(self._pieces):
                if start <= pos:
                    out += piece[pos - start: pos - start + n - len(out)]
                    break
        return bytes(out)


def _first_frame_fragments(pixel_data, n_frames: int) -> Iterator[memoryview]:
    """The fragments of frame 1 (PS3.5 A.4): after the Basic Offset Table item, up to frame 2."""
    buf = memoryview(pixel_data)
    pos, index, frame_2_at = 0, 0, None
    while pos + 8 <= len(buf):
        group, element, length = struct.unpack_from("<HHL", buf, pos)
        if (group, element) == (0xFFFE, 0xE0DD):  # sequence delimiter
            return
        if (group, element) != (0xFFFE, 0xE000) or length == 0xFFFFFFFF:
            raise DecodeError(f"the encapsulated Pixel Data is malformed: no valid item at byte {pos}")
        value = buf[pos + 8: pos + 8 + length]  # a short last item is kept short: read() sees the cut
        pos += 8 + length
        if index == 0:  # the Basic Offset Table: offsets from its end to each frame's first item
            if n_frames > 1 and len(value) >= 8:
                frame_2_at = pos + struct.unpack_from("<L", value, 4)[0]
        else:
            yield value
            # With several frames and no offsets, frame 1 is taken to be one fragment (as
            # pydicom does when fragments == frames); a single-frame image owns every fragment.
            if n_frames > 1 and (frame_2_at is None or pos >= frame_2_at):
                return
        index += 1


def _jpeg(frame: _Frame) -> FrameSize:
    """ISO 10918-1 / 14495-1: walk marker segments from SOI to the first SOFn or SOF55."""
    pos = 2
    for _ in range(_MAX_STEPS):
        head = frame.read(pos, 2)
        if head[0] != 0xFF:
            raise DecodeError(f"the JPEG codestream is malformed: no marker at byte {pos}, before its SOF marker")
        marker = head[1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        pos += 2
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (0xD8, 0xD9, 0xDA):  # a second SOI, EOI or scan data before any frame header
            raise DecodeError("the JPEG codestream has no SOF marker before its image data")
        (length,) = struct.unpack(">H", frame.read(pos, 2))
        if length < 2:
            raise DecodeError(f"the JPEG codestream is malformed: a marker segment of length {length}")
        if marker in _JPEG_SOF or marker == _JPEG_LS_SOF55:
            if length < 8:
                raise DecodeError(f"the JPEG codestream is malformed: a frame header of length {length}")
            precision, height, width, components = struct.unpack(">BHHB", frame.read(pos + 2, 6))
            if marker == _JPEG_LS_SOF55:
                return FrameSize("JPEG-LS", "SOF55 marker", width, height, components, precision)
            return FrameSize("JPEG", "SOF marker", width, height, components, precision)
        pos += length
    raise DecodeError(f"the JPEG codestream has no SOF marker in its first {_MAX_STEPS} marker segments")


def _j2k_siz(frame: _Frame, at: int) -> FrameSize:
    """ISO 15444-1 A.5.1: SIZ directly follows SOC; the image area is (Xsiz-XOsiz) x (Ysiz-YOsiz)."""
    if frame.read(at, 4) != b"\xff\x4f\xff\x51":
        raise DecodeError("the JPEG 2000 codestream is malformed: SOC is not followed by its SIZ marker")
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">LLLL", frame.read(at + 8, 16))
    (csiz,) = struct.unpack(">H", frame.read(at + 40, 2))
    if xsiz <= xosiz or ysiz <= yosiz:
        raise DecodeError("the JPEG 2000 codestream is malformed: its SIZ marker gives an empty image area")
    return FrameSize("JPEG 2000", "SIZ marker", xsiz - xosiz, ysiz - yosiz, csiz)


def _jp2(frame: _Frame) -> list[FrameSize]:
    """ISO 15444-1 Annex I: a JP2 file (some writers put one in DICOM). The decoder allocates from
    the SIZ of the contiguous codestream box, so that is checked as well as the ihdr box."""
    found: list[FrameSize] = []
    pos = 0
    for _ in range(_MAX_STEPS):
        length, kind = struct.unpack(">L4s", frame.read(pos, 8))
        header = 8
        if length == 1:  # 64-bit XLBox
            (length,) = struct.unpack(">Q", frame.read(pos + 8, 8))
            header = 16
        if kind == b"jp2c":
            return found + [_j2k_siz(frame, pos + header)]
        if kind == b"jp2h":  # superbox: its first child is ihdr (I.5.3)
            sub_length, sub_kind = struct.unpack(">L4s", frame.read(pos + header, 8))
            if sub_kind != b"ihdr" or sub_length < 22:
                raise DecodeError("the JP2 header box does not start with an image header (ihdr) box")
            height, width, components = struct.unpack(">LLH", frame.read(pos + header + 8, 10))
            found.append(FrameSize("JPEG 2000", "JP2 ihdr box", width, height, components))
        if length == 0:  # box runs to the end: no codestream box follows
            return found
        if length < header:
            raise DecodeError(f"the JP2 file is malformed: a box of length {length}")
        pos += length
    raise DecodeError(f"the JP2 file has no codestream box in its first {_MAX_STEPS} boxes")


def _rle(frame: _Frame) -> None:
    """PS3.5 G.3.1: the 64-byte header. No dimensions there (the decoder sizes its output from
    Rows/Columns), only a segment count that must be 1..15."""
    (segments,) = struct.unpack("<L", frame.read(0, 4))
    frame.read(0, 64)
    if not 1 <= segments <= 15:
        raise DecodeError(f"the RLE frame header gives {segments} segments (1 to 15 are possible)")


def frame_sizes(pixel_data, transfer_syntax: str, n_frames: int = 1) -> list[FrameSize]:
    """What the first frame's codestream says about its size; [] when its format is not known here.

    Raises DecodeError for a codestream that is malformed or cut before its size marker.
    """
    frame = _Frame(_first_frame_fragments(pixel_data, n_frames))
    kind = ("RLE" if transfer_syntax == RLELossless
            else "JPEG-LS" if transfer_syntax in JPEGLSTransferSyntaxes else "JPEG")
    try:
        if transfer_syntax == RLELossless:
            _rle(frame)
            return []
        start = frame.read(0, 2)
        if start == b"\xff\xd8":
            return [_jpeg(frame)]
        kind = "JPEG 2000"
        if start == b"\xff\x4f":
            return [_j2k_siz(frame, 0)]
        if start == _JP2_SIGNATURE[:2] and frame.read(0, 12) == _JP2_SIGNATURE:
            return _jp2(frame)
        return []  # another codec (MPEG, JPEG XL, ...) or garbage: the decoder reports it
    except _Cut:
        if frame._end == 0:
            raise DecodeError("the first frame of the encapsulated Pixel Data is empty") from None
        raise DecodeError(
            f"the {kind} frame is cut short: its {frame._end} bytes end before its size marker", incomplete=True
        ) from None


def check_frame_size(ds, max_pixels: int) -> None:
    """Refuse an encapsulated frame whose codestream is larger than `max_pixels`, disagrees with
    Rows/Columns/SamplesPerPixel, or is cut before its size marker. Native pixel data is read as
    exactly Rows x Columns by pydicom, so it is not looked at."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_encapsulated or "PixelData" not in ds:
        return
    pixel_data = ds.PixelData
    if not isinstance(pixel_data, (bytes, bytearray, memoryview)):
        return  # a buffer pydicom has not read in; its decoders stream it themselves
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    rows, columns = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    for size in frame_sizes(pixel_data, str(syntax), n_frames):
        what, source = f"the {size.codec} frame", size.source
        if size.height == 0:
            # Height to come in a DNL marker. Measured: pylibjpeg-libjpeg then grows its buffer
            # until memory runs out (1.9 GB under a 2 GB cap for the 1024x1024 RSNA frame), and
            # IJG-based decoders (Pillow, dcmtk) refuse DNL anyway, so it cannot be bounded.
            raise DecodeError(f"{what} has height 0 in its {source} (set later by a DNL marker); "
                              f"its decoded size cannot be bounded before decoding (Rows says {rows})")
        pixels = size.width * size.height
        if pixels > max_pixels:
            raise DecodeError(f"{what} is {size.width}x{size.height} = {pixels} pixels (from its "
                              f"{source}), above the limit of {max_pixels}")
        if (size.width, size.height) != (columns, rows):
            raise DecodeError(f"{what} is {size.width}x{size.height} ({source}) but Columns/Rows "
                              f"say {columns}x{rows}")
        if size.components != samples:
            raise DecodeError(f"{what} has {size.components} components ({source}) but "
                              f"SamplesPerPixel is {samples}")
        allocated = int(ds.get("BitsAllocated", 0) or 0)
        if size.precision is not None and not 2 <= size.precision <= max(allocated, 8):
            # A stream with more bits per sample than the pixel cells hold decodes to other values
            # than the header describes (findings on garbage): refuse, as for a size mismatch.
            raise DecodeError(f"{what} has {size.precision}-bit samples ({source}) but Bits Allocated is {allocated}")
    _check_end_of_frame(pixel_data, str(syntax), n_frames)


def _check_end_of_frame(pixel_data, syntax: str, n_frames: int) -> None:
    """JPEG, JPEG-LS and JPEG 2000 codestreams end with FFD9 (EOI / EOC). libjpeg fills a frame cut
    short with grey and reports nothing, so a frame whose last fragment does not end so is refused.
    Fragments may be padded to even length with a NUL (PS3.5 A.4), some writers pad with FF."""
    if syntax == RLELossless:
        return
    last = None
    for last in _first_frame_fragments(pixel_data, n_frames):
        pass
    if last is None:
        return
    if not bytes(last[-16:]).rstrip(b"\x00\xff").endswith(b"\xff\xd9"):
        raise DecodeError("the compressed frame is cut short or corrupt: it does not end with its "
                          "end-of-image marker (EOI / EOC, FFD9)", incomplete=True)
