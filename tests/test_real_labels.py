"""validate.py --real-labels (ImageNet-ReaL, Beyer et al. 2020) on a fake ImageNet val folder made here, with
a model whose answer is known: its head ignores the image, so every image gets the same top-5 and the
expected ReaL accuracy follows from the labels file by hand."""
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import validate
from mixpro.distributed import DistInfo
from mixpro.real_labels import TIMM_REAL_LABELS
from mixpro.validation import evaluate_loaded, load_model

SMALL = ['--model', 'deit_tiny_patch16_224', '--model-kwargs', 'patch_size=8', 'embed_dim=16', 'depth=1',
         'num_heads=1', 'img_size=32', '--img-size', '32', '--workers', '0', '--device', 'cpu']
WNIDS = timm.data.ImageNetInfo().label_names()   # output index -> WordNet id (sorted)
TOP5 = [10, 20, 30, 40, 50]                      # the fixed model's top-5 for every image, best first

# val image number -> (class folder index, ReaL set); the folder is the ordinary label
IMAGES = {
    1: (10, [10]),        # right, ReaL right
    2: (99, [10, 99]),    # folder label wrong for the prediction, but ReaL accepts it
    3: (10, []),          # right, but no ReaL label: left out of ReaL
    4: (10, [99]),        # right by the folder, wrong by ReaL
    5: (30, [30]),        # top-5 only, in both
    6: (99, []),          # wrong, no ReaL label: left out of ReaL
    7: (99, [50, 77]),    # wrong; ReaL top-5 only
    8: (99, [99]),        # wrong in both
}
# by hand: top-1 {1, 3, 4} of 8, top-5 {1, 3, 4, 5} of 8; ReaL scores {1, 2, 4, 5, 7, 8}: top-1 {1, 2}, top-5 {1, 2, 5, 7}


def val_name(number: int) -> str:
    return f'ILSVRC2012_val_{number:08d}.JPEG'


def make_val_folder(root, images, split='val'):
    rng = np.random.default_rng(0)
    for number, (label, _) in images.items():
        folder = root / split / WNIDS[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / val_name(number))
    return root


def write_labels(path, images, count=None):
    entries = [[] for _ in range(count or max(images))]
    for number, (_, real) in images.items():
        entries[number - 1] = real
    path.write_text(json.dumps(entries))
    return path


def fixed_model(path, top5=TOP5, num_classes=1000):
    """A tiny DeiT whose logits are its head bias: ``top5`` ranked first to fifth, every other class far below."""
    model = timm.create_model('deit_tiny_patch16_224', patch_size=8, embed_dim=16, depth=1, num_heads=1,
                              img_size=32, num_classes=num_classes)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(-10.0)
        for rank, index in enumerate(top5):
            model.head.bias[index] = 10.0 - rank
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope='module')
def fake_imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp('real')
    make_val_folder(root / 'imagenet', IMAGES)
    return root / 'imagenet', write_labels(root / 'real.json', IMAGES), fixed_model(root / 'fixed.pth')


def argv(data_dir, weights, labels, *extra):
    return [*SMALL, '--checkpoint', str(weights), '--data-dir', str(data_dir), '--batch-size', '3',
            '--real-labels', str(labels), *extra]


def test_real_accuracy_is_the_hand_computed_one(fake_imagenet, tmp_path, capsys):
    data_dir, labels, weights = fake_imagenet
    out = tmp_path / 'results.csv'
    row = validate.main(argv(data_dir, weights, labels, '--results-file', str(out)))[0]
    assert row['samples'] == 8 and row['top1'] == 100 * 3 / 8 and row['top5'] == 100 * 4 / 8
    assert row['real_images'] == 6
    assert row['real_top1'] == pytest.approx(100 * 2 / 6) and row['real_top5'] == pytest.approx(100 * 4 / 6)
    printed = capsys.readouterr().out
    assert 'ReaL top-1 33.333' in printed and 'top-5 66.667' in printed and '6 images with ReaL labels' in printed
    plain = validate.main([*SMALL, '--checkpoint', str(weights), '--data-dir', str(data_dir), '--batch-size', '3'])[0]
    assert {k: v for k, v in row.items() if not k.startswith('real_')} == plain   # the other columns as without
    written = out.read_text().splitlines()
    assert written[0].endswith(',real_top1,real_top5,real_images') and written[1].endswith(',6')


