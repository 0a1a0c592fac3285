"""Multi-label losses for imbalanced findings: BCE (+pos_weight), focal, asymmetric (ASL, timm's)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("bce", "focal", "asl")


def pos_weight_for(labels: torch.Tensor, cap: float = 20.0) -> torch.Tensor:
    """negatives / positives per class, capped: Hernia is ~0.2% of NIH and would explode."""
    pos = labels.sum(0).clamp(min=1)
    return ((len(labels) - pos) / pos).clamp(max=cap)


class FocalLoss(torch.nn.Module):
    """Lin et al. 2017: BCE scaled by (1 - p_t)^gamma, so easy negatives stop dominating.

    Kept here: timm's focal form (PolyBinaryCrossEntropy with epsilon 0) takes no pos_weight,
    which `--pos-weight` applies to focal as to BCE."""

    def __init__(self, gamma: float = 2.0, pos_weight: torch.Tensor | None = None):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=self.pos_weight, reduction="none")
        p = torch.sigmoid(logits)
        p_t = p * targets + (1 - p) * (1 - targets)
        return ((1 - p_t) ** self.gamma * bce).mean()


def asymmetric_loss() -> torch.nn.Module:
    """Ridnik et al. 2021 (ASL), timm's: focusing gamma_neg 4 on negatives only (gamma_pos 0),
    probability shift 0.05 (very easy negatives count 0); averaged over images and classes."""
    from timm.loss import AsymmetricLossMultiLabel

    return AsymmetricLossMultiLabel(gamma_neg=4.0, gamma_pos=0.0, clip=0.05, eps=1e-8, reduction="mean")


def make_loss(name: str, train_labels: torch.Tensor, use_pos_weight: bool) -> torch.nn.Module:
    pos_weight = pos_weight_for(train_labels) if use_pos_weight else None
    if name == "bce":
        return torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    if name == "focal":
        return FocalLoss(pos_weight=pos_weight)
    if name == "asl":
        return asymmetric_loss()  # ASL does its own re-balancing
    raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")


def weighted_sample_weights(labels: torch.Tensor) -> torch.Tensor:
    """Per-image weight = inverse frequency of its rarest label (No Finding counts as a label)."""
    freq = labels.mean(0).clamp(min=1.0 / len(labels))
    inverse = torch.where(labels > 0, 1.0 / freq, torch.zeros_like(labels))
    weights = inverse.max(1).values
    return torch.where(weights > 0, weights, torch.ones_like(weights))
