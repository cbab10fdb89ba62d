"""The mixer: a drop-in for ``timm.data.Mixup`` that also does TransMix, MaskMix and MixPro.

Use it exactly like timm's Mixup, plus one call after the forward pass::

    x, target = mixer(x, y)                     # area-mixed images and soft target
    probe.enabled = mixer.needs_attention       # class attention only where a label needs it
    logits = model(x)
    target = mixer.relabel(logits, probe.attention)   # TransMix / PAL label, or target unchanged
    loss = SoftTargetCrossEntropy()(logits, target)

Methods (one per recipe):

- ``mixup_cutmix``: timm's DeiT recipe, Mixup (α 0.8) or CutMix (α 1.0), switch 0.5, area labels.
- ``transmix``: CutMix with probability 0.8 else Mixup; CutMix steps get the TransMix label.
- ``maskmix``: MaskMix on every batch with area labels (the ablation).
- ``mixpro``: per batch MaskMix + PAL label with probability 0.5, else ``mixup_cutmix``.

Per-batch decisions (kind, ratio, box) come from a seeded host RNG; per-sample randomness
(cells, partners) from a seeded generator on the batch's device, so a step never waits on the
device and the same seed gives the same masks, partners and targets.
"""
import math
import random
from dataclasses import dataclass
from typing import Optional

import torch

from .masks import (box_keep_mask, cells_to_pixels, maskmix_cells, maskmix_grid, random_box,
                    token_membership, visible_cell_area)
from .targets import attention_lambda, mix_target, pal_lambda, transmix_lambda

METHODS = ('mixup_cutmix', 'transmix', 'maskmix', 'mixpro')
# CutMix-vs-Mixup switch probability when the caller does not set one.
DEFAULT_SWITCH_PROB = {'mixup_cutmix': 0.5, 'transmix': 0.8, 'maskmix': 0.5, 'mixpro': 0.5}


@dataclass
class MixStep:
    """What the last call did: enough to relabel it and to log it."""
    kind: str                       # 'none' | 'mixup' | 'cutmix' | 'maskmix'
    labels: torch.Tensor            # [B] original labels
    partner: torch.Tensor           # [B] index of the image mixed into each sample
    lam_area: torch.Tensor          # [B] visible fraction of the original image
    area_target: torch.Tensor       # [B, K] target returned by the call
    keep: Optional[torch.Tensor]    # [B or 1, 1, H, W] True where the original image shows
    relabel: Optional[str]          # 'transmix' | 'pal' | None
    lam_attn: Optional[torch.Tensor] = None   # filled in by relabel()
    alpha: Optional[torch.Tensor] = None      # PAL progressive factor, filled in by relabel()


def _check_prob(name, value):
    if not 0.0 <= value <= 1.0:
        raise ValueError(f'{name} must be in [0, 1], got {value!r}')


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f'{name} must be one of {", ".join(map(repr, choices))}; got {value!r}')


