"""The pictures: scripts/show_mix.py on a trained checkpoint, and the captioned TensorBoard grid."""
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import train
from conftest import train_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'scripts'))
import show_mix  # noqa: E402


@pytest.fixture(scope='module')
def mixpro_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp('runs')
    train.main(train_args(data_dir, out, 'pictures', 'mixpro', 1, '--maskmix-prob', '1.0'))
    return out / 'pictures'


def test_show_mix_draws_the_pairs(mixpro_run, tmp_path, capsys):
    size, pairs = 48, 3
    out = tmp_path / 'mix.png'
    show_mix.main(['--checkpoint', str(mixpro_run / 'last.pth.tar'), '--output', str(out), '--pairs', str(pairs),
                   '--size', str(size), '--seed', '1'])
    lines = capsys.readouterr().out
    assert f'wrote {out}: 3 pairs of' in lines
    sheet = np.asarray(Image.open(out).convert('RGB')).astype(int)
    assert sheet.shape[1] == len(show_mix.COLUMNS) * (size + 4) + 8
    top = 18   # the column titles
    for row in range(pairs):
        y = top + row * (sheet.shape[0] - top) // pairs

        def picture(column):
            return sheet[y:y + size, column * (size + 4):column * (size + 4) + size]
        a, b, maskmix, cutmix = picture(0), picture(1), picture(2), picture(5)
        for mixed in (maskmix, cutmix):   # every pixel of a mix is A's or B's, and both show
            from_a, from_b = (mixed == a).all(-1), (mixed == b).all(-1)
            assert (from_a | from_b).all() and (from_a & ~from_b).any() and (from_b & ~from_a).any()
        tokens = picture(3)
        assert tokens.max() == 255 and tokens.min() == 0          # white and black tokens: A's and B's
    with pytest.raises(SystemExit, match='too few'):
        show_mix.main(['--checkpoint', str(mixpro_run / 'last.pth.tar'), '--output', str(out), '--pairs', '20'])
    for bad in (tmp_path / 'no_extension', tmp_path):              # not a picture file: refused before drawing
        with pytest.raises(SystemExit):
            show_mix.main(['--checkpoint', str(mixpro_run / 'last.pth.tar'), '--output', str(bad)])
        assert 'name a picture file' in capsys.readouterr().err


def test_tensorboard_grid_has_captions_and_attention(mixpro_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(mixpro_run), size_guidance={'images': 0})
    events.Reload()
    grids = events.Images('mix/samples')
    assert len(grids) == 1
    from io import BytesIO
    grid = Image.open(BytesIO(grids[0].encoded_image_string)).convert('RGB')
    pixels = np.asarray(grid).astype(int)
    # each of the 8 samples: the mixed image and its attention overlay (red-tinted) side by side, captions below
    tile = 112
    overlay = pixels[:tile, tile + 4:2 * tile + 4]
    assert (overlay[..., 0] > overlay[..., 2]).mean() > 0.5          # red heat over a grey image
    caption = pixels[tile + 2:tile + 34, :2 * tile]
    assert (caption < 128).any()                                       # text was written
    assert grid.size == (4 * (2 * (tile + 4) + 8), 2 * (tile + 2 * 14 + 6 + 4))
