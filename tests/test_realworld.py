"""Every legal DICOM a hospital sends gives a result; what is not an image is refused by name.

The corpus (tests/realworld_corpus.py) is derived from the real samples with pydicom and dcmtk:
each class of the real-world DICOM issue once. Decoded one by one here, then all together through
`cxr-edge infer` as a user would run it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from cxr_edge.decode import MIN_SIDE, decode_file
from cxr_edge.errors import DecodeError

from . import realworld_corpus
from .conftest import need_tool


def strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    need_tool("dcmconv")
    need_tool("dcmcjpeg")
    folder = tmp_path_factory.mktemp("realworld") / "inbox"
    return folder, realworld_corpus.build(folder)


def _names():
    # the case names, without building (parametrize ids); kept in step with build() by a test
    return sorted([
        "charset_ir87.dcm", "charset_ir149.dcm", "charset_2022_ir100_single.dcm", "charset_gb18030.dcm",
        "charset_utf8.dcm", "birthdate_dashes.dcm", "malformed_values.dcm", "invalid_sop_uid.dcm",
        "raw_implicit_no_meta", "big_endian.dcm", "deflated.dcm", "jpeg_extended_12bit.dcm",
        "jpeg_lossy_12bit_gdcm.dcm", "mono2_presentation_inverse.dcm", "voi_lut_empty.dcm",
        "window_width_zero.dcm", "window_width_negative.dcm", "window_center_nan.dcm", "window_width_inf.dcm",
        "rescale_slope_nan.dcm", "rescale_slope_zero.dcm", "blank_1bit.dcm", "constant_16bit.dcm",
        "tiny_16x16.dcm", "frames_not_a_number.dcm", "xa.dcm", "rf.dcm", "acr_nema_ct", "report.pdf.dcm",
        "lying_jpeg_frame.dcm", "jpeg_frame_cut_short.dcm", "jpeg_precision_lie.dcm", "bits_stored_above_allocated.dcm",
        "pixel_representation_2.dcm", "photometric_lowercase.dcm", "modality_lut_short.dcm",
        "rescale_intercept_huge.dcm", "fifo.dcm", "dev_zero.dcm",
    ])


def test_case_list_matches_the_corpus(built):
    _, expected = built
    assert sorted(expected) == _names()


@pytest.mark.parametrize("name", _names())
def test_each_case_decodes_or_is_refused_by_name(built, name):
    folder, expected = built
    expectation = expected[name]
    if expectation[0] == "error":
        with pytest.raises(DecodeError) as info:
            decode_file(folder / name, min_side=MIN_SIDE)
        assert info.value.stage == expectation[1]
        assert expectation[2] in info.value.reason, info.value.reason
    else:
        image = decode_file(folder / name, min_side=MIN_SIDE)
        assert np.isfinite(image.pixels).all() and image.pixels.std() > 0.05


def _pixels(path):
    return decode_file(path).pixels


def test_other_encodings_give_the_same_pixels(built):
    folder, _ = built
    reference = _pixels(realworld_corpus.CANINE)
    for name in ("raw_implicit_no_meta", "big_endian.dcm", "deflated.dcm"):
        np.testing.assert_array_equal(_pixels(folder / name), reference, err_msg=name)
    assert decode_file(folder / "raw_implicit_no_meta").info["transfer_syntax"] == "Implicit VR Little Endian"
    assert decode_file(folder / "deflated.dcm").info["transfer_syntax"] == "Deflated Explicit VR Little Endian"


def test_presentation_lut_inverse_is_honoured(built, tmp_path):
    """MONOCHROME2 + INVERSE shows inverted; the canine DX (MONOCHROME1 + INVERSE, as the DX IOD
    requires) is inverted once, so both give the same picture; MONOCHROME2 alone is not inverted."""
    folder, _ = built
    original = _pixels(realworld_corpus.CANINE)
    np.testing.assert_allclose(_pixels(folder / "mono2_presentation_inverse.dcm"), original, atol=1e-6)
    plain = realworld_corpus._edited(realworld_corpus.CANINE, tmp_path / "m2.dcm",
                                     PhotometricInterpretation="MONOCHROME2", PresentationLUTShape=None)
    np.testing.assert_allclose(_pixels(plain), 1.0 - original, atol=1e-6)


def test_12bit_jpeg_extended_decodes_like_dcmtk(built, tmp_path):
    """libjpeg reads dcmtk's 12-bit stream; pydicom's JPEG-lossy.dcm it refuses, and GDCM (in a child
    process) decodes it to exactly what dcmtk's dcmdjpeg gives."""
    need_tool("dcmdjpeg")
    folder, _ = built
    for name in ("jpeg_extended_12bit.dcm", "jpeg_lossy_12bit_gdcm.dcm"):
        plain = tmp_path / f"{name}.plain.dcm"
        subprocess.run(["dcmdjpeg", str(folder / name), str(plain)], check=True, capture_output=True)
        image = decode_file(folder / name)
        assert image.info["transfer_syntax"] == "JPEG Extended (Process 2 and 4)"
        # GDCM (the second file) matches dcmtk exactly; libjpeg's IDCT may differ by 1 of 4095
        tolerance = 0 if "gdcm" in name else 1.0 / 4095 + 1e-7
        np.testing.assert_allclose(image.pixels, _pixels(plain), atol=tolerance, rtol=0, err_msg=name)