class Mixer:
    """Batch mixer for the ``mixup_cutmix``, ``transmix``, ``maskmix`` and ``mixpro`` recipes.

    Args:
        method: one of ``METHODS``.
        num_classes: number of classes of the soft targets.
        label_smoothing: smoothing of the area target (and of the TransMix label), as in timm.
        mixup_alpha, cutmix_alpha: Beta parameters; 0 switches that mix off.
        switch_prob: probability of CutMix when both are on (default 0.8 for transmix, else 0.5).
        mix_prob: probability of mixing a batch at all (timm's ``prob``).
        maskmix_prob: mixpro only, probability of a MaskMix + PAL batch.
        maskmix_alpha: Beta parameter of the MaskMix keep ratio.
        mask_cell: MaskMix cell size in pixels; a multiple of ``token_size``.
        token_size: pixel size of one token of the attention grid used for labels.
        maskmix_lam: ``'exact'`` visible pixel fraction, or ``'cells'`` (official: cropped
            border cells count as whole cells).
        membership: ``'area'`` token membership, or ``'nearest'`` (official TransMix).
        pal_smoothing: label smoothing of the final PAL target (official: none).
        pal_detach_alpha: stop gradients through PAL's α (official code lets them flow).
        seed: seeds both the host and the device generators; use a different one per rank.
    """

    def __init__(self, method: str = 'mixpro', num_classes: int = 1000, label_smoothing: float = 0.1,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, switch_prob: Optional[float] = None,
                 mix_prob: float = 1.0, maskmix_prob: float = 0.5, maskmix_alpha: float = 1.0,
                 mask_cell: int = 64, token_size: int = 16, maskmix_lam: str = 'exact',
                 membership: str = 'area', pal_smoothing: float = 0.0, pal_detach_alpha: bool = True,
                 seed: int = 0):
        _check_choice('method', method, METHODS)
        _check_choice('maskmix_lam', maskmix_lam, ('exact', 'cells'))
        _check_choice('membership', membership, ('area', 'nearest'))
        switch_prob = DEFAULT_SWITCH_PROB[method] if switch_prob is None else switch_prob
        for name, value in (('switch_prob', switch_prob), ('mix_prob', mix_prob),
                            ('maskmix_prob', maskmix_prob), ('label_smoothing', label_smoothing),
                            ('pal_smoothing', pal_smoothing)):
            _check_prob(name, value)
        for name, value in (('mixup_alpha', mixup_alpha), ('cutmix_alpha', cutmix_alpha),
                            ('maskmix_alpha', maskmix_alpha)):
            if value < 0:
                raise ValueError(f'{name} must be >= 0, got {value!r}')
        if num_classes < 1:
            raise ValueError(f'num_classes must be >= 1, got {num_classes!r}')
        if token_size < 1 or mask_cell < 1:
            raise ValueError(f'token_size and mask_cell must be positive, got {token_size!r}, {mask_cell!r}')
        self.uses_maskmix = method in ('maskmix', 'mixpro')
        if self.uses_maskmix and mask_cell % token_size:
            raise ValueError(
                f'mask_cell={mask_cell} is not a multiple of token_size={token_size}: MaskMix cells must '
                f'cover whole tokens of the attention grid so every token comes from one image')
        if self.uses_maskmix and maskmix_alpha <= 0:
            raise ValueError(f'{method} needs maskmix_alpha > 0, got {maskmix_alpha!r}')

        self.method = method
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.switch_prob, self.mix_prob, self.maskmix_prob = switch_prob, mix_prob, maskmix_prob
        self.maskmix_alpha, self.mask_cell, self.token_size = maskmix_alpha, mask_cell, token_size
        self.maskmix_lam, self.membership = maskmix_lam, membership
        self.pal_smoothing, self.pal_detach_alpha = pal_smoothing, pal_detach_alpha
        self.mixup_enabled = True   # timm's switch: the train loop turns mixing off for late epochs
        self.seed = seed
        self._rng = random.Random(seed)
        self._device_generators = {}
        self.last: Optional[MixStep] = None

    # ---- randomness -------------------------------------------------------------------------
    def _generator(self, device: torch.device) -> torch.Generator:
        # keyed by device type: a process mixes on one device, and a resumed rank may sit on another index
        key = torch.device(device).type
        if key not in self._device_generators:
            self._device_generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._device_generators[key]

    def state_dict(self) -> dict:
        """Generator states, so a resumed run mixes exactly as an uninterrupted one."""
        _, host, gauss_next = self._rng.getstate()
        return {'seed': self.seed, 'host': list(host), 'host_gauss_next': gauss_next,
                'devices': {k: g.get_state() for k, g in self._device_generators.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.seed = state['seed']   # device generators not yet created start from this seed
        self._rng.setstate((3, tuple(state['host']), state['host_gauss_next']))
        for key, gen_state in state['devices'].items():
            self._generator(torch.device(key)).set_state(gen_state)

    def _choose_kind(self) -> str:
        if not self.mixup_enabled or self._rng.random() >= self.mix_prob:
            return 'none'
        if self.method in ('maskmix',) or (self.method == 'mixpro' and self._rng.random() < self.maskmix_prob):
            return 'maskmix'
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            return 'cutmix' if self._rng.random() < self.switch_prob else 'mixup'
        if self.mixup_alpha > 0:
            return 'mixup'
        return 'cutmix' if self.cutmix_alpha > 0 else 'none'

    # ---- the call ---------------------------------------------------------------------------
    @property
    def needs_attention(self) -> bool:
        """True when the last batch's label needs the class attention of its forward pass."""
        return self.last is not None and self.last.relabel is not None

    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        """Mix the batch (in place where possible) and return ``(x_mixed, area_target)``."""
        kind = self._choose_kind()
        batch, _, height, width = x.shape
        keep, relabel = None, None
        # timm pairs sample i with sample B-1-i for Mixup and CutMix; MaskMix uses a permutation.
        partner = torch.arange(batch - 1, -1, -1, device=x.device)
        lam_area = torch.ones(batch, device=x.device)

        if kind == 'mixup':
            lam = self._rng.betavariate(self.mixup_alpha, self.mixup_alpha)
            partner_images = x.flip(0).mul_(1.0 - lam)   # flip before x is scaled in place
            x.mul_(lam).add_(partner_images)
            lam_area.fill_(lam)
        elif kind == 'cutmix':
            lam = self._rng.betavariate(self.cutmix_alpha, self.cutmix_alpha)
            y0, y1, x0, x1 = box = random_box(height, width, lam, self._rng)
            x[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
            lam_area.fill_(1.0 - (y1 - y0) * (x1 - x0) / float(height * width))
            if self.method == 'transmix':
                keep, relabel = box_keep_mask(box, height, width, device=x.device), 'transmix'
        elif kind == 'maskmix':
            x, keep, partner, lam_area = self._maskmix(x)
            relabel = 'pal' if self.method == 'mixpro' else None

        area_target = mix_target(y, y[partner], lam_area, self.num_classes, self.label_smoothing)
        self.last = MixStep(kind, y, partner, lam_area, area_target, keep, relabel)
        return x, area_target

    def _maskmix(self, x: torch.Tensor):
        batch, _, height, width = x.shape
        grid = maskmix_grid(height, width, self.mask_cell)
        total = grid[0] * grid[1]
        n_keep = math.ceil(total * self._rng.betavariate(self.maskmix_alpha, self.maskmix_alpha))
        generator = self._generator(x.device)
        cells = maskmix_cells(batch, grid, n_keep, generator)
        partner = torch.randperm(batch, generator=generator, device=x.device)
        keep = cells_to_pixels(cells, self.mask_cell, height, width)
        torch.where(keep, x, x[partner], out=x)
        if self.maskmix_lam == 'exact':
            area = visible_cell_area(grid, self.mask_cell, height, width, device=x.device)
            lam_area = cells.flatten(1).float() @ area
        else:
            lam_area = torch.full((batch,), n_keep / total, device=x.device)
        return x, keep, partner, lam_area

    # ---- after the forward pass -------------------------------------------------------------
    def relabel(self, logits: torch.Tensor, attention: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final target of the last batch: the TransMix or PAL label where that batch needs one,
        the area target otherwise. ``attention`` is ``[B, N]`` (or ``[B, h, w]``) class attention
        over the patch tokens of the forward pass on the mixed batch."""
        step = self.last
        if step is None:
            raise RuntimeError('Mixer.relabel() called before the mixer was applied to a batch')
        if step.relabel is None:
            return step.area_target
        if attention is None:
            raise ValueError(f'this {step.kind} batch needs the class attention of its forward pass '
                             f'(set probe.enabled = mixer.needs_attention before the forward)')
        attention = attention.flatten(1)
        height, width = step.keep.shape[-2:]
        if height % self.token_size or width % self.token_size or \
                attention.shape[1] != (height // self.token_size) * (width // self.token_size):
            raise ValueError(
                f'attention has {attention.shape[1]} tokens but a {height}x{width} image cut into '
                f'token_size={self.token_size} px tokens does not give that grid; set token_size to the '
                f'token size of the attention grid (probe.token_size)')
        membership = token_membership(step.keep, self.token_size, self.membership)
        lam_attn = attention_lambda(membership, attention)
        partner_labels = step.labels[step.partner]
        if step.relabel == 'transmix':
            lam = transmix_lambda(step.lam_area, lam_attn)
            target = mix_target(step.labels, partner_labels, lam, self.num_classes, self.label_smoothing)
        else:
            lam, alpha = pal_lambda(logits, step.area_target, step.lam_area, lam_attn, self.pal_detach_alpha)
            target = mix_target(step.labels, partner_labels, lam, self.num_classes, self.pal_smoothing)
            step.alpha = alpha.detach()
        step.lam_attn = lam_attn.detach()
        return target
