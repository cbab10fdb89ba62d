"""--dataset wds/...: WebDataset shards through timm's ReaderWds, written by the tests (JPEG and PNG + .cls,
an _info.json): an epoch of train.py, validate.py on its checkpoint, exact evaluation over ranks, a
mid-epoch stop, and the one-line errors."""
import io
import json
import signal
import sys
import tarfile
from argparse import Namespace
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train
import validate
from conftest import TINY, read_summary, signal_during_mixer_call
from mixpro.config import ConfigError
from mixpro.data import build_dataset, eval_loader, set_loader_epoch, train_loader
from mixpro.distributed import DistInfo

pytest.importorskip('webdataset')   # scripts/test.sh installs it; train.py needs it only for wds/

REPO = Path(__file__).resolve().parents[1]
CLASSES = ['circle', 'square', 'stripes']
TRAIN_SHARDS = [6, 6, 6, 6]     # 24 images: 3 steps of 8 per epoch in one process
VAL_SHARDS = [4, 4, 3]          # 11 images, uneven shards



def wds_dataset(args, split, is_training, class_to_idx=None):
    """build_dataset with the wds/ options of a train.py run."""
    return build_dataset(args.data_dir, split, is_training, dataset=args.dataset, class_to_idx=class_to_idx,
                         num_classes=getattr(args, 'num_classes', None), batch_size=getattr(args, 'batch_size', 1),
                         seed=getattr(args, 'seed', 42))

def _image(label: int, index: int, size: int = 16) -> np.ndarray:
    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[0:size, 0:size]
    angle = np.pi * label / len(CLASSES)
    wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 1.2 + rng.uniform(0, 6.3))
    return np.stack([(127 + 100 * wave).clip(0, 255).astype(np.uint8)] * 3, -1)


def write_split(root: Path, split: str, shard_lengths, labels=None) -> dict:
    """Tar shards ``<split>-00000N.tar`` of samples ``<key>.jpg|png`` + ``<key>.cls``; returns the split's
    _info entry. Labels cycle over the classes unless given (one per sample)."""
    filenames, index = [], 0
    for shard, length in enumerate(shard_lengths):
        name = f'{split}-{shard:06d}.tar'
        with tarfile.open(root / name, 'w') as tar:
            for _ in range(length):
                label = labels[index] if labels is not None else index % len(CLASSES)
                ext = 'png' if index % 2 else 'jpg'
                buffer = io.BytesIO()
                Image.fromarray(_image(index % len(CLASSES), index)).save(buffer, format='PNG' if ext == 'png' else 'JPEG')
                for suffix, payload in ((ext, buffer.getvalue()), ('cls', str(label).encode())):
                    info = tarfile.TarInfo(f'{split}{index:06d}.{suffix}')
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                index += 1
        filenames.append(name)
    return {'name': split, 'num_samples': sum(shard_lengths), 'filenames': filenames,
            'shard_lengths': list(shard_lengths)}


def write_shards(root: Path, train=TRAIN_SHARDS, val=VAL_SHARDS, labels=None, **info) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    splits = {'train': write_split(root, 'train', train, labels), 'val': write_split(root, 'val', val, labels)}
    (root / '_info.json').write_text(json.dumps({'name': 'tiny', **info, 'splits': splits}))
    return root


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp('wds'), classes=CLASSES)


def wds_args(root, out, experiment='wds', *extra):
    return [*TINY, '--dataset', 'wds/tiny', '--data-dir', str(root), '--output', str(out),
            '--experiment', experiment, '--mix-method', 'mixpro', '--epochs', '1', *extra]


def _validate(argv):
    result = validate.main(argv)
    return result[0] if isinstance(result, list) else result   # one row per checkpoint in newer validate.py


@pytest.mark.slow
def test_an_epoch_trains_and_validate_counts_every_image_once(shards, tmp_path, capsys):
    result = train.main(wds_args(shards, tmp_path))
    out = capsys.readouterr().out
    assert '3 classes, 24 train and 11 val images' in out
    assert 'epoch 0 [   3/3 (100%)]' in out                    # 24 images / batch 8: 3 steps, all of them
    assert result['eval']['count'] == 11
    state = torch.load(tmp_path / 'wds' / 'last.pth.tar', weights_only=True)
    assert state['num_classes'] == 3 and state['class_to_idx'] == {'circle': 0, 'square': 1, 'stripes': 2}
    checked = _validate(['--checkpoint', str(tmp_path / 'wds' / 'last.pth.tar'), '--workers', '2',
                         '--device', 'cpu'])   # dataset, folder and class index from the checkpoint
    assert checked['samples'] == 11 and checked['top1'] == pytest.approx(state['metric'])
    assert checked['split'] == 'wds/tiny:val'


