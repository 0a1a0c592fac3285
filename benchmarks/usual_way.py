"""The usual way to run a chest X-ray ViT, as most notebooks and student projects do: timm + torch
eager, one image at a time, PIL + torchvision preprocessing, a JSON file per image.

It loads the *same weights* as a cxr-edge package by reading them back out of the package's ONNX
graph (strict load: every timm parameter must be found), so a comparison is weights-for-weights.
Needs the train extra (torch, timm).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np


def load_model(package):
    """The package's timm architecture with the package's own weights (read strictly out of its
    ONNX, as the torch backend does), in eval mode."""
    from cxr_edge.backends.torch_model import timm_model

    return timm_model(package.section("architecture"), package.read_verified("fp32"), str(package.root))


def run_usual_way(package, images: list[Path], out_dir: Path) -> dict:
    """One image at a time: PIL open -> grayscale -> resize -> tensor -> normalize -> model -> JSON."""
    import torch
    from PIL import Image
    from torchvision import transforms

    params = package.preprocess_params
    model = load_model(package)
    transform = transforms.Compose([
        transforms.Resize((params.size, params.size)),
        transforms.ToTensor(),
        transforms.Normalize([params.mean] * params.channels, [params.std] * params.channels),
    ])
    labels = list(package.labels)
    temperatures = package.temperatures
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():  # warm-up: the first call pays for lazy initialisation
        model(transform(Image.open(images[0]).convert("L")).unsqueeze(0))
    latencies, probabilities = [], {}
    started = time.perf_counter()
    with torch.no_grad():
        for path in images:
            t0 = time.perf_counter()
            x = transform(Image.open(path).convert("L")).unsqueeze(0)
            logits = model(x)[0].numpy()
            p = 1 / (1 + np.exp(-logits / temperatures))
            (out_dir / f"{path.stem}.json").write_text(json.dumps(dict(zip(labels, p.tolist()))))
            probabilities[path.name] = p
            latencies.append((time.perf_counter() - t0) * 1e3)
    elapsed = time.perf_counter() - started
    return {"images": len(images), "seconds": round(elapsed, 3), "throughput_img_s": round(len(images) / elapsed, 2),
            "latencies_ms": latencies, "probabilities": probabilities, "torch_threads": torch.get_num_threads()}


def weights_parity(package, tensors: np.ndarray) -> float:
    """max |Δlogit| between the torch model and ONNX Runtime on the same tensors: proves the
    weights are the same ones, independent of preprocessing differences."""
    import torch

    from cxr_edge.backends import create_backend

    with torch.no_grad():
        torch_logits = load_model(package)(torch.from_numpy(tensors)).numpy()
    with create_backend(package, "onnxruntime", "fp32") as ort_backend:
        ort_logits = ort_backend.infer(tensors)
    return float(np.abs(torch_logits - ort_logits).max())
