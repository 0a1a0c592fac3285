"""Distil a fine-tuned teacher run into a smaller student (soft sigmoid targets + hard labels).

The student trains on the teacher's split (its test images stay held out for both). Teacher
logits on the un-augmented training images are computed once and cached in the run folder.
A DeiT student with a distillation token (e.g. deit_tiny_distilled_patch16_224) learns the hard
labels on its class token and the teacher on its distillation token, as in Touvron et al. 2021.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cxr_edge.atomic import atomic_write_json
from cxr_edge.calibration import fit_calibration
from cxr_edge.findings import sigmoid
from cxr_edge.labels import LABELS
from cxr_edge.manifest import sha256_file
from cxr_edge.metrics import per_class_auroc

from .data import Split, SplitSpec
from .finetune import prepare_run, save_npz, save_run
from .loop import LoopConfig, fit, predict_logits, seed_everything, setup_distributed
from .losses import make_loss
from .model import create_model, load_run_model, read_run_config

log = logging.getLogger(__name__)


@dataclass
class DistillConfig(LoopConfig):
    teacher: str = ""  # a finetune run folder
    out: str = "runs/distill"
    arch: str = "vit_tiny_patch16_224"
    init: str | None = None
    temperature: float = 2.0  # softens both teacher and student logits in the soft term
    alpha: float = 0.5  # weight of the soft (teacher) term; 1 - alpha on the hard labels
    loss: str = "bce"
    pos_weight: bool = True
    cache: str | None = None


def soft_bce(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """BCE between sigmoid(student / T) and sigmoid(teacher / T), times T^2 (Hinton et al.).

    Kept here: timm's distillation tasks use a softmax KL divergence (one label per image); the
    findings are independent sigmoids, so each is distilled as its own binary distribution."""
    targets = torch.sigmoid(teacher_logits / temperature)
    return F.binary_cross_entropy_with_logits(student_logits / temperature, targets) * temperature**2


def cached_teacher_logits(teacher, dataset, out: Path, teacher_sha: str, cfg: DistillConfig, device) -> torch.Tensor:
    path = out / "teacher_logits.npz"
    if path.is_file():
        saved = np.load(path)
        if str(saved["teacher_sha256"]) == teacher_sha and len(saved["logits"]) == len(dataset):
            log.info("teacher logits from cache %s", path)
            return torch.from_numpy(saved["logits"])
    log.info("teacher logits on %d training images (once)", len(dataset))
    logits = predict_logits(teacher.to(device), dataset, cfg.batch_size * 2, cfg.workers, device, cfg.amp)
    save_npz(path, logits=logits, teacher_sha256=np.array(teacher_sha))
    return torch.from_numpy(logits)


def agreement_report(teacher_run: Path, student_logits: np.ndarray, teacher_logits: np.ndarray, labels: np.ndarray) -> dict:
    """Test AUROC of both, and how often their decisions agree at the teacher's thresholds."""
    calibration_path = teacher_run / "calibration.json"
    if calibration_path.is_file():
        calibration = json.loads(calibration_path.read_text())
        temperatures, thresholds = np.asarray(calibration["temperatures"]), np.asarray(calibration["thresholds"])
    else:  # an uncalibrated teacher: fit on the validation logits it saved
        val = np.load(teacher_run / "logits_val.npz")
        fit = fit_calibration(val["labels"], val["logits"])
        temperatures, thresholds = np.asarray(fit["temperatures"]), np.asarray(fit["thresholds"])
    agree = (sigmoid(student_logits / temperatures) >= thresholds) == (sigmoid(teacher_logits / temperatures) >= thresholds)
    student_auroc, teacher_auroc = per_class_auroc(labels, student_logits), per_class_auroc(labels, teacher_logits)
    rounded = lambda values: {k: (None if np.isnan(v) else round(float(v), 4)) for k, v in zip(LABELS, values)}  # noqa: E731
    return {
        "test_images": int(len(labels)),
        "student_mean_auroc": round(float(np.nanmean(student_auroc)), 4),
        "teacher_mean_auroc": round(float(np.nanmean(teacher_auroc)), 4),
        "student_auroc": rounded(student_auroc), "teacher_auroc": rounded(teacher_auroc),
        "decision_agreement": round(float(agree.mean()), 4),
        "decision_agreement_per_class": {k: round(float(v), 4) for k, v in zip(LABELS, agree.mean(0))},
        "thresholds_from": "teacher calibration",
    }


def distill(cfg: DistillConfig, resume: bool = False) -> dict:
    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    dist = setup_distributed()
    out, teacher_run = Path(cfg.out), Path(cfg.teacher)
    out.mkdir(parents=True, exist_ok=True)
    teacher_cfg, params = read_run_config(teacher_run)  # the student sees exactly the tensors the teacher saw
    split = SplitSpec.from_config(teacher_cfg)
    datasets = prepare_run(split, params, cfg.cache, cfg.workers, out, dist.main)  # decode before torch's threads
    teacher, _, _ = load_run_model(teacher_run)
    teacher_sha = sha256_file(teacher_run / "model.safetensors")
    teacher_train = cached_teacher_logits(teacher, datasets[Split.TRAIN], out, teacher_sha, cfg, dist.device).to(dist.device)
    student = create_model(cfg.arch, len(LABELS), params.channels, params.size, cfg.init)
    if hasattr(student, "set_distilled_training"):  # DeiT: return (class, distillation) logits in training
        student.set_distilled_training(True)
    hard = make_loss(cfg.loss, torch.from_numpy(datasets[Split.TRAIN].labels), cfg.pos_weight).to(dist.device)

    def compute_loss(outputs, targets, index):
        soft_targets = teacher_train[index.to(teacher_train.device)]
        if isinstance(outputs, tuple):  # DeiT: class token <- labels, distillation token <- teacher
            cls_logits, dist_logits = outputs
            return (1 - cfg.alpha) * hard(cls_logits, targets) + cfg.alpha * soft_bce(dist_logits, soft_targets, cfg.temperature)
        return (1 - cfg.alpha) * hard(outputs, targets) + cfg.alpha * soft_bce(outputs, soft_targets, cfg.temperature)

    run_config = json.loads(json.dumps(asdict(cfg)))
    history = fit(student, datasets[Split.TRAIN], datasets[Split.VAL], cfg, out, compute_loss, run_config, resume, dist)
    if not dist.main:
        return {}
    # The student's run folder looks like a finetune run, so calibrate / evaluate / export take it.
    config = run_config | {"data": list(split.data), "split_seed": split.split_seed, "train_val_list": split.train_val_list,
                           "test_list": split.test_list, "val_fraction": split.val_fraction,
                           "distilled_from": {"run": str(teacher_run), "arch": teacher_cfg["arch"], "sha256": teacher_sha}}
    save_run(student, datasets, config, params, history, out)
    test = datasets[Split.TEST]
    teacher_test = predict_logits(teacher.cpu(), test, cfg.batch_size * 2, cfg.workers)
    report = agreement_report(teacher_run, np.load(out / "logits_test.npz")["logits"], teacher_test, test.labels)
    atomic_write_json(out / "distill_report.json", report)
    log.info("student mean AUROC %.4f vs teacher %.4f; decisions agree on %.1f%%", report["student_mean_auroc"],
             report["teacher_mean_auroc"], 100 * report["decision_agreement"])
    return report
