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
import functools
import math
import random
from typing import Optional

import torch

from .masks import (CellGeometry, box_keep_mask, cell_units, cells_to_pixels, maskmix_cells, mix_cells,
                    mix_cells_in_place, random_box, token_membership, units_to_grid)
from .targets import attention_lambda, mix_target, pal_lambda, transmix_lambda

METHODS = ('mixup_cutmix', 'transmix', 'maskmix', 'mixpro')
# CutMix-vs-Mixup switch probability when the caller does not set one.
DEFAULT_SWITCH_PROB = {'mixup_cutmix': 0.5, 'transmix': 0.8, 'maskmix': 0.5, 'mixpro': 0.5}


class MixStep:
    """What the last call did: enough to relabel it and to log it.

    ``kind``: 'none' | 'mixup' | 'cutmix' | 'maskmix'; ``labels`` [B] original labels; ``partner`` [B]
    index of the image mixed into each sample; ``lam_area`` [B] visible fraction of the original
    image; ``area_target`` [B, K] the target the call returned; ``keep`` [B or 1, 1, H, W] True where
    the original image shows; ``relabel`` 'transmix' | 'pal' | None; ``lam_attn`` and ``alpha`` (PAL's
    progressive factor) are filled in by ``Mixer.relabel``.

    A MaskMix step keeps its ``[B, Gh, Gw]`` cell mask (``cells``) and builds the pixel mask ``keep``
    only when something reads it (pictures, tests): the training step itself never needs it.
    """

    def __init__(self, kind: str, labels: torch.Tensor, partner: torch.Tensor, lam_area: torch.Tensor,
                 area_target: torch.Tensor, keep: Optional[torch.Tensor], relabel: Optional[str],
                 lam_attn: Optional[torch.Tensor] = None, alpha: Optional[torch.Tensor] = None, *,
                 cells: Optional[torch.Tensor] = None, mask_cell: int = 0, image_size=(0, 0),
                 partner_labels: Optional[torch.Tensor] = None):
        self.kind, self.labels, self.partner, self.lam_area = kind, labels, partner, lam_area
        self.area_target, self.relabel, self.lam_attn, self.alpha = area_target, relabel, lam_attn, alpha
        self._keep = keep
        self.cells, self.mask_cell, self.image_size = cells, mask_cell, tuple(image_size)
        self.partner_labels = partner_labels if partner_labels is not None else labels[partner]

    @property
    def keep(self) -> Optional[torch.Tensor]:
        if self._keep is None and self.cells is not None:
            self._keep = cells_to_pixels(self.cells, self.mask_cell, *self.image_size)
        return self._keep

    @keep.setter
    def keep(self, value: Optional[torch.Tensor]) -> None:   # a mask set by hand replaces the cells
        self._keep, self.cells = value, None
        if value is not None:
            self.image_size = tuple(value.shape[-2:])

    def __repr__(self):
        return f'MixStep(kind={self.kind!r}, relabel={self.relabel!r}, batch={self.labels.shape[0]})'


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
        maskmix_lam: ``'exact'`` visible pixel fraction, or ``'cells'``: kept cells / all cells, the
            official formula, which equals the area only where the cell divides the image (the official
            56 px at 224; cropped border cells count as whole cells here).
        membership: ``'area'`` token membership, or ``'nearest'`` (official TransMix).
        pal_smoothing: label smoothing of the final PAL target (official: none).
        pal_detach_alpha: stop gradients through PAL's α (official code lets them flow).
        seed: seeds both the host and the device generators; use a different one per rank.
        compile_backend: compile MaskMix's one-gather composition (the accelerators' path) and the PAL
            label with this ``torch.compile`` backend (e.g. ``'inductor'``), each into a few fused kernels
            instead of tens of small ones; the random draws stay eager. None runs everything eagerly.
    """

    # MaskMix on the CPU copies the partner's cells into x (mix_cells_in_place: one host sync, free there;
    # never compiled); elsewhere, and with this off, one gather over a block view writes a new tensor
    # (mix_cells: no sync), which compile_backend compiles
    cpu_in_place = True

    def __init__(self, method: str = 'mixpro', num_classes: int = 1000, label_smoothing: float = 0.1,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, switch_prob: Optional[float] = None,
                 mix_prob: float = 1.0, maskmix_prob: float = 0.5, maskmix_alpha: float = 1.0,
                 mask_cell: int = 64, token_size: int = 16, maskmix_lam: str = 'exact',
                 membership: str = 'area', pal_smoothing: float = 0.0, pal_detach_alpha: bool = True,
                 seed: int = 0, compile_backend: Optional[str] = None):
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
        self._geometry: Optional[CellGeometry] = None   # MaskMix constants of the last batch shape
        self.last: Optional[MixStep] = None
        self.compile_backend = compile_backend
        self._compose, self._pal_from_cells = compose_maskmix, pal_from_cells
        if compile_backend:
            self._compose = _compiled(compose_maskmix, compile_backend)
            self._pal_from_cells = _compiled(pal_from_cells, compile_backend)

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
        """Mix the batch and return ``(x_mixed, area_target)``. Mixup and CutMix write into ``x``, as
        timm does; MaskMix writes into ``x`` on the CPU and returns a new tensor on an accelerator
        (one gather, no host sync): use the returned images."""
        kind = self._choose_kind()
        batch, _, height, width = x.shape
        keep, relabel, cells = None, None, None
        if kind == 'maskmix':
            x, cells, partner, lam_area, partner_labels, area_target = self._maskmix(x, y)
            relabel = 'pal' if self.method == 'mixpro' else None
        else:
            # timm pairs sample i with sample B-1-i for Mixup and CutMix; MaskMix uses a permutation.
            partner = torch.arange(batch - 1, -1, -1, device=x.device)
            lam = 1.0
            if kind == 'mixup':
                lam = self._rng.betavariate(self.mixup_alpha, self.mixup_alpha)
                partner_images = x.flip(0).mul_(1.0 - lam)   # flip before x is scaled in place
                x.mul_(lam).add_(partner_images)
            elif kind == 'cutmix':
                lam = self._rng.betavariate(self.cutmix_alpha, self.cutmix_alpha)
                y0, y1, x0, x1 = box = random_box(height, width, lam, self._rng)
                x[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
                lam = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
                if self.method == 'transmix':
                    keep, relabel = box_keep_mask(box, height, width, device=x.device), 'transmix'
            lam_area = torch.full((batch,), lam, device=x.device)
            partner_labels = y[partner]
            area_target = mix_target(y, partner_labels, lam_area, self.num_classes, self.label_smoothing)
        self.last = MixStep(kind, y, partner, lam_area, area_target, keep, relabel, cells=cells,
                            mask_cell=self.mask_cell, image_size=(height, width), partner_labels=partner_labels)
        return x, area_target

    def _cell_geometry(self, batch: int, height: int, width: int, device) -> CellGeometry:
        if self._geometry is None or not self._geometry.matches(batch, height, width, self.mask_cell, device):
            self._geometry = CellGeometry(batch, height, width, self.mask_cell, device)
        return self._geometry

    def _maskmix(self, x: torch.Tensor, y: torch.Tensor):
        """The random draws (keep ratio, cells, partners), then ``compose_maskmix``."""
        batch, _, height, width = x.shape
        geometry = self._cell_geometry(batch, height, width, x.device)
        total = geometry.grid[0] * geometry.grid[1]
        n_keep = math.ceil(total * self._rng.betavariate(self.maskmix_alpha, self.maskmix_alpha))
        generator = self._generator(x.device)
        cells = maskmix_cells(batch, geometry.grid, n_keep, generator)
        partner = torch.randperm(batch, generator=generator, device=x.device)
        counted = None if self.maskmix_lam == 'exact' else torch.full((batch,), n_keep / total, device=x.device)
        in_place = x.device.type == 'cpu' and self.cpu_in_place   # syncs once: eager only, and faster there
        compose = compose_maskmix if in_place else self._compose
        x, cells, lam_area, partner_labels, area_target = compose(
            x, y, cells, partner, geometry, self.num_classes, self.label_smoothing, counted, in_place)
        return x, cells, partner, lam_area, partner_labels, area_target

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
        height, width = step.image_size
        if height % self.token_size or width % self.token_size or \
                attention.shape[1] != (height // self.token_size) * (width // self.token_size):
            raise ValueError(
                f'attention has {attention.shape[1]} tokens but a {height}x{width} image cut into '
                f'token_size={self.token_size} px tokens does not give that grid; set token_size to the '
                f'token size of the attention grid (probe.token_size)')
        if step.cells is not None:   # MaskMix + PAL, the MixPro step
            target, lam_attn, alpha = self._pal_from_cells(
                logits, attention, step.cells, self.mask_cell // self.token_size, height // self.token_size,
                width // self.token_size, step.labels, step.partner_labels, step.lam_area, step.area_target,
                self.num_classes, self.pal_smoothing, self.pal_detach_alpha)
        else:
            membership = token_membership(step.keep, self.token_size, self.membership)
            lam_attn = attention_lambda(membership, attention)
            if step.relabel == 'transmix':
                lam, alpha = transmix_lambda(step.lam_area, lam_attn), None
                smoothing = self.label_smoothing
            else:
                lam, alpha = pal_lambda(logits, step.area_target, step.lam_area, lam_attn, self.pal_detach_alpha)
                smoothing = self.pal_smoothing
            target = mix_target(step.labels, step.partner_labels, lam, self.num_classes, smoothing)
        step.lam_attn = lam_attn.detach()
        step.alpha = None if alpha is None else alpha.detach()
        return target


class MixerCompileError(RuntimeError):
    """The compiler of ``compile_backend`` failed on the mixer's functions (e.g. no C++ compiler for inductor)."""


