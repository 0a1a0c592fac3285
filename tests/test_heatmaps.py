"""Heatmaps (issue #13): class maps from the same inference pass, drawn through the model's
window on the image, written as PNG (every input) and DICOM Secondary Capture (DICOM inputs)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pydicom
import pytest
from onnx import TensorProto, helper, numpy_helper

from cxr_edge.engines.class_maps import CLASS_MAPS, add_class_maps, with_class_maps
from cxr_edge.errors import ModelPackageError
from cxr_edge.heatmap_sink import every_heatmap_path, label_slugs
from cxr_edge.heatmaps import heat_on_display, peak, relative_heat
from cxr_edge.labels import LABELS, NO_FINDING
from cxr_edge.manifest import ModelPackage, write_package_copy
from cxr_edge.preprocess import _square, model_window

from .conftest import SAMPLES, need_tool
from .test_infer import load_records, run_cli


# --- the maps -------------------------------------------------------------------------------------
def test_the_bundled_models_class_maps_average_to_its_logits():
    """The CAM is exact for an avg-pool linear head: the logit is the mean of the map, so the
    map decomposes the very number the finding is decided on."""
    from cxr_edge.backends import create_backend
    from cxr_edge.workers import tensors_for
    from cxr_edge.sources import discover

    package = ModelPackage.load()
    spec = package.heatmap_spec
    assert spec is not None and spec.method == "cam" and spec.grid == (8, 8)
    items, _ = discover([str(SAMPLES / "nih")])
    tensors = np.stack(tensors_for(items, package.preprocess_params, workers=1).tensors)
    with create_backend(package, "onnxruntime", "fp32", "fp32") as runner:
        assert runner.provides(spec.output)
        plain = runner.infer(tensors)
        assert runner.last_maps is None  # not asked for: not fetched
        runner.maps_output = spec.output
        logits = runner.infer(tensors)
        maps = runner.last_maps
    assert maps.shape == (len(tensors), len(LABELS), 8, 8)
    np.testing.assert_allclose(logits, plain, rtol=0, atol=1e-5)  # the maps change nothing
    np.testing.assert_allclose(maps.mean(axis=(2, 3)), logits, rtol=0, atol=1e-4)
    assert np.ptp(maps, axis=(2, 3)).min() > 0  # and they are maps, not constants


def _gemm_head_model(pool: str) -> onnx.ModelProto:
    """tokens [B, 5, 4] -> (mean over tokens | the first token) -> Gemm -> logits [B, 3]."""
    w = numpy_helper.from_array(np.ones((3, 4), np.float32), "head.weight")
    b = numpy_helper.from_array(np.zeros(3, np.float32), "head.bias")
    if pool == "mean":
        pooled = helper.make_node("ReduceMean", ["tokens"], ["pooled"], axes=[1], keepdims=0)
    else:  # a CLS-token head: its CAM would not be exact
        index = numpy_helper.from_array(np.array(0, np.int64), "zero")
        pooled = helper.make_node("Gather", ["tokens", "zero"], ["pooled"], axis=1)
    head = helper.make_node("Gemm", ["pooled", "head.weight", "head.bias"], ["logits"], transB=1)
    graph = helper.make_graph([pooled, head], "g", [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, [None, 4, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 3])],
                              [w, b] + ([] if pool == "mean" else [index]))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_add_class_maps_takes_an_average_pool_head_and_refuses_any_other():
    model = add_class_maps(_gemm_head_model("mean"), (2, 2))
    assert [o.name for o in model.graph.output] == ["logits", CLASS_MAPS]
    with pytest.raises(ModelPackageError, match="already has"):
        add_class_maps(model, (2, 2))
    with pytest.raises(ModelPackageError, match="not linear on the mean of the patch tokens"):
        add_class_maps(_gemm_head_model("cls"), (2, 2))


def _without_class_maps(model_bytes: bytes) -> bytes:
    """The bundled graph as it was before `add-class-maps`."""
    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    keep = [n for n in graph.node if not n.name.startswith(f"{CLASS_MAPS}/")]
    del graph.node[:]
    graph.node.extend(keep)
    inits = [i for i in graph.initializer if not i.name.startswith(f"{CLASS_MAPS}/")]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    outputs = [o for o in graph.output if o.name != CLASS_MAPS]
    del graph.output[:]
    graph.output.extend(outputs)
    return model.SerializeToString()


def test_add_class_maps_writes_a_new_package_and_refuses_a_second_time(tmp_path):
    from cxr_edge.manifest import sha256_bytes

    package = ModelPackage.load()
    data = _without_class_maps(package.read_verified("fp32"))
    manifest = package.to_manifest()
    del manifest["heatmaps"]
    manifest["artifacts"]["fp32"]["sha256"] = sha256_bytes(data)
    plain = write_package_copy(package, tmp_path / "plain", manifest, replace={"fp32": data})
    assert plain.heatmap_spec is None
    made = with_class_maps(plain, tmp_path / "maps", "9.9")
    assert made.version == "9.9" and made.heatmap_spec.grid == (8, 8)
    assert made.artifact("fp32").sha256 != plain.artifact("fp32").sha256  # the graph changed, and says so
    made.read_verified("fp32")
    assert made.artifact("fp32").sha256 == package.artifact("fp32").sha256  # exactly the bundled graph again
    with pytest.raises(ModelPackageError, match="already has class maps"):
        with_class_maps(made, tmp_path / "again")
    manifest = made.to_manifest()
    del manifest["heatmaps"]  # a graph with the output under a manifest that does not say so
    with pytest.raises(ModelPackageError, match="already has a 'class_maps' output"):
        with_class_maps(write_package_copy(made, tmp_path / "unsaid", manifest), tmp_path / "again")


@pytest.mark.parametrize("bad", [{"method": "rollout", "output": "x", "grid": [8, 8]},
                                 {"method": "cam", "output": "", "grid": [8, 8]},
                                 {"method": "cam", "output": "x", "grid": [8]},
                                 {"method": "cam", "output": "x", "grid": [0, 8]},
                                 {"method": "cam", "output": "x", "grid": [True, 8]}])
def test_a_malformed_heatmaps_section_is_refused(tmp_path, bad):
    manifest = ModelPackage.load().to_manifest()
    manifest["heatmaps"] = bad
    with pytest.raises(ModelPackageError, match="heatmaps"):
        ModelPackage(tmp_path, manifest)


# --- geometry -------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["pad", "crop", "stretch"])
@pytest.mark.parametrize("shape", [(60, 100), (100, 60), (80, 80)])
def test_model_window_is_where_preprocessing_put_the_image(mode, shape):
    h, w = shape
    image = np.random.default_rng(0).random(shape).astype(np.float32)
    square = _square(image, mode)
    top, left, height, width = model_window(h, w, mode)
    assert square.shape == ((height, width) if mode != "stretch" else shape)
    if mode == "pad":  # the image sits inside the letterbox at (-top, -left)
        np.testing.assert_array_equal(square[-top : -top + h, -left : -left + w], image)
    elif mode == "crop":
        np.testing.assert_array_equal(square, image[top : top + height, left : left + width])
    else:
        assert (top, left, height, width) == (0, 0, h, w)


def test_the_peak_is_the_hottest_patch_in_source_pixels():
    class_map = np.zeros((8, 8))
    class_map[2, 5] = 3.0
    # 1000 rows x 800 columns, letterboxed to 1000x1000: 100 columns of padding on the left
    found = peak(class_map, (1000, 800), "pad")
    assert (found.x, found.y) == pytest.approx((-100 + 5.5 * 125, 2.5 * 125))
    corner = np.zeros((8, 8))
    corner[7, 0] = 1.0  # a padding patch: the peak stays on the image
    assert peak(corner, (1000, 800), "pad").x == 0.0


def test_the_heat_lies_inside_the_models_window_and_peaks_where_the_map_does():
    class_map = np.zeros((8, 8))
    class_map[4, 4] = 5.0
    heat = heat_on_display(class_map, (400, 800), (200, 400), "crop")  # the centre 400x400 of the image
    assert heat.shape == (200, 400) and heat.min() >= 0 and heat.max() <= 1
    assert heat[:, :100].max() == 0 and heat[:, 300:].max() == 0  # outside the crop: nothing
    row, column = np.unravel_index(np.argmax(heat), heat.shape)
    assert 100 + 4 * 25 <= column <= 100 + 5 * 25 and 4 * 25 <= row <= 5 * 25
    assert relative_heat(np.full((8, 8), 2.0)).max() == 0  # a flat map shows nothing, not noise


def test_file_name_parts_are_distinct_and_short():
    slugs = label_slugs(LABELS)
    assert len(set(slugs.values())) == len(LABELS) and max(map(len, slugs.values())) <= 24
    assert slugs["Pleural_Thickening"] == "pleural_thickening" and slugs[NO_FINDING] == "no_finding"
    assert label_slugs(["A b", "a_b"]) == {"A b": "a_b", "a_b": "a_b-1"}


# --- the outputs ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("heatmaps") / "out"
    proc = run_cli("infer", str(SAMPLES), "--out", str(out), "--json", check_rc=0)
    return out, json.loads(proc.stdout), load_records(out)


def test_every_flagged_finding_gets_a_png_and_dicom_inputs_a_dicom(sample_run):
    out, _, records = sample_run
    named = set()
    dicoms = 0
    for name, record in records.items():
        maps = record["outputs"]["heatmaps"]["maps"]
        flagged = [f for f in record["positive_findings"]]
        assert [m["label"] for m in maps] == flagged  # one per flagged finding, in label order
        is_dicom = name.endswith(".dcm.json")
        for entry in maps:
            png = Path(entry["png"])
            assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            named.add(png)
            assert len(entry["peak"]) == 2
            if is_dicom:
                dicom = Path(entry["dicom"])
                assert dicom.is_file() and pydicom.dcmread(dicom).SOPInstanceUID == entry["sop_instance_uid"]
                named.add(dicom)
                dicoms += 1
            else:
                assert "dicom" not in entry
    assert dicoms >= 1, "no DICOM sample has a flagged finding: nothing below is tested"
    on_disk = {p for p in out.rglob("*") if ".heatmap." in p.name}
    assert on_disk == named  # nothing unnamed, nothing missing


def test_the_secondary_captures_are_valid_and_in_the_source_study(sample_run):
    out, _, records = sample_run
    for record in records.values():
        for entry in record["outputs"]["heatmaps"]["maps"]:
            if "dicom" not in entry:
                continue
            source = pydicom.dcmread(record["input"]["path"], stop_before_pixels=True)
            sc = pydicom.dcmread(entry["dicom"])
            assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
            assert sc.StudyInstanceUID == source.StudyInstanceUID and sc.PatientID == source.PatientID
            assert sc.SeriesInstanceUID not in (source.SeriesInstanceUID, record["outputs"]["sr"]["series_instance_uid"])
            assert sc.SeriesInstanceUID == record["outputs"]["heatmaps"]["series_instance_uid"]
            assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
            assert sc.BurnedInAnnotation == "YES" and "NOT FOR DIAGNOSIS" in sc.ImageComments
            assert sc.PhotometricInterpretation == "RGB" and sc.pixel_array.shape[2] == 3
            assert entry["label"] in sc.ImageComments


def test_dciodvfy_finds_no_errors_in_the_secondary_captures(sample_run):
    need_tool("dciodvfy")
    out, _, _ = sample_run
    captures = sorted(out.rglob("*.heatmap.*.dcm"))
    assert captures
    for path in captures:
        run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], f"{path.name}: {errors}"


def test_heatmaps_made_again_are_the_same_instances(sample_run, tmp_path):
    """Same input bytes, same model: the same SOP Instance UIDs (a redo or a re-send replaces
    the PACS's copy instead of adding a second one)."""
    _, _, records = sample_run
    out = tmp_path / "again"
    run_cli("infer", str(SAMPLES / "dicom"), "--out", str(out), check_rc=0)
    first = {m["sop_instance_uid"] for r in records.values() for m in r["outputs"]["heatmaps"]["maps"] if "dicom" in m}
    again = {m["sop_instance_uid"] for r in load_records(out).values() for m in r["outputs"]["heatmaps"]["maps"]}
    assert first == again and first


def test_no_heatmaps_writes_none(tmp_path):
    out = tmp_path / "out"
    run_cli("infer", str(SAMPLES), "--out", str(out), "--no-heatmaps", check_rc=0)
    assert not [p for p in out.rglob("*") if ".heatmap." in p.name]
    assert all("heatmaps" not in r["outputs"] for r in load_records(out).values())


def _package(tmp_path, name: str, *, maps: bool = True, threshold: float | None = None) -> Path:
    """A copy of the bundled package, without its class maps or with every threshold moved."""
    package = ModelPackage.load()
    manifest = package.to_manifest()
    if not maps:
        del manifest["heatmaps"]
    if threshold is not None:
        manifest["thresholds"]["values"] = [threshold] * len(LABELS)
        for point in manifest["thresholds"]["operating_points"]:
            point["threshold"] = threshold
    write_package_copy(package, tmp_path / name, manifest)
    return tmp_path / name


def test_a_model_without_class_maps_runs_without_heatmaps_unless_they_are_asked_for(tmp_path):
    model = _package(tmp_path, "plain", maps=False)
    out = tmp_path / "out"
    run_cli("infer", str(SAMPLES / "nih"), "--out", str(out), "--model", str(model), check_rc=0)
    assert not [p for p in out.rglob("*") if ".heatmap." in p.name]
    proc = run_cli("infer", str(SAMPLES / "nih"), "--out", str(tmp_path / "out2"), "--model", str(model), "--heatmaps",
                   check_rc=2)
    assert "has no class maps" in proc.stderr and "add-class-maps" in proc.stderr


def test_findings_no_longer_flagged_lose_their_old_heatmaps(tmp_path):
    """The same input read again by a model that flags nothing: its earlier maps go, so the
    folder holds what the record names."""
    out = tmp_path / "out"
    inputs = SAMPLES / "dicom"
    run_cli("infer", str(inputs), "--out", str(out), "--model", str(_package(tmp_path, "all", threshold=0.0)),
            check_rc=0)
    before = [p for p in out.rglob("*") if ".heatmap." in p.name]
    assert len(before) == 2 * 3 * (len(LABELS) - 1)  # every finding flagged: PNG + DICOM each
    run_cli("infer", str(inputs), "--out", str(out), "--model", str(_package(tmp_path, "none", threshold=1.0)),
            check_rc=0)
    assert not [p for p in out.rglob("*") if ".heatmap." in p.name]
    assert all(r["outputs"]["heatmaps"]["maps"] == [] for r in load_records(out).values())


def test_a_heatmap_that_cannot_be_written_costs_only_itself(tmp_path):
    """A folder where a heatmap goes: that input's findings and SR are written, with the reason;
    its neighbours are untouched."""
    out = tmp_path / "out"
    model = _package(tmp_path, "all", threshold=0.0)
    run_cli("infer", str(SAMPLES / "dicom"), "--out", str(out), "--model", str(model), check_rc=0)  # an earlier run's maps
    target = out / "dicom" / "rsna_cr_pa_jpeg_baseline_mono2.dcm.heatmap.effusion.png"
    target.unlink()
    target.mkdir(parents=True)
    proc = run_cli("infer", str(SAMPLES / "dicom"), "--out", str(out), "--model", str(model))
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = load_records(out)
    hit = records["dicom/rsna_cr_pa_jpeg_baseline_mono2.dcm.json"]
    assert hit["status"] == "ok" and "cannot write the heatmap" in hit["heatmaps_error"]["reason"]
    assert Path(hit["outputs"]["sr"]["path"]).is_file() and "heatmaps" not in hit["outputs"]
    # none of its maps are left, neither this run's nor the earlier run's; the others have all of theirs
    assert not [p for p in (out / "dicom").glob("rsna_cr_pa_jpeg_baseline_mono2.dcm.heatmap.*") if p.is_file()]
    for name, record in records.items():
        if record is not hit:
            assert len(record["outputs"]["heatmaps"]["maps"]) == len(LABELS) - 1


def test_every_heatmap_path_covers_what_the_sink_writes(sample_run):
    out, _, records = sample_run
    for name, record in records.items():
        stem = out / name.removesuffix(".json")
        possible = set(every_heatmap_path(stem, LABELS))
        for entry in record["outputs"]["heatmaps"]["maps"]:
            assert Path(entry["png"]) in possible and Path(entry.get("dicom", entry["png"])) in possible


def test_a_source_no_dicom_can_reference_gets_png_heatmaps_and_the_reason(tmp_path):
    """An invalid SOP Instance UID: no SR and no Secondary Capture can reference the source, but
    the PNGs are made, and the record says why there is no DICOM (naming the attribute only)."""
    from . import realworld_corpus

    inbox = tmp_path / "in"
    inbox.mkdir()
    realworld_corpus._edited(realworld_corpus.RSNA, inbox / "a.dcm", SOPInstanceUID="1.2.03.abc")
    out = tmp_path / "out"
    run_cli("infer", str(inbox), "--out", str(out), "--model", str(_package(tmp_path, "all", threshold=0.0)),
            check_rc=1)  # 1: findings without their SR
    (record,) = load_records(out).values()
    heatmaps = record["outputs"]["heatmaps"]
    assert len(heatmaps["maps"]) == len(LABELS) - 1 and all("dicom" not in m for m in heatmaps["maps"])
    assert "SOP Instance UID (0008,0018)" in heatmaps["dicom_error"] and "1.2.03" not in heatmaps["dicom_error"]
    assert not list(out.rglob("*.heatmap.*.dcm")) and "series_instance_uid" not in heatmaps


def test_an_input_that_fails_to_be_retried_leaves_no_heatmaps_behind(tmp_path):
    """The maps are written in a worker before the record: when another output of the input
    fails in a way that may pass (a full disk), the input is retried later and the maps already
    on disk go with it (no file without a record)."""
    from cxr_edge.backends import create_backend
    from cxr_edge.errors import TRANSIENT
    from cxr_edge.heatmap_sink import HeatmapSink
    from cxr_edge.pipeline import Pipeline
    from cxr_edge.sinks import Sink, SinkFailure
    from cxr_edge.sources import discover

    class FullDisk(Sink):
        name = "full"

        def write(self, inference, work):
            raise SinkFailure("cannot write: No space left on device", TRANSIENT)

    package = ModelPackage.load(_package(tmp_path, "all", threshold=0.0))
    items, _ = discover([str(SAMPLES / "nih")])
    out = tmp_path / "out"
    with create_backend(package, threads=1) as runner:
        info = package.describe(runner.artifact_sha256)
        sinks = [FullDisk(), HeatmapSink(info, package.labels, package.preprocess_params.resize)]
        results = Pipeline(package, runner, out, workers=1, sinks=sinks).run(items[:2])
    assert {r.status for r in results} == {"error"} and {r.error.kind for r in results} == {TRANSIENT}
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == sorted(
        f"{item.relative.name}.json" for item in items[:2])  # the error records, nothing else


@pytest.mark.parametrize("heatmaps, phrase", [({"method": "cam", "output": "logits", "grid": [8, 8]}, "is not [batch"),
                                              ({"method": "cam", "output": "class_maps", "grid": [4, 4]}, "is not [batch"),
                                              ({"method": "cam", "output": "maps", "grid": [8, 8]}, "has no 'maps' output")])
def test_a_heatmaps_section_that_does_not_match_the_model_is_refused_at_start(tmp_path, heatmaps, phrase):
    package = ModelPackage.load()
    manifest = package.to_manifest()
    manifest["heatmaps"] = heatmaps
    write_package_copy(package, tmp_path / "pkg", manifest)
    proc = run_cli("infer", str(SAMPLES / "nih"), "--out", str(tmp_path / "out"), "--model", str(tmp_path / "pkg"),
                   "--heatmaps", check_rc=2)
    assert phrase in proc.stderr
    run_cli("infer", str(SAMPLES / "nih"), "--out", str(tmp_path / "out"), "--model", str(tmp_path / "pkg"), check_rc=0)
    assert not [p for p in (tmp_path / "out").rglob("*") if ".heatmap." in p.name]  # default: off, said in the log


@pytest.mark.parametrize("orientation, kept", [(["P", "FL"], ["P", "FL"]), (["Q", "R"], None), (["L"], None)])
def test_the_sources_patient_orientation_is_kept_when_well_formed(orientation, kept):
    """An oblique orientation (`FL`) is valid DICOM that highdicom's enum refuses: it must
    neither cost the Secondary Capture nor be guessed; a malformed one is left empty."""
    from cxr_edge.heatmap_dicom import SCSource, build_heatmap_sc
    from cxr_edge.sr import ModelIdentity

    source = pydicom.dcmread(SAMPLES / "dicom" / "rsna_cr_pa_jpeg_baseline_mono2.dcm", stop_before_pixels=True)
    source.PatientOrientation = orientation
    sc = build_heatmap_sc(SCSource.of(source), np.zeros((8, 8, 3), np.uint8), "Mass", 0.5,
                          ModelIdentity("m", "1", "0" * 64), "1.2.3.4", "1.2.3.5", 1)
    assert (list(sc.PatientOrientation) if sc.PatientOrientation else None) == kept


@pytest.mark.parametrize("shape", [(384, 384), (1, 384), (384, 1)])
def test_the_warning_is_drawn_above_the_image_whatever_its_shape(shape):
    """The caption band is added above the picture (never over it) and is wide enough to read."""
    from cxr_edge.findings import Finding
    from cxr_edge.heatmaps import MIN_CAPTION_WIDTH, caption_for, overlay

    display = np.full(shape, 200, np.uint8)
    picture = overlay(display, np.zeros(shape, np.float32), caption_for(Finding("Mass", 0.5, 0.3), "m", "1"))
    band = picture.shape[0] - shape[0]
    assert band > 20 and picture.shape[1] == max(shape[1], MIN_CAPTION_WIDTH)
    assert (picture[band:, : shape[1]] == 200).all()  # the image itself untouched
    assert picture[:band].max() == 255  # white text in the band
