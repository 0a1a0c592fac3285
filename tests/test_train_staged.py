"""The staged recipe (frozen trunk, linear probe, top blocks, K-fold out-of-fold predictions) and
its student, on real 64x64 NIH images at a tiny size: the mechanics, not the accuracy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from .conftest import NIH_TINY64
from .test_train import _ok, _train

torch = pytest.importorskip("torch", reason="needs the train extra (torch + timm)")
pytest.importorskip("timm", reason="needs the train extra (torch + timm)")

from cxr_edge.train.data import Split, SplitSpec, read_nih_csv  # noqa: E402

STAGED = ["--frozen-blocks", "10", "--views", "2", "--other-views", "1", "--folds", "2", "--epochs", "1",
          "--probe-epochs", "2", "--batch-size", "64"]


def test_held_out_split_draws_test_patients_from_the_target_set_only(tmp_path):
    data = str(NIH_TINY64 / "labels.csv")
    records = read_nih_csv(data)
    half = len(records) // 2
    other, target = tmp_path / "other.csv", tmp_path / "target.csv"
    lines = (NIH_TINY64 / "labels.csv").read_text().splitlines()
    other.write_text("\n".join([lines[0], *lines[1 : half + 1]]) + "\n")
    # the target set shares its patients with the other one for its first 10 rows
    target.write_text("\n".join([lines[0], *lines[1:11], *lines[half + 1 :]]) + "\n")
    spec = SplitSpec((f"{other}:{NIH_TINY64 / 'images'}", f"{target}:{NIH_TINY64 / 'images'}"),
                     test_data=f"{target}:{NIH_TINY64 / 'images'}", test_fraction=0.3)
    splits = spec.splits()
    test_patients = {r.patient_id for r in splits[Split.TEST]}
    target_patients = {r.patient_id for r in read_nih_csv(target, NIH_TINY64 / "images")}
    assert test_patients <= target_patients
    assert len(test_patients) == round(0.3 * len(target_patients))
    assert not test_patients & {r.patient_id for r in splits[Split.TRAIN]}  # no image of a test patient trains
    assert splits[Split.VAL] == []
    assert spec.splits() == splits  # seeded


def test_trunk_cache_key_changes_with_an_image_on_disk(tmp_path):
    """Cached trunk outputs are reused only for the same images: one rewritten in place (same
    path) must not get its old outputs back."""
    import os
    import shutil

    from cxr_edge.preprocess import PreprocessParams
    from cxr_edge.train.staged import StagedConfig, trunk_key

    images = tmp_path / "images"
    shutil.copytree(NIH_TINY64 / "images", images)
    records = read_nih_csv(NIH_TINY64 / "labels.csv", images)[:5]
    cfg, params, counts = StagedConfig(), PreprocessParams(size=56, resize="pad", channels=1), np.full(5, 2)
    before = trunk_key(cfg, params, records, counts)
    assert trunk_key(cfg, params, records, counts) == before
    stat = records[0].path.stat()
    os.utime(records[0].path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert trunk_key(cfg, params, records, counts) != before
    assert trunk_key(cfg, params, records, np.full(5, 3)) != before


@pytest.mark.slow
def test_staged_teacher_and_student_runs_calibrate_and_export(tmp_path):
    data = NIH_TINY64 / "labels.csv"
    teacher, student, package = tmp_path / "teacher", tmp_path / "student", tmp_path / "pkg"
    _ok(_train("staged", "--data", data, "--test-data", data, "--out", teacher, "--img-size", "56",
               "--cache", tmp_path / "cache", *STAGED))
    config = json.loads((teacher / "config.json").read_text())
    split = json.loads((teacher / "split.json").read_text())
    assert not set(split["test"]) & set(split["train"])
    oof, test = np.load(teacher / "logits_val.npz"), np.load(teacher / "logits_test.npz")
    n_test = len(SplitSpec.from_config(config).splits()[Split.TEST])
    assert len(test["labels"]) == n_test and len(oof["labels"]) == 241 - n_test  # every training image once
    history = json.loads((teacher / "history.json").read_text())
    assert len(history["folds"]) == 2 and sum(f["images"] for f in history["folds"]) == 241 - n_test

    # the cut model is the whole model: its saved weights give the test logits it saved
    from cxr_edge.train.model import load_run_model
    from cxr_edge.train.tensors import load_tensors

    model, _, params = load_run_model(teacher)
    images = load_tensors(SplitSpec.from_config(config).splits()[Split.TEST], params).images
    with torch.no_grad():
        whole = model(torch.from_numpy(images)).numpy()
    assert np.abs(whole - test["logits"]).max() < 0.02  # the trunk's outputs are stored as float16

    # the student learns the teacher's views at its own size, on the same split
    _ok(_train("staged", "--teacher", teacher, "--data", data, "--test-data", data, "--out", student,
               "--img-size", "28", "--cache", tmp_path / "cache", *STAGED))
    student_config = json.loads((student / "config.json").read_text())
    assert student_config["distilled_from"]["run"] == str(teacher)
    assert json.loads((student / "split.json").read_text())["test"] == split["test"]
    views = np.load(student / "view_logits.npz")
    assert views["logits"].shape == (241, 2, 15) and views["fold_logits"].shape == (2, 241, 2, 15)
    teacher_views = np.load(teacher / "view_logits.npz")
    assert (views["held_out_fold"] == teacher_views["held_out_fold"]).all()  # the student's folds are the teacher's
    assert sorted(set(teacher_views["held_out_fold"].tolist())) == [-1, 0, 1]

    _ok(_train("calibrate", student, "--policy", "specificity:0.9"))
    _ok(_train("calibrate", teacher))
    _ok(_train("export", student, "--out", package, "--name", "tiny-staged-student", "--candidate", teacher))
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["architecture"]["timm_kwargs"] == {"global_pool": "avg", "fc_norm": False}
    # an average-pool head: the export adds exact class maps (heatmaps), checked against the logits
    assert manifest["heatmaps"]["method"] == "cam" and manifest["heatmaps"]["exact_to"] <= 1e-3
    assert manifest["artifacts"]["fp32"]["class_maps"] == "class_maps"
    assert "out-of-fold" in manifest["thresholds"]["chosen_on"]
    assert len(manifest["thresholds"]["operating_points"]) == 15
    assert manifest["metrics"]["test"]["mean_auroc_ci95"][0] <= manifest["metrics"]["test"]["mean_auroc"]
    assert manifest["provenance"]["training"]["recipe"] == "staged"
    shifts = json.loads((student / "calibration.json").read_text())["logit_shifts"]
    assert manifest["calibration"].get("logit_shifts_in_model", [0.0] * 15) == shifts  # Platt, folded into the head
    shipped, other = manifest["provenance"]["candidates"]  # the manifest names both, and what each scored
    assert (shipped["run"], shipped["img_size"], other["run"], other["img_size"]) == ("student", 28, "teacher", 56)
    assert shipped["distilled_from"] == str(teacher) and "mean_auroc_ci95" in other["test"]