def test_infer_over_the_corpus(built, tmp_path):
    """One run over every case: exit 1 (some are refused), findings for every legal image, an SR
    for each unless its source cannot have one, a specific reason for every refusal, strict JSON."""
    import pydicom

    from cxr_edge.sr import read_sr_findings

    folder, expected = built
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "cxr_edge", "infer", str(folder), "--out", str(out), "--json"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    summary = strict_json(done.stdout)
    outcomes = {expected[name][0] for name in expected}
    assert summary["inputs"] == len(expected)
    assert summary["failed"] == sum(1 for e in expected.values() if e[0] == "error")
    assert summary["succeeded_without_sr"] == sum(1 for e in expected.values() if e[0] == "no_sr")
    assert outcomes == {"ok", "no_sr", "error"}
    for line in (out / "summary.jsonl").read_text().splitlines():
        strict_json(line)
    for name, expectation in expected.items():
        record = strict_json((out / "inbox" / f"{name}.json").read_text())
        if expectation[0] == "error":
            assert record["status"] == "error", name
            assert record["error"]["stage"] == expectation[1] and expectation[2] in record["error"]["reason"], record
            continue
        assert record["status"] == "ok", (name, record.get("error"))
        probabilities = [f["probability"] for f in record["findings"]] + [record["no_finding"]["probability"]]
        assert len(probabilities) == 15 and all(0.0 <= p <= 1.0 for p in probabilities)
        sr_path = out / "inbox" / f"{name}.sr.dcm"
        if expectation[0] == "no_sr":
            assert not sr_path.exists() and "sr" not in record["outputs"], name
            assert record["sr_error"]["stage"] == "sr" and expectation[1] in record["sr_error"]["reason"]
            continue
        assert "sr_error" not in record, (name, record.get("sr_error"))
        sr = pydicom.dcmread(sr_path)
        found = read_sr_findings(sr)
        # the SR shows three decimals: the JSON's (six) rounded, give or take the double rounding
        assert found.keys() == {f["label"] for f in record["findings"] + [record["no_finding"]]}
        for f in record["findings"] + [record["no_finding"]]:
            assert abs(found[f["label"]][0] - f["probability"]) <= 5e-4 + 1e-6, (name, f["label"])
            assert found[f["label"]][1] == f["positive"], (name, f["label"])
        source = pydicom.dcmread(folder / name, stop_before_pixels=True, force=True)
        if name.startswith("charset_"):  # the characters read back unchanged
            assert str(sr.PatientName) == str(source.PatientName), name


def test_a_deflate_bomb_is_refused_before_pydicom_inflates_it(tmp_path):
    """Deflated Explicit VR: pydicom inflates the whole dataset before any limit applies. A small
    file whose Pixel Data inflates past what the pixel limit allows is refused while inflating."""
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = pydicom.dcmread(realworld_corpus.CANINE)
    ds.PixelData = bytes(40 << 20)  # 40 MiB of zeros deflate to ~40 KiB
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "bomb.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert path.stat().st_size < 1 << 20
    with pytest.raises(DecodeError) as info:
        decode_file(path, max_pixels=1_000_000)  # inflated data allowed: 8 MB + 16 MiB of header slack
    assert "inflates to more than" in info.value.reason
