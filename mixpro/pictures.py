"""Pictures of what the mixer did: mixed images with their labels, λ and class attention."""
import math
from typing import Dict, List, Optional, Tuple

import torch
from PIL import Image, ImageDraw, ImageFont

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


# ---- drawing (Pillow only: no plotting dependency) -----------------------------------------------
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:   # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def line_plot(series: Dict[str, List[Tuple[float, float]]], path, title: str, xlabel: str, ylabel: str,
              size=(720, 480)) -> None:
    """A PNG line chart: one line with dots per series, axes with ticks, a legend."""
    image = Image.new('RGB', size, 'white')
    draw = ImageDraw.Draw(image)
    small, normal = font(11), font(13)
    left, right, top, bottom = 60, size[0] - 20, 40, size[1] - 50
    points = [p for values in series.values() for p in values]
    x_lo, x_hi = min((p[0] for p in points), default=0.0), max((p[0] for p in points), default=1.0)
    y_lo, y_hi = min((p[1] for p in points), default=0.0), max((p[1] for p in points), default=100.0)
    y_lo, y_hi = math.floor(y_lo / 10) * 10, max(math.ceil(y_hi / 10) * 10, math.floor(y_lo / 10) * 10 + 10)
    x_hi = x_hi if x_hi > x_lo else x_lo + 1.0

    def at(x, y):
        return (left + (x - x_lo) / (x_hi - x_lo) * (right - left), bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top))

    draw.text((size[0] / 2, 12), title, fill='black', font=normal, anchor='mt')
    step = 10 if y_hi - y_lo <= 60 else 20
    for y in range(int(y_lo), int(y_hi) + 1, step):
        draw.line([(left - 4, at(x_lo, y)[1]), (right, at(x_lo, y)[1])], fill=(225, 225, 225))
        draw.text((left - 6, at(x_lo, y)[1]), f'{y:g}', fill='black', font=small, anchor='rm')
    draw.rectangle([left, top, right, bottom], outline='black')
    x_ticks = sorted({p[0] for p in points})
    for x in x_ticks if len(x_ticks) <= 12 else [x_lo + (x_hi - x_lo) * i / 5 for i in range(6)]:
        draw.line([at(x, y_lo), (at(x, y_lo)[0], bottom + 4)], fill='black')
        draw.text((at(x, y_lo)[0], bottom + 6), f'{x:g}', fill='black', font=small, anchor='mt')
    draw.text(((left + right) / 2, size[1] - 18), xlabel, fill='black', font=normal, anchor='mm')
    draw.text((8, top - 16), ylabel, fill='black', font=normal)
    for n, (label, values) in enumerate(series.items()):
        colour = PALETTE[n % len(PALETTE)]
        xy = [at(x, y) for x, y in sorted(values)]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for px, py in xy:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        legend_y = bottom - 16 * (len(series) - n) - 4    # lower left: where falling curves leave room
        draw.line([(left + 10, legend_y + 6), (left + 30, legend_y + 6)], fill=colour, width=3)
        draw.text((left + 35, legend_y), label, fill='black', font=small)
    image.save(path)
