"""Fine-tune a timm model on NIH-format data; keep the best validation mean AUROC weights."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from cxr_edge.atomic import atomic_write, atomic_write_json
from cxr_edge.labels import LABELS
from cxr_edge.preprocess import PreprocessParams

from .data import Split, SplitSpec
from .dataset import make_dataset
from .loop import LoopConfig, fit, predict_logits, seed_everything, setup_distributed
from .losses import make_loss
from .model import create_model

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig(LoopConfig):
    data: tuple[str, ...] = ()  # "labels.csv" or "labels.csv:image_dir"
    out: str = "runs/finetune"
    arch: str = "vit_base_patch16_224"
    init: str | None = None
    img_size: int = 224
    resize: str = "pad"
    loss: str = "bce"
    pos_weight: bool = True
    split_seed: int = 0
    train_val_list: str | None = None
    test_list: str | None = None
    val_fraction: float = 0.1
    cache: str | None = None  # None | "memory" | a folder for the float16 tensor cache

    @property
    def split(self) -> SplitSpec:
        return SplitSpec(tuple(self.data), self.split_seed, self.train_val_list, self.test_list, self.val_fraction)


def prepare_run(split: SplitSpec, params: PreprocessParams, cache: str | None, workers: int, out: Path, main: bool):
    """Splits + datasets; the split (and any image left out) is written down so every later step
    uses the same one."""
    splits = split.splits()
    log.info("data: %s", {str(k): len(v) for k, v in splits.items()})
    datasets = {k: make_dataset(v, params, cache, workers) for k, v in splits.items()}
    if main:
        atomic_write_json(out / "split.json", {k: sorted({r.patient_id for r in v}) for k, v in splits.items()}
                          | {"spec": asdict(split),
                             "left_out": {k: [{"file": str(path), "reason": reason} for path, reason in d.left_out]
                                          for k, d in datasets.items() if d.left_out}})
    return datasets


def save_npz(path: Path, **arrays) -> None:
    atomic_write(path, lambda f: np.savez(f, **arrays))


def save_run(model, datasets, config: dict, params: PreprocessParams, history: dict, out: Path) -> None:
    """The run folder every later step reads: weights, val/test logits, config, history."""
    from safetensors.torch import save

    model = model.cpu().eval()
    atomic_write(out / "model.safetensors", save({k: v.contiguous() for k, v in model.state_dict().items()}))
    for name in (Split.VAL, Split.TEST):
        logits = predict_logits(model, datasets[name], config["batch_size"] * 2, config["workers"])
        save_npz(out / f"logits_{name}.npz", logits=logits, labels=datasets[name].labels)
    atomic_write_json(out / "config.json", config | {"preprocessing": params.to_manifest()})
    atomic_write_json(out / "history.json", history)
    log.info("best val mean AUROC %.4f; run saved in %s", history["best_val_mean_auroc"], out)


def finetune(cfg: FinetuneConfig, resume: bool = False) -> Path:
    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    dist = setup_distributed()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    params = PreprocessParams(size=cfg.img_size, resize=cfg.resize, channels=1)
    datasets = prepare_run(cfg.split, params, cfg.cache, cfg.workers, out, dist.main)
    model = create_model(cfg.arch, len(LABELS), params.channels, cfg.img_size, cfg.init)
    criterion = make_loss(cfg.loss, torch.from_numpy(datasets["train"].labels), cfg.pos_weight).to(dist.device)

    def compute_loss(outputs, targets, index):
        if isinstance(outputs, tuple):  # DeiT with a distillation token, trained without a teacher
            return sum(criterion(o, targets) for o in outputs) / len(outputs)
        return criterion(outputs, targets)

    run_config = json.loads(json.dumps(asdict(cfg)))
    history = fit(model, datasets["train"], datasets["val"], cfg, out, compute_loss, run_config, resume, dist)
    if dist.main:
        save_run(model, datasets, run_config, params, history, out)
    return out
