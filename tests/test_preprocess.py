"""The preprocessing contract (cxr-preprocess v1): parameters, geometry, normalisation, goldens.

The golden file tests/golden/preprocess_v1.json pins what v1 produces on the real chest files in
samples/ (tests/corpus.py). A change to those numbers is a change of the contract: bump CONTRACT_VERSION
(and name the golden file after it) instead of regenerating v1, or every model trained on v1
silently gets different inputs. Regenerate (only for a new version, or after adding a file):

    CXR_EDGE_REGEN_GOLDEN=1 python -m pytest -q tests/test_preprocess.py -k golden
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from cxr_edge.decode import decode_file
from cxr_edge.preprocess import CONTRACT_NAME, CONTRACT_VERSION, PreprocessParams, preprocess

from . import corpus

GOLDEN = Path(__file__).parent / "golden" / f"preprocess_v{CONTRACT_VERSION}.json"
GOLDEN_PARAMS = PreprocessParams(size=112, resize="pad", mean=0.5, std=0.25, channels=1)
GOLDEN_FILES = corpus.REAL_DICOMS + corpus.NIH_PNGS
GRID = 8
TOLERANCE = 1e-3


# --- parameters and the manifest --------------------------------------------------------------


def test_manifest_round_trip():
    params = PreprocessParams(size=320, resize="crop", mean=0.45, std=0.3, channels=3)
    entry = params.to_manifest()
    assert entry["contract"] == CONTRACT_NAME == "cxr-preprocess"
    assert entry["version"] == CONTRACT_VERSION == 1
    assert {k: entry[k] for k in ("size", "resize", "mean", "std", "channels")} == \
        {"size": 320, "resize": "crop", "mean": 0.45, "std": 0.3, "channels": 3}
    assert PreprocessParams.from_manifest(json.loads(json.dumps(entry))) == params


def test_manifest_defaults_fill_missing_fields():
    entry = {"contract": CONTRACT_NAME, "version": CONTRACT_VERSION, "size": 64}
    assert PreprocessParams.from_manifest(entry) == PreprocessParams(size=64)


@pytest.mark.parametrize("change", [
    {"contract": "imagenet-preprocess"},
    {"version": CONTRACT_VERSION + 1},
    {"version": str(CONTRACT_VERSION)},
    {"contract": None},
])
def test_manifest_refuses_other_contracts(change):
    entry = {**PreprocessParams().to_manifest(), **change}
    with pytest.raises(ValueError, match=f"implements {CONTRACT_NAME} v{CONTRACT_VERSION}"):
        PreprocessParams.from_manifest(entry)


def test_manifest_without_contract_is_refused():
    with pytest.raises(ValueError):
        PreprocessParams.from_manifest({"size": 224})


@pytest.mark.parametrize("kwargs", [
    {"resize": "zoom"}, {"size": 4}, {"channels": 2}, {"std": 0.0}, {"std": -1.0},
])
def test_invalid_params_are_refused(kwargs):
    with pytest.raises(ValueError):
        PreprocessParams(**kwargs)


def test_preprocess_refuses_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        preprocess(np.zeros((3, 16, 16), np.float32), PreprocessParams(size=16))


# --- geometry ---------------------------------------------------------------------------------

P = dict(mean=0.5, std=0.25)  # white -> +2, black -> -2
WHITE, BLACK = 2.0, -2.0


def test_pad_wide_image_gets_black_bars_top_and_bottom():
    image = np.ones((100, 200), np.float32)  # wide, all white
    out = preprocess(image, PreprocessParams(size=64, resize="pad", **P))[0]
    # padded to 200x200 with the image in rows 50..149 -> rows 16..47 of 64 (scale 3.125)
    assert np.all(out[:15] == BLACK) and np.all(out[-15:] == BLACK)
    np.testing.assert_allclose(out[17:47], WHITE, atol=1e-5)
    np.testing.assert_allclose(out[:, :], out[:, ::-1], atol=1e-5)  # symmetric, nothing cut left/right


def test_pad_tall_image_gets_black_bars_left_and_right():
    image = np.ones((200, 100), np.float32)
    out = preprocess(image, PreprocessParams(size=64, resize="pad", **P))[0]
    assert np.all(out[:, :15] == BLACK) and np.all(out[:, -15:] == BLACK)
    np.testing.assert_allclose(out[:, 17:47], WHITE, atol=1e-5)


def test_crop_keeps_the_centre():
    image = np.zeros((100, 300), np.float32)
    image[:, 100:200] = 1.0  # only the central square is white
    out = preprocess(image, PreprocessParams(size=32, resize="crop", **P))[0]
    np.testing.assert_allclose(out, WHITE, atol=1e-5)
    tall = image.T.copy()
    np.testing.assert_allclose(preprocess(tall, PreprocessParams(size=32, resize="crop", **P))[0], WHITE, atol=1e-5)


def test_stretch_keeps_everything_and_the_orientation():
    image = np.zeros((100, 300), np.float32)
    image[:, 150:] = 1.0  # right half white
    image[:20, :150] = 0.5  # a grey band in the top-left
    out = preprocess(image, PreprocessParams(size=60, resize="stretch", **P))[0]
    np.testing.assert_allclose(out[:, 31:], WHITE, atol=1e-5)
    np.testing.assert_allclose(out[13:, :29], BLACK, atol=1e-5)  # grey band is the top 20%: rows 0..11
    np.testing.assert_allclose(out[:11, :29], 0.0, atol=1e-5)


def test_orientation_is_preserved_on_a_real_chest():
    """No transpose or flip: the preprocessed image correlates with the input, not its mirror."""
    import cv2

    image = decode_file(corpus.path(corpus.CANINE_DX)).pixels  # 169x211, not symmetric
    out = preprocess(image, PreprocessParams(size=64, resize="stretch", **P))[0]
    ref = (cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA) - 0.5) / 0.25

    def corr(a, b):
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    assert corr(out, ref) > 0.999
    assert corr(out, ref[::-1]) < 0.9 and corr(out, ref[:, ::-1]) < 0.9 and corr(out, ref.T) < 0.9


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("resize", ["pad", "crop", "stretch"])
@pytest.mark.parametrize("shape", [(169, 211), (40, 30), (64, 64)])
def test_output_dtype_and_shape(channels, resize, shape):
    image = np.random.default_rng(0).random(shape, dtype=np.float64)  # float64 input is accepted
    out = preprocess(image, PreprocessParams(size=48, resize=resize, channels=channels, **P))
    assert out.dtype == np.float32 and out.shape == (channels, 48, 48)
    assert out.flags["C_CONTIGUOUS"]
    for c in range(1, channels):
        np.testing.assert_array_equal(out[c], out[0])
    # whatever the interpolation (cubic overshoots when enlarging), the range stays [0, 1] before normalising
    assert out.min() >= BLACK - 1e-6 and out.max() <= WHITE + 1e-6


def test_input_is_not_modified():
    image = np.random.default_rng(1).random((50, 70)).astype(np.float32)
    before = image.copy()
    preprocess(image, PreprocessParams(size=32, resize="pad"))
    np.testing.assert_array_equal(image, before)


def test_enlarging_a_sharp_edge_is_clipped_to_unit_range():
    """Cubic upsampling rings on edges; the contract clips to [0, 1] before normalising."""
    image = np.zeros((16, 16), np.float32)
    image[:, 8:] = 1.0
    out = preprocess(image, PreprocessParams(size=128, resize="pad", mean=0.0, std=1.0))[0]
    assert out.min() == 0.0 and out.max() == 1.0


# --- normalisation ----------------------------------------------------------------------------


@pytest.mark.parametrize("value,mean,std", [(0.3, 0.5, 0.25), (0.3, 0.3, 0.1), (1.0, 0.485, 0.229), (0.0, 0.5, 0.5)])
@pytest.mark.parametrize("resize", ["pad", "crop", "stretch"])
def test_normalisation_is_exact_on_a_constant_image(value, mean, std, resize):
    image = np.full((90, 90), value, np.float32)  # square: no padding
    out = preprocess(image, PreprocessParams(size=32, resize=resize, mean=mean, std=std, channels=3))
    expected = (np.float32(value) - np.float32(mean)) / np.float32(std)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


def test_pad_value_is_black_before_normalisation():
    """Padding is 0 (air) in [0, 1] space, i.e. -mean/std after normalisation, whatever mean/std."""
    image = np.full((20, 80), 0.7, np.float32)
    out = preprocess(image, PreprocessParams(size=40, resize="pad", mean=0.4, std=0.2))[0]
    np.testing.assert_allclose(out[0], (0.0 - 0.4) / 0.2, atol=1e-6)
    np.testing.assert_allclose(out[20], (0.7 - 0.4) / 0.2, atol=1e-5)


# --- golden: the contract on real files ---------------------------------------------------------


def _summary(tensor: np.ndarray) -> dict:
    plane = tensor[0].astype(np.float64)
    side = plane.shape[0] // GRID
    grid = plane.reshape(GRID, side, GRID, side).mean(axis=(1, 3))  # area downsample
    return {
        "mean": round(float(plane.mean()), 4),
        "std": round(float(plane.std()), 4),
        "grid": np.round(grid, 4).tolist(),
    }


def _key(parts) -> str:
    return "/".join(parts)


def regenerate_golden() -> dict:
    """Writes tests/golden/preprocess_v{CONTRACT_VERSION}.json from the real files."""
    entries = {}
    for parts in GOLDEN_FILES:
        path = corpus.path(parts)
        entries[_key(parts)] = _summary(preprocess(decode_file(path).pixels, GOLDEN_PARAMS))
    golden = {
        "about": ("cxr-preprocess contract pinned on real files in samples/ (tests/corpus.py): tensor mean, std "
                  f"and a {GRID}x{GRID} area-downsampled grid, rounded to 4 decimals. A change here is "
                  "a contract version bump, not a regeneration."),
        "params": GOLDEN_PARAMS.to_manifest(),
        "files": entries,
    }
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(golden, indent=1)
    text = re.sub(r"\[\s+([-0-9.,\s]+?)\s+\]", lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)
    GOLDEN.write_text(text + "\n")
    return golden


@pytest.fixture(scope="module")
def golden():
    if os.environ.get("CXR_EDGE_REGEN_GOLDEN") == "1":
        return regenerate_golden()
    if not GOLDEN.exists():
        pytest.fail(f"{GOLDEN} is missing; generate it with CXR_EDGE_REGEN_GOLDEN=1 (new contract version only)")
    return json.loads(GOLDEN.read_text())


def test_golden_params_are_the_pinned_ones(golden):
    assert PreprocessParams.from_manifest(golden["params"]) == GOLDEN_PARAMS
    assert set(golden["files"]) == {_key(p) for p in GOLDEN_FILES}


@pytest.mark.parametrize("parts", GOLDEN_FILES, ids=lambda p: p[-1])
def test_golden_preprocess_on_real_files(golden, parts):
    tensor = preprocess(decode_file(corpus.path(parts)).pixels, GOLDEN_PARAMS)
    assert tensor.shape == (1, 112, 112) and tensor.dtype == np.float32
    got, want = _summary(tensor), golden["files"][_key(parts)]
    assert got["mean"] == pytest.approx(want["mean"], abs=TOLERANCE)
    assert got["std"] == pytest.approx(want["std"], abs=TOLERANCE)
    diff = np.abs(np.asarray(got["grid"]) - np.asarray(want["grid"]))
    assert diff.max() <= TOLERANCE, f"grid differs by up to {diff.max():.4f} at {np.unravel_index(diff.argmax(), diff.shape)}"


def test_golden_grid_looks_like_a_chest(golden):
    """The pinned numbers themselves are sane: centre column brighter than the lung columns
    at mid height for every real PA chest (guards against pinning an inverted image)."""
    for parts in (corpus.NEMA_CR_J2K, corpus.RSNA_MONO2) + corpus.NIH_PNGS:
        grid = np.asarray(golden["files"][_key(parts)]["grid"])
        mid = grid[3:5]
        assert mid[:, 3:5].mean() > mid[:, 1:3].mean() and mid[:, 3:5].mean() > mid[:, 5:7].mean(), _key(parts)
    m1 = np.asarray(golden["files"][_key(corpus.RSNA_MONO1_HEADER)]["grid"])
    m2 = np.asarray(golden["files"][_key(corpus.RSNA_MONO2)]["grid"])
    np.testing.assert_allclose(m1, -m2, atol=2e-4)  # see test_decode: the header-only MONOCHROME1 is the inverse
