"""The train path: patient-wise splits, a tiny finetune -> calibrate -> export chain, parity."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from .conftest import NIH_TINY64, SAMPLES

torch = pytest.importorskip("torch", reason="needs the train extra (torch + timm)")
pytest.importorskip("timm", reason="needs the train extra (torch + timm)")

from cxr_edge.train.data import SplitSpec, patient_split, read_nih_csv  # noqa: E402


def write_nih_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID"])
        writer.writerows(rows)


def test_patient_split_keeps_each_patient_in_one_split(tmp_path):
    (tmp_path / "images").mkdir()
    rows = []
    for patient in range(60):
        for follow_up in range(patient % 5 + 1):  # 1 to 5 images per patient, as in NIH
            name = f"{patient:08d}_{follow_up:03d}.png"
            (tmp_path / "images" / name).write_bytes(b"")
            rows.append([name, "No Finding" if patient % 3 else "Effusion|Mass", follow_up, patient])
    write_nih_csv(tmp_path / "Data_Entry_2017.csv", rows)
    records = read_nih_csv(tmp_path / "Data_Entry_2017.csv")
    splits = patient_split(records, seed=3)
    patients = {name: {r.patient_id for r in split} for name, split in splits.items()}
    assert all(patients.values())
    assert not (patients["train"] & patients["val"]) and not (patients["train"] & patients["test"])
    assert not (patients["val"] & patients["test"])
    assert sum(len(s) for s in splits.values()) == len(records)
    assert patient_split(records, seed=3) == splits  # seeded: reproducible
    assert patient_split(records, seed=4) != splits


def test_patient_split_on_real_nih_csv():
    records = read_nih_csv(NIH_TINY64 / "labels.csv")
    assert len({r.patient_id for r in records}) < len(records)  # some patients have several images
    splits = patient_split(records, seed=0)
    seen = {}
    for name, split in splits.items():
        for r in split:
            assert seen.setdefault(r.patient_id, name) == name, f"patient {r.patient_id} in two splits"


def test_unknown_label_is_refused(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"")
    write_nih_csv(tmp_path / "labels.csv", [["a.png", "Effusion|Cancer", 0, 1]])
    with pytest.raises(ValueError, match="Cancer"):
        read_nih_csv(tmp_path / "labels.csv")


def test_official_lists_split_and_refuse_a_leaking_list(tmp_path):
    (tmp_path / "images").mkdir()
    rows = []
    for patient in range(40):
        for follow_up in range(2):
            name = f"{patient:08d}_{follow_up:03d}.png"
            (tmp_path / "images" / name).write_bytes(b"")
            rows.append([name, "Effusion" if patient % 4 == 0 else "No Finding", follow_up, patient])
    write_nih_csv(tmp_path / "Data_Entry_2017.csv", rows)
    names = [r[0] for r in rows]
    (tmp_path / "train_val_list.txt").write_text("\n".join(names[:60]) + "\n")
    (tmp_path / "test_list.txt").write_text("\n".join(names[60:]) + "\n")
    spec = SplitSpec((str(tmp_path / "Data_Entry_2017.csv"),), 0, str(tmp_path / "train_val_list.txt"),
                     str(tmp_path / "test_list.txt"), 0.2)
    splits = spec.splits()
    assert {r.path.name for r in splits["test"]} == set(names[60:])
    assert len(splits["val"]) > 0 and len(splits["train"]) + len(splits["val"]) == 60
    patients = {k: {r.patient_id for r in v} for k, v in splits.items()}
    assert not (patients["train"] & patients["val"]) and not (patients["test"] & (patients["train"] | patients["val"]))
    # a list that puts one patient's images on both sides is refused
    (tmp_path / "test_list.txt").write_text("\n".join(names[59:]) + "\n")
    (tmp_path / "train_val_list.txt").write_text("\n".join(names[:59]) + "\n")
    with pytest.raises(ValueError, match="patients are in both"):
        spec.splits()


def test_losses():
    from cxr_edge.train.losses import FocalLoss, make_loss, weighted_sample_weights

    logits = torch.tensor([[2.0, -1.0, 0.3], [-0.5, 0.2, -3.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    assert torch.isclose(FocalLoss(gamma=0.0)(logits, targets), bce)  # gamma 0 is plain BCE
    assert FocalLoss(gamma=2.0)(logits, targets) < bce  # easy examples down-weighted
    # ASL (timm's) with the settings the runs use: gamma_neg 4, gamma_pos 0, negatives shifted by 0.05
    p = torch.sigmoid(logits)
    p_neg = (p - 0.05).clamp(min=0)
    expected = -(targets * torch.log(p) + (1 - targets) * torch.log(1 - p_neg) * p_neg**4).mean()
    assert torch.isclose(make_loss("asl", targets, True)(logits, targets), expected)
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    weights = weighted_sample_weights(labels)
    assert weights[0] > weights[1]  # the rare label's image is drawn more often
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss("hinge", labels, True)


def _schedule(scheduler, optimizer, steps):
    lrs = []
    for step in range(steps):
        scheduler.step_update(num_updates=step)
        lrs.append([group["lr"] for group in optimizer.param_groups])
    return np.array(lrs)


def test_lr_schedule_warmup_then_cosine_with_layer_scale_and_checkpointable():
    import io

    from cxr_edge.train.loop import make_scheduler

    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW([{"params": [model.weight], "lr_scale": 0.5}, {"params": [model.bias]}], lr=1e-3)
    lrs = _schedule(make_scheduler(optimizer, total_steps=20, warmup_steps=4, lr=1e-3), optimizer, 20)
    base, scaled = lrs[:, 1], lrs[:, 0]
    np.testing.assert_allclose(scaled, 0.5 * base)  # layer-wise decay scales every step
    assert base[0] == pytest.approx(1e-3 / 4)  # the first update already learns
    assert np.all(np.diff(base[:5]) > 0) and base[4] == pytest.approx(1e-3)  # linear warmup to the peak
    assert np.all(np.diff(base[4:]) < 0) and 0 < base[-1] < 1e-5  # cosine down to (almost) 0 at the end

    # the scheduler's state goes into checkpoint.pt, which is loaded with weights_only=True
    buffer = io.BytesIO()
    torch.save({"scheduler": make_scheduler(optimizer, 20, 4, 1e-3).state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["scheduler"]
    other = torch.optim.AdamW([{"params": [model.weight], "lr_scale": 0.5}, {"params": [model.bias]}], lr=1e-3)
    restored = make_scheduler(other, total_steps=99, warmup_steps=1, lr=1e-3)
    restored.load_state_dict(state)
    np.testing.assert_array_equal(_schedule(restored, other, 20), lrs)


_real_prepare = None


def crashing_prepare(item, *args):
    if item.path.name.startswith("crash"):
        os._exit(1)  # what a segfaulting decoder looks like to the pool
    return _real_prepare(item, *args)


def _small_nih_set(tmp_path, n=10):
    """`n` real NIH images (64x64) with their labels, plus one that crashes the decoder and one
    truncated PNG: a CSV of n + 2 rows."""
    source = NIH_TINY64 / "labels.csv"
    with open(source, newline="") as f:
        rows = list(csv.DictReader(f))[:n]
    images = tmp_path / "images"
    images.mkdir()
    out_rows = []
    for row in rows:
        shutil.copy(source.parent / "images" / row["Image Index"], images / row["Image Index"])
        out_rows.append([row["Image Index"], row["Finding Labels"], 0, row["Patient ID"]])
    shutil.copy(images / rows[0]["Image Index"], images / "crash.png")
    (images / "broken.png").write_bytes((images / rows[1]["Image Index"]).read_bytes()[:200])
    out_rows[3:3] = [["crash.png", "Effusion", 0, "crash"], ["broken.png", "Mass", 0, "broken"]]
    write_nih_csv(tmp_path / "labels.csv", out_rows)
    return read_nih_csv(tmp_path / "labels.csv")


def test_tensor_cache_leaves_out_crashing_and_broken_images_by_name(tmp_path, monkeypatch, caplog):
    """A decoder that dies on one image (crash-isolated workers) or a broken file costs only that
    image and its label; the cache holds the others and reports the same failures on a hit."""
    global _real_prepare
    import cxr_edge.workers as workers_module
    from cxr_edge.decode import decode_file
    from cxr_edge.preprocess import PreprocessParams, preprocess
    from cxr_edge.train.data import labels_of
    from cxr_edge.train.dataset import XrayDataset, make_dataset

    records = _small_nih_set(tmp_path)
    params = PreprocessParams(size=32, channels=1)
    _real_prepare = workers_module.prepare
    monkeypatch.setattr(workers_module, "prepare", crashing_prepare)  # the pool forks: workers run it
    with caplog.at_level("ERROR", logger="cxr_edge.train.dataset"):
        dataset = make_dataset(records, params, str(tmp_path / "cache"), workers=2)
    good = [r for r in records if r.path.name not in ("crash.png", "broken.png")]
    assert [r.path for r in dataset.records] == [r.path for r in good]
    np.testing.assert_array_equal(dataset.labels, labels_of(good))  # the labels of the left-out are gone too
    reasons = {path.name: reason for path, reason in dataset.left_out}
    assert set(reasons) == {"crash.png", "broken.png"}
    assert "crashed" in reasons["crash.png"] and reasons["broken.png"].startswith("decode:")
    assert "crash.png" in caplog.text and "broken.png" in caplog.text
    expected = np.stack([preprocess(decode_file(r.path).pixels, params) for r in good])
    got = np.stack([dataset[i][0].numpy() for i in range(len(dataset))])
    np.testing.assert_allclose(got, expected, atol=2e-3, rtol=1e-3)  # stored as float16
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1 and not entries[0].name.startswith(".")  # published whole; no staging left

    # a hit decodes nothing (every decode would now crash) and reports the same images
    monkeypatch.setattr(workers_module, "prepare", lambda item, *args: os._exit(1))
    again = make_dataset(records, params, str(tmp_path / "cache"), workers=2)
    assert again.left_out == dataset.left_out and len(again) == len(dataset)
    np.testing.assert_array_equal(np.asarray(again.images), np.asarray(dataset.images))

    # decoding on the fly cannot leave an image out mid-epoch: it stops, naming the file and why
    with pytest.raises(ValueError, match=r"broken\.png: decode: .*--cache"):
        XrayDataset([r for r in records if r.path.name == "broken.png"], params)[0]


def _train(*args, timeout=600, **kwargs):
    return subprocess.run([sys.executable, "-m", "cxr_edge.train", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def _ok(proc):
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc


LOOP = ["--batch-size", "64", "--cache", "memory", "--workers", "2"]
TINY = ["--img-size", "32", *LOOP]


@pytest.mark.slow
def test_whole_chain_finetune_calibrate_distill_evaluate_export_infer(tmp_path):
    """Issue 3's chain on real 64x64 NIH images; the exported student runs under `cxr-edge infer`."""
    data = NIH_TINY64 / "labels.csv"
    teacher, student, package = tmp_path / "teacher", tmp_path / "student", tmp_path / "pkg"
    _ok(_train("finetune", "--data", data, "--out", teacher, "--arch", "vit_small_patch16_224", "--epochs", 2,
               "--lr", 3e-4, *TINY))
    for name in ("model.safetensors", "logits_val.npz", "logits_test.npz", "checkpoint.pt", "split.json"):
        assert (teacher / name).is_file(), name

    _ok(_train("calibrate", teacher, "--policy", "sensitivity:0.8"))
    calibration = json.loads((teacher / "calibration.json").read_text())
    report = calibration["validation"]["report"]
    # temperature scaling minimises validation NLL: per class it cannot make it worse
    assert all(a <= b + 1e-9 for a, b in zip(report["nll_after"], report["nll_before"]))
    assert {"ece_before", "ece_after", "brier_before", "brier_after"} <= set(report["mean"])
    assert calibration["threshold_policy"] == "sensitivity:0.80"

    # DeiT student: class token learns the labels, distillation token the teacher
    proc = _ok(_train("distill", "--teacher", teacher, "--out", student, "--arch", "deit_tiny_distilled_patch16_224",
                      "--epochs", 2, "--lr", 3e-4, *LOOP))
    distill_report = json.loads((student / "distill_report.json").read_text())
    assert 0.0 <= distill_report["decision_agreement"] <= 1.0
    assert set(distill_report["student_auroc"]) == set(distill_report["teacher_auroc"])
    assert (student / "teacher_logits.npz").is_file()
    assert json.loads((student / "split.json").read_text())["test"] == json.loads((teacher / "split.json").read_text())["test"]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["student_mean_auroc"] == distill_report["student_mean_auroc"]

    _ok(_train("calibrate", student))
    _ok(_train("evaluate", student, "--out", tmp_path / "eval_run", "--bootstrap", 200))
    run_report = json.loads((tmp_path / "eval_run" / "report.json").read_text())
    for plot in ("roc.png", "reliability.png", "history.png", "report.md"):
        assert (tmp_path / "eval_run" / plot).stat().st_size > 0, plot
    per_class = run_report["metrics"]["per_class"]
    assert len(per_class) == 15 and all("auroc_ci95" in m and "average_precision" in m for m in per_class.values())

    _ok(_train("export", student, "--out", package, "--name", "tiny-student"))
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["export"]["parity_vs_torch"]["max_abs_dprob"] < 1e-4
    assert "heatmaps" not in manifest  # a class-token head has no exact class map: exported without
    assert manifest["provenance"]["distilled_from"]["arch"] == "vit_small_patch16_224"

    # the package through the runtime gets the same report as the torch run on the same images
    _ok(_train("evaluate", package, "--data", data, "--split", "test", "--out", tmp_path / "eval_pkg", "--bootstrap", 200))
    pkg_report = json.loads((tmp_path / "eval_pkg" / "report.json").read_text())
    assert pkg_report["metrics"]["images"] == run_report["metrics"]["images"]
    assert abs(pkg_report["metrics"]["mean_auroc"] - run_report["metrics"]["mean_auroc"]) < 1e-3

    # Backend parity on real images through the whole runtime path (decode -> ORT -> JSON)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "cxr_edge", "infer", str(SAMPLES / "nih"), "--out", str(out),
                           "--model", str(package), "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from cxr_edge.decode import decode_file
    from cxr_edge.findings import calibrated_probabilities
    from cxr_edge.manifest import ModelPackage
    from cxr_edge.preprocess import preprocess
    from cxr_edge.train.model import load_run_model

    pkg = ModelPackage.load(package)
    model, _, params = load_run_model(student)
    images = sorted((SAMPLES / "nih").glob("*.png"))
    x = np.stack([preprocess(decode_file(p).pixels, params) for p in images])
    with torch.no_grad():
        torch_probs = calibrated_probabilities(model(torch.from_numpy(x)).numpy(), pkg.temperatures)
    for image, expected in zip(images, torch_probs):
        record = json.loads((out / "nih" / (image.name + ".json")).read_text())
        got = [f["probability"] for f in record["findings"]] + [record["no_finding"]["probability"]]
        assert np.max(np.abs(np.array(got) - expected)) < 1e-4


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    data = NIH_TINY64 / "labels.csv"
    args = ["finetune", "--data", data, "--arch", "vit_tiny_patch16_224", "--epochs", 3, "--patience", 5, *TINY]
    _ok(_train(*args, "--out", tmp_path / "whole"))

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "cxr_edge.train", *map(str, args), "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (killed / "checkpoint.pt").exists():  # written atomically at the end of each epoch
            assert proc.poll() is None and time.monotonic() < deadline, "run ended before its first checkpoint"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] < 3 and not (killed / "model.safetensors").exists(), "killed too late to test resume"

    _ok(_train(*args, "--out", killed, "--resume"))
    from safetensors.numpy import load_file

    whole, resumed = load_file(tmp_path / "whole" / "model.safetensors"), load_file(killed / "model.safetensors")
    assert whole.keys() == resumed.keys()
    for key in whole:
        np.testing.assert_array_equal(whole[key], resumed[key], err_msg=key)
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h["epochs"]]  # noqa: E731
    assert strip(json.loads((tmp_path / "whole" / "history.json").read_text())) == \
        strip(json.loads((killed / "history.json").read_text()))

    # a resume with other settings is refused, not silently mixed
    proc = _train(*[a if a != 3 else 4 for a in args], "--out", killed, "--resume")
    assert proc.returncode != 0 and "other settings" in proc.stderr


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tmp_path):
    """DistributedDataParallel under torchrun (gloo on CPU): the multi-GPU path, minus the GPUs."""
    data = NIH_TINY64 / "labels.csv"
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "cxr_edge.train", "finetune", "--data", str(data), "--out", str(out), "--arch",
                           "vit_tiny_patch16_224", "--epochs", "2", "--threads", "1", *TINY],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((out / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2]
    assert proc.stderr.count("epoch 1/2") == 1  # rank 1 stays quiet


@pytest.mark.slow
def test_export_over_an_existing_package_leaves_a_whole_package(tmp_path, monkeypatch):
    """A failed export leaves the package that was there untouched; a good one replaces it whole."""
    import cxr_edge.train.export as export_module
    from cxr_edge.manifest import ModelPackage

    run, package = tmp_path / "run", tmp_path / "pkg"
    _ok(_train("finetune", "--data", NIH_TINY64 / "labels.csv", "--out", run, "--arch", "vit_tiny_patch16_224",
               "--epochs", 1, *TINY))
    assert "scheduler" in torch.load(run / "checkpoint.pt", weights_only=True)  # resumable schedule
    _ok(_train("calibrate", run))
    _ok(_train("export", run, "--out", package, "--version", "1.0.0"))
    before = {p.name: p.read_bytes() for p in package.iterdir()}

    monkeypatch.setattr(export_module, "PARITY_TOLERANCE", -1.0)  # every export now fails its parity gate
    with pytest.raises(RuntimeError, match="drifts from torch"):
        export_module.export_package(run, package, "tiny", "2.0.0", "")
    assert {p.name: p.read_bytes() for p in package.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg", "run"]  # no staging or old folder left

    monkeypatch.undo()
    exported = export_module.export_package(run, package, "tiny", "2.0.0", "")
    reloaded = ModelPackage.load(package)
    assert exported.version == reloaded.version == "2.0.0"
    assert reloaded.read_verified("fp32")  # sha256 matches the manifest
    assert reloaded.section("export")["parity_vs_torch"]["images"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg", "run"]
