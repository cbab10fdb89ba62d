"""timm's RandAugment on a batch of uint8 tensors, on any device, with timm's draws and Pillow's pixels.

The work is split in two:

- **Draws, in the data-loader worker.** ``RandAugmentParams`` is built from timm's own parsed
  ``RandAugment`` (``rand_augment_transform(config_str, hparams)``), so the recipe string, the op list,
  ``prob``, ``magnitude_std``, ``magnitude_max`` and the ``hparams`` are timm's. Calling it makes exactly
  the random calls ``RandAugment.__call__`` and ``AugmentOp.__call__`` make, in the same order: the op
  choice (``np.random.choice``), each op's skip test (``random.random``), the magnitude
  (``random.gauss`` / ``random.uniform``), timm's own ``level_fn`` (with its sign flip) and the
  resample choice (``random.choice``, geometric ops only). Called where Pillow's RandAugment was (after
  the crop), it leaves the worker's seeded ``random`` / ``np.random`` in the same state, so the
  distributions are timm's and a resumed run draws what an uninterrupted one would. It returns a small
  ``[num_layers, PARAMS_WIDTH]`` float64 tensor (columns below) that collates like a label.
- **Pixels, on the device.** ``apply_rand_augment(images, params)`` applies each sample's layers to a
  uint8 ``[B, 3, H, W]`` batch. It loops over layers and op kinds only: each kind runs once on the
  samples that drew it (gathered with ``index_select``, written back with ``index_copy_``). Every op
  redoes Pillow's uint8 arithmetic: the same lookup tables, ``Image.blend``'s float32 ``a + f * (b - a)``
  truncated, the ``SMOOTH`` filter's float32 sums, ``ImageOps.equalize``'s integer steps, and for the
  affine ops Pillow's own samplers (pixel-centre coordinates in float64, bilinear as two lerps, bicubic
  with Pillow's a = -1 kernel and clamped taps, nearest in Pillow's 16.16 fixed point where Pillow uses
  it, a hard inside/outside test with the fill colour outside). ``F.grid_sample`` is not used: its
  bicubic is a = -0.75 with clamped coordinates and its border handling blends the fill in, so it
  could only be close, not equal.

Fidelity (``tests/test_tensor_augment.py``, against timm's Pillow ops on the same draws): every op is
bit-exact on the test images (Pillow 13 on x86-64), at magnitudes 0, 5 and 10, with all three resample
filters, and so is the whole recipe image by image. The tests hold the integer-LUT ops (Invert,
Posterize, Solarize, SolarizeAdd, Equalize) to exact, and the float ones (blends, SMOOTH,
AutoContrast, the affine samplers) to a mean of 0.01 grey levels and a max of 1: a Pillow compiled to
fuse a * b + c into one FMA (aarch64 builds) can truncate a value sitting on an integer one level
lower. Not emulated: Pillow's float nearest-neighbour affine path, used only when coordinates pass
+-32768 px (its fixed-point path is emulated). Needs float64 on the device (CPU, CUDA; not MPS).

``params`` columns (``PARAMS_WIDTH`` = 9), one row per layer:
``OP`` index into ``OP_NAMES``; ``APPLIED`` 1.0 / 0.0 (the op's ``prob`` test); ``ARG`` the op's argument
after timm's ``level_fn`` (angle in degrees, shear factor, translate fraction for ``*Rel`` or pixels,
enhance factor, bits, threshold, add; 0 for ops without one); ``RESAMPLE`` Pillow's filter number
(0 nearest, 2 bilinear, 3 bicubic; -1 for non-geometric ops); ``FILL`` three columns, the fill colour;
``COS``, ``SIN`` Rotate's matrix entries as Pillow rounds them (computed in the worker with Python's
``math`` so the device matrix is Pillow's to the last bit).
"""
import math
import random
from typing import Dict, Optional

import numpy as np
import torch
from PIL import Image
from timm.data import auto_augment

__all__ = ['OP_NAMES', 'PARAMS_WIDTH', 'RandAugmentParams', 'apply_rand_augment', 'unsupported_reason',
           'is_supported']

