"""The small-data recipe: a frozen pretrained trunk, a linear probe, then the top blocks unfrozen.

1. The first `frozen_blocks` blocks never train. Their outputs are computed once for every
   augmented view of every image (train/trunk.py), so an epoch costs only the top blocks.
2. Stage 1 (linear probe): the head alone, on the pooled features of the pretrained top.
3. Stage 2: the top blocks + head from there, layer-wise LR decay, cosine schedule, EMA of the
   weights (the EMA is what is kept), stochastic depth on the trained blocks.
4. Out-of-fold predictions: the same recipe in K folds over the target-domain training images
   (the full-resolution set) gives every one of them a prediction from a model that did not see
   it: `logits_val.npz`, what the operating points are chosen on.
5. The final model trains on all training images. Its logits and every fold model's on every
   view are saved, so a student (`--teacher`) learns the teacher's outputs on exactly the same
   views at its own size, each of its folds from the teacher's model of that fold (the final
   teacher has seen the held-out images' labels: distilling it would leak them into the
   student's out-of-fold predictions).

The run folder looks like a finetune run: calibrate / evaluate / export take it unchanged.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from cxr_edge.atomic import atomic_write, atomic_write_json
from cxr_edge.labels import LABELS
from cxr_edge.manifest import sha256_file
from cxr_edge.metrics import per_class_auroc
from cxr_edge.preprocess import PreprocessParams

from .data import Record, Split, SplitSpec, labels_of, read_records
from .distill import soft_bce
from .loop import make_scheduler, seed_everything
from .losses import make_loss
from .model import create_model
from .tensors import cache_key, cached_tensors, load_tensors
from .trunk import cached_encode, encode_views, top_forward, top_parameters

log = logging.getLogger(__name__)
VIEW_LOGITS = "view_logits.npz"
MODEL_KWARGS = {"global_pool": "avg", "fc_norm": False}  # logits = mean over patches of a linear map: a faithful CAM


@dataclass
class StagedConfig:
    data: tuple[str, ...] = ()
    test_data: str = ""  # one of `data`: held-out test patients and the out-of-fold set come from it
    test_fraction: float = 0.3
    split_seed: int = 0
    out: str = "runs/staged"
    arch: str = "vit_small_patch14_dinov2"
    init: str | None = None
    teacher: str | None = None  # a staged run: distil it (same data, split and views)
    alpha: float = 0.7  # weight of the teacher term with --teacher
    temperature: float = 2.0
    img_size: int = 224
    frozen_blocks: int = 10
    views: int = 4  # per target-domain training image (view 0 is the image as served)
    other_views: int = 2  # per other training image (the 64 px thumbnails)
    strength: float = 2.0  # augmentation strength (train/augment.py: 2 = twice the default limits)
    folds: int = 5
    probe_epochs: int = 40
    probe_lr: float = 1e-3
    epochs: int = 6
    lr: float = 1e-4
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    drop_path: float = 0.1
    ema_decay: float = 0.99
    batch_size: int = 32
    loss: str = "bce"
    pos_weight: bool = True
    seed: int = 0
    workers: int = 2
    threads: int = 2
    cache: str | None = None

    @property
    def split(self) -> SplitSpec:
        return SplitSpec(tuple(self.data), self.split_seed, test_data=self.test_data, test_fraction=self.test_fraction)


@dataclass
class Views:
    """Every image of the run, its labels, how many views it has and its trunk outputs."""

    records: list[Record]
    labels: np.ndarray  # [N, C]
    views: np.ndarray  # [N] views per image
    tokens: np.ndarray  # [N, max views, T, D] float16
    train: np.ndarray  # row indices
    test: np.ndarray
    target: np.ndarray  # training rows from the target domain (the out-of-fold set)


def staged(cfg: StagedConfig) -> Path:
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.teacher:
        cfg = inherit_from_teacher(cfg)
    if cfg.test_data not in cfg.data:
        raise ValueError(f"--test-data {cfg.test_data!r} must be one of --data")
    params = PreprocessParams(size=cfg.img_size, resize="pad", channels=1)
    decoded, counts, is_test, is_target = decode(cfg, params, out)  # forks its workers before torch's threads
    seed_everything(cfg.seed)
    # drop_path_rate: stochastic depth while the top blocks train (the frozen trunk runs in ONNX Runtime)
    base = create_model(cfg.arch, len(LABELS), params.channels, cfg.img_size, cfg.init, **MODEL_KWARGS,
                        drop_path_rate=cfg.drop_path)
    views = encode(cfg, params, base, decoded, counts, is_test, is_target)
    teacher = None
    if cfg.teacher:
        teacher = teacher_view_logits(cfg, views)
        start_from_teacher_top(base, cfg)
    features = probe_features(base, views, cfg)  # of the top every fold starts from: computed once
    history = {"folds": [], "final": None}

    started = time.perf_counter()
    oof = np.zeros((len(views.target), len(LABELS)), np.float32)
    fold_of = np.random.default_rng(cfg.seed).permutation(len(views.target)) % cfg.folds
    fold_logits = np.zeros((cfg.folds, *views_logits_shape(views)), np.float32)
    held_out_fold = np.full(len(views.records), -1)
    held_out_fold[views.target] = fold_of
    if teacher is not None and not np.array_equal(teacher.held_out_fold, held_out_fold):
        raise ValueError(f"{cfg.teacher}: the teacher's folds hold out other images than this run's")
    for fold in range(cfg.folds):
        held = views.target[fold_of == fold]
        rows = np.setdiff1d(views.train, held)
        # A student's fold learns from the teacher's model of the same fold: the teacher's final
        # model has seen the held-out images' labels, and would leak them into the estimate.
        fold_teacher = teacher.folds[fold] if teacher is not None else None
        model, fold_history = train_model(base, views, rows, cfg, fold_teacher, features, f"fold {fold + 1}/{cfg.folds}")
        fold_logits[fold] = every_view_logits(model, views, cfg.frozen_blocks)
        oof[fold_of == fold] = predict(model, views.tokens, held, cfg.frozen_blocks)
        fold_history["held_out_mean_auroc"] = _mean_auroc(views.labels[held], oof[fold_of == fold])
        log.info("fold %d/%d: mean AUROC %.4f on its %d held-out images", fold + 1, cfg.folds,
                 fold_history["held_out_mean_auroc"], len(held))
        history["folds"].append(fold_history)
    oof_auroc = _mean_auroc(views.labels[views.target], oof)
    log.info("out-of-fold mean AUROC %.4f on %d target-domain training images", oof_auroc, len(views.target))

    model, history["final"] = train_model(base, views, views.train, cfg, teacher.final if teacher is not None else None,
                                          features, "final")
    test_logits = predict(model, views.tokens, views.test, cfg.frozen_blocks)
    history |= {"best_val_mean_auroc": oof_auroc, "validation": f"{cfg.folds}-fold out-of-fold predictions",
                "test_mean_auroc": _mean_auroc(views.labels[views.test], test_logits),
                "seconds": round(time.perf_counter() - started, 1), "epochs": history["final"]["epochs"]}
    save(model, views, oof, test_logits, fold_logits, held_out_fold, cfg, params, history, out)
    log.info("test mean AUROC %.4f on %d images; run saved in %s", history["test_mean_auroc"], len(views.test), out)
    return out


def inherit_from_teacher(cfg: StagedConfig) -> StagedConfig:
    """A student sees the teacher's data, split and views (its own size and blocks)."""
    teacher = json.loads((Path(cfg.teacher) / "config.json").read_text())
    shared = ("data", "test_data", "test_fraction", "split_seed", "views", "other_views", "strength", "seed", "folds")
    return StagedConfig(**(asdict(cfg) | {k: (tuple(teacher[k]) if k == "data" else teacher[k]) for k in shared}))