def test_real_differs_from_the_folder_label_where_the_file_says_so(fake_imagenet, tmp_path):
    """Image 2 alone: its folder says class 99, the prediction is 10, ReaL accepts 10 (and 99)."""
    data_dir, labels, weights = fake_imagenet
    make_val_folder(tmp_path, {2: IMAGES[2]})
    row = validate.main(argv(tmp_path, weights, labels))[0]
    assert (row['top1'], row['real_top1'], row['real_images']) == (0.0, 100.0, 1)
    write_labels(tmp_path / 'only99.json', {2: (99, [99])})        # ReaL agreeing with the folder: wrong in both
    row = validate.main(argv(tmp_path, weights, tmp_path / 'only99.json'))[0]
    assert (row['top1'], row['real_top1'], row['real_images']) == (0.0, 0.0, 1)


def test_images_with_an_empty_real_set_are_left_out(fake_imagenet, tmp_path):
    data_dir, _, weights = fake_imagenet
    filled = {**IMAGES, 3: (10, [10])}   # image 3 now has a ReaL label, a right one
    row = validate.main(argv(data_dir, weights, write_labels(tmp_path / 'filled.json', filled)))[0]
    assert row['real_images'] == 7 and row['real_top1'] == pytest.approx(100 * 3 / 7)
    empty = {number: (label, []) for number, (label, _) in IMAGES.items()}
    row = validate.main(argv(data_dir, weights, write_labels(tmp_path / 'empty.json', empty)))[0]
    assert row['real_images'] == 0 and row['real_top1'] is None and row['real_top5'] is None
    assert row['samples'] == 8 and row['top1'] == 100 * 3 / 8      # plain accuracy still counts all 8


def test_an_unreadable_image_is_left_out_of_real_too(fake_imagenet, tmp_path):
    """Image 8 (ReaL set {99}, predicted 10) cannot be read: the image that stands in for it is not scored
    against 8's ReaL labels either."""
    _, labels, weights = fake_imagenet
    make_val_folder(tmp_path, IMAGES)
    broken = tmp_path / 'val' / WNIDS[99] / val_name(8)
    broken.write_bytes(broken.read_bytes()[:60])
    row = validate.main(argv(tmp_path, weights, labels))[0]
    assert row['unreadable'] == 1 and row['samples'] == 7
    assert row['real_images'] == 5 and row['real_top1'] == pytest.approx(100 * 2 / 5)


def test_rank_shards_add_up_to_the_whole(fake_imagenet):
    """Under DDP each rank scores its own shard (every other image of the dataset order) and the counts are
    summed: run both ranks' shards here (no process group: the sum is done by hand)."""
    data_dir, labels, weights = fake_imagenet
    args = validate.parse_args(argv(data_dir, weights, labels))
    loaded = load_model(args, args.checkpoint[0])
    # dataset order (folders 10, 30, 99 by WordNet id, then file names): images 1 3 4 | 5 | 2 6 7 8
    expected = {0: (2, 3, 4),    # rank 0: dataset images 0 2 4 6 = val 1 4 2 7
                1: (0, 1, 2)}    # rank 1: dataset images 1 3 5 7 = val 3 5 6 8 (3, 6 have no ReaL label)
    totals = np.zeros(3, int)
    for rank in (0, 1):
        row = evaluate_loaded(args, loaded, DistInfo(rank=rank, world_size=2))[0]
        counts = (round(row['real_top1'] * row['real_images'] / 100),
                  round(row['real_top5'] * row['real_images'] / 100), row['real_images'])
        assert row['samples'] == 4 and counts == expected[rank]
        totals += counts
    assert tuple(totals) == (2, 4, 6)   # the whole folder's ReaL hits, each image once


@pytest.mark.slow
def test_timms_labels_by_default_and_with_occlusion(tmp_path):
    """No FILE: timm's copy. Its first three entries: image 1 none, image 2 {970, 795}, image 3 {230, 231}."""
    shipped = json.loads(open(TIMM_REAL_LABELS).read())
    assert len(shipped) == 50000 and shipped[:3] == [[], [970, 795], [230, 231]]
    make_val_folder(tmp_path, {1: (970, None), 2: (795, None), 3: (230, None)})
    weights = fixed_model(tmp_path / 'fixed.pth', top5=[970, 230, 1, 2, 3])
    rows = validate.main([*SMALL, '--checkpoint', str(weights), '--data-dir', str(tmp_path), '--real-labels',
                          '--occlusion', '0', '1', '--occlusion-patch', '8'])
    assert len(rows) == 2
    for row in rows:   # the head ignores the image: occluded or not, the same answers
        assert row['top1'] == pytest.approx(100 / 3) and row['real_images'] == 2
        assert row['real_top1'] == 50.0 and row['real_top5'] == 100.0


