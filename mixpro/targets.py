"""Soft targets of mixed images: the area label, the TransMix label and the PAL label.

``lam`` is always the weight of the ORIGINAL image's class, one value per sample.
"""
from typing import Tuple

import torch
from timm.data.mixup import one_hot


def smoothed_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """``[B, K]`` one-hot rows with label smoothing spread over all K classes (timm's convention)."""
    off = smoothing / num_classes
    return one_hot(labels, num_classes, on_value=1.0 - smoothing + off, off_value=off)


def mix_target(labels: torch.Tensor, partner_labels: torch.Tensor, lam: torch.Tensor,
               num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """``lam * y + (1 - lam) * y_partner`` per sample, both smoothed, fp32. ``lam`` is ``[B]`` (or one value).

    Built as the smoothing floor plus each image's share of the one-hot step added at its label: the
    same sum as two mixed one-hot matrices, in five tensor operations instead of eight (each one is a
    kernel launch on a GPU, where this small matrix costs launches, not bandwidth).
    """
    off = smoothing / num_classes
    own = lam.float().reshape(-1, 1).expand(labels.shape[0], 1) * (1.0 - smoothing)   # (on - off) * lam
    target = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32, device=labels.device)
    target.scatter_add_(1, labels.long().view(-1, 1), own)
    return target.scatter_add_(1, partner_labels.long().view(-1, 1), (1.0 - smoothing) - own)


def attention_lambda(membership: torch.Tensor, attention: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``λ_attn = Σ m·a / Σ a`` per sample: the share of class attention on original-image tokens."""
    attention = attention.float()
    return (membership * attention).sum(1) / attention.sum(1).clamp_min(eps)


def transmix_lambda(lam_area: torch.Tensor, lam_attn: torch.Tensor) -> torch.Tensor:
    """TransMix's label weight: the mean of the area and the attention weights."""
    return 0.5 * (lam_area + lam_attn)


def pal_lambda(logits: torch.Tensor, area_target: torch.Tensor, lam_area: torch.Tensor,
               lam_attn: torch.Tensor, detach_alpha: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Progressive Attention Labeling: ``λ = α·λ_attn + (1−α)·λ_area``, ``α = cos(softmax(logits), ỹ)``.

    ``α`` measures how far the prediction already agrees with the area label ``ỹ``: the attention
    label is trusted only as much as the model has learned. With ``detach_alpha=False`` gradients
    flow through ``α`` into the logits, as in the official MixPro code. Returns ``(λ, α)``.
    """
    probs = logits.float().softmax(dim=1)
    area_target = area_target.float()
    # cosine similarity written out: half the tensor operations of F.cosine_similarity, and both norms
    # are far from zero (a softmax row and a target row), so its per-norm eps never applies
    norms = torch.linalg.vector_norm(probs, dim=1) * torch.linalg.vector_norm(area_target, dim=1)
    alpha = (probs * area_target).sum(1) / norms.clamp_min(1e-8)
    if detach_alpha:
        alpha = alpha.detach()
    lam = torch.lerp(lam_area.float(), lam_attn.float(), alpha)     # one operation: (1-α)·λ_area + α·λ_attn
    return lam, alpha

