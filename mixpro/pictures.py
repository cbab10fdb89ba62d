"""Pictures of what the mixer did: mixed images with their labels, λ and class attention."""
from typing import Optional

import torch

from .mixer import MixStep


def mix_snapshot(x: torch.Tensor, step: MixStep, attention: Optional[torch.Tensor], count: int = 16) -> dict:
    """The first ``count`` mixed images of a batch and what made them, detached on the CPU."""
    def first(t):
        return None if t is None else t[:count].detach().float().cpu()
    keep = step.keep
    if keep is not None and keep.shape[0] == 1:   # CutMix: one box for the whole batch
        keep = keep.expand(x.shape[0], *keep.shape[1:])
    return {'kind': step.kind, 'images': first(x), 'labels': step.labels[:count].cpu(),
            'partner_labels': step.labels[step.partner][:count].cpu(), 'lam_area': first(step.lam_area),
            'lam_attn': first(step.lam_attn), 'alpha': first(step.alpha), 'keep': first(keep),
            'attention': first(attention)}