def decode(cfg: StagedConfig, params: PreprocessParams, out: Path):
    """Every image of the run decoded once; how many views each gets (test images: the image as
    served only); the split written down."""
    splits = cfg.split.splits()
    target_paths = {r.path for r in read_records([cfg.test_data])}
    records = splits[Split.TRAIN] + splits[Split.TEST]
    decoded = cached_tensors(records, params, cfg.cache, cfg.workers) if cfg.cache else load_tensors(records, params, cfg.workers)
    for path, reason in decoded.left_out:
        log.error("%s: left out: %s", path, reason)
    test_paths = {r.path for r in splits[Split.TEST]}
    is_test = np.array([r.path in test_paths for r in decoded.records])
    is_target = np.array([r.path in target_paths for r in decoded.records])
    counts = np.where(is_test, 1, np.where(is_target, cfg.views, cfg.other_views))
    atomic_write_json(out / "split.json", {
        "train": sorted({r.patient_id for r, t in zip(decoded.records, is_test) if not t}),
        "test": sorted({r.patient_id for r, t in zip(decoded.records, is_test) if t}),
        "spec": asdict(cfg.split), "left_out": [{"file": str(p), "reason": reason} for p, reason in decoded.left_out]})
    return decoded, counts, is_test, is_target


def trunk_key(cfg: StagedConfig, params: PreprocessParams, records: list[Record], counts: np.ndarray) -> dict:
    """What the cached trunk outputs depend on: every image (path, size, mtime: the tensor
    cache's key), its views, the trunk's weights (--init, or the seed that drew them) and cut."""
    return {"images": cache_key(records, params), "views": counts.tolist(), "arch": cfg.arch,
            "init": sha256_file(cfg.init) if cfg.init else None, "frozen": cfg.frozen_blocks,
            "seed": cfg.seed, "strength": cfg.strength}


