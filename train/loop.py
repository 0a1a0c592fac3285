"""The training loop shared by finetune and distill.

AdamW (timm's factory: no decay on norms/biases, optional layer-wise LR decay) with linear warmup
+ cosine (timm's scheduler, stepped per optimizer update), gradient accumulation, AMP on CUDA,
DistributedDataParallel under torchrun, early stopping on validation mean AUROC with the best
weights restored, and a checkpoint after every epoch (written atomically) that `--resume`
continues from bit-for-bit: every random number comes from one generator whose state is
checkpointed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cxr_edge.atomic import atomic_write
from cxr_edge.metrics import per_class_auroc

from .augment import augment
from .dataset import XrayDataset, loader
from .losses import weighted_sample_weights

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
# Settings that may differ on --resume without changing the result.
RESUMABLE_DIFFERENCES = {"resume", "workers", "threads", "cache"}


@dataclass
class LoopConfig:
    epochs: int = 8
    batch_size: int = 32
    lr: float = 1e-4
    layer_decay: float | None = None
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    accum_steps: int = 1
    amp: str = "off"  # off | bf16 | fp16 (CUDA only)
    sampler: str = "shuffle"  # shuffle | weighted
    patience: int = 3
    grad_clip: float = 1.0
    seed: int = 0
    workers: int = 2
    threads: int = 2


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Distributed:
    """torchrun sets WORLD_SIZE / RANK / LOCAL_RANK; NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:  # one set of progress logs, from rank 0
        logging.getLogger(__package__).setLevel(logging.WARNING)  # train, or cxr_edge.train installed
    return Distributed(rank, world, device)


def seed_everything(seed: int) -> None:
    """Before the model is built: its initial weights (head, no --init) come from this seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_scheduler(optimizer, total_steps: int, warmup_steps: int, lr: float):
    """Linear warmup from lr / warmup_steps to lr, then cosine to 0 at the last of `total_steps`
    optimizer updates; timm's scheduler applies each group's layer-decay `lr_scale`."""
    from timm.scheduler import CosineLRScheduler

    return CosineLRScheduler(optimizer, t_initial=max(1, total_steps - warmup_steps), lr_min=0.0,
                             warmup_t=warmup_steps, warmup_lr_init=lr / max(1, warmup_steps), warmup_prefix=True,
                             t_in_epochs=False)


def base_lr(optimizer) -> float:
    """The schedule's learning rate now (without a group's layer-decay scale)."""
    group = optimizer.param_groups[0]
    return group["lr"] / group.get("lr_scale", 1.0)


def autocast(device: torch.device, amp: str):
    if device.type != "cuda" or amp == "off":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def predict_logits(model, dataset: XrayDataset, batch_size: int = 64, workers: int = 0,
                   device: torch.device = torch.device("cpu"), amp: str = "off") -> np.ndarray:
    model.eval()
    out = []
    for x, _, _ in loader(dataset, None, batch_size, workers, pin=device.type == "cuda"):
        with autocast(device, amp):
            logits = model(x.to(device, non_blocking=True))
        out.append(logits.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, dataset.labels.shape[1]), np.float32)


def epoch_order(n: int, labels: torch.Tensor, sampler: str, generator: torch.Generator) -> list[int]:
    if sampler == "weighted":  # rare findings drawn more often, with replacement
        return torch.multinomial(weighted_sample_weights(labels), n, replacement=True, generator=generator).tolist()
    return torch.randperm(n, generator=generator).tolist()


def shard(order: list[int], dist: Distributed) -> list[int]:
    """This rank's share; padded so every rank runs the same number of steps (DDP needs that)."""
    if dist.world == 1:
        return order
    padded = order + order[: (-len(order)) % dist.world]
    return padded[dist.rank :: dist.world]


