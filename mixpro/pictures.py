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


def to_unit(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised ``[B, 3, H, W]`` images back to [0, 1]."""
    mean = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images * std + mean).clamp(0, 1)


def tile(image: torch.Tensor, size: int) -> Image.Image:
    """A ``[3, H, W]`` image in [0, 1] as a ``size``-px PIL square (nearest: small images stay sharp)."""
    array = (image.permute(1, 2, 0).float().numpy() * 255).round().astype('uint8')
    return Image.fromarray(array).resize((size, size), Image.NEAREST)


def grey_tile(values: torch.Tensor, size: int) -> Image.Image:
    """A ``[h, w]`` map in [0, 1] as a grey square (white = 1), with the grid drawn on it."""
    h, w = values.shape
    image = tile(values.float().view(1, h, w).expand(3, h, w), size)
    draw = ImageDraw.Draw(image)
    for i in range(1, h):
        draw.line([(0, i * size / h), (size, i * size / h)], fill=(160, 160, 200))
    for j in range(1, w):
        draw.line([(j * size / w, 0), (j * size / w, size)], fill=(160, 160, 200))
    return image


def attention_tile(image: torch.Tensor, attention: torch.Tensor, size: int) -> Image.Image:
    """The class attention (``[N]`` over a square token grid) as a red heat map over ``image``, scaled
    from its smallest to its largest token (a near-uniform attention still shows where it leans)."""
    side = math.isqrt(attention.numel())
    heat = attention.float().view(1, 1, side, side)
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)
    heat = torch.nn.functional.interpolate(heat, size=image.shape[-2:], mode='nearest')[0]
    red = torch.stack([torch.ones_like(heat[0]), torch.zeros_like(heat[0]), torch.zeros_like(heat[0])])
    return tile(image * (1 - 0.7 * heat) + red * 0.7 * heat, size)


def compose(rows: List[List[Optional[Image.Image]]], captions: List[List[str]], size: int,
            titles: Optional[List[str]] = None, columns_per_row: int = 1) -> Image.Image:
    """Tiles in a grid, ``captions`` (lines) under each row of tiles; ``columns_per_row`` rows side by side."""
    text = font(11)
    line_height = 14
    caption_height = line_height * max((len(c) for c in captions), default=0) + 6
    title_height = 18 if titles else 0
    cells = max(len(r) for r in rows)
    cell_w, cell_h = cells * (size + 4) + 8, size + caption_height + 4
    grid_rows = math.ceil(len(rows) / columns_per_row)
    sheet = Image.new('RGB', (columns_per_row * cell_w, title_height + grid_rows * cell_h), 'white')
    draw = ImageDraw.Draw(sheet)
    for block in range(columns_per_row if titles else 0):
        for j, title in enumerate(titles):
            draw.text((block * cell_w + j * (size + 4) + size / 2, 4), title, fill='black', font=text, anchor='mt')
    for n, (tiles, lines) in enumerate(zip(rows, captions)):
        x0, y0 = (n % columns_per_row) * cell_w, title_height + (n // columns_per_row) * cell_h
        for j, image in enumerate(tiles):
            if image is not None:
                sheet.paste(image, (x0 + j * (size + 4), y0))
        for k, line in enumerate(lines):
            draw.text((x0, y0 + size + 3 + k * line_height), line, fill='black', font=text)
    return sheet


def _name(index: int, class_names: Optional[Dict[int, str]]) -> str:
    return (class_names or {}).get(index, str(index))


def snapshot_sheet(snapshot: dict, mean, std, class_names: Optional[Dict[int, str]] = None,
                   size: int = 112) -> Image.Image:
    """The TensorBoard picture of a logged batch: each mixed image, its class attention where the step
    had one, and a caption with both labels and λ_area / λ_attn / α."""
    images = to_unit(snapshot['images'], mean, std)
    rows, captions = [], []
    for i in range(images.shape[0]):
        tiles = [tile(images[i], size)]
        if snapshot['attention'] is not None:
            tiles.append(attention_tile(images[i], snapshot['attention'][i], size))
        rows.append(tiles)
        own, other = int(snapshot['labels'][i]), int(snapshot['partner_labels'][i])
        lam_area = float(snapshot['lam_area'][i])
        lines = [f"{snapshot['kind']}: {_name(own, class_names)}" +
                 ('' if snapshot['kind'] == 'none' else f" + {_name(other, class_names)}, area {lam_area:.2f}")]
        if snapshot['lam_attn'] is not None:   # the default font has no Greek: lam / alpha spelt out
            alpha = '' if snapshot['alpha'] is None else f" alpha {float(snapshot['alpha'][i]):.2f}"
            lines.append(f"attn {float(snapshot['lam_attn'][i]):.2f}{alpha}")
        captions.append(lines)
    return compose(rows, captions, size, columns_per_row=4)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL picture as a ``[3, H, W]`` float tensor in [0, 1] (TensorBoard's image format)."""
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3) \
        .permute(2, 0, 1).float() / 255