def encode(cfg: StagedConfig, params: PreprocessParams, base, decoded, counts: np.ndarray, is_test: np.ndarray,
           is_target: np.ndarray) -> Views:
    """The trunk outputs of `base` (the model every fold starts from) on every view."""
    tokens = cached_encode(cfg.cache, trunk_key(cfg, params, decoded.records, counts), lambda: encode_views(
        base, cfg.frozen_blocks, decoded.images, counts, cfg.seed, cfg.strength, cfg.threads))
    records = decoded.records
    return Views(records, labels_of(records), counts, tokens, np.flatnonzero(~is_test), np.flatnonzero(is_test),
                 np.flatnonzero(~is_test & is_target))


def start_from_teacher_top(base, cfg: StagedConfig) -> None:
    """A student of the teacher's architecture starts its trained blocks, norm and head from the
    teacher's (the frozen trunk, position embeddings included, stays the pretrained one)."""
    from safetensors.torch import load_file

    teacher_cfg = json.loads((Path(cfg.teacher) / "config.json").read_text())
    if teacher_cfg["arch"] != cfg.arch:
        log.info("student starts from its initial weights (the teacher is a %s)", teacher_cfg["arch"])
        return
    top = tuple(f"blocks.{i}." for i in range(cfg.frozen_blocks, len(base.blocks))) + ("norm.", "fc_norm.", "head.")
    state = {k: v for k, v in load_file(str(Path(cfg.teacher) / "model.safetensors")).items() if k.startswith(top)}
    base.load_state_dict(state, strict=False)
    log.info("student's top blocks and head start from the teacher's (%d tensors)", len(state))


@dataclass
class TeacherLogits:
    final: np.ndarray  # [N, views, C]: the teacher's final model on every view of every image
    folds: np.ndarray  # [folds, N, views, C]: each fold's model on the same
    held_out_fold: np.ndarray  # [N]: the fold that held the image out (-1: trained on in every fold)


