import math

import pytest
import torch

from conftest import source_coded_batch
from mixpro import Mixer


def maskmix_step(size, cell, batch=16, seed=0, **kwargs):
    mixer = Mixer('maskmix', num_classes=10, mask_cell=cell, token_size=16, seed=seed, **kwargs)
    x = source_coded_batch(batch, size)
    y = torch.arange(batch) % 10
    mixed, target = mixer(x.clone(), y)
    return mixer, x, mixed, target


@pytest.mark.parametrize('size,cell', [(224, 32), (224, 64), (224, 112), (160, 96)])
def test_every_token_comes_from_one_image(size, cell):
    mixer, x, mixed, _ = maskmix_step(size, cell)
    step = mixer.last
    source = mixed[:, 0] - 1                                   # [B, H, W] index of the source image
    tokens = source.unfold(1, 16, 16).unfold(2, 16, 16)        # [B, h, w, 16, 16]
    per_token_min = tokens.amin(dim=(-1, -2))
    per_token_max = tokens.amax(dim=(-1, -2))
    assert torch.equal(per_token_min, per_token_max), 'a token mixes pixels of two images'
    own = torch.arange(source.shape[0]).view(-1, 1, 1)
    assert torch.all((source == own) | (source == step.partner.view(-1, 1, 1)))


@pytest.mark.parametrize('size,cell', [(224, 32), (224, 64), (224, 112), (160, 96)])
def test_lambda_is_visible_pixel_fraction(size, cell):
    mixer, x, mixed, _ = maskmix_step(size, cell)
    step = mixer.last
    own = torch.arange(x.shape[0]).view(-1, 1, 1)
    shows_own = (mixed[:, 0] - 1) == own
    moved = step.partner != torch.arange(x.shape[0])   # a sample paired with itself shows itself everywhere
    assert moved.any()
    assert torch.allclose(step.lam_area[moved], shows_own[moved].float().mean(dim=(1, 2)), atol=1e-6)
    assert torch.allclose(step.lam_area, step.keep.float().mean(dim=(1, 2, 3)), atol=1e-6)


def test_cropped_grid_counts_cells_per_sample_and_exactly():
    # 224 px with 96-px cells: a 3x3 grid whose last row and column are only 32 px wide
    mixer = Mixer('maskmix', num_classes=10, mask_cell=96, token_size=16, seed=3)
    mixer(source_coded_batch(32, 224), torch.zeros(32, dtype=torch.long))
    step = mixer.last
    cells = step.keep[:, 0, ::96, ::96]                         # one pixel per cell: [B, 3, 3]
    counts = cells.flatten(1).sum(1)
    assert torch.all(counts == counts[0]) and 1 <= counts[0] <= 9   # n = ceil(T*r) for every sample
    assert not torch.all(cells == cells[0]), 'every sample should pick its own cells'
    areas = torch.tensor([96., 96., 32.])
    expected = (cells.float() * areas.view(1, 3, 1) * areas.view(1, 1, 3)).sum((1, 2)) / 224 ** 2
    assert torch.allclose(step.lam_area, expected, atol=1e-6)
    if counts[0] < 9:
        assert not torch.allclose(step.lam_area, counts.float() / 9)


def test_official_cell_count_lambda_option():
    mixer = Mixer('maskmix', num_classes=10, mask_cell=96, token_size=16, maskmix_lam='cells', seed=3)
    mixer(source_coded_batch(8, 224), torch.zeros(8, dtype=torch.long))
    counts = mixer.last.keep[:, 0, ::96, ::96].flatten(1).sum(1).float()
    assert torch.allclose(mixer.last.lam_area, counts / 9)


def test_cell_count_follows_ceil_of_ratio():
    counts = set()
    for seed in range(40):
        mixer, *_ = maskmix_step(64, 16, batch=2, seed=seed)
        counts.add(int(mixer.last.keep[0, 0, ::16, ::16].sum()))
    assert min(counts) >= 1 and max(counts) <= 16 and len(counts) > 5


@pytest.mark.parametrize('cell,token', [(40, 16), (48, 32), (8, 16)])
def test_cell_not_multiple_of_token_is_rejected(cell, token):
    with pytest.raises(ValueError, match=f'mask_cell={cell}.*token_size={token}'):
        Mixer('mixpro', mask_cell=cell, token_size=token)


def test_bad_keywords_name_themselves():
    with pytest.raises(ValueError, match='method'):
        Mixer('mixpr0')
    with pytest.raises(ValueError, match='maskmix_prob'):
        Mixer('mixpro', maskmix_prob=1.5)
    with pytest.raises(ValueError, match='membership'):
        Mixer('transmix', membership='bilinear')


def test_maskmix_images_match_an_independent_composition():
    mixer = Mixer('maskmix', num_classes=10, mask_cell=32, token_size=16, seed=5)
    x = torch.randn(6, 3, 96, 96)
    mixed, _ = mixer(x.clone(), torch.zeros(6, dtype=torch.long))
    keep, partner = mixer.last.keep, mixer.last.partner
    expected = keep * x + (~keep) * x[partner]
    assert torch.equal(mixed, expected)
    assert sorted(partner.tolist()) == list(range(6))     # partners form a permutation
    assert math.isclose(float(keep.float().mean()), float(mixer.last.lam_area.mean()), rel_tol=1e-6)