@pytest.fixture
def closing():
    """Loaders a test makes, whose persistent workers are shut down at its end even when it fails (the
    workers ignore SIGTERM, so a failed test's leftover loader would hold the interpreter at exit)."""
    loaders = []
    yield loaders
    for loader in loaders:
        iterator = getattr(loader, '_iterator', None)
        if iterator is not None and hasattr(iterator, '_shutdown_workers'):
            iterator._shutdown_workers()


@contextmanager
def as_rank(monkeypatch, rank: int, world_size: int):
    """What timm's reader sees of a process group torchrun set up (it reads it when built)."""
    with monkeypatch.context() as patch:
        patch.setattr(torch.distributed, 'is_initialized', lambda: True)
        patch.setattr(torch.distributed, 'get_world_size', lambda *a: world_size)
        patch.setattr(torch.distributed, 'get_rank', lambda *a: rank)
        yield


@pytest.mark.parametrize('world_size,workers', [(2, 0), (3, 2), (4, 0)])
def test_evaluation_deals_whole_shards_to_ranks_so_every_image_counts_once(tmp_path, monkeypatch, closing,
                                                                            world_size, workers):
    """Labels 0..10 name the 11 images: over all ranks each appears once (4 ranks: one reads nothing).
    Each rank's dataset is built as under torchrun, where timm's own DDP evaluation would repeat images."""
    root = write_shards(tmp_path / 'ids', train=[11], labels=list(range(11)), num_classes=11)
    config = {'input_size': (3, 16, 16), 'interpolation': 'bilinear', 'mean': (0.5,) * 3, 'std': (0.5,) * 3,
              'crop_pct': 1.0}
    seen = []
    for rank in range(world_size):
        args = Namespace(dataset='wds/ids', data_dir=str(root), dataset_download=False, class_map='')
        with as_rank(monkeypatch, rank, world_size):
            dataset = wds_dataset(args, 'val', is_training=False)
        assert dataset.reader.dist_num_replicas == world_size
        loader = eval_loader(dataset, config, 2, workers, DistInfo(rank=rank, world_size=world_size))
        closing.append(loader)
        seen += [int(label) for _, labels in loader for label in labels]
    assert sorted(seen) == list(range(11))


def test_training_shards_go_to_ranks_and_workers_and_move_with_the_epoch(tmp_path, closing):
    """Two ranks x two workers over four shards: every batch full, len(loader) of them, the two ranks
    together read every image each epoch, and which shards a rank reads changes with set_epoch."""
    root = write_shards(tmp_path / 'ids', train=[4, 4, 4, 4], val=[1], labels=list(range(16)), num_classes=16)
    config = {'input_size': (3, 16, 16), 'mean': (0.5,) * 3, 'std': (0.5,) * 3}
    options = dict(dataset='wds/ids', data_dir=str(root), dataset_download=False, class_map='', num_classes=None,
                   batch_size=2, seed=0, workers=2, pin_mem=False, aug_repeats=0, scale=(0.5, 1.0),
                   ratio=(0.75, 1.33), hflip=0.5, vflip=0.0, color_jitter=0.0, aa=None, train_interpolation='bilinear',
                   reprob=0.0, remode='pixel', recount=1, train_split='train', data_backend='pillow')
    loaders = closing
    for rank in range(2):
        dataset = wds_dataset(Namespace(**options), 'train', is_training=True)
        loaders.append(train_loader(dataset, config, Namespace(**options), DistInfo(rank=rank, world_size=2)))
    assert [len(loader) for loader in loaders] == [4, 4]    # 16 images / 2 ranks / batch 2
    rank0_epochs = []
    for epoch in range(3):
        labels = []
        for loader in loaders:
            set_loader_epoch(loader, epoch)
            batches = [y.tolist() for _, y in loader]
            assert len(batches) == len(loader) and all(len(b) == 2 for b in batches)
            labels.append(sorted(sum(batches, [])))
        assert sorted(labels[0] + labels[1]) == list(range(16)), f'epoch {epoch}: {labels}'
        rank0_epochs.append(labels[0])
    assert len({tuple(e) for e in rank0_epochs}) > 1, 'the shards of rank 0 never change with the epoch'
    with pytest.raises(ValueError, match='cannot skip'):
        set_loader_epoch(loaders[0], 3, start_batch=1)