# Every op the device side implements; a params row names its op by the index here.
OP_NAMES = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'PosterizeIncreasing', 'PosterizeOriginal',
    'Solarize', 'SolarizeIncreasing', 'SolarizeAdd', 'Color', 'ColorIncreasing', 'Contrast', 'ContrastIncreasing',
    'Brightness', 'BrightnessIncreasing', 'Sharpness', 'SharpnessIncreasing', 'ShearX', 'ShearY', 'TranslateX',
    'TranslateY', 'TranslateXRel', 'TranslateYRel', 'Desaturate',
)
OP_ID = {name: i for i, name in enumerate(OP_NAMES)}

# params columns
OP, APPLIED, ARG, RESAMPLE, FILL, COS, SIN = 0, 1, 2, 3, 4, 7, 8
PARAMS_WIDTH = 9

NEAREST = int(Image.Resampling.NEAREST)
BILINEAR = int(Image.Resampling.BILINEAR)
BICUBIC = int(Image.Resampling.BICUBIC)
# Ops whose timm function calls _check_args_tf, the only ones that draw a resample filter.
GEOMETRIC = ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'TranslateXRel', 'TranslateYRel')


# ----------------------------------------------------------------------------------------------
# Draws (CPU, data-loader worker)


def unsupported_reason(config_str: str, hparams: Optional[Dict] = None) -> Optional[str]:
    """None when ``config_str`` (with timm's ``hparams``) runs on the device, else why not (one line)
    so the caller can keep Pillow's RandAugment and say so."""
    if not isinstance(config_str, str) or config_str.split('-')[0] != 'rand':
        return f"only RandAugment ('rand-...') policies run on the device, not {config_str!r}"
    try:
        # a copy: timm's parser setdefault()s magnitude_std / magnitude_max into the dict it is given
        rand_augment = auto_augment.rand_augment_transform(config_str, dict(hparams) if hparams else None)
    except Exception as e:  # timm asserts on unknown sections
        return f'timm cannot parse {config_str!r}: {type(e).__name__} {e}'
    return _unsupported_ops(rand_augment)


def is_supported(config_str: str, hparams: Optional[Dict] = None) -> bool:
    """True when ``unsupported_reason`` has nothing to say."""
    return unsupported_reason(config_str, hparams) is None


def _unsupported_ops(rand_augment) -> Optional[str]:
    missing = sorted({op.name for op in rand_augment.ops if op.name not in OP_ID})
    if missing:
        return f"RandAugment ops without a device version: {', '.join(missing)}"
    for op in rand_augment.ops:
        resample = op.kwargs.get('resample', BICUBIC)
        choices = resample if isinstance(resample, (list, tuple)) else (resample,)
        if op.name in GEOMETRIC and any(int(r) not in (NEAREST, BILINEAR, BICUBIC) for r in choices):
            return f'{op.name} resample {resample} is not nearest/bilinear/bicubic (Pillow refuses it too)'
        if _fill_of(op) is None:
            return f"{op.name} fillcolor {op.kwargs.get('fillcolor')!r} is not a grey level or an RGB triple"
    return None


def _fill_of(op):
    """The op's fillcolor as three ints 0..255, or None when it is something else."""
    fill = op.kwargs.get('fillcolor', auto_augment._FILL)
    fill = (fill,) * 3 if isinstance(fill, int) else tuple(fill)
    if len(fill) != 3 or not all(isinstance(v, (int, np.integer)) and 0 <= v <= 255 for v in fill):
        return None
    return tuple(float(v) for v in fill)


def _pillow_rotation(degrees: float):
    """Image.rotate's cos / sin entries: the angle taken mod 360, negated, rounded to 15 decimals."""
    angle = degrees % 360.0
    if angle == 0:  # Image.rotate returns a copy: the identity matrix gives the same pixels
        return 1.0, 0.0
    angle = -math.radians(angle)
    return round(math.cos(angle), 15), round(math.sin(angle), 15)


