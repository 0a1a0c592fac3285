"""Fine-tune a timm model on NIH-format data: AdamW, warmup + cosine, best-AUROC weights kept."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from cxr_edge.labels import LABELS
from cxr_edge.metrics import per_class_auroc
from cxr_edge.preprocess import PreprocessParams

from .data import load_tensors, patient_split, read_nih_csv
from .model import create_model

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    data: list[str]  # "labels.csv" or "labels.csv:image_dir"
    out: str
    arch: str = "vit_small_patch14_dinov2"
    init: str | None = None
    img_size: int = 112
    resize: str = "pad"
    epochs: int = 8
    batch_size: int = 32
    lr: float = 1e-4
    layer_decay: float | None = None  # layer-wise LR decay: block i gets lr * decay^(depth - i)
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    seed: int = 0
    split_seed: int = 0
    patience: int = 3
    threads: int = 2


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """CXR-safe augmentation: small rotation / shift / scale and brightness-contrast; no flips."""
    b = x.shape[0]
    angle = (torch.rand(b, generator=generator) - 0.5) * 2 * math.radians(7)
    scale = 1 + (torch.rand(b, generator=generator) - 0.5) * 0.2
    shift = (torch.rand(b, 2, generator=generator) - 0.5) * 0.12
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, x.shape, align_corners=False)
    x = torch.nn.functional.grid_sample(x, grid, padding_mode="border", align_corners=False)
    contrast = 1 + (torch.rand(b, 1, 1, 1, generator=generator) - 0.5) * 0.3
    brightness = (torch.rand(b, 1, 1, 1, generator=generator) - 0.5) * 0.3
    return x * contrast + brightness


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def predict_logits(model, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    model.eval()
    return np.concatenate([model(torch.from_numpy(x[i : i + batch_size])).numpy() for i in range(0, len(x), batch_size)])


def finetune(cfg: FinetuneConfig) -> Path:
    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for spec in cfg.data:
        csv_path, _, image_dir = spec.partition(":")
        records += read_nih_csv(csv_path, image_dir or None)
    splits = patient_split(records, seed=cfg.split_seed)
    log.info("data: %s", {k: len(v) for k, v in splits.items()})
    (out / "split.json").write_text(json.dumps(
        {k: sorted({r.patient_id for r in v}) for k, v in splits.items()} | {"seed": cfg.split_seed}, indent=1))
    params = PreprocessParams(size=cfg.img_size, resize=cfg.resize, channels=1)
    tensors = {k: load_tensors(v, params, workers=cfg.threads) for k, v in splits.items()}
    x_train, y_train = (torch.from_numpy(a) for a in tensors["train"])

    model = create_model(cfg.arch, len(LABELS), params.channels, cfg.img_size, cfg.init)
    from timm.optim import create_optimizer_v2

    # timm's AdamW factory: no weight decay on norms/biases, optional layer-wise LR decay.
    optimizer = create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay)
    steps_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    # pos_weight evens out the rare findings (Hernia is ~0.2% in NIH).
    pos = y_train.sum(0).clamp(min=1)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=((len(y_train) - pos) / pos).clamp(max=20))
    generator = torch.Generator().manual_seed(cfg.seed)

    history, best, best_state, step, stale = [], -1.0, None, 0, 0
    for epoch in range(cfg.epochs):
        model.train()
        started, losses = time.perf_counter(), []
        for batch in torch.randperm(len(x_train), generator=generator).split(cfg.batch_size):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, warmup, cfg.lr) * group.get("lr_scale", 1.0)
            loss = loss_fn(model(augment(x_train[batch], generator)), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item())
            step += 1
        val_auroc = per_class_auroc(tensors["val"][1], predict_logits(model, tensors["val"][0]))
        mean_auroc = float(np.nanmean(val_auroc))
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_mean_auroc": mean_auroc,
                        "seconds": round(time.perf_counter() - started, 1)})
        log.info("epoch %d: %s", epoch + 1, history[-1])
        if mean_auroc > best:
            best, stale = mean_auroc, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= cfg.patience:
                log.info("early stop: no val AUROC gain for %d epochs", stale)
                break
    model.load_state_dict(best_state)  # restore the best epoch, not the last

    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    for name in ("val", "test"):
        np.savez(out / f"logits_{name}.npz", logits=predict_logits(model, tensors[name][0]), labels=tensors[name][1])
    (out / "config.json").write_text(json.dumps(asdict(cfg) | {"preprocessing": params.to_manifest()}, indent=2))
    (out / "history.json").write_text(json.dumps({"best_val_mean_auroc": best, "epochs": history}, indent=2))
    log.info("best val mean AUROC %.4f; run saved in %s", best, out)
    return out