def teacher_view_logits(cfg: StagedConfig, views: Views) -> TeacherLogits:
    saved = np.load(Path(cfg.teacher) / VIEW_LOGITS)
    if "fold_logits" not in saved or len(saved["fold_logits"]) != cfg.folds:
        raise ValueError(f"{cfg.teacher}: no per-fold teacher logits for {cfg.folds} folds (a run made before "
                         "students learned each fold from the teacher's fold: train the teacher again)")
    row_of = {path: i for i, path in enumerate(saved["paths"].tolist())}
    missing = [r.path for r in views.records if str(r.path) not in row_of]
    if missing:
        raise ValueError(f"{cfg.teacher}: no teacher logits for {len(missing)} images (e.g. {missing[0]})")
    rows = [row_of[str(r.path)] for r in views.records]
    return TeacherLogits(saved["logits"][rows], saved["fold_logits"][:, rows], saved["held_out_fold"][rows])


def views_logits_shape(views: Views) -> tuple[int, int, int]:
    return len(views.records), views.tokens.shape[1], len(LABELS)


def every_view_logits(model, views: Views, frozen_blocks: int) -> np.ndarray:
    """The model's logits on every view of every image [N, views, C] (zeros past an image's views)."""
    out = np.zeros(views_logits_shape(views), np.float32)
    for view in range(views.tokens.shape[1]):
        rows = np.flatnonzero(views.views > view)
        out[rows, view] = predict(model, views.tokens, rows, frozen_blocks, view)
    return out


def train_model(base, views: Views, rows: np.ndarray, cfg: StagedConfig, teacher: np.ndarray | None,
                features: torch.Tensor, name: str):
    """Stage 1 (linear probe) then stage 2 (top blocks); returns the EMA model and its history."""
    from timm.utils import ModelEmaV3

    model = copy.deepcopy(base)
    labels = torch.from_numpy(views.labels)
    criterion = make_loss(cfg.loss, labels[rows], cfg.pos_weight)
    history = {"name": name, "images": int(len(rows)), "probe": linear_probe(model, features, views, rows, cfg, criterion)}

    params = top_parameters(model, cfg.frozen_blocks)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(layer_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * int(np.ceil(len(rows) / cfg.batch_size))
    scheduler = make_scheduler(optimizer, steps, int(np.ceil(len(rows) / cfg.batch_size)), cfg.lr)
    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True)
    generator = np.random.default_rng(cfg.seed)
    step, history["epochs"] = 0, []
    for epoch in range(cfg.epochs):
        model.train()
        started, losses = time.perf_counter(), []
        order = generator.permutation(rows)
        for start in range(0, len(order), cfg.batch_size):
            batch = order[start : start + cfg.batch_size]
            view = generator.integers(0, views.views[batch])  # a random view of each image
            x = torch.from_numpy(views.tokens[batch, view].astype(np.float32))
            logits = top_forward(model, x, cfg.frozen_blocks)
            loss = criterion(logits, labels[batch])
            if teacher is not None:
                soft = torch.from_numpy(teacher[batch, view])
                loss = (1 - cfg.alpha) * loss + cfg.alpha * soft_bce(logits, soft, cfg.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            step += 1
            scheduler.step_update(num_updates=step)
            ema.update(model, step=step)
            losses.append(loss.item())
        history["epochs"].append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)),
                                  "seconds": round(time.perf_counter() - started, 1)})
        log.info("%s: epoch %d/%d %s", name, epoch + 1, cfg.epochs, history["epochs"][-1])
    final = ema.module.eval()
    for p in final.parameters():
        p.requires_grad_(False)
    return final, history


@torch.no_grad()
def probe_features(base, views: Views, cfg: StagedConfig) -> torch.Tensor:
    """Pooled features [N, views, D] of the starting top (pretrained, or a student's teacher's) on every
    training view (zeros elsewhere)."""
    base.eval()
    out = torch.zeros(len(views.records), views.tokens.shape[1], base.num_features)
    for view in range(views.tokens.shape[1]):
        rows = views.train[views.views[views.train] > view]
        for start in range(0, len(rows), 64):
            chunk = rows[start : start + 64]
            x = torch.from_numpy(views.tokens[chunk, view].astype(np.float32))
            out[chunk, view] = top_forward(base, x, cfg.frozen_blocks, pre_logits=True)
    log.info("linear-probe features of %d training images computed", len(views.train))
    return out


