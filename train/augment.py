"""CXR-safe augmentation on a batch: small rotation / shift / scale, brightness-contrast; no flips.

Flips are off: a mirrored chest puts the heart on the wrong side (dextrocardia is a finding).
Random numbers come from the training loop's own generator, so a resumed run draws the same.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def augment(x: torch.Tensor, generator: torch.Generator, rotate_deg: float = 7.0, shift: float = 0.06,
            scale: float = 0.1, intensity: float = 0.15) -> torch.Tensor:
    b = x.shape[0]
    rand = lambda *shape: (torch.rand(*shape, generator=generator) - 0.5) * 2  # noqa: E731  U(-1, 1) on the CPU
    angle = rand(b) * math.radians(rotate_deg)
    zoom = 1 + rand(b) * scale
    offset = rand(b, 2) * shift
    contrast = 1 + rand(b, 1, 1, 1) * intensity
    brightness = rand(b, 1, 1, 1) * intensity
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, offset[:, 0]], 1), torch.stack([sin, cos, offset[:, 1]], 1)], 1)
    theta = theta.to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    return x * contrast.to(x.device, x.dtype) + brightness.to(x.device, x.dtype)
