"""The shipped recipes' training transforms survive thousands of draws on the installed Pillow.

Pillow 13's ``ImageOps.posterize`` rejects ``bits=0``, which timm 1.0.31's RandAugment
(``rand-m9-mstd0.5-inc1``) draws about once in 660 images; ``mixpro.augment`` patches it."""
import glob
import random
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image, ImageOps
from timm.data import auto_augment, resolve_data_config

from mixpro import augment
from mixpro.config import parse_train_args
from mixpro.data import train_loader
from mixpro.distributed import DistInfo

REPO = Path(__file__).resolve().parents[1]
DRAWS_RANDAUGMENT = 4000   # bits=0 comes ~1 in 660 draws: missed with probability ~0.2% (seeded below: hit)
DRAWS_PLAIN = 500


def _images(size=(37, 23)):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), 'RGB')
    return [rgb, rgb.convert('L')]


def test_safe_posterize_is_black_for_zero_bits_and_pillow_posterize_otherwise():
    for img in _images():
        black = augment.safe_posterize(img, 0)
        assert (black.mode, black.size) == (img.mode, img.size)
        assert black.tobytes() == bytes(len(img.tobytes()))           # Pillow <= 12: every pixel 0
        assert augment.safe_posterize(img, -1).tobytes() == black.tobytes()
        for bits in range(1, 9):
            out = augment.safe_posterize(img, bits)
            assert (out.mode, out.size) == (img.mode, img.size)
            assert out.tobytes() == ImageOps.posterize(img, bits).tobytes(), bits


def test_timm_posterize_ops_are_patched_once():
    for name in augment.POSTERIZE_OPS:
        assert auto_augment.NAME_TO_OP[name] is augment.safe_posterize, name
    augment.patch_posterize()   # idempotent
    for name in augment.POSTERIZE_OPS:
        assert auto_augment.NAME_TO_OP[name] is augment.safe_posterize, name
    op = auto_augment.AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=10)   # level 10 -> bits 0
    img = _images()[0]
    assert op(img).tobytes() == bytes(len(img.tobytes()))


class _Images(torch.utils.data.Dataset):
    transform = None

    def __len__(self):
        return 1

    def __getitem__(self, index):
        raise NotImplementedError


def recipe_train_transforms():
    """{settings: (transform, recipe paths)}, one entry per distinct training transform of configs/*.yaml,
    built by mixpro.data.train_loader exactly as a training run builds it."""
    transforms = {}
    for path in sorted(glob.glob(str(REPO / 'configs' / '*.yaml'))):
        args = parse_train_args(['--config', path])
        cfg = timm.models.get_pretrained_cfg(args.model)   # what resolve_data_config reads off the model
        data_config = resolve_data_config(vars(args), pretrained_cfg=cfg.to_dict() if cfg else None)
        key = (tuple(data_config['input_size']), tuple(args.scale), tuple(args.ratio), args.hflip, args.vflip,
               args.color_jitter, args.aa, args.train_interpolation, args.reprob, args.remode, args.recount,
               tuple(data_config['mean']), tuple(data_config['std']))
        if key not in transforms:
            args.workers, args.pin_mem, args.aug_repeats = 0, False, 0   # loader-only: not in the transform
            dataset = _Images()
            train_loader(dataset, data_config, args, DistInfo())
            transforms[key] = (dataset.transform, [])
        transforms[key][1].append(Path(path).name)
    return transforms


@pytest.fixture
def one_torch_thread():
    """As in a DataLoader worker; two intra-op threads make ToTensor several times slower here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_every_recipe_train_transform_survives_thousands_of_draws(monkeypatch, one_torch_thread):
    bits_drawn = []

    def counting(original):
        def op(img, bits_to_keep, **kwargs):
            bits_drawn.append(bits_to_keep)
            return original(img, bits_to_keep, **kwargs)
        return op
    for name in augment.POSTERIZE_OPS:   # before the transforms are built: AugmentOp looks its op up then
        monkeypatch.setitem(auto_augment.NAME_TO_OP, name, counting(auto_augment.NAME_TO_OP[name]))

    transforms = recipe_train_transforms()
    assert sum(len(paths) for _, paths in transforms.values()) == len(glob.glob(str(REPO / 'configs' / '*.yaml')))
    randaugment = {key for key in transforms if key[6] and key[6].startswith('rand')}
    assert randaugment, 'no recipe uses RandAugment: this test no longer covers the ImageNet recipes'

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    source = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8), 'RGB')
    for key, (transform, paths) in transforms.items():
        for i in range(DRAWS_RANDAUGMENT if key in randaugment else DRAWS_PLAIN):
            try:
                out = transform(source)
            except Exception as err:
                pytest.fail(f'the train transform of {len(paths)} recipe(s) ({", ".join(paths[:3])}, ...) '
                            f'failed at draw {i}: {err!r}')
            assert out.shape == key[0], paths
            assert torch.isfinite(out).all(), paths
    assert bits_drawn.count(0) >= 1, 'RandAugment never drew posterize bits=0: raise DRAWS_RANDAUGMENT'
    print(f'posterize drawn {len(bits_drawn)} times, {bits_drawn.count(0)} with bits=0')