class RandAugmentParams:
    """Draws one image's RandAugment layers exactly as timm's ``RandAugment`` would, as a tensor.

    ``RandAugmentParams(rand_augment_transform(config_str, hparams))()`` -> ``[num_layers, PARAMS_WIDTH]``
    float64. Call it in the worker where the Pillow RandAugment would run (after the crop), once per
    image; ``apply_rand_augment`` applies the collated ``[B, num_layers, PARAMS_WIDTH]`` on the device.
    """

    def __init__(self, timm_rand_augment):
        reason = _unsupported_ops(timm_rand_augment)
        if reason:
            raise ValueError(reason)
        self.ops = list(timm_rand_augment.ops)
        self.num_layers = timm_rand_augment.num_layers
        self.choice_weights = timm_rand_augment.choice_weights
        self._fills = [_fill_of(op) for op in self.ops]

    @classmethod
    def from_string(cls, config_str: str, hparams: Optional[Dict] = None) -> 'RandAugmentParams':
        reason = unsupported_reason(config_str, hparams)
        if reason:
            raise ValueError(reason)
        return cls(auto_augment.rand_augment_transform(config_str, dict(hparams) if hparams else None))

    def __call__(self) -> torch.Tensor:
        # RandAugment.__call__: np.random.choice over the ops; choosing among len(ops) indices draws
        # exactly what choosing among the op objects draws (only the population size matters).
        chosen = np.random.choice(len(self.ops), self.num_layers, replace=self.choice_weights is None,
                                  p=self.choice_weights)
        return torch.tensor([self._draw(int(i)) for i in chosen], dtype=torch.float64).view(
            self.num_layers, PARAMS_WIDTH)

    def _draw(self, index: int):
        """AugmentOp.__call__'s draws for op ``index``, in its order, as one params row."""
        op, fill = self.ops[index], self._fills[index]
        row = [float(OP_ID[op.name]), 0.0, 0.0, -1.0, *fill, 1.0, 0.0]
        if op.prob < 1.0 and random.random() > op.prob:
            return row  # skipped: timm returns the image before drawing anything else
        magnitude = op.magnitude
        if op.magnitude_std > 0:
            if op.magnitude_std == float('inf'):
                magnitude = random.uniform(0, magnitude)
            else:
                magnitude = random.gauss(magnitude, op.magnitude_std)
        magnitude = max(0., min(magnitude, op.magnitude_max or auto_augment._LEVEL_DENOM))
        # timm's own level_fn: same arguments, same _randomly_negate draw
        args = op.level_fn(magnitude, op.hparams) if op.level_fn is not None else ()
        row[APPLIED] = 1.0
        row[ARG] = float(args[0]) if args else 0.0
        if op.name in GEOMETRIC:
            # _check_args_tf -> _interpolation: random.choice only when the resample is a tuple/list,
            # and it comes after the level_fn's sign flip
            resample = op.kwargs.get('resample', BICUBIC)
            if isinstance(resample, (list, tuple)):
                resample = random.choice(resample)
            row[RESAMPLE] = float(int(resample))
            if op.name == 'Rotate':
                row[COS], row[SIN] = _pillow_rotation(row[ARG])
        return row


# ----------------------------------------------------------------------------------------------
# Pixels (any device). Each op: uint8 [n, 3, H, W] and its rows [n, PARAMS_WIDTH] -> uint8 [n, 3, H, W].


def _col(rows: torch.Tensor, column: int) -> torch.Tensor:
    return rows[:, column].view(-1, 1, 1, 1)


def _apply_lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Per sample and channel lookup: lut [n, 3, 256] of 0..255."""
    n = x.shape[0]
    return lut.to(torch.uint8).gather(2, x.reshape(n, 3, -1).long()).view_as(x)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> 'L' (ITU-R 601-2 in 16-bit fixed point, rounded): int32 [n, 1, H, W]."""
    r, g, b = x.int().unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(1)