def _compiled(fn, backend):
    """``fn`` compiled on first use. fullgraph: a graph break would be slower than eager, so it is an error.
    Shapes start static and turn dynamic where they change (dynamo's default), so a new batch size costs
    one recompile, not one per size up to dynamo's limit (a hard error under fullgraph)."""
    try:
        compiled = torch.compile(fn, backend=backend, fullgraph=True)
    except RuntimeError as err:   # dynamo's InvalidBackend
        raise ValueError(f'compile_backend {backend!r}: {err}') from err

    @functools.wraps(fn)
    def call(*args):
        try:
            return compiled(*args)
        except torch._dynamo.exc.BackendCompilerFailed as err:
            cause = getattr(err, 'inner_exception', None) or err   # what the compiler itself raised
            reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
            name = getattr(backend, '__name__', backend)
            message = (f'compile_backend {name!r} (--compile-mixer) could not compile {fn.__name__}: '
                       f'{type(cause).__name__}: {reason}; try --compile-mixer aot_eager, or leave it off')
            raise MixerCompileError(message) from err
    return call


def compose_maskmix(x, labels, cells, partner, geometry: CellGeometry, num_classes: int, smoothing: float,
                    lam_area: Optional[torch.Tensor] = None, in_place: bool = False):
    """MaskMix after its random draws, one function so that ``torch.compile`` can fuse it whole.

    ``x[b]`` shows its ``cells[b]`` and ``x[partner[b]]`` elsewhere; a sample the permutation pairs with
    itself keeps its whole image, and its cells say so (its lam_area, keep mask and token membership are
    then 1, as its pixels are). ``lam_area``: given (the official cell count), or None for the exact
    visible fraction. ``in_place``: the CPU path (``mix_cells_in_place``), else one gather into a new tensor.
    Returns ``(mixed, cells, lam_area, partner_labels, area_target)``."""
    unmoved = partner == geometry.samples
    cells = cells | unmoved.view(-1, 1, 1)
    mixed = mix_cells_in_place(x, cells, partner, geometry) if in_place else mix_cells(x, cells, partner, geometry)
    if lam_area is None:
        lam_area = cells.flatten(1).float() @ geometry.area
    lam_area = lam_area.masked_fill(unmoved, 1.0)
    partner_labels = labels[partner]
    return mixed, cells, lam_area, partner_labels, mix_target(labels, partner_labels, lam_area, num_classes, smoothing)


def pal_from_cells(logits, attention, cells, units_per_cell: int, rows: int, cols: int, labels, partner_labels,
                   lam_area, area_target, num_classes: int, smoothing: float, detach_alpha: bool):
    """The PAL label of a MaskMix step, one function so that ``torch.compile`` can fuse it whole.

    MaskMix cells are whole tokens: the token membership is the cell mask on the ``rows x cols`` token grid
    (the same 0/1 values, area or nearest, as pooling the pixel mask, without building it).
    Returns ``(target, lam_attn, alpha)``."""
    membership = units_to_grid(cell_units(cells, units_per_cell).float(), rows, cols).flatten(1)
    lam_attn = attention_lambda(membership, attention)
    lam, alpha = pal_lambda(logits, area_target, lam_area, lam_attn, detach_alpha)
    return mix_target(labels, partner_labels, lam, num_classes, smoothing), lam_attn, alpha
