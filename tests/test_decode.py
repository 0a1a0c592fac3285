"""Decoding real chest radiographs (DICOM, PNG, JPEG) to grayscale [0, 1], and refusing the rest.

Every input is a real radiograph from samples/, either as shipped or re-encoded / given an
edited header in tmp_path by `tests/corpus.py`.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

from cxr_edge.decode import decode_file
from cxr_edge.errors import DecodeError
from cxr_edge.preprocess import PreprocessParams, preprocess

from . import corpus
from .conftest import SAMPLES, need_tool

_CACHE: dict = {}


def decoded(*parts: str):
    """decode_file on a real file in samples/ (see corpus.path), cached for the module (J2K is slow)."""
    path = corpus.path(parts)
    if path not in _CACHE:
        _CACHE[path] = decode_file(path)
    return _CACHE[path]


def refusal(path, **kw) -> str:
    with pytest.raises(DecodeError) as info:
        decode_file(path, **kw)
    assert info.value.stage == "decode"
    return info.value.reason


# --- real DICOM --------------------------------------------------------------------------------

EXPECTED_INFO = {
    corpus.NEMA_CR_J2K: dict(modality="CR", photometric="MONOCHROME1", rows=1955, columns=1841, bits=15,
                             transfer_syntax="JPEG 2000 Image Compression", voi="window linear"),
    corpus.RSNA_MONO2: dict(modality="CR", photometric="MONOCHROME2", rows=1024, columns=1024, bits=8,
                            transfer_syntax="JPEG Baseline (Process 1)", voi="bit range"),
    corpus.RSNA_MONO1_HEADER: dict(modality="CR", photometric="MONOCHROME1", rows=1024, columns=1024,
                                   bits=8, transfer_syntax="JPEG Baseline (Process 1)", voi="bit range"),
    corpus.CANINE_DX: dict(modality="DX", photometric="MONOCHROME1", rows=169, columns=211, bits=8,
                           transfer_syntax="Explicit VR Little Endian", voi="window linear"),
}


@pytest.mark.parametrize("parts", corpus.REAL_DICOMS, ids=lambda p: p[-1])
def test_real_dicom_decodes_to_unit_float32(parts):
    image = decoded(*parts)
    expected = EXPECTED_INFO[parts]
    assert image.format == "dicom"
    assert image.pixels.dtype == np.float32 and image.pixels.ndim == 2
    assert image.pixels.shape == (expected["rows"], expected["columns"])
    assert image.pixels.flags["C_CONTIGUOUS"]
    assert np.isfinite(image.pixels).all()
    assert 0.0 <= image.pixels.min() and image.pixels.max() <= 1.0
    assert image.pixels.std() > 0.1  # a real image, not a flat field
    for key, value in expected.items():
        assert image.info[key] == value, key
    # The header travels (for the SR) without the pixels.
    assert image.dicom_header is not None and "PixelData" not in image.dicom_header
    assert image.dicom_header.Modality == expected["modality"]


def _strips(pixels: np.ndarray) -> tuple[float, float, float]:
    """Medians of the central (spine/mediastinum) and two lateral (lung) strips, 35-60% height.

    Chosen by looking at the decoded images: at that height the 45-55% column strip is heart /
    spine on every PA chest here, 20-32% and 68-80% are mid-lung fields.
    """
    h, w = pixels.shape
    band = pixels[int(0.35 * h): int(0.60 * h)]

    def med(a, b):
        return float(np.median(band[:, int(a * w): int(b * w)]))

    return med(0.45, 0.55), med(0.20, 0.32), med(0.68, 0.80)


@pytest.mark.parametrize("parts", [corpus.NEMA_CR_J2K, corpus.RSNA_MONO2, corpus.NIH_RGBA, corpus.NIH_L_1],
                         ids=lambda p: p[-1])
def test_real_chest_looks_like_a_chest(parts):
    """Lungs dark, mediastinum/spine bright: catches a missed or doubled MONOCHROME1 inversion."""
    centre, left, right = _strips(decoded(*parts).pixels)
    # Measured margins are 0.23 (NEMA J2K), 0.35 (RSNA), 0.31 and 0.27 (NIH); inverted is < -0.2.
    assert centre > left + 0.15 and centre > right + 0.15, (centre, left, right)
    assert left < 0.7 and right < 0.7  # aerated lung is not white


def test_rsna_mono1_header_is_the_exact_inverse_of_mono2():
    """Same JPEG bytes, header MONOCHROME1 vs MONOCHROME2: a correct decoder inverts one of them.
    (The MONOCHROME1 file is the RSNA sample with only that header value changed: tests/corpus.py.)

    The foundation issue says the two files "must give the same tensor". That does not hold for
    this data: the pixel data is byte-identical (checked below) and only the header's
    PhotometricInterpretation differs, so by PS3.3 C.7.6.3.1.2 the MONOCHROME1 file *means* the
    inverted picture (minimum = white). A decoder that gave the same tensor would be ignoring
    PhotometricInterpretation, i.e. would show every real MONOCHROME1 CR (like the NEMA one)
    negative. The mono1_header file is therefore a negative chest: it fails the chest-shape check.
    """
    m1_path, m2_path = corpus.path(corpus.RSNA_MONO1_HEADER), corpus.path(corpus.RSNA_MONO2)
    assert corpus.read(m1_path).PixelData == corpus.read(m2_path).PixelData
    m1, m2 = decoded(*corpus.RSNA_MONO1_HEADER).pixels, decoded(*corpus.RSNA_MONO2).pixels
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6, rtol=0)
    centre, left, right = _strips(m1)
    assert centre < left and centre < right  # a negative chest, as its header says

    params = PreprocessParams(size=64, resize="pad", mean=0.5, std=0.25, channels=1)
    t1, t2 = preprocess(m1, params), preprocess(m2, params)
    assert not np.allclose(t1, t2, atol=0.1)
    # Square input (no padding) and a linear resize: with mean 0.5, t(1 - x) = -t(x).
    np.testing.assert_allclose(t1, -t2, atol=1e-4, rtol=0)


def test_canine_dx_window_and_inverse_presentation_lut():
    """MONOCHROME1 + PresentationLUTShape INVERSE + window 128/256: inverted exactly once, windowed."""
    path = corpus.path(corpus.CANINE_DX)
    ds = corpus.read(path)
    assert ds.PresentationLUTShape == "INVERSE" and ds.PhotometricInterpretation == "MONOCHROME1"
    raw = ds.pixel_array.astype(np.float64)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    expected = 1.0 - np.clip((raw - (c - 0.5)) / (w - 1.0) + 0.5, 0.0, 1.0)  # PS3.3 C.11.2.1.2.1
    image = decoded(*corpus.CANINE_DX)
    assert image.info["voi"] == "window linear"
    np.testing.assert_allclose(image.pixels, expected, atol=1e-6)
    # Air around the dog is dark (one inversion, not two): the top and bottom edges; the body
    # in between is not.
    p = image.pixels
    assert np.median(p[:8]) < 0.1 and np.median(p[-15:]) < 0.1
    assert np.median(p[40:60, 60:160]) > 0.3


def test_window_from_header_is_applied(tmp_path):
    """The canine DX with a narrower window: output follows that window, not the bit range."""
    src = corpus.path(corpus.CANINE_DX)
    ds = corpus.read(src)
    ds.WindowCenter, ds.WindowWidth = 160, 100
    path = corpus.save(ds, tmp_path / "narrow.dcm")
    raw = ds.pixel_array.astype(np.float64)
    expected = 1.0 - np.clip((raw - 159.5) / 99.0 + 0.5, 0.0, 1.0)
    image = decode_file(path)
    np.testing.assert_allclose(image.pixels, expected, atol=1e-6)
    assert (image.pixels == 0).mean() > 0.05 and (image.pixels == 1).mean() > 0.05  # clipped both ends


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID"])
def test_voi_lut_functions(tmp_path, function):
    src = corpus.path(corpus.RSNA_MONO2)
    v12 = corpus.real_12bit(src)
    c, w = 2000.0, 1500.0
    ds = corpus.dx_dataset(corpus.path(corpus.CANINE_DX), v12, bits_stored=12,
                           WindowCenter=c, WindowWidth=w, VOILUTFunction=function)
    image = decode_file(corpus.save(ds, tmp_path / "f.dcm"))
    x = v12.astype(np.float64)
    if function == "LINEAR_EXACT":
        expected = np.clip((x - c) / w + 0.5, 0, 1)
    else:
        expected = 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    assert image.info["voi"] == f"window {function.lower()}"
    np.testing.assert_allclose(image.pixels, expected, atol=1e-5)


# --- transfer syntaxes -----------------------------------------------------------------------


def _syntaxes():
    from pydicom import uid

    return [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.ExplicitVRBigEndian,
            uid.RLELossless, uid.JPEGLSLossless, uid.JPEG2000Lossless]


@pytest.mark.parametrize("syntax", _syntaxes(), ids=lambda s: s.name)
@pytest.mark.parametrize("source", ["canine_dx_8bit", "rsna_12bit"])
def test_lossless_transfer_syntaxes_give_identical_pixels(tmp_path, syntax, source):
    if source == "canine_dx_8bit":
        original = corpus.path(corpus.CANINE_DX)
    else:  # 12 bits stored in 16 allocated, 128x96 (non-square): exercises the 16-bit codec paths
        v12 = corpus.real_12bit(corpus.path(corpus.RSNA_MONO2))
        original = corpus.save(corpus.dx_dataset(corpus.path(corpus.CANINE_DX), v12, bits_stored=12),
                               tmp_path / "orig.dcm")
    reference = decode_file(original)
    path = corpus.reencode(original, tmp_path / "re.dcm", syntax)
    image = decode_file(path)
    assert image.info["transfer_syntax"] == syntax.name
    assert image.pixels.shape == reference.pixels.shape
    np.testing.assert_array_equal(image.pixels, reference.pixels)
    assert {k: image.info[k] for k in ("voi", "photometric", "bits")} == \
        {k: reference.info[k] for k in ("voi", "photometric", "bits")}


@pytest.mark.parametrize("option,syntax_uid", [("+e1", "1.2.840.10008.1.2.4.70"), ("+el", "1.2.840.10008.1.2.4.57")])
def test_jpeg_lossless_process_14(tmp_path, option, syntax_uid):
    """JPEG Lossless (process 14): pydicom bundles no grayscale file in this syntax (its only one,
    SC_rgb_jpeg_gdcm.dcm, is an RGB secondary capture), so dcmtk's dcmcjpeg encodes the real
    12-bit chest here; skipped where dcmtk is not installed."""
    import subprocess

    tool = need_tool("dcmcjpeg")
    v12 = corpus.real_12bit(corpus.path(corpus.RSNA_MONO2))
    original = corpus.save(corpus.dx_dataset(corpus.path(corpus.CANINE_DX), v12, bits_stored=12), tmp_path / "o.dcm")
    out = tmp_path / "jll.dcm"
    subprocess.run([tool, option, str(original), str(out)], check=True, capture_output=True)
    assert str(corpus.read(out).file_meta.TransferSyntaxUID) == syntax_uid
    image = decode_file(out)
    np.testing.assert_array_equal(image.pixels, decode_file(original).pixels)
    np.testing.assert_allclose(image.pixels, v12 / 4095.0, atol=1e-6)


def test_bits_stored_scales_by_stored_range(tmp_path):
    """12 bits stored in 16 allocated, no window: 4095 is white (not 65535)."""
    v12 = corpus.real_12bit(corpus.path(corpus.RSNA_MONO2))
    assert v12.max() > 3000  # real data uses the range
    ds = corpus.dx_dataset(corpus.path(corpus.CANINE_DX), v12, bits_stored=12)
    image = decode_file(corpus.save(ds, tmp_path / "b12.dcm"))
    assert image.info["voi"] == "bit range" and image.info["bits"] == 12
    np.testing.assert_allclose(image.pixels, v12 / 4095.0, atol=1e-6)


def test_bits_above_high_bit_are_ignored(tmp_path):
    """Bits above HighBit are not part of the pixel value (PS3.5 8.1.1); overlays once lived there."""
    v12 = corpus.real_12bit(corpus.path(corpus.RSNA_MONO2))
    ds = corpus.dx_dataset(corpus.path(corpus.CANINE_DX), v12 | 0xF000, bits_stored=12)
    image = decode_file(corpus.save(ds, tmp_path / "junk_high_bits.dcm"))
    np.testing.assert_allclose(image.pixels, v12 / 4095.0, atol=1e-6)


def test_bits_stored_monochrome1(tmp_path):
    v12 = corpus.real_12bit(corpus.path(corpus.RSNA_MONO2))
    ds = corpus.dx_dataset(corpus.path(corpus.CANINE_DX), 4095 - v12, bits_stored=12, photometric="MONOCHROME1")
    image = decode_file(corpus.save(ds, tmp_path / "m1.dcm"))
    np.testing.assert_allclose(image.pixels, v12 / 4095.0, atol=1e-6)


def test_modality_lut_rescale_then_bit_range(tmp_path):
    """RescaleSlope/Intercept without a window: the rescaled stored range maps to [0, 1]."""
    v12 = corpus.real_12bit(corpus.path(corpus.RSNA_MONO2))
    ds = corpus.dx_dataset(corpus.path(corpus.CANINE_DX), v12, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1000)
    image = decode_file(corpus.save(ds, tmp_path / "rescale.dcm"))
    np.testing.assert_allclose(image.pixels, v12 / 4095.0, atol=1e-6)


def test_modality_lut_then_window(tmp_path):
    """The window is in rescaled (modality) units: it must be applied after RescaleSlope/Intercept."""
    v12 = corpus.real_12bit(corpus.path(corpus.RSNA_MONO2))
    slope, intercept, c, w = 2.0, -1000.0, 3000.0, 4000.0
    ds = corpus.dx_dataset(corpus.path(corpus.CANINE_DX), v12, bits_stored=12, RescaleSlope=slope,
                           RescaleIntercept=intercept, WindowCenter=c, WindowWidth=w)
    image = decode_file(corpus.save(ds, tmp_path / "rescale_window.dcm"))
    expected = np.clip((v12 * slope + intercept - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    assert image.info["voi"] == "window linear"
    np.testing.assert_allclose(image.pixels, expected, atol=1e-5)
    # and it differs from the window applied to raw stored values (the bug this would catch)
    wrong = np.clip((v12 - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    assert np.abs(image.pixels - wrong).max() > 0.2


def test_signed_pixels_use_the_signed_stored_range(tmp_path):
    """PixelRepresentation 1, 12 bits stored: -2048 is black and 2047 white."""
    v12 = corpus.real_12bit(corpus.path(corpus.RSNA_MONO2))
    signed = (v12.astype(np.int32) - 2048).astype(np.int16)
    ds = corpus.dx_dataset(corpus.path(corpus.CANINE_DX), signed.view(np.uint16), bits_stored=12)
    ds.PixelRepresentation = 1
    image = decode_file(corpus.save(ds, tmp_path / "signed.dcm"))
    np.testing.assert_allclose(image.pixels, v12 / 4095.0, atol=1e-6)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_window_width_one_is_a_threshold(tmp_path):
    v12 = corpus.real_12bit(corpus.path(corpus.RSNA_MONO2))
    c = float(int(np.median(v12))) + 0.5  # the median pixel value equals c - 0.5
    ds = corpus.dx_dataset(corpus.path(corpus.CANINE_DX), v12, bits_stored=12, WindowCenter=c, WindowWidth=1)
    image = decode_file(corpus.save(ds, tmp_path / "threshold.dcm"))
    assert np.isfinite(image.pixels).all()
    np.testing.assert_array_equal(image.pixels, (v12 > c - 0.5).astype(np.float32))  # x <= c - 0.5 -> 0


def _sqrt_lut(bits: int) -> np.ndarray:
    return np.round(np.sqrt(np.arange(4096) / 4095.0) * (2**bits - 1)).astype(np.uint16)


@pytest.mark.parametrize("lut_bits", [16, 12])
def test_voi_lut_sequence(tmp_path, lut_bits):
    """A VOI LUT Sequence (here a square-root curve over 12-bit input) wins over a window."""
    v12 = corpus.real_12bit(corpus.path(corpus.RSNA_MONO2))
    lut = _sqrt_lut(lut_bits)
    ds = corpus.dx_dataset(corpus.path(corpus.CANINE_DX), v12, bits_stored=12, WindowCenter=100, WindowWidth=10)
    ds.VOILUTSequence = [corpus.voi_lut_item(lut, 0, lut_bits)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pydicom: "VOI LUT on a float input array"
        image = decode_file(corpus.save(ds, tmp_path / "voilut.dcm"))
    assert image.info["voi"] == "lut"
    np.testing.assert_allclose(image.pixels, lut[v12] / (2.0**lut_bits - 1), atol=1e-6)


def test_voi_lut_sequence_with_first_mapped_offset(tmp_path):
    """Inputs below the first mapped value take the first entry, above the last take the last."""
    v12 = corpus.real_12bit(corpus.path(corpus.RSNA_MONO2))
    first, n = 1000, 2048
    lut = np.linspace(0, 65535, n).round().astype(np.uint16)
    ds = corpus.dx_dataset(corpus.path(corpus.CANINE_DX), v12, bits_stored=12)
    ds.VOILUTSequence = [corpus.voi_lut_item(lut, first, 16)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        image = decode_file(corpus.save(ds, tmp_path / "voilut_offset.dcm"))
    expected = lut[np.clip(v12.astype(int) - first, 0, n - 1)] / 65535.0
    np.testing.assert_allclose(image.pixels, expected, atol=1e-6)


def test_voi_lut_sequence_8bit_entries(tmp_path):
    """LUT Descriptor (4096, 0, 8): 8 bits per entry is explicitly allowed (PS3.3 C.11.2.1.1)."""
    v12 = corpus.real_12bit(corpus.path(corpus.RSNA_MONO2))
    lut = _sqrt_lut(8)
    ds = corpus.dx_dataset(corpus.path(corpus.CANINE_DX), v12, bits_stored=12)
    ds.VOILUTSequence = [corpus.voi_lut_item(lut, 0, 8)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        image = decode_file(corpus.save(ds, tmp_path / "voilut8.dcm"))
    np.testing.assert_allclose(image.pixels, lut[v12] / 255.0, atol=1e-6)


def test_dicom_without_preamble_decodes(tmp_path):
    """A raw dataset (no 128-byte preamble / DICM) named .dcm is still read."""
    import pydicom

    ds = corpus.read(corpus.path(corpus.CANINE_DX))
    ds.preamble = None
    path = tmp_path / "nopreamble.dcm"
    pydicom.dcmwrite(path, ds, enforce_file_format=False)
    assert path.read_bytes()[128:132] != b"DICM"
    np.testing.assert_array_equal(decode_file(path).pixels, decoded(*corpus.CANINE_DX).pixels)


def test_format_comes_from_content_not_name(tmp_path):
    dcm_as_png = tmp_path / "really_dicom.png"
    dcm_as_png.write_bytes(corpus.path(corpus.CANINE_DX).read_bytes())
    assert decode_file(dcm_as_png).format == "dicom"
    png_as_dcm = tmp_path / "really_png.dcm"
    corpus.nih_small(corpus.path(corpus.NIH_L_1), 64).save(png_as_dcm, "PNG")
    assert decode_file(png_as_dcm).format == "png"


# --- PNG / JPEG -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raster_set(tmp_path_factory):
    gray = corpus.nih_small(corpus.path(corpus.NIH_L_1), 256)
    return np.asarray(gray, dtype=np.float32) / 255.0, corpus.raster_variants(gray, tmp_path_factory.mktemp("raster"))


# (mode PIL reports, format, max abs error, mean abs error) vs the 8-bit L decode
RASTER_EXPECT = {
    "L": ("L", "png", 0.0, 0.0),
    "I16": ("I;16", "png", 1e-6, 1e-7),  # v * 257 / 65535 == v / 255
    "LA": ("LA", "png", 0.0, 0.0),
    "RGB": ("RGB", "png", 0.0, 0.0),  # R = G = B: luma is the same value
    "RGBA": ("RGBA", "png", 0.0, 0.0),
    "P": ("P", "png", 0.0, 0.0),  # an L image as palette: 256 grey entries, lossless
    "JPEG": ("L", "jpeg", 0.12, 0.01),  # quality 95, lossy
}


@pytest.mark.parametrize("name", list(RASTER_EXPECT))
def test_raster_variants_decode_to_the_same_gray(raster_set, name):
    reference, paths = raster_set
    mode, fmt, max_err, mean_err = RASTER_EXPECT[name]
    image = decode_file(paths[name])
    assert image.format == fmt and image.info["mode"] == mode
    assert image.pixels.dtype == np.float32 and image.pixels.shape == (256, 256)
    assert 0.0 <= image.pixels.min() and image.pixels.max() <= 1.0
    err = np.abs(image.pixels - reference)
    assert err.max() <= max_err + 1e-7 and err.mean() <= mean_err + 1e-7, (err.max(), err.mean())
    if name == "I16":
        assert image.info["bits"] == 16


def test_sixteen_bit_png_keeps_precision(tmp_path):
    """Values between 8-bit steps survive: a 16-bit PNG is not squeezed through 8 bits."""
    from PIL import Image

    gray = np.asarray(corpus.nih_small(corpus.path(corpus.NIH_L_1), 64), dtype=np.uint16)
    v16 = gray * 257 + 100  # off the 257 grid
    Image.fromarray(v16).save(tmp_path / "v16.png")
    image = decode_file(tmp_path / "v16.png")
    np.testing.assert_allclose(image.pixels, v16 / 65535.0, atol=1e-6)


def test_rgb_uses_luma(tmp_path):
    """A tinted real image: RGB -> L uses ITU-R 601 luma, not one channel."""
    from PIL import Image

    gray = np.asarray(corpus.nih_small(corpus.path(corpus.NIH_L_1), 64), dtype=np.float64)
    rgb = np.stack([gray, gray * 0.5, gray * 0.25], axis=-1).round().astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "tinted.png")
    image = decode_file(tmp_path / "tinted.png")
    luma = (rgb[..., 0] * 299.0 + rgb[..., 1] * 587.0 + rgb[..., 2] * 114.0) / 1000.0
    np.testing.assert_allclose(image.pixels * 255.0, luma, atol=1.0)


def test_real_rgba_nih_file():
    image = decoded(*corpus.NIH_RGBA)
    assert image.info["mode"] == "RGBA" and image.format == "png"
    assert image.pixels.shape == (1024, 1024) and image.pixels.dtype == np.float32
    from PIL import Image

    with Image.open(corpus.path(corpus.NIH_RGBA)) as im:
        red = np.asarray(im)[..., 0]
    np.testing.assert_allclose(image.pixels, red / 255.0, atol=1e-6)  # R = G = B, alpha opaque


@pytest.mark.parametrize("parts", corpus.NIH_PNGS, ids=lambda p: p[-1])
def test_nih_png_info(parts):
    image = decoded(*parts)
    assert image.info["rows"] == 1024 and image.info["columns"] == 1024 and image.info["bits"] == 8
    assert image.dicom_header is None


# --- refusals ---------------------------------------------------------------------------------


def _testdata(name: str):
    from pydicom.data import get_testdata_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom does not bundle {name} here")
    return path


@pytest.mark.parametrize("name,phrase", [
    ("CT_small.dcm", "modality CT is not accepted for chest analysis (accepted: CR, DX, RG)"),
    ("MR_small.dcm", "modality MR is not accepted for chest analysis"),
    ("DICOMDIR", "DICOMDIR"),
    ("test-SR.dcm", "no pixel data: the object is Comprehensive SR Storage, not an image"),
    ("reportsi.dcm", "no pixel data: the object is Basic Text SR Storage, not an image"),
    ("waveform_ecg.dcm", "no pixel data"),
    ("SC_rgb_jpeg_gdcm.dcm", "modality OT is not accepted for chest analysis"),
])
def test_refuses_non_radiograph_dicom(name, phrase):
    assert phrase in refusal(_testdata(name))


def test_refuses_sr_written_by_pydicom(tmp_path):
    """A minimal Basic Text SR (no pixels) built here, independent of pydicom's bundled files."""
    path = corpus.minimal_dicom(tmp_path / "sr.dcm", "1.2.840.10008.5.1.4.1.1.88.11", "SR", ValueType="CONTAINER")
    assert "no pixel data: the object is Basic Text SR Storage, not an image" in refusal(path)