def _blend(degenerate: torch.Tensor, image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Image.blend(degenerate, image, factor): C float arithmetic d + f * (i - d), truncated to uint8
    (clipped when f is outside [0, 1]). The factor goes through a C float like Pillow's."""
    f = factor.float().view(-1, 1, 1, 1)
    d = degenerate.int()
    return (d.float() + f * (image.int() - d).float()).clamp(0, 255).trunc().to(torch.uint8)


def _autocontrast(x, rows):
    """ImageOps.autocontrast(cutoff=0): per channel, lo..hi stretched to 0..255 with int() truncation,
    in float64 in Pillow's order (ix * scale + offset); a channel with hi <= lo is left alone."""
    lo = x.amin(dim=(2, 3)).double().unsqueeze(2)  # [n, 3, 1]: the lowest / highest used bins
    hi = x.amax(dim=(2, 3)).double().unsqueeze(2)
    # tensor / tensor: a Python number over a tensor is computed as number * reciprocal, one rounding more
    scale = torch.full_like(hi, 255.0) / (hi - lo).clamp(min=1)
    offset = -lo * scale
    ix = torch.arange(256, device=x.device, dtype=torch.float64)
    lut = (ix * scale + offset).trunc().clamp(0, 255)
    return _apply_lut(x, torch.where(hi > lo, lut, ix))


def _equalize(x, rows):
    """ImageOps.equalize: per channel, step = (pixels - count of the top used level) // 255 and
    lut[i] = (step // 2 + pixels below i) // step; fewer than two used levels or step 0: unchanged."""
    n, _, h, w = x.shape
    idx = x.reshape(n * 3, h * w).long()
    hist = torch.zeros(n * 3, 256, dtype=torch.int64, device=x.device)
    hist.scatter_add_(1, idx, torch.ones_like(idx))  # no bincount: it would sync on its size
    top_count = hist.gather(1, idx.amax(1, keepdim=True))
    step = (h * w - top_count) // 255
    below = hist.cumsum(1) - hist
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)  # Image.point clips a 256
    keep = ((hist > 0).sum(1, keepdim=True) <= 1) | (step == 0)
    lut = torch.where(keep, torch.arange(256, device=x.device), lut)
    return _apply_lut(x, lut.view(n, 3, 256))


def _invert(x, rows):
    return 255 - x


def _posterize(x, rows):
    """Keep the top ``bits``: x & ~(2 ** (8 - bits) - 1); bits <= 0 gives black like Pillow <= 12 and
    mixpro.augment.safe_posterize, bits >= 8 leaves the image alone like timm."""
    bits = _col(rows, ARG).round().long().clamp(0, 8)
    mask = 256 - torch.pow(2, 8 - bits)  # 0 for bits 0, 255 for bits 8
    return x & mask.to(torch.uint8)


def _solarize(x, rows):
    """ImageOps.solarize: levels at or above the threshold (0..256) inverted."""
    return torch.where(x.int() < _col(rows, ARG), x, 255 - x)


def _solarize_add(x, rows):
    """timm's solarize_add: levels below 128 raised by ``add``, capped at 255."""
    added = (x.int() + _col(rows, ARG).round().int()).clamp(0, 255).to(torch.uint8)
    return torch.where(x < 128, added, x)


def _color(x, rows):
    return _blend(_grey(x), x, rows[:, ARG])  # degenerate: convert('L').convert('RGB')


def _desaturate(x, rows):
    return _blend(_grey(x), x, (1.0 - rows[:, ARG]).clamp(0.0, 1.0))  # timm: min(1, max(0, 1 - f))


def _contrast(x, rows):
    """Degenerate: the rounded mean of the 'L' image, int(sum / count + 0.5) as ImageStat does."""
    grey = _grey(x)
    total = grey.sum(dim=(1, 2, 3)).double()
    # a tensor divisor: CUDA turns division by a Python number into a product with its reciprocal
    mean = (total / torch.full_like(total, grey[0].numel()) + 0.5).floor()
    return _blend(mean.view(-1, 1, 1, 1), x, rows[:, ARG])


def _brightness(x, rows):
    return _blend(torch.zeros(1, 1, 1, 1, dtype=torch.int32, device=x.device), x, rows[:, ARG])


