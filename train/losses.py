"""Multi-label losses for imbalanced findings: BCE (+pos_weight), focal, asymmetric (ASL)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("bce", "focal", "asl")


def pos_weight_for(labels: torch.Tensor, cap: float = 20.0) -> torch.Tensor:
    """negatives / positives per class, capped: Hernia is ~0.2% of NIH and would explode."""
    pos = labels.sum(0).clamp(min=1)
    return ((len(labels) - pos) / pos).clamp(max=cap)


class FocalLoss(torch.nn.Module):
    """Lin et al. 2017: BCE scaled by (1 - p_t)^gamma, so easy negatives stop dominating."""

    def __init__(self, gamma: float = 2.0, pos_weight: torch.Tensor | None = None):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=self.pos_weight, reduction="none")
        p = torch.sigmoid(logits)
        p_t = p * targets + (1 - p) * (1 - targets)
        return ((1 - p_t) ** self.gamma * bce).mean()


class AsymmetricLoss(torch.nn.Module):
    """Ridnik et al. 2021 (ASL): focusing gamma_neg on negatives, probability shift `clip`."""

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05, eps: float = 1e-8):
        super().__init__()
        self.gamma_neg, self.gamma_pos, self.clip, self.eps = gamma_neg, gamma_pos, clip, eps

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(logits)
        p_neg = (p - self.clip).clamp(min=0) if self.clip else p  # shifted: very easy negatives count 0
        loss_pos = targets * torch.log(p.clamp(min=self.eps)) * (1 - p) ** self.gamma_pos
        loss_neg = (1 - targets) * torch.log((1 - p_neg).clamp(min=self.eps)) * p_neg**self.gamma_neg
        return -(loss_pos + loss_neg).sum(1).mean() / logits.shape[1]


def make_loss(name: str, train_labels: torch.Tensor, use_pos_weight: bool) -> torch.nn.Module:
    pos_weight = pos_weight_for(train_labels) if use_pos_weight else None
    if name == "bce":
        return torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    if name == "focal":
        return FocalLoss(pos_weight=pos_weight)
    if name == "asl":
        return AsymmetricLoss()  # ASL does its own re-balancing
    raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")


def weighted_sample_weights(labels: torch.Tensor) -> torch.Tensor:
    """Per-image weight = inverse frequency of its rarest label (No Finding counts as a label)."""
    freq = labels.mean(0).clamp(min=1.0 / len(labels))
    inverse = torch.where(labels > 0, 1.0 / freq, torch.zeros_like(labels))
    weights = inverse.max(1).values
    return torch.where(weights > 0, weights, torch.ones_like(weights))