def linear_probe(model, features: torch.Tensor, views: Views, rows: np.ndarray, cfg: StagedConfig, criterion) -> dict:
    """Stage 1: the head alone on pooled features of the pretrained top, so stage 2 starts from a
    head that already points the right way (LP-FT)."""
    head = model.head
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.probe_lr, weight_decay=1e-4)
    generator = np.random.default_rng(cfg.seed + 1)
    labels = torch.from_numpy(views.labels)
    losses = []
    for _ in range(cfg.probe_epochs):
        order = generator.permutation(rows)
        for start in range(0, len(order), 64):
            batch = order[start : start + 64]
            x = features[batch, generator.integers(0, views.views[batch])]
            loss = criterion(head(x), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return {"epochs": cfg.probe_epochs, "final_loss": float(np.mean(losses[-10:]))}


def layer_groups(model, cfg: StagedConfig) -> list[dict]:
    """Top block at lr * decay, the one below at lr * decay^2, ...; norm and head at lr.
    No weight decay on biases and norms. `lr_scale` is what timm's scheduler multiplies by."""
    groups = []
    depth = len(model.blocks)
    named = [(model.blocks[i], cfg.layer_decay ** (depth - i)) for i in range(cfg.frozen_blocks, depth)]
    named += [(model.norm, 1.0), (model.fc_norm, 1.0), (model.head, 1.0)]
    for module, scale in named:
        decay = [p for p in module.parameters() if p.ndim >= 2]
        no_decay = [p for p in module.parameters() if p.ndim < 2]
        groups += [{"params": decay, "lr_scale": scale}, {"params": no_decay, "lr_scale": scale, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


@torch.no_grad()
def predict(model, tokens: np.ndarray, rows: np.ndarray, frozen_blocks: int, view: int = 0) -> np.ndarray:
    """Logits of view `view` (0: the image as served) of each row."""
    out = [top_forward(model, torch.from_numpy(tokens[rows[i : i + 64], view].astype(np.float32)), frozen_blocks).numpy()
           for i in range(0, len(rows), 64)]
    return np.concatenate(out) if out else np.zeros((0, len(LABELS)), np.float32)


def save(model, views: Views, oof: np.ndarray, test_logits: np.ndarray, fold_logits: np.ndarray,
         held_out_fold: np.ndarray, cfg: StagedConfig, params: PreprocessParams, history: dict, out: Path) -> None:
    from safetensors.torch import save as to_bytes

    from .finetune import save_npz

    atomic_write(out / "model.safetensors", to_bytes({k: v.contiguous() for k, v in model.state_dict().items()}))
    save_npz(out / "logits_val.npz", logits=oof, labels=views.labels[views.target])
    save_npz(out / "logits_test.npz", logits=test_logits, labels=views.labels[views.test])
    save_npz(out / VIEW_LOGITS, paths=np.array([str(r.path) for r in views.records]),
             logits=every_view_logits(model, views, cfg.frozen_blocks), fold_logits=fold_logits,
             held_out_fold=held_out_fold)
    config = json.loads(json.dumps(asdict(cfg))) | {
        "recipe": "staged", "model_kwargs": MODEL_KWARGS, "preprocessing": params.to_manifest(),
        "validation": f"{cfg.folds}-fold out-of-fold predictions on {len(views.target)} training images of "
                      f"{Path(cfg.test_data.partition(':')[0]).parent.name or cfg.test_data}",
        **({"distilled_from": {"run": cfg.teacher, "sha256": sha256_file(Path(cfg.teacher) / "model.safetensors")}}
           if cfg.teacher else {})}
    atomic_write_json(out / "config.json", config)
    atomic_write_json(out / "history.json", history)


def _mean_auroc(labels: np.ndarray, logits: np.ndarray) -> float:
    return round(float(np.nanmean(per_class_auroc(labels, logits))), 4)