def test_refuses_multiframe(tmp_path):
    ds = corpus.read(corpus.path(corpus.CANINE_DX))
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    assert "multi-frame image (2 frames)" in refusal(corpus.save(ds, tmp_path / "mf.dcm"))


def test_refuses_colour(tmp_path):
    ds = corpus.read(corpus.path(corpus.CANINE_DX))
    gray = ds.pixel_array
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = np.repeat(gray[..., None], 3, axis=-1).tobytes()
    assert re.search(r"colour image \(RGB, 3 samples", refusal(corpus.save(ds, tmp_path / "rgb.dcm")))


def test_refuses_dicom_decompression_bomb_before_decoding(tmp_path, monkeypatch):
    """Rows = Columns = 60000 in a real header: refused from the header, pixels never decoded."""
    from pydicom.dataset import Dataset

    ds = corpus.read(corpus.path(corpus.CANINE_DX))
    ds.Rows = ds.Columns = 60000
    path = corpus.save(ds, tmp_path / "bomb.dcm")

    def no_decoding(self):
        raise AssertionError("pixel data decoded before the size check")

    monkeypatch.setattr(Dataset, "pixel_array", property(no_decoding))
    reason = refusal(path)
    assert "60000x60000 = 3600000000 pixels, above the limit" in reason
    # and the limit is the caller's: a small real image above a small max_pixels
    assert "above the limit of 1000" in refusal(corpus.path(corpus.CANINE_DX), max_pixels=1000)


