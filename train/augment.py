"""CXR-safe augmentation on a batch: small rotation / shift / scale, brightness-contrast; no flips.

Flips are off: a mirrored chest puts the heart on the wrong side (dextrocardia is a finding).
Random numbers come from the caller's generator, so a resumed run (or a student that must see
its teacher's views) draws the same.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

# strength 1.0: the limits below; strength 2.0 (the staged recipe's "strong"): twice each
ROTATE_DEG, SHIFT, SCALE, INTENSITY = 7.0, 0.06, 0.1, 0.15


class Affine(NamedTuple):
    theta: torch.Tensor  # [B, 2, 3] in normalised coordinates: the same view at any image size
    contrast: torch.Tensor  # [B, 1, 1, 1]
    brightness: torch.Tensor  # [B, 1, 1, 1]


def draw_affine(b: int, generator: torch.Generator, strength: float = 1.0) -> Affine:
    rand = lambda *shape: (torch.rand(*shape, generator=generator) - 0.5) * 2  # noqa: E731  U(-1, 1) on the CPU
    angle = rand(b) * math.radians(ROTATE_DEG * strength)
    zoom = 1 + rand(b) * SCALE * strength
    offset = rand(b, 2) * SHIFT * strength
    contrast = 1 + rand(b, 1, 1, 1) * INTENSITY * strength
    brightness = rand(b, 1, 1, 1) * INTENSITY * strength
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, offset[:, 0]], 1), torch.stack([sin, cos, offset[:, 1]], 1)], 1)
    return Affine(theta, contrast, brightness)


def apply_affine(x: torch.Tensor, affine: Affine) -> torch.Tensor:
    grid = F.affine_grid(affine.theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    return x * affine.contrast.to(x.device, x.dtype) + affine.brightness.to(x.device, x.dtype)


def augment(x: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    return apply_affine(x, draw_affine(x.shape[0], generator, strength))