def fit(model: torch.nn.Module, train_set: XrayDataset, val_set: XrayDataset, cfg: LoopConfig, out: Path,
        compute_loss: Callable, run_config: dict, resume: bool = False, dist: Distributed | None = None) -> dict:
    """Train `model` in place (ending on its best epoch's weights); return the history."""
    dist = dist or Distributed()
    model.to(dist.device)
    from timm.optim import create_optimizer_v2

    optimizer = create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay)
    use_amp = dist.device.type == "cuda" and cfg.amp != "off"
    if cfg.amp != "off" and not use_amp:
        log.warning("--amp %s needs a CUDA GPU; training in float32 on %s", cfg.amp, dist.device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and cfg.amp == "fp16")
    train_model = model
    if dist.world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)

    labels = torch.from_numpy(train_set.labels)
    micro_batches = math.ceil(math.ceil(len(train_set) / dist.world) / cfg.batch_size)
    steps_per_epoch = math.ceil(micro_batches / cfg.accum_steps)
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    scheduler = make_scheduler(optimizer, total, warmup, cfg.lr)
    generator = torch.Generator().manual_seed(cfg.seed)
    state = {"epoch": 0, "step": 0, "history": [], "best": -1.0, "best_state": None, "stale": 0, "stopped": False}

    checkpoint_path = out / CHECKPOINT
    if resume and checkpoint_path.is_file():
        saved = torch.load(checkpoint_path, map_location="cpu", weights_only=True)  # never unpickle code
        _check_same_run(json.loads(saved["config"]), run_config)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        if "scheduler" in saved:  # checkpoints from before timm's scheduler: the step count is enough
            scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])  # dropout / drop-path draw from the global generator
        if dist.device.type == "cuda" and "cuda_rng" in saved:
            torch.cuda.set_rng_state(saved["cuda_rng"], dist.device)
        state = {k: saved[k] for k in state}
        log.info("resumed from %s after epoch %d (best val mean AUROC %.4f)", checkpoint_path, state["epoch"], state["best"])
    elif resume:
        log.info("--resume: no checkpoint in %s, starting from scratch", out)

    while state["epoch"] < cfg.epochs and not state["stopped"]:
        train_model.train()
        started, losses = time.perf_counter(), []
        order = shard(epoch_order(len(train_set), labels, cfg.sampler, generator), dist)
        batches = loader(train_set, order, cfg.batch_size, cfg.workers, pin=dist.device.type == "cuda")
        optimizer.zero_grad(set_to_none=True)
        for i, (x, y, index) in enumerate(batches):
            x, y = x.to(dist.device, non_blocking=True), y.to(dist.device, non_blocking=True)
            x = augment(x, generator)
            last_micro = (i + 1) % cfg.accum_steps == 0 or i + 1 == len(batches)
            sync = train_model.no_sync() if dist.world > 1 and not last_micro else contextlib.nullcontext()
            with sync:
                with autocast(dist.device, cfg.amp):
                    loss = compute_loss(train_model(x), y, index)
                scaler.scale(loss / cfg.accum_steps).backward()
            losses.append(loss.item())
            if len(batches) >= 50 and (i + 1) % (len(batches) // 10) == 0:  # progress on long epochs
                log.info("epoch %d: batch %d/%d, loss %.4f", state["epoch"] + 1, i + 1, len(batches), np.mean(losses[-50:]))
            if last_micro:
                scheduler.step_update(num_updates=state["step"])
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
        train_loss = float(np.mean(losses))
        if dist.world > 1:  # the loss of the whole step, not of this rank's shard
            mean_loss = torch.tensor([train_loss], device=dist.device)
            torch.distributed.all_reduce(mean_loss)
            train_loss = mean_loss.item() / dist.world
        val_logits = predict_logits(model, val_set, cfg.batch_size * 2, cfg.workers, dist.device, cfg.amp)
        mean_auroc = float(np.nanmean(per_class_auroc(val_set.labels, val_logits)))
        state["epoch"] += 1
        state["history"].append({"epoch": state["epoch"], "train_loss": train_loss,
                                 "val_mean_auroc": mean_auroc, "lr": base_lr(optimizer),
                                 "seconds": round(time.perf_counter() - started, 1)})
        log.info("epoch %d/%d: %s", state["epoch"], cfg.epochs, state["history"][-1])
        if mean_auroc > state["best"]:
            state["best"], state["stale"] = mean_auroc, 0
            state["best_state"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            state["stale"] += 1
            if state["stale"] >= cfg.patience:
                log.info("early stop: no validation AUROC gain for %d epochs", state["stale"])
                state["stopped"] = True
        if dist.main:
            checkpoint = {**state, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                          "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                          **({"cuda_rng": torch.cuda.get_rng_state(dist.device)} if dist.device.type == "cuda" else {}),
                          "config": json.dumps(run_config)}
            atomic_write(checkpoint_path, lambda f: torch.save(checkpoint, f))
    model.load_state_dict(state["best_state"])  # the best epoch, not the last
    return {"best_val_mean_auroc": state["best"], "epochs": state["history"], "stopped_early": state["stopped"]}


def _check_same_run(saved: dict, current: dict) -> None:
    changed = sorted(k for k in set(saved) | set(current)
                     if k not in RESUMABLE_DIFFERENCES and saved.get(k) != current.get(k))
    if changed:
        raise ValueError(f"--resume: the checkpoint was made with other settings ({', '.join(changed)}); "
                         "use the same command, or a new --out folder")


def config_dict(cfg) -> dict:
    return json.loads(json.dumps(asdict(cfg)))