def one_line_error(args, match, *phrases):
    """validate.py refuses ``args`` with one line that matches ``match`` and holds each of ``phrases``."""
    with pytest.raises(SystemExit, match=match) as err:
        validate.main(args)
    assert '\n' not in str(err.value) and str(err.value).startswith('error: ')
    for phrase in phrases:
        assert phrase in str(err.value)


def test_a_file_outside_the_real_set_is_one_line(fake_imagenet, tmp_path):
    _, labels, weights = fake_imagenet
    make_val_folder(tmp_path / 'nine', {**IMAGES, 9: (10, [])})          # the labels file covers 1 … 8
    one_line_error(argv(tmp_path / 'nine', weights, labels), '--real-labels .*real.json',
                   'ILSVRC2012_val_00000009.JPEG', 'not one of the 8')
    make_val_folder(tmp_path / 'other', {1: IMAGES[1]})
    Image.new('RGB', (32, 32)).save(tmp_path / 'other' / 'val' / WNIDS[10] / 'photo.JPEG')
    one_line_error(argv(tmp_path / 'other', weights, labels), '--real-labels .*photo.JPEG is not one of')
    make_val_folder(tmp_path / 'twice', {1: IMAGES[1]})
    make_val_folder(tmp_path / 'twice', {1: (20, [])})                    # the same val image in two folders
    one_line_error(argv(tmp_path / 'twice', weights, labels), '--real-labels .*ILSVRC2012_val_00000001.JPEG',
                   'twice')


def test_a_model_that_is_not_imagenet_1k_is_one_line(fake_imagenet, tmp_path):
    data_dir, labels, _ = fake_imagenet
    small = fixed_model(tmp_path / 'three.pth', top5=[0, 1, 2], num_classes=3)
    one_line_error(argv(data_dir, small, labels), '--real-labels .*real.json', '1000 ImageNet-1k classes',
                   'has 3 outputs')
    shuffled = tmp_path / 'shuffled.txt'                                  # 1000 outputs, another order
    shuffled.write_text('\n'.join(WNIDS[1:] + WNIDS[:1]) + '\n')
    one_line_error(argv(data_dir, fixed_model(tmp_path / 'fixed.pth'), labels, '--class-map', str(shuffled)),
                   "--real-labels .*1000 outputs", "in timm's order")


def test_refused_options_and_files_are_one_line(fake_imagenet, tmp_path):
    data_dir, labels, weights = fake_imagenet
    subset = tmp_path / 'subset.txt'
    subset.write_text(f'{WNIDS[10]}\n{WNIDS[99]}\n')
    one_line_error(argv(data_dir, weights, labels, '--class-subset', str(subset)),
                   '--real-labels with --class-subset', 'subset.txt', 'all 1000')
    one_line_error(argv(data_dir, weights, labels, '--dataset', 'torch/cifar10'),
                   '--real-labels', 'ImageFolder of ImageNet val', 'not --dataset torch/cifar10')
    (tmp_path / 'bad.json').write_text('{"ILSVRC2012_val_00000001.JPEG": [1]}')
    one_line_error(argv(data_dir, weights, tmp_path / 'bad.json'), '--real-labels .*bad.json: needs a JSON list')
    (tmp_path / 'range.json').write_text('[[1], [1000]]')
    one_line_error(argv(data_dir, weights, tmp_path / 'range.json'), '--real-labels .*range.json: entry 2 .*0…999')
    one_line_error(argv(data_dir, weights, tmp_path / 'missing.json'), '--real-labels .*missing.json',
                   'cannot be read')


def test_the_robustness_report_has_a_real_column_for_the_clean_images(fake_imagenet, tmp_path):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'scripts'))
    import robustness
    data_dir, labels, weights = fake_imagenet
    out = tmp_path / 'report.md'
    table = robustness.main([str(weights), *SMALL, '--data-dir', str(data_dir), '--batch-size', '3',
                             '--occlusion', '0.5', '--real-labels', str(labels), '--output', str(out)])
    values = table[0][1]
    assert values['clean'] == 100 * 3 / 8 and values['ReaL'] == pytest.approx(100 * 2 / 6)
    header, _, row = out.read_text().splitlines()
    assert header == '| checkpoint | clean | ReaL | occlusion 0.5 |'
    assert row.startswith('| fixed.pth | 37.50 | 33.33 | ')