# Pillow divides the kernel by 13 in C floats; computed here, not on a device that may divide by
# multiplying with a reciprocal.
_SMOOTH_ONE, _SMOOTH_FIVE = float(np.float32(1) / np.float32(13)), float(np.float32(5) / np.float32(13))


def _smooth(x):
    """ImageFilter.SMOOTH (3x3, 1 1 1 / 1 5 1 / 1 1 1 over 13) as Pillow's filter sums it: float32
    weights, 0.5 + row below + row itself + row above, each row left to right, clamped and truncated;
    the outermost rows and columns are copied."""
    one, five = _SMOOTH_ONE, _SMOOTH_FIVE
    p = x.float()

    def row(r, centre):
        return (r[..., :-2] * one + r[..., 1:-1] * centre) + r[..., 2:] * one

    ss = 0.5 + row(p[:, :, 2:], one)
    ss = ss + row(p[:, :, 1:-1], five)
    ss = ss + row(p[:, :, :-2], one)
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = ss.clamp(0, 255).trunc().to(torch.uint8)
    return out


def _sharpness(x, rows):
    return _blend(_smooth(x), x, rows[:, ARG])


def _affine_matrices(rows: torch.Tensor, height: int, width: int):
    """Per sample (a, b, c, d, e, f) as timm hands them to Image.transform (output pixel centre ->
    input point): float64 [n] each, computed in Pillow's order."""
    op, arg = rows[:, OP].round().long(), rows[:, ARG]
    one, zero = torch.ones_like(arg), torch.zeros_like(arg)

    def pick(*cases, default):
        out = default
        for name, value in cases:
            out = torch.where(op == OP_ID[name], value, out)
        return out

    cos, sin = rows[:, COS], rows[:, SIN]
    cx, cy = width / 2, height / 2
    # Image.rotate: c = cos * -cx + sin * -cy + 0.0, then += cx (and likewise f)
    rot_c = ((cos * -cx + sin * -cy) + 0.0) + cx
    rot_f = ((-sin * -cx + cos * -cy) + 0.0) + cy
    a = pick(('Rotate', cos), default=one)
    b = pick(('Rotate', sin), ('ShearX', arg), default=zero)
    c = pick(('Rotate', rot_c), ('TranslateX', arg), ('TranslateXRel', arg * width), default=zero)
    d = pick(('Rotate', -sin), ('ShearY', arg), default=zero)
    e = pick(('Rotate', cos), default=one)
    f = pick(('Rotate', rot_f), ('TranslateY', arg), ('TranslateYRel', arg * height), default=zero)
    return a, b, c, d, e, f


def _taps(flat: torch.Tensor, yi: torch.Tensor, xi: torch.Tensor, width: int) -> torch.Tensor:
    """flat int32 [n, 3, H*W] read at integer (yi, xi) [n, H, W] -> int32 [n, 3, H, W]."""
    n = flat.shape[0]
    index = (yi * width + xi).view(n, 1, -1).expand(n, 3, -1)
    return flat.gather(2, index).view(n, 3, *yi.shape[1:])


def _bilinear(flat, xin, yin, height, width):
    """Pillow's bilinear_filter32RGB: taps at floor(v - 0.5) and +1 (clamped to the image), a row lerp
    a + (b - a) * dx per row, a lerp of the rows, truncated."""
    xs, ys = xin - 0.5, yin - 0.5
    x0, y0 = xs.floor(), ys.floor()
    dx, dy = (xs - x0).unsqueeze(1), (ys - y0).unsqueeze(1)
    x0, y0 = x0.long(), y0.long()
    xa, xb = x0.clamp(0, width - 1), (x0 + 1).clamp(0, width - 1)

    def row_lerp(yi):
        left, right = _taps(flat, yi, xa, width), _taps(flat, yi, xb, width)
        return left.double() + (right - left).double() * dx

    v1 = row_lerp(y0.clamp(0, height - 1))
    v2 = row_lerp((y0 + 1).clamp(0, height - 1))  # Pillow's v2 = v1 below the last row is this clamp
    return (v1 + (v2 - v1) * dy).clamp(0, 255).trunc()


