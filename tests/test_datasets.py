"""--dataset: torchvision datasets in their standard layout, written by the tests (nothing is downloaded)."""
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import train
import validate
from conftest import TINY
from mixpro.config import ConfigError, parse_train_args
from mixpro.data import build_dataset, num_classes_of

REPO = Path(__file__).resolve().parents[1]


def write_cifar(root, classes=10, train=24, test=12, fine=False):
    """CIFAR-10 (or CIFAR-100 with ``fine``) python-pickle files, stripes whose angle gives the class."""
    rng = np.random.default_rng(0)
    folder = root / ('cifar-100-python' if fine else 'cifar-10-batches-py')
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[0:32, 0:32]

    def batch(count):
        labels = [i % classes for i in range(count)]
        images = [(127 + 100 * np.sin((xx * np.cos(np.pi * c / classes) + yy * np.sin(np.pi * c / classes)) * 0.8
                                     + rng.uniform(0, 6.3))).astype(np.uint8) for c in labels]
        data = np.stack([np.stack([img] * 3) for img in images]).reshape(count, 3072)
        return {'data': data, ('fine_labels' if fine else 'labels'): labels}
    names = [f'class{c}' for c in range(classes)]
    if fine:
        files = {'train': batch(train), 'test': batch(test), 'meta': {'fine_label_names': names}}
    else:
        files = {f'data_batch_{i}': batch(train // 5 + (i <= train % 5)) for i in range(1, 6)}
        files.update(test_batch=batch(test), **{'batches.meta': {'label_names': names}})
    for name, content in files.items():
        with open(folder / name, 'wb') as f:
            pickle.dump(content, f)
    return root


def write_fashion_mnist(root, train=20, test=10):
    """FashionMNIST's idx files (grayscale 28 px); torchvision checks only that they exist."""
    raw = root / 'FashionMNIST' / 'raw'
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for prefix, count in (('train', train), ('t10k', test)):
        images = rng.integers(0, 255, (count, 28, 28), dtype=np.uint8)
        labels = np.arange(count, dtype=np.uint8) % 10
        (raw / f'{prefix}-images-idx3-ubyte').write_bytes(struct.pack('>IIII', 2051, count, 28, 28) + images.tobytes())
        (raw / f'{prefix}-labels-idx1-ubyte').write_bytes(struct.pack('>II', 2049, count) + labels.tobytes())
    return root


@pytest.fixture
def no_md5(monkeypatch):
    """torchvision checks CIFAR files against the published md5 sums; ours are tiny stand-ins."""
    monkeypatch.setattr(torchvision.datasets.cifar, 'check_integrity', lambda *args, **kwargs: True)


def cifar_args(root, out, dataset='torch/cifar10', *extra):
    return [*TINY, '--dataset', dataset, '--data-dir', str(root), '--output', str(out), '--experiment', 'cifar',
            '--img-size', '32', '--mask-cell', '8', '--epochs', '1', *extra]


@pytest.mark.slow
def test_cifar10_trains_and_validates_with_every_test_image_once(tmp_path, no_md5):
    root = write_cifar(tmp_path / 'cifar')
    result = train.main(cifar_args(root, tmp_path, 'torch/cifar10', '--mix-method', 'mixpro'))
    assert result['eval']['count'] == 12
    state = torch.load(tmp_path / 'cifar' / 'last.pth.tar', weights_only=True)
    assert state['num_classes'] == 10 and state['class_to_idx']['class3'] == 3
    checked = validate.main(['--checkpoint', str(tmp_path / 'cifar' / 'last.pth.tar'), '--workers', '0',
                             '--device', 'cpu'])[0]                     # dataset and folder from the checkpoint
    assert checked['samples'] == 12 and checked['top1'] == pytest.approx(state['metric'])
    assert checked['split'] == 'torch/cifar10:val'
    # a run of an older version that kept an (unused) --class-map beside its --dataset still validates and resumes
    (tmp_path / 'map.txt').write_text('class3\nclass1\n')
    state['args']['class_map'] = str(tmp_path / 'map.txt')
    torch.save(state, tmp_path / 'cifar' / 'last.pth.tar')
    again = validate.main(['--checkpoint', str(tmp_path / 'cifar' / 'last.pth.tar'), '--workers', '0',
                           '--device', 'cpu'])[0]
    assert again['samples'] == 12 and again['top1'] == checked['top1']
    resumed = train.main(cifar_args(root, tmp_path, 'torch/cifar10', '--mix-method', 'mixpro', '--epochs', '2'))
    assert resumed['epoch'] == 1


def test_cifar100_labels_come_from_its_fine_labels(tmp_path, no_md5):
    root = write_cifar(tmp_path / 'c100', classes=100, train=200, test=100, fine=True)
    args = parse_train_args(['--dataset', 'torch/cifar100', '--data-dir', str(root)])
    train_set = build_dataset(args.data_dir, 'train', is_training=True, dataset=args.dataset)
    assert num_classes_of(train_set) == 100 and len(train_set) == 200
    assert [train_set[i][1] for i in range(3)] == [0, 1, 2]


@pytest.mark.slow
def test_grayscale_fashion_mnist_becomes_rgb(tmp_path):
    root = write_fashion_mnist(tmp_path / 'fm')
    result = train.main(cifar_args(root, tmp_path, 'torch/fashion_mnist', '--mix-method', 'transmix',
                                   '--batch-size', '4'))
    assert result['eval']['count'] == 10


def test_missing_data_is_one_line_and_nothing_is_downloaded(tmp_path):
    with pytest.raises(SystemExit, match='--dataset torch/cifar10 .*empty') as err:
        train.main(cifar_args(tmp_path / 'empty', tmp_path, 'torch/cifar10'))
    message = str(err.value)
    assert '(train)' in message and 'Dataset not found' in message and '--dataset-download' in message
    assert not any((tmp_path / 'empty').glob('**/*.tar.gz'))


@pytest.mark.parametrize('name,message', [
    ('tfds/imagenet2012', 'streaming datasets .*not supported'),
    ('hfids/cifar100', 'streaming datasets .*not supported'),
    ('hfds/cifar100', 'pip install datasets'),
    ('torch/nonsense', r'Unknown torchvision dataset nonsense$'),   # no download hint: the name is wrong
])
def test_unsupported_or_unavailable_datasets_are_one_line(tmp_path, name, message):
    if name.startswith('hfds') and __import__('importlib').util.find_spec('datasets') is not None:
        pytest.skip('the datasets package is installed here')
    with pytest.raises(SystemExit, match=message):
        train.main(cifar_args(tmp_path, tmp_path, name))


@pytest.mark.slow
@pytest.mark.parametrize('method', ['baseline', 'transmix', 'mixpro'])
def test_cifar100_recipes_train_an_epoch(tmp_path, no_md5, method):
    root = write_cifar(tmp_path / 'c100', classes=100, train=100, test=50, fine=True)
    config = REPO / 'configs' / f'cifar100_{method}.yaml'
    result = train.main(['--config', str(config), '--data-dir', str(root), '--model-kwargs', 'depth=1',
                         '--batch-size', '16', '--epochs', '1', '--workers', '0', '--device', 'cpu',
                         '--output', str(tmp_path / 'out'), '--log-interval', '0'])
    assert result['eval']['count'] == 50
    args = parse_train_args(['--config', str(config)])
    assert args.img_size % 4 == 0 and args.mask_cell % 4 == 0 and args.img_size // args.mask_cell >= 2


def test_eval_prefetcher_gives_the_host_pipelines_numbers(data_dir):
    """On CUDA the eval loader hands uint8 images to timm's prefetcher, which normalises on the device;
    forced on here (CPU), it must give the metrics of the host-normalised pipeline."""
    import timm
    from timm.data import resolve_data_config
    from mixpro.data import build_dataset, eval_loader
    from mixpro.distributed import DistInfo
    from mixpro.engine import evaluate
    from mixpro.robustness import OccludedBatches
    model = timm.create_model('deit_tiny_patch16_224', patch_size=4, embed_dim=32, depth=1, num_heads=2,
                              img_size=16, num_classes=3).eval()
    config = resolve_data_config({'img_size': 16, 'crop_pct': 1.0}, model=model)
    dist = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device('cpu'))
    results = {}
    for prefetch in (False, True):
        loader = eval_loader(build_dataset(str(data_dir), 'val', False), config, 5, 0, dist, prefetch=prefetch)
        results[prefetch] = [evaluate(model, OccludedBatches(loader, ratio, config['mean'], config['std'], patch=4),
                                      dist.device) for ratio in (0.0, 0.5)]
    assert results[True][0]['count'] == results[False][0]['count'] == 18
    for host, device in zip(results[False], results[True]):
        assert device['top1'] == host['top1'] and device['loss'] == pytest.approx(host['loss'], abs=1e-5)
    assert results[True][1]['loss'] != pytest.approx(results[True][0]['loss'], abs=1e-5)   # occlusion applied


@pytest.mark.parametrize('dataset, how', [('torch/cifar10', 'by its own classes'), ('wds/shards', '.cls integers')])
def test_class_map_with_a_named_dataset_is_refused_not_ignored(tmp_path, dataset, how):
    (tmp_path / 'map.txt').write_text('3\n1\n')
    with pytest.raises(ConfigError, match=f'--class-map .*--dataset {dataset}.*{how}'):
        build_dataset(str(tmp_path), 'train', is_training=True, dataset=dataset, class_map=str(tmp_path / 'map.txt'))
