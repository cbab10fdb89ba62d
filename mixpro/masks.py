"""Where each pixel of a mixed image comes from.

A *keep mask* is a bool tensor ``[B or 1, 1, H, W]`` that is True where the pixel shows the
original image and False where it shows the partner. Everything here runs on the tensors'
device, vectorized over the batch, and never reads a value back to the host.
"""
import math
import random
from typing import Tuple

import torch
import torch.nn.functional as F


def maskmix_grid(height: int, width: int, cell: int) -> Tuple[int, int]:
    """Rows and columns of the MaskMix cell grid; border cells are cropped, so ``ceil``."""
    return math.ceil(height / cell), math.ceil(width / cell)


def maskmix_cells(batch: int, grid: Tuple[int, int], n_keep: int, generator: torch.Generator) -> torch.Tensor:
    """Bool ``[B, Gh, Gw]``: each sample keeps its own ``n_keep`` cells, chosen uniformly.

    The ``n_keep`` largest of T uniform scores per row form a uniform random subset of size n_keep.
    """
    gh, gw = grid
    scores = torch.rand(batch, gh * gw, generator=generator, device=generator.device)
    keep = torch.zeros(batch, gh * gw, dtype=torch.bool, device=generator.device)
    keep.scatter_(1, scores.topk(n_keep, dim=1).indices, True)
    return keep.view(batch, gh, gw)


def cells_to_pixels(cells: torch.Tensor, cell: int, height: int, width: int) -> torch.Tensor:
    """Blow a ``[B, Gh, Gw]`` cell mask up to a ``[B, 1, H, W]`` pixel mask, cropping the border."""
    b, gh, gw = cells.shape
    pixels = cells[:, :, None, :, None].expand(b, gh, cell, gw, cell).reshape(b, gh * cell, gw * cell)
    return pixels[:, None, :height, :width]


def visible_cell_area(grid: Tuple[int, int], cell: int, height: int, width: int, device=None) -> torch.Tensor:
    """``[Gh*Gw]`` fraction of the image each cell covers once the grid is cropped at the border.

    Built on the device from ``arange`` (a tensor made from a Python list would be a blocking copy)."""
    gh, gw = grid
    rows = (height - cell * torch.arange(gh, device=device)).clamp(max=cell).float()
    cols = (width - cell * torch.arange(gw, device=device)).clamp(max=cell).float()
    return (rows[:, None] * cols[None, :]).flatten() / float(height * width)


def random_box(height: int, width: int, lam: float, rng: random.Random) -> Tuple[int, int, int, int]:
    """CutMix box ``(y0, y1, x0, x1)`` as in timm's ``rand_bbox``: side ``sqrt(1-lam)``, centre
    uniform over the image, clipped at the border (so the real area can be smaller)."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = rng.randrange(height), rng.randrange(width)
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return y0, y1, x0, x1


def box_keep_mask(box: Tuple[int, int, int, int], height: int, width: int, device=None) -> torch.Tensor:
    """``[1, 1, H, W]`` keep mask of a CutMix step: False inside the pasted box."""
    y0, y1, x0, x1 = box
    keep = torch.ones(1, 1, height, width, dtype=torch.bool, device=device)
    keep[..., y0:y1, x0:x1] = False
    return keep


def token_membership(keep: torch.Tensor, token_size: int, mode: str = 'area') -> torch.Tensor:
    """``[B, N]`` fraction of each token's pixels that come from the original image.

    ``area`` averages the pixel mask over each token (exact for MaskMix, area-true for CutMix
    boxes that cut through a token); ``nearest`` samples one pixel per token like the official
    TransMix code, kept only to reproduce it.
    """
    height, width = keep.shape[-2:]
    if height % token_size or width % token_size:
        raise ValueError(f'image {height}x{width} is not a whole number of {token_size}-px tokens')
    keep = keep.float()
    if mode == 'area':
        grid = F.avg_pool2d(keep, token_size)
    elif mode == 'nearest':
        grid = F.interpolate(keep, size=(height // token_size, width // token_size), mode='nearest')
    else:
        raise ValueError(f"membership must be 'area' or 'nearest', got {mode!r}")
    return grid.flatten(1)