def _cubic(v1, v2, v3, v4, d):
    """Pillow's BICUBIC macro (a = -1) on float64 rows (the vertical pass), in its association."""
    p2 = -v1 + v3
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))


def _cubic_taps(t, d):
    """The horizontal pass: Pillow's p1..p4 are int arithmetic on the uint8 taps, then float64."""
    v1, v2, v3, v4 = t
    p2 = (-v1 + v3).double()
    p3 = (2 * (v1 - v2) + v3 - v4).double()
    p4 = (-v1 + v2 - v3 + v4).double()
    return v2.double() + d * (p2 + d * (p3 + d * p4))


def _bicubic(flat, xin, yin, height, width):
    """Pillow's bicubic_filter32RGB: 4x4 taps from floor(v - 0.5) - 1 (clamped: Pillow's YCLIP and
    'v2 = v1' fallbacks amount to clamping the row index), rows first, clipped and truncated."""
    xs, ys = xin - 0.5, yin - 0.5
    x0, y0 = xs.floor(), ys.floor()
    dx, dy = (xs - x0).unsqueeze(1), (ys - y0).unsqueeze(1)
    x0, y0 = x0.long() - 1, y0.long() - 1
    cols = [(x0 + k).clamp(0, width - 1) for k in range(4)]

    def row_cubic(yi):
        return _cubic_taps([_taps(flat, yi, xi, width) for xi in cols], dx)

    v = [row_cubic((y0 + k).clamp(0, height - 1)) for k in range(4)]
    return _cubic(v[0], v[1], v[2], v[3], dy).clamp(0, 255).trunc()


def _nearest(flat, xin, yin, mats, height, width):
    """Pillow's nearest paths: translations (b = d = 0) read floor(v) of the float coordinates
    (ImagingScaleAffine walks them as a running sum, which can differ in the last bit: it would take
    a coordinate within ~1e-13 of an integer to matter); anything else goes through affine_fixed's
    16.16 fixed point, emulated exactly. Returns the values and the inside mask, since fixed point
    decides inside/outside by its own coordinates."""
    a, b, c, d, e, f = (m.view(-1, 1, 1) for m in mats)

    def fix(v):
        return (v * 65536.0 + 0.5).floor().long()

    n = xin.shape[0]
    xs = torch.arange(width, device=xin.device).view(1, 1, -1)
    ys = torch.arange(height, device=xin.device).view(1, -1, 1)
    # the fixed-point walk: start (c + a/2 + b/2), += b per row, += a per column, >> 16
    fx = fix((c + a * 0.5) + b * 0.5) + ys * fix(b) + xs * fix(a)
    fy = fix((f + d * 0.5) + e * 0.5) + ys * fix(e) + xs * fix(d)
    scale_only = ((b == 0) & (d == 0)).expand(n, height, width)
    xi = torch.where(scale_only, xin.floor().long(), fx >> 16)
    yi = torch.where(scale_only, yin.floor().long(), fy >> 16)
    inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
    values = _taps(flat, yi.clamp(0, height - 1), xi.clamp(0, width - 1), width)
    return values, inside


def _warp(x, rows, resample: int):
    """Image.transform(size, AFFINE, matrix, resample, fillcolor) for every sample in x (one resample
    filter for all of them): output pixel (i, j) reads the input at matrix @ (j + 0.5, i + 0.5); points
    outside [0, W) x [0, H) take the fill colour."""
    n, _, height, width = x.shape
    mats = _affine_matrices(rows, height, width)
    a, b, c, d, e, f = (m.view(-1, 1, 1) for m in mats)
    px = torch.arange(width, device=x.device, dtype=torch.float64).view(1, 1, -1) + 0.5
    py = torch.arange(height, device=x.device, dtype=torch.float64).view(1, -1, 1) + 0.5
    xin = (a * px + b * py) + c  # Pillow: a0 * xin + a1 * yin + a2, in this order
    yin = (d * px + e * py) + f
    flat = x.reshape(n, 3, height * width).int()  # Pillow's taps are ints: (b - a) etc. in int arithmetic
    if resample == NEAREST:
        values, inside = _nearest(flat, xin, yin, mats, height, width)
    else:
        sampler = _bilinear if resample == BILINEAR else _bicubic
        values = sampler(flat, xin, yin, height, width)
        inside = (xin >= 0) & (xin < width) & (yin >= 0) & (yin < height)
    fill = rows[:, FILL:FILL + 3].round().view(n, 3, 1, 1)
    return torch.where(inside.unsqueeze(1), values.to(fill.dtype), fill).to(torch.uint8)


