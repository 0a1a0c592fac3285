"""The preprocessing contract: one versioned function shared by training and serving.

Input is a decoded grayscale image, float32 in [0, 1] with 0 = dark (air) and 1 = bright (bone),
whatever the source format (see `cxr_edge.decode`). Output is the model's input tensor, CHW
float32. Every parameter comes from the model manifest, so a model carries its own contract.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

# OpenCV's own thread pool must never start in a process that forks (the decode workers are
# forked, and forked again after a crash): a child forked while that pool exists hangs in its
# first OpenCV call. Parallelism comes from the process pool; every module that uses cv2
# imports this one first (heatmaps, prepare's workers).
cv2.setNumThreads(1)

CONTRACT_NAME = "cxr-preprocess"
CONTRACT_VERSION = 1
RESIZE_MODES = ("pad", "crop", "stretch")


@dataclass(frozen=True)
class PreprocessParams:
    size: int = 224
    # pad: letterbox to a square with black (keeps the whole chest); crop: centre square;
    # stretch: resize each axis independently.
    resize: str = "pad"
    mean: float = 0.5
    std: float = 0.25
    channels: int = 1

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, not {self.resize!r}")
        if self.size < 8 or self.channels not in (1, 3) or self.std <= 0:
            raise ValueError(f"invalid preprocessing parameters: {self}")

    def to_manifest(self) -> dict:
        return {"contract": CONTRACT_NAME, "version": CONTRACT_VERSION, **asdict(self)}

    @classmethod
    def from_manifest(cls, entry: dict) -> "PreprocessParams":
        if entry.get("contract") != CONTRACT_NAME or entry.get("version") != CONTRACT_VERSION:
            raise ValueError(
                f"model wants preprocessing {entry.get('contract')} v{entry.get('version')}, "
                f"this cxr-edge implements {CONTRACT_NAME} v{CONTRACT_VERSION}"
            )
        fields = {k: entry[k] for k in ("size", "resize", "mean", "std", "channels") if k in entry}
        return cls(**fields)


def _square(image: np.ndarray, mode: str) -> np.ndarray:
    h, w = image.shape
    if mode == "stretch" or h == w:
        return image
    if mode == "crop":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        return image[top : top + side, left : left + side]
    side = max(h, w)
    out = np.zeros((side, side), dtype=image.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    out[top : top + h, left : left + w] = image
    return out


def model_window(h: int, w: int, mode: str) -> tuple[int, int, int, int]:
    """Where the model's square input lies on an (h, w) image, as (top, left, height, width) in
    image pixels (`_square`'s arithmetic): a letterbox reaches past the image (negative top or
    left), a centre crop lies inside it. Heatmaps map the model's patch grid back through it."""
    if mode == "stretch" or h == w:
        return 0, 0, h, w
    if mode == "crop":
        side = min(h, w)
        return (h - side) // 2, (w - side) // 2, side, side
    side = max(h, w)
    return -((side - h) // 2), -((side - w) // 2), side, side


def preprocess(image: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """Grayscale float32 [0, 1] (H, W) -> normalised float32 (channels, size, size)."""
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {image.shape}")
    image = _square(np.ascontiguousarray(image, dtype=np.float32), params.resize)
    size = params.size
    h, w = image.shape
    # INTER_AREA averages when shrinking (no aliasing on 2k radiographs); cubic when enlarging.
    interp = cv2.INTER_AREA if (h >= size and w >= size) else cv2.INTER_CUBIC
    resized = cv2.resize(image, (size, size), interpolation=interp)
    resized = np.clip(resized, 0.0, 1.0)
    normalised = (resized - np.float32(params.mean)) / np.float32(params.std)
    return np.repeat(normalised[None], params.channels, axis=0).astype(np.float32, copy=False)
