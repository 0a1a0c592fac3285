"""A ViT cut in two: a frozen trunk whose outputs are computed once per augmented view, and the
top blocks + head that train on them.

On a CPU this is what makes a 224 px ViT trainable at all: the frozen trunk runs once per view
in ONNX Runtime (about twice torch eager's rate here) instead of every epoch in torch, and every
fold of a cross-validation reuses the same outputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from cxr_edge.atomic import atomic_write

from .augment import apply_affine, draw_affine

log = logging.getLogger(__name__)


class Trunk(torch.nn.Module):
    """Patch embedding, position embedding and the first `frozen_blocks` blocks of a timm ViT."""

    def __init__(self, vit, frozen_blocks: int):
        super().__init__()
        self.vit, self.frozen_blocks = vit, frozen_blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        for block in vit.blocks[: self.frozen_blocks]:
            x = block(x)
        return x


def top_forward(vit, tokens: torch.Tensor, frozen_blocks: int, pre_logits: bool = False) -> torch.Tensor:
    """The rest of the model on trunk outputs: the remaining blocks, the norm and the head."""
    for block in vit.blocks[frozen_blocks:]:
        tokens = block(tokens)
    return vit.forward_head(vit.norm(tokens), pre_logits=pre_logits)


def top_parameters(vit, frozen_blocks: int) -> list[torch.nn.Parameter]:
    return [p for block in vit.blocks[frozen_blocks:] for p in block.parameters()] + list(vit.norm.parameters()) \
        + list(vit.fc_norm.parameters()) + list(vit.head.parameters())


def view_batch(images: np.ndarray, indices: np.ndarray, view: int, seed: int, strength: float) -> torch.Tensor:
    """View `view` of each image: 0 is the image as served; every other view is a random affine +
    intensity change drawn from (seed, image index, view) alone, so a student at another size gets
    the same views as its teacher (affine grids are in normalised coordinates)."""
    x = torch.from_numpy(np.asarray(images[indices], np.float32))
    if view == 0:
        return x
    out = []
    for row, index in enumerate(indices):
        generator = torch.Generator().manual_seed(hash_seed(seed, int(index), view))
        out.append(apply_affine(x[row : row + 1], draw_affine(1, generator, strength)))
    return torch.cat(out)


def hash_seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(json.dumps(parts).encode()).digest()[:8], "little") & (2**63 - 1)


def encode_views(vit, frozen_blocks: int, images: np.ndarray, views_of: np.ndarray, seed: int, strength: float,
                 threads: int, batch_size: int = 16) -> np.ndarray:
    """Trunk outputs [N, max(views_of), tokens, dim] as float16 (views past an image's count stay 0).

    The trunk runs in ONNX Runtime; its outputs match torch's to float32 rounding.
    """
    import onnxruntime as ort

    size = images.shape[-1]
    trunk = Trunk(vit, frozen_blocks).eval()
    with tempfile.TemporaryDirectory(prefix="cxr-edge-trunk-") as tmp:
        path = Path(tmp) / "trunk.onnx"
        dummy = torch.zeros(2, images.shape[1], size, size)
        with torch.no_grad():
            tokens, dim = trunk(dummy).shape[1:]
            torch.onnx.export(trunk, dummy, str(path), input_names=["image"], output_names=["tokens"],
                              dynamic_axes={"image": {0: "batch"}, "tokens": {0: "batch"}}, opset_version=17, dynamo=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        out = np.zeros((len(images), int(views_of.max()), tokens, dim), np.float16)
        for view in range(int(views_of.max())):
            todo = np.flatnonzero(views_of > view)
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                x = view_batch(images, chunk, view, seed, strength).numpy()
                out[chunk, view] = session.run(None, {"image": x})[0]
            log.info("trunk outputs: view %d of %d done (%d images)", view + 1, int(views_of.max()), len(todo))
    return out


def cached_encode(cache_dir: str | Path | None, key: dict, compute) -> np.ndarray:
    """Trunk outputs from `cache_dir` when the same key built them before, else computed and saved."""
    if not cache_dir:
        return compute()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"trunk-{digest}.npy"
    if path.is_file():
        log.info("trunk outputs from cache %s", path)
        return np.load(path)
    array = compute()
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.save(f, array))
    return array