def _geometric(resample):
    def warp(x, rows):
        return _warp(x, rows, resample)
    return warp


# (kernel, op names, resample or None): the op kinds apply_rand_augment loops over.
_KINDS = (
    (_autocontrast, ('AutoContrast',), None),
    (_equalize, ('Equalize',), None),
    (_invert, ('Invert',), None),
    (_posterize, ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal'), None),
    (_solarize, ('Solarize', 'SolarizeIncreasing'), None),
    (_solarize_add, ('SolarizeAdd',), None),
    (_color, ('Color', 'ColorIncreasing'), None),
    (_desaturate, ('Desaturate',), None),
    (_contrast, ('Contrast', 'ContrastIncreasing'), None),
    (_brightness, ('Brightness', 'BrightnessIncreasing'), None),
    (_sharpness, ('Sharpness', 'SharpnessIncreasing'), None),
    *((_geometric(r), GEOMETRIC, r) for r in (NEAREST, BILINEAR, BICUBIC)),
)
_KIND_IDS = [torch.tensor([OP_ID[name] for name in names]) for _, names, _ in _KINDS]
assert {name for _, names, _ in _KINDS for name in names} == set(OP_NAMES)


def apply_rand_augment(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Apply each sample's drawn RandAugment layers, in layer order, as Pillow would.

    images: uint8 [B, 3, H, W] on any device; params: [B, num_layers, PARAMS_WIDTH] from
    ``RandAugmentParams`` (best left on the CPU: which sample gets which op is read there, so the
    device never has to be waited on). Returns a new uint8 [B, 3, H, W] on the images' device.
    """
    if images.dtype != torch.uint8:
        raise ValueError(f'apply_rand_augment takes uint8 images (Pillow grey levels 0..255), got {images.dtype}')
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f'apply_rand_augment takes [B, 3, H, W] images, got shape {tuple(images.shape)}')
    if params.dim() != 3 or params.shape[0] != images.shape[0] or params.shape[2] != PARAMS_WIDTH:
        raise ValueError(f'params must be [{images.shape[0]}, num_layers, {PARAMS_WIDTH}], '
                         f'got {tuple(params.shape)}')
    device = images.device
    plan = params.detach().to('cpu', torch.float64)  # a no-op when the loader left them on the CPU
    # Which samples each (layer, kind) touches, worked out on the CPU and sent over in one copy.
    steps, chunks = [], []
    for layer in range(plan.shape[1]):
        op, applied = plan[:, layer, OP].round().long(), plan[:, layer, APPLIED] > 0.5
        resample = plan[:, layer, RESAMPLE].round().long()
        for (kernel, _, kind_resample), ids in zip(_KINDS, _KIND_IDS):
            chosen = applied & torch.isin(op, ids)
            if kind_resample is not None:
                chosen &= resample == kind_resample
            index = chosen.nonzero()[:, 0]
            if len(index):
                steps.append((layer, kernel, len(index)))
                chunks.append(index)
    out = images.clone()
    if not steps:
        return out
    indices = torch.cat(chunks)
    if device.type == 'cuda':
        indices, plan = indices.pin_memory(), plan.pin_memory()
    indices = indices.to(device, non_blocking=True)
    plan = plan.to(device, non_blocking=True)
    start = 0
    for layer, kernel, count in steps:
        index = indices[start:start + count]
        start += count
        out.index_copy_(0, index, kernel(out.index_select(0, index), plan[index, layer]))
    return out
