import csv
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
STEPS = 4   # training steps per epoch of data_dir: 3 classes x 12 train images, batch 8, drop_last


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


def source_coded_batch(batch: int, size: int) -> torch.Tensor:
    """Images whose every pixel says which sample it belongs to: image b is the constant b + 1."""
    return (torch.arange(batch, dtype=torch.float32) + 1).view(batch, 1, 1, 1).expand(batch, 3, size, size).clone()


def make_image_folder(root, classes=3, train_per_class=12, val_per_class=6, size=16):
    """A tiny ImageFolder whose classes differ visibly: stripes at a class-specific angle."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    for split, count in (('train', train_per_class), ('val', val_per_class)):
        for c in range(classes):
            folder = root / split / f'class{c}'
            folder.mkdir(parents=True, exist_ok=True)
            angle = np.pi * c / classes
            for i in range(count):
                phase = rng.uniform(0, 2 * np.pi)
                wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 1.2 + phase)
                img = (127 + 100 * wave + rng.normal(0, 20, wave.shape)).clip(0, 255).astype(np.uint8)
                Image.fromarray(np.stack([img] * 3, -1)).save(folder / f'{i}.png')
    return root


TINY = ['--model', 'deit_tiny_patch16_224', '--model-kwargs', 'patch_size=4', 'embed_dim=32', 'depth=2',
        'num_heads=2', '--img-size', '16', '--crop-pct', '1.0', '--mask-cell', '8', '--batch-size', '8',
        '--workers', '0', '--lr', '1e-3', '--warmup-epochs', '1', '--aa', 'none', '--reprob', '0',
        '--hflip', '0', '--color-jitter', '0', '--log-interval', '2', '--image-grid-interval', '1',
        '--device', 'cpu']


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('data'))


def train_args(data_dir, out, experiment, method='mixpro', epochs=2, *extra):
    return [*TINY, '--data-dir', str(data_dir), '--output', str(out), '--experiment', experiment,
            '--mix-method', method, '--epochs', str(epochs), *extra]


def xcit_train_args(data_dir, out, experiment, method='mixpro', epochs=1, *extra):
    """train_args for a one-block XCiT on 16 px images: BatchNorm in its convolutional patch embedding and
    in the block, class attention for the probe."""
    args = train_args(data_dir, out, experiment, method, epochs, *extra)
    model_kwargs = args.index('--model-kwargs')
    return [*args[:model_kwargs + 1], 'embed_dim=32', 'depth=1', 'cls_attn_layers=1', 'num_heads=2',
            *args[model_kwargs + 5:], '--model', 'xcit_nano_12_p8_224']


def load_state(path):
    """A checkpoint's dict, read as train.py's own files are."""
    return torch.load(path, map_location='cpu', weights_only=True)


def read_summary(run_dir):
    with open(run_dir / 'summary.csv') as f:
        return list(csv.DictReader(f))


def signal_during_mixer_call(monkeypatch, call: int, signum: int) -> None:
    """Deliver ``signum`` to this process inside the ``call``-th mixer call (a training step)."""
    from mixpro.mixer import Mixer
    real = Mixer.__call__
    calls = {'n': 0}

    def mixing(self, x, y):
        calls['n'] += 1
        if calls['n'] == call:
            os.kill(os.getpid(), signum)
        return real(self, x, y)
    monkeypatch.setattr(Mixer, '__call__', mixing)


def nan_loss_at(monkeypatch, step: int) -> None:
    """The training loss of the ``step``-th step (counted over epochs, from 1) becomes NaN."""
    from timm.loss import SoftTargetCrossEntropy
    from mixpro import training

    class NanAtStep(SoftTargetCrossEntropy):
        calls = 0

        def forward(self, x, target):
            NanAtStep.calls += 1
            loss = super().forward(x, target)
            return loss * float('nan') if NanAtStep.calls == step else loss
    monkeypatch.setattr(training, 'SoftTargetCrossEntropy', NanAtStep)