@pytest.mark.slow
def test_a_mid_epoch_stop_redoes_that_epoch_from_its_first_step(shards, tmp_path, monkeypatch, capsys):
    args = wds_args(shards, tmp_path, 'stopped', '--epochs', '2')
    signal_during_mixer_call(monkeypatch, 3 + 2, signal.SIGTERM)        # epoch 1, step 2 of 3
    with pytest.raises(SystemExit):
        train.main(args)
    assert 'SIGTERM: stopped at epoch 1 step 2/3' in capsys.readouterr().out
    run_dir = tmp_path / 'stopped'
    assert torch.load(run_dir / 'interrupted.pth.tar', weights_only=True)['resume_at'] == [1, 2]

    monkeypatch.undo()
    from mixpro.mixer import Mixer
    real, steps = Mixer.__call__, []
    monkeypatch.setattr(Mixer, '__call__', lambda self, x, y: steps.append(len(y)) or real(self, x, y))
    result = train.main(args)                                             # --resume auto
    out = capsys.readouterr().out
    assert 'is a stream' in out and 'stopped at (2)' in out and 'epoch 1 restarts from its first step' in out
    assert 'resumed from' in out and 'at epoch 1\n' in out
    assert steps == [8, 8, 8]                                             # the whole epoch 1, again
    assert result['epoch'] == 1 and result['eval']['count'] == 11
    assert [row['epoch'] for row in read_summary(run_dir)] == ['0', '1']
    assert not (run_dir / 'interrupted.pth.tar').exists()


def test_missing_webdataset_package_is_one_line(shards, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'webdataset', None)      # import webdataset -> ImportError
    with pytest.raises(SystemExit, match='^error: --dataset wds/tiny') as err:
        train.main(wds_args(shards, tmp_path))
    assert 'pip install webdataset' in str(err.value) and '\n' not in str(err.value)


def _meta(root, **changes):
    info = json.loads((root / '_info.json').read_text())
    info.update(changes)
    (root / '_info.json').write_text(json.dumps(info))


@pytest.mark.parametrize('problem,message', [
    ('no_info', 'no _info.json .*split .train.'),
    ('no_classes', 'classes is unknown.*--num-classes'),
    ('no_num_samples', "split 'train' .*no 'num_samples'"),
    ('missing_shard', '1 of its 4 shards .*train-000002.tar'),
    ('unknown_split', 'split val2 not found.*another split'),
    ('too_few_shards', r'has 1 shard\(s\) for 2 processes'),
])
def test_bad_shard_folders_are_one_line(tmp_path, problem, message):
    root = write_shards(tmp_path / 'data', train=[8, 8, 8, 8], val=[2])
    args = Namespace(dataset='wds/x', data_dir=str(root), dataset_download=False, class_map='', num_classes=None,
                     batch_size=8, seed=0)
    split = 'train'
    if problem == 'no_info':
        (root / '_info.json').unlink()
    elif problem != 'no_classes':
        _meta(root, num_classes=3)
    if problem == 'no_num_samples':
        info = json.loads((root / '_info.json').read_text())
        del info['splits']['train']['num_samples']
        (root / '_info.json').write_text(json.dumps(info))
    elif problem == 'missing_shard':
        (root / 'train-000002.tar').unlink()
    elif problem == 'unknown_split':
        split = 'val2'
    with pytest.raises(ConfigError, match=message):
        dataset = wds_dataset(args, 'val' if problem == 'too_few_shards' else split, is_training=True)
        options = Namespace(**vars(args), workers=0, pin_mem=False, aug_repeats=0, train_split='val', scale=None,
                            ratio=None, hflip=0.5, vflip=0.0, color_jitter=0.0, aa=None, train_interpolation='bilinear',
                            reprob=0.0, remode='pixel', recount=1, data_backend='pillow')
        train_loader(dataset, {'input_size': (3, 16, 16), 'mean': (0.5,) * 3, 'std': (0.5,) * 3}, options,
                     DistInfo(rank=0, world_size=2))


def test_num_classes_option_or_info_gives_the_class_index(tmp_path):
    root = write_shards(tmp_path / 'data', train=[4], val=[2])
    args = Namespace(dataset='wds/x', data_dir=str(root), dataset_download=False, class_map='', num_classes=5,
                     batch_size=2, seed=0)
    assert wds_dataset(args, 'train', True).reader.class_to_idx == {str(i): i for i in range(5)}
    _meta(root, num_classes=3)
    assert wds_dataset(args, 'train', True).reader.class_to_idx == {'0': 0, '1': 1, '2': 2}
    with pytest.raises(ConfigError, match='classes differ'):
        wds_dataset(args, 'val', False, class_to_idx={'a': 0, 'b': 1, 'c': 2})