def test_refuses_png_above_max_pixels(tmp_path):
    path = tmp_path / "small.png"
    corpus.nih_small(corpus.path(corpus.NIH_L_1), 256).save(path)
    assert "256x256 = 65536 pixels, above the limit of 65535" in refusal(path, max_pixels=65535)
    assert decode_file(path, max_pixels=65536).pixels.shape == (256, 256)


def test_refuses_png_header_bomb(tmp_path):
    """An IHDR claiming 60000x60000 with a few bytes of data is refused without allocating it."""
    path = corpus.png_header_only(tmp_path / "bomb.png", 60000, 60000)
    reason = refusal(path)
    assert "3600000000 pixels" in reason and "limit" in reason


def test_refuses_truncated_png(tmp_path):
    full = tmp_path / "full.png"
    corpus.nih_small(corpus.path(corpus.NIH_L_1), 256).save(full)
    half = corpus.cut(full, tmp_path / "half.png", full.stat().st_size // 2)
    assert "corrupt or truncated PNG" in refusal(half)


def test_refuses_truncated_jpeg(tmp_path):
    full = tmp_path / "full.jpg"
    corpus.nih_small(corpus.path(corpus.NIH_L_1), 256).save(full, "JPEG", quality=90)
    half = corpus.cut(full, tmp_path / "half.jpg", full.stat().st_size // 2)
    assert "corrupt or truncated JPEG" in refusal(half)


@pytest.mark.parametrize("parts", [corpus.RSNA_MONO2, corpus.NEMA_CR_J2K, corpus.CANINE_DX], ids=lambda p: p[-1])
def test_refuses_dicom_cut_in_half(tmp_path, parts):
    src = corpus.path(parts)
    half = corpus.cut(src, tmp_path / "half.dcm", src.stat().st_size // 2)
    reason = refusal(half)
    # encapsulated (JPEG / J2K): pydicom hits EOF in the fragments; native: fewer bytes than
    # Rows x Columns x BitsAllocated needs.
    assert re.search(r"truncated|less than expected", reason), reason


@pytest.mark.parametrize("where", ["Rows", "PixelData"])
def test_refuses_dicom_cut_in_header(tmp_path, where):
    src = corpus.path(corpus.CANINE_DX)
    path = corpus.cut(src, tmp_path / "cut.dcm", corpus.element_offset(src, where) + 2)
    reason = refusal(path)
    assert "truncated" in reason, reason


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_refuses_dicom_cut_inside_sop_class_uid(tmp_path):
    src = corpus.path(corpus.CANINE_DX)
    path = corpus.cut(src, tmp_path / "cut.dcm", corpus.element_offset(src, "SOPClassUID") + 12)
    assert "truncated" in refusal(path)


@pytest.mark.parametrize("name,content,phrase", [
    ("notes.dcm", b"Patient chest X-ray, see attached.\n" * 20, "not a DICOM file"),
    ("empty.dcm", b"", "empty file (0 bytes)"),
    ("empty.png", b"", "empty file (0 bytes)"),
    ("random.dcm", None, "not a DICOM file"),
    ("random.bin", None, "not a DICOM, PNG or JPEG file"),
    ("text.png", b"this is not a PNG\n", "not a DICOM, PNG or JPEG file"),
    ("fake.jpg", b"\xff\xd8\xff\xe0" + b"\x00" * 60, "corrupt or truncated JPEG"),
    ("fake.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, "corrupt or truncated PNG"),
])
def test_refuses_garbage(tmp_path, name, content, phrase):
    if content is None:
        content = np.random.default_rng(7).bytes(4096)
    path = tmp_path / name
    path.write_bytes(content)
    assert phrase in refusal(path)


def test_refuses_missing_file_permanently_at_the_read_stage(tmp_path):
    from cxr_edge.errors import PERMANENT, InputError

    with pytest.raises(InputError) as info:
        decode_file(tmp_path / "nope.dcm")
    assert (info.value.stage, info.value.kind) == ("read", PERMANENT)
    assert "cannot read file" in info.value.reason


def test_a_cut_file_is_incomplete_and_garbage_is_permanent(tmp_path):
    """The daemon retries `incomplete` while a file is young (it may still be arriving)."""
    from cxr_edge.errors import INCOMPLETE, PERMANENT

    data = (SAMPLES / "dicom" / "rsna_cr_pa_jpeg_baseline_mono2.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.dcm").write_text("not an image\n" * 10)
    png = (SAMPLES / "nih" / "00000100_000.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    for name, kind in (("cut.dcm", INCOMPLETE), ("cut.png", INCOMPLETE), ("text.dcm", PERMANENT)):
        with pytest.raises(DecodeError) as info:
            decode_file(tmp_path / name)
        assert info.value.kind == kind, (name, info.value.reason)
