"""One real ``train.py`` epoch per Table-1 model recipe, with the recipe's own 224-px augmentation
(RandAugment, random erasing, ...), its mixing method and precision, on CPU and on JPEG images: what a
fresh install meets first. Only the depth is cut (``--model-kwargs``) and the data is tiny."""
import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'
# fewer blocks, same layers (as in test_table1_models.py): a step at 224 px stays quick on a CPU
SHALLOW = {'deit': ['depth=1'], 'xcit': ['depth=1', 'cls_attn_layers=1'],
           'cait': ['depth=1', 'depth_token_only=1'], 'pvt': ['depths=(1,1,1,1)'],
           'ca_swin': ['depths=(1,1,1,1)']}
# every model once; each family and the set as a whole see baseline, TransMix and MixPro where it can.
# The recipes train in fp16 autocast (imagenet.yaml amp: true), which a CPU run turns off unless asked:
# fp16 matmuls are emulated there, 10-35x slower than fp32. deit_t asks for it (--amp, GradScaler included).
# The recipes choose --data-backend tensor, pillow on a CPU unless asked: some models ask, so both run.
RECIPES = [
    ('deit_t', 'mixpro', 0), ('deit_s', 'transmix', 0), ('deit_b', 'baseline', 0),
    ('pvt_t', 'transmix', 2), ('pvt_s', 'mixpro', 0), ('pvt_m', 'baseline', 0), ('pvt_l', 'mixpro', 0),
    ('xcit_t', 'baseline', 0), ('xcit_s', 'mixpro', 0), ('xcit_m', 'transmix', 0), ('xcit_l', 'mixpro', 0),
    ('cait_xxs', 'mixpro', 0), ('ca_swin_t', 'transmix', 0), ('ca_swin_s', 'mixpro', 0),
]
TRAIN_PER_CLASS, VAL_PER_CLASS, BATCH = 4, 2, 2
KEEPS_AMP = 'deit_t'
TENSOR_BACKEND = {'deit_t', 'pvt_t', 'xcit_s', 'ca_swin_s'}   # pvt_t with loader workers


def test_recipes_cover_every_table1_model_and_method():
    bases = {p.stem for p in (CONFIGS / 'base').glob('*.yaml')} - {'imagenet', 'cifar100'}   # CIFAR: test_datasets.py
    assert {prefix for prefix, _, _ in RECIPES} == bases
    assert {method for _, method, _ in RECIPES} == {'baseline', 'transmix', 'mixpro'}
    assert any(workers for _, _, workers in RECIPES)


@pytest.fixture(scope='module')
def jpeg_folder(tmp_path_factory):
    """Two classes of 224-px JPEGs (ImageNet is JPEG): smooth colour gradients plus noise."""
    root = tmp_path_factory.mktemp('jpeg_data')
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:224, 0:224] / 224.0
    for split, count in (('train', TRAIN_PER_CLASS), ('val', VAL_PER_CLASS)):
        for c in range(2):
            folder = root / split / f'n0000000{c}'
            folder.mkdir(parents=True)
            for i in range(count):
                base = np.stack([xx, yy, (xx + yy) / 2] if c == 0 else [yy, 1 - xx, xx * yy], -1)
                pixels = (255 * base + rng.normal(0, 25, base.shape)).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels, 'RGB').save(folder / f'img{i}.JPEG', quality=90)
    return root


@pytest.mark.slow
@pytest.mark.parametrize('prefix,method,workers', RECIPES, ids=[f'{p}_{m}' for p, m, _ in RECIPES])
def test_recipe_trains_one_epoch_on_cpu(jpeg_folder, tmp_path, prefix, method, workers):
    family = prefix.rsplit('_', 1)[0]
    experiment = f'{prefix}_{method}'
    result = train.main([
        '--config', str(CONFIGS / f'{experiment}.yaml'), '--data-dir', str(jpeg_folder),
        '--output', str(tmp_path), '--model-kwargs', *SHALLOW[family],
        '--batch-size', str(BATCH), '--epochs', '1', '--workers', str(workers), '--device', 'cpu',
        '--log-interval', '1', *(['--amp'] if prefix == KEEPS_AMP else []),
        *(['--data-backend', 'tensor'] if prefix in TENSOR_BACKEND else [])])
    run_dir = tmp_path / experiment
    assert (run_dir / 'last.pth.tar').is_file()
    with open(run_dir / 'summary.csv') as f:
        rows = list(csv.DictReader(f))
    assert [int(r['epoch']) for r in rows] == [0]
    assert np.isfinite(float(rows[0]['train_loss']))
    assert result['eval']['count'] == 2 * VAL_PER_CLASS
    state = torch.load(run_dir / 'last.pth.tar', weights_only=True)
    assert state['epoch'] == 0 and state['args']['aa'] == 'rand-m9-mstd0.5-inc1'
    assert state['args']['amp'] == (prefix == KEEPS_AMP) and (state['scaler'] is not None) == state['args']['amp']
    assert state['args']['data_backend'] == ('tensor' if prefix in TENSOR_BACKEND else 'pillow')
