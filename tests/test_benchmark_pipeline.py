"""The input-pipeline benchmark across data backends (scripts/benchmark.py --sections pipeline --data-backend),
the ImageNet-like JPEG maker (scripts/make_jpegs.py) and the backends picture (scripts/show_backends.py)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, JpegImagePlugin

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'scripts'))
import benchmark  # noqa: E402
import make_jpegs  # noqa: E402
import show_backends  # noqa: E402

RECORD_KEYS = {'data_backend', 'workers', 'batch_size', 'loader_img_per_s', 'worker_img_per_s', 'device_ms_per_batch'}
# a quickstart model on tiny JPEGs, with the ImageNet recipes' RandAugment and erasing, so that the tensor
# backend has a device stage to time
RECIPE_ARGS = '--batch-size 4 --img-size 32 --mask-cell 8 --aa rand-m9-mstd0.5-inc1 --reprob 0.25'


@pytest.fixture(scope='module')
def jpegs(tmp_path_factory):
    root = tmp_path_factory.mktemp('jpegs')
    make_jpegs.make_jpegs(root, images=16, classes=2, val_images=2, size=(48, 36))
    return root


def test_make_jpegs_writes_an_image_folder_of_jpegs_of_the_asked_size(tmp_path, capsys):
    made = make_jpegs.main(['--out', str(tmp_path), '--images', '6', '--classes', '3', '--val-images', '3',
                            '--size', '40', '30'])
    assert made['train'] == 6 and made['val'] == 3 and made['mean_kb'] > 0
    for split, per_class in (('train', 2), ('val', 1)):
        folders = sorted(p.name for p in (tmp_path / split).iterdir())
        assert folders == ['class000', 'class001', 'class002'], split
        for folder in folders:
            files = sorted((tmp_path / split / folder).iterdir())
            assert len(files) == per_class and all(f.suffix == '.JPEG' for f in files)
            for file in files:
                with Image.open(file) as image:
                    assert image.format == 'JPEG' and image.mode == 'RGB' and image.size == (40, 30)
                    assert JpegImagePlugin.get_sampling(image) == make_jpegs.SUBSAMPLING_420   # 4:2:0
    assert 'mean file size' in capsys.readouterr().out


def test_make_jpegs_views_differ_and_repeat_with_the_seed(tmp_path):
    first = make_jpegs.make_jpegs(tmp_path / 'a', images=4, classes=2, val_images=2, size=(40, 30), seed=3)
    make_jpegs.make_jpegs(tmp_path / 'b', images=4, classes=2, val_images=2, size=(40, 30), seed=3)
    files_a = sorted((tmp_path / 'a').rglob('*.JPEG'))
    files_b = sorted((tmp_path / 'b').rglob('*.JPEG'))
    assert [f.read_bytes() for f in files_a] == [f.read_bytes() for f in files_b]   # seeded
    assert len({f.read_bytes() for f in files_a}) == len(files_a) == first['train'] + first['val']   # all views differ


def test_make_jpegs_refuses_a_class_without_images(tmp_path):
    with pytest.raises(SystemExit):
        make_jpegs.main(['--out', str(tmp_path), '--images', '2', '--classes', '3'])
    with pytest.raises(ValueError, match='val-images'):
        make_jpegs.make_jpegs(tmp_path, images=4, classes=2, val_images=1)


def test_backend_ratios_are_tensor_over_pillow_per_worker_count():
    records = [{'data_backend': 'pillow', 'workers': 1, 'loader_img_per_s': 100.0, 'worker_img_per_s': 100.0},
               {'data_backend': 'tensor', 'workers': 1, 'loader_img_per_s': 50.0, 'worker_img_per_s': 250.0},
               {'data_backend': 'tensor', 'workers': 2, 'loader_img_per_s': 80.0, 'worker_img_per_s': 400.0}]
    assert benchmark.backend_ratios(records) == {'tensor / pillow, whole loader, workers 1': 0.5,
                                                'tensor / pillow, workers alone, workers 1': 2.5}   # 2: no pillow


def test_device_stage_is_timed_on_a_cached_batch_with_the_loaders_own_code():
    from mixpro.tensor_augment import RandAugmentParams
    from mixpro.tensor_data import DeviceAugmentLoader
    cpu = torch.device('cpu')
    draw = RandAugmentParams.from_string('rand-m9-mstd0.5-inc1')
    batch = (torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8), torch.tensor([0, 1]),
             torch.stack([draw(), draw()]))
    stage = DeviceAugmentLoader([], (0.5,) * 3, (0.25,) * 3, cpu, re_prob=0.25)
    assert benchmark.device_stage_ms(stage, batch, cpu, repeats=2) > 0
    assert stage.loader == []   # timed on a copy: the loader itself is left as it was
    # Pillow on the CPU normalises and erases inside the workers' transform: no device stage
    assert benchmark.device_stage_ms(torch.utils.data.DataLoader([]), batch, cpu, repeats=2) is None


@pytest.mark.slow
def test_pipeline_section_times_every_backend_and_worker_count(tmp_path, jpegs):
    out = tmp_path / 'pipeline.json'
    printed = subprocess.run(
        [sys.executable, str(REPO / 'scripts' / 'benchmark.py'), '--device', 'cpu', '--sections', 'pipeline',
         '--recipe', str(REPO / 'configs' / 'quickstart_mixpro.yaml'), '--data-dir', str(jpegs),
         '--recipe-args', RECIPE_ARGS, '--data-backend', 'pillow', 'tensor', '--workers-list', '0', '1',
         '--rounds', '1', '--pipeline-batches', '2', '--repeats', '1', '--step-steps', '1', '--step-warmup', '1',
         '--json', str(out)],
        check=True, cwd=REPO, timeout=300, capture_output=True, text=True).stdout
    results = json.loads(out.read_text())
    records = results['pipeline']
    assert sorted((r['data_backend'], r['workers']) for r in records) == \
        [('pillow', 0), ('pillow', 1), ('tensor', 0), ('tensor', 1)]
    for record in records:
        assert set(record) == RECORD_KEYS, record
        assert record['batch_size'] == 4 and record['loader_img_per_s'] > 0 and record['worker_img_per_s'] > 0
        if record['data_backend'] == 'tensor':
            assert record['device_ms_per_batch'] > 0   # RandAugment + normalise + erase, in this process
        else:
            assert record['device_ms_per_batch'] is None   # on the CPU Pillow's workers do it all
        assert f"| {record['data_backend']} | {record['workers']} | 4 | " in printed
    summaries = results['input_pipeline_by_backend']
    assert set(summaries) == {'pillow', 'tensor'}
    for backend, summary in summaries.items():
        assert summary['verdict'] == ('input-bound' if summary['loader / step'] < 1 else 'compute-bound')
        assert summary['step img/s'] > 0 and summary['data_backend'] == backend
    assert results['input_pipeline'] == summaries['pillow']   # the first backend named, in the old place
    assert set(results['pipeline_ratios']) == {f'tensor / pillow, {view}, workers {w}'
                                               for view in ('whole loader', 'workers alone') for w in (0, 1)}
    assert printed.count('| verdict | ') == 2


@pytest.mark.slow
def test_pipeline_refuses_a_tensor_backend_that_would_time_pillow(tmp_path, jpegs):
    """Colour jitter without RandAugment runs on Pillow only: train.py falls back, the benchmark says so."""
    done = subprocess.run(
        [sys.executable, str(REPO / 'scripts' / 'benchmark.py'), '--device', 'cpu', '--sections', 'pipeline',
         '--recipe', str(REPO / 'configs' / 'quickstart_mixpro.yaml'), '--data-dir', str(jpegs),
         '--recipe-args', '--batch-size 4 --img-size 32 --mask-cell 8 --color-jitter 0.4',
         '--data-backend', 'tensor', '--workers-list', '0', '--json', str(tmp_path / 'x.json')],
        cwd=REPO, timeout=300, capture_output=True, text=True)
    assert done.returncode != 0
    assert 'trains with pillow' in done.stderr and '--color-jitter 0.4' in done.stdout   # mixpro's note names it


@pytest.mark.slow
def test_show_backends_draws_both_paths_from_the_same_seeds(tmp_path, jpegs):
    output = tmp_path / 'backends.png'
    shown = show_backends.show_backends(output, seed=1, data_dir=jpegs, count=2, size=64)
    with Image.open(output) as picture:
        assert picture.format == 'PNG' and picture.width >= 3 * 64 and picture.height >= 2 * 64
    assert shown['samples'] == 2
    # the same crop, flips and ops on both paths: the pixels differ by rounding only (other draws: by far more)
    assert all(mean < 0.5 for mean in shown['mean_abs']), shown
