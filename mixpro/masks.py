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


def cell_units(cells: torch.Tensor, per_cell: int) -> torch.Tensor:
    """``[B, Gh, Gw]`` per cell -> a ``[B, Gh, u, Gw, u]`` view (no copy) with ``u = per_cell`` units per
    cell side. An elementwise op on it (``where``, ``float``) writes the finer grid in one pass, and
    ``units_to_grid`` then reads it as ``[B, rows, cols]`` without another copy."""
    b, gh, gw = cells.shape
    return cells[:, :, None, :, None].expand(b, gh, per_cell, gw, per_cell)


def units_to_grid(units: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``[B, Gh, u, Gw, u]`` -> ``[B, rows, cols]``, cropped at the border (the image crops the last cells)."""
    b, gh, u, gw, _ = units.shape
    return units.reshape(b, gh * u, gw * u)[:, :rows, :cols]


def cells_to_blocks(cells: torch.Tensor, per_cell: int, rows: int, cols: int) -> torch.Tensor:
    """``[B, Gh, Gw]`` cell mask -> ``[B, rows, cols]`` mask of a finer grid with ``per_cell`` x
    ``per_cell`` units per cell, cropped to ``rows`` x ``cols`` (the image border crops the last cells)."""
    return units_to_grid(cell_units(cells, per_cell), rows, cols)


def cells_to_pixels(cells: torch.Tensor, cell: int, height: int, width: int) -> torch.Tensor:
    """Blow a ``[B, Gh, Gw]`` cell mask up to a ``[B, 1, H, W]`` pixel mask, cropping the border."""
    return cells_to_blocks(cells, cell, height, width)[:, None]


class CellGeometry:
    """Constants of MaskMix on one image size, cell size, batch and device, built once (on the device,
    from ``arange``: a tensor made from a Python list would be a blocking copy).

    The image is cut into square *blocks* of ``u = gcd(cell, H, W)`` px: every block lies inside one
    (possibly cropped) cell, so the mixed image is ONE gather over a block view of the batch, each
    block read whole from its source image (see ``mix_cells``)."""

    def __init__(self, batch: int, height: int, width: int, cell: int, device):
        self.batch, self.height, self.width, self.cell = batch, height, width, cell
        self.grid = maskmix_grid(height, width, cell)
        self.block = math.gcd(cell, math.gcd(height, width))
        self.rows, self.cols = height // self.block, width // self.block
        self.samples = torch.arange(batch, device=device)
        self.block_rows = torch.arange(self.rows, device=device).view(1, -1, 1)
        self.block_cols = torch.arange(self.cols, device=device).view(1, 1, -1)
        self.area = visible_cell_area(self.grid, cell, height, width, device=device)
        # pixel ranges of every cell, row-major like the cell mask
        self.regions = [(slice(r * cell, min(height, (r + 1) * cell)), slice(c * cell, min(width, (c + 1) * cell)))
                        for r in range(self.grid[0]) for c in range(self.grid[1])]

    def matches(self, batch: int, height: int, width: int, cell: int, device) -> bool:
        return (batch, height, width, cell) == (self.batch, self.height, self.width, self.cell) and \
            self.samples.device == torch.device(device)


def mix_cells(x: torch.Tensor, cells: torch.Tensor, partner: torch.Tensor, geometry: CellGeometry,
              out: torch.Tensor = None) -> torch.Tensor:
    """MaskMix composition in one pass: ``x[b]`` where ``cells[b]`` is True, ``x[partner[b]]`` elsewhere.

    One gather over a ``[B, rows, cols, C, u, u]`` block view of ``x`` writes every block of the
    result from its source image (read once, written once: no full-size partner copy, no pixel mask).
    ``out`` (contiguous, like ``x``) receives the result; a new tensor when None or when compiling (the
    compiled gather writes its own output). ``x`` is not changed.
    """
    b, c, height, width = x.shape
    g = geometry
    u, rows, cols = g.block, g.rows, g.cols
    # the source image of every block, written once on the [B, Gh, u', Gw, u'] units of the cells
    source = units_to_grid(torch.where(cell_units(cells, g.cell // u), g.samples.view(-1, 1, 1, 1, 1),
                                       partner.view(-1, 1, 1, 1, 1)), rows, cols)   # [B, rows, cols]
    x = x.contiguous()
    blocks_in = x.view(b, c, rows, u, cols, u).permute(0, 2, 4, 1, 3, 5)
    if torch.compiler.is_compiling():   # functional: the compiler writes the gather and the layout in one pass
        return blocks_in[source, g.block_rows, g.block_cols].permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    blocks_out = out.view(b, c, rows, u, cols, u).permute(0, 2, 4, 1, 3, 5)
    torch.ops.aten.index.Tensor_out(blocks_in, [source, g.block_rows, g.block_cols], out=blocks_out)
    return out


def mix_cells_in_place(x: torch.Tensor, cells: torch.Tensor, partner: torch.Tensor, geometry: CellGeometry) -> torch.Tensor:
    """The same composition as ``mix_cells``, written into ``x``: cell by cell, only the samples that
    take that cell from their partner are copied (a gather of those cells, then a scatter into them).

    Reads the cell mask back to the host (one sync), so it is the CPU path: there a sync costs nothing,
    a new batch-sized tensor costs page faults, and copying only the partner's cells halves the traffic.
    Cells are disjoint, so each cell's partners are read before anything writes them."""
    flat = ~cells.flatten(1).t()                                  # [T, B] True where the partner shows
    counts = flat.sum(1).tolist()
    taking = flat.nonzero()[:, 1]                                 # samples taking a cell, cell by cell
    takers, sources = taking.split(counts), partner[taking].split(counts)
    for (rows, cols), take, source in zip(geometry.regions, takers, sources):
        if len(take):
            region = x[:, :, rows, cols]
            region.index_copy_(0, take, region.index_select(0, source))
    return x


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
