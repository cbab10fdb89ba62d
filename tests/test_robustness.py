"""validate.py on timm models and state dicts, class subsets (ImageNet-A/R) and occlusion, on data made here."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import validate
from mixpro.config import ConfigError
from mixpro.robustness import NAMED_SUBSETS, OccludedBatches, dropped_count, occlusion_mask, read_class_subset

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]   # class c: an image of colour c with noise
SMALL = ['--model', 'deit_tiny_patch16_224', '--model-kwargs', 'patch_size=8', 'embed_dim=16', 'depth=1',
         'num_heads=1', 'img_size=32', '--img-size', '32', '--workers', '0', '--device', 'cpu']


def colour_images(count, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(count):
        colour = COLOURS[i % len(COLOURS)]
        yield i % len(COLOURS), (np.array(colour) + rng.normal(0, 25, (32, 32, 3))).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope='module')
def colour_model(tmp_path_factory):
    """A tiny DeiT trained here to tell the three colours apart, saved as a plain state dict, and a
    val folder of 12 images per colour."""
    root = tmp_path_factory.mktemp('colours')
    for label, pixels in colour_images(36, seed=1):
        folder = root / 'val' / f'class{label}'
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f'{len(list(folder.iterdir()))}.png')
    torch.manual_seed(0)
    model = timm.create_model('deit_tiny_patch16_224', patch_size=8, embed_dim=16, depth=1, num_heads=1,
                              img_size=32, num_classes=3)
    labels, images = zip(*colour_images(60))
    x = torch.tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    y = torch.tensor(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    weights = root / 'colours.pth'
    torch.save({'model': model.state_dict()}, weights)   # DeiT's own format: the weights under 'model'
    return root, weights


def test_shipped_subsets_are_timms():
    info = Path(timm.__file__).parent / 'data' / '_info'
    for name, timm_file in (('imagenet-a', 'imagenet_a_synsets.txt'), ('imagenet-r', 'imagenet_r_synsets.txt')):
        ours = read_class_subset(name)
        assert len(ours) == 200 and ours == sorted((info / timm_file).read_text().split())
    assert read_class_subset('imagenet-a') != read_class_subset('imagenet-r')


def test_occlusion_mask_is_seeded_and_sized():
    grid = (14, 14)
    for ratio, expected in ((0.0, 0), (0.1, 19), (0.3, 58), (0.5, 98), (1.0, 196)):   # Naseer et al.'s k*196//10
        assert int(occlusion_mask(7, grid, ratio, seed=0).sum()) == expected == dropped_count(ratio, 196)
    assert torch.equal(occlusion_mask(7, grid, 0.5, 0), occlusion_mask(7, grid, 0.5, 0))
    assert not torch.equal(occlusion_mask(7, grid, 0.5, 0), occlusion_mask(8, grid, 0.5, 0))
    assert not torch.equal(occlusion_mask(7, grid, 0.5, 0), occlusion_mask(7, grid, 0.5, 1))


def test_dropped_patches_turn_black():
    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    pixels = torch.rand(2, 3, 32, 32)
    x = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    occluded = OccludedBatches([], 0.5, mean, std, patch=8).occlude(x.clone(), [0, 1])
    back = occluded * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    black = (back.abs() < 1e-6).all(1)                   # [2, 32, 32]
    assert black.view(2, 4, 8, 4, 8).all(4).all(2).sum().item() == 2 * 8   # half of 16 patches per image
    assert torch.allclose(back[~black.unsqueeze(1).expand_as(back)], pixels[~black.unsqueeze(1).expand_as(back)],
                          atol=1e-6)


def test_occlusion_zero_is_clean_and_accuracy_falls(colour_model, tmp_path):
    root, weights = colour_model
    common = [*SMALL, '--checkpoint', str(weights), '--data-dir', str(root), '--occlusion-patch', '8']
    clean = validate.main([*common, '--batch-size', '5'])
    assert len(clean) == 1 and clean[0]['samples'] == 36 and clean[0]['top1'] == 100.0
    out = tmp_path / 'occ.json'
    rows = validate.main([*common, '--batch-size', '5', '--occlusion', '0', '0.5', '1', '--results-file', str(out)])
    assert [r['occlusion'] for r in rows] == [0.0, 0.5, 1.0]
    assert rows[0]['top1'] == clean[0]['top1'] and rows[0]['loss'] == clean[0]['loss']   # exactly the clean numbers
    assert rows[0]['top1'] >= rows[1]['top1'] >= rows[2]['top1'] and rows[1]['loss'] > rows[0]['loss']
    assert rows[2]['top1'] == pytest.approx(100 / 3)     # all black: one answer for every image
    assert [r['top1'] for r in json.loads(out.read_text())] == [r['top1'] for r in rows]
    # the patches come from (seed, image index): batch size does not change them, the seed does
    other_batching = validate.main([*common, '--batch-size', '7', '--occlusion', '0.5'])
    assert other_batching[0]['loss'] == pytest.approx(rows[1]['loss'], abs=1e-6)
    other_seed = validate.main([*common, '--batch-size', '7', '--occlusion', '0.5', '--occlusion-seed', '3'])
    assert other_seed[0]['loss'] != pytest.approx(rows[1]['loss'], abs=1e-6)


def test_own_class_subset(colour_model, tmp_path):
    root, weights = colour_model
    subset_root = tmp_path / 'two'
    for name in ('class0', 'class2'):
        (subset_root / 'val' / name).mkdir(parents=True)
        for i, image in enumerate((root / 'val' / name).iterdir()):
            (subset_root / 'val' / name / image.name).write_bytes(image.read_bytes())
    (tmp_path / 'names.txt').write_text('class0\nclass1\nclass2\n')
    (tmp_path / 'subset.txt').write_text('# my two classes\nclass0\nclass2\n')
    common = [*SMALL, '--checkpoint', str(weights), '--data-dir', str(subset_root)]
    rows = validate.main([*common, '--class-map', str(tmp_path / 'names.txt'),
                          '--class-subset', str(tmp_path / 'subset.txt')])
    assert rows[0]['samples'] == 24 and rows[0]['top1'] == 100.0 and rows[0]['class_subset'].endswith('subset.txt')
    with pytest.raises(SystemExit, match="needs the names of the model's classes"):   # 3 unnamed outputs
        validate.main([*common, '--class-subset', str(tmp_path / 'subset.txt')])
    (tmp_path / 'one.txt').write_text('class0\n')
    with pytest.raises(SystemExit, match='outside --class-subset.*class2'):
        validate.main([*common, '--class-map', str(tmp_path / 'names.txt'), '--class-subset', str(tmp_path / 'one.txt')])


def test_imagenet_r_subset_of_a_1000_class_model(tmp_path):
    """A 1000-class model that always answers 'tench' (not an ImageNet-R class), else the ImageNet-R class
    `favourite`: over the subset's logits every image of `favourite` is right; over all 1000, none is."""
    wnids = read_class_subset('imagenet-r')
    favourite = wnids[7]
    for wnid in wnids:
        folder = tmp_path / 'imagenet-r' / wnid
        folder.mkdir(parents=True)
        for i in range(10 if wnid == favourite else 1):
            Image.fromarray(np.full((32, 32, 3), i * 20, np.uint8)).save(folder / f'{i}.jpg')
    model = timm.create_model('deit_tiny_patch16_224', patch_size=8, embed_dim=16, depth=1, num_heads=1, img_size=32)
    imagenet = timm.data.ImageNetInfo().label_names()
    assert 'n01440764' not in wnids
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(-5.0)
        model.head.bias[imagenet.index('n01440764')] = 10.0     # tench wins over all 1000 outputs
        model.head.bias[imagenet.index(favourite)] = 5.0         # and favourite among ImageNet-R's 200
    torch.save(model.state_dict(), tmp_path / 'always.pth')
    common = [*SMALL, '--checkpoint', str(tmp_path / 'always.pth'), '--data-dir', str(tmp_path), '--split', 'imagenet-r']
    subset = validate.main([*common, '--class-subset', 'imagenet-r'])[0]
    assert subset['samples'] == 209 and subset['top1'] == pytest.approx(100 * 10 / 209)
    whole = validate.main(common)[0]                # the folder's wnids labelled as ImageNet-1k classes
    assert whole['samples'] == 209 and whole['top1'] == 0.0
    (tmp_path / 'imagenet-r' / 'n01440764').mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / 'imagenet-r' / 'n01440764' / '0.jpg')
    with pytest.raises(SystemExit, match='outside --class-subset imagenet-r: n01440764'):
        validate.main([*common, '--class-subset', 'imagenet-r'])


def test_model_and_weights_errors(colour_model, tmp_path):
    root, weights = colour_model
    with pytest.raises(SystemExit, match='name its architecture with --model NAME'):
        validate.main(['--checkpoint', str(weights), '--data-dir', str(root), '--workers', '0'])
    with pytest.raises(SystemExit, match='does not fit model'):
        validate.main([*SMALL[:2], '--checkpoint', str(weights), '--data-dir', str(root)])   # full-size DeiT
    with pytest.raises(SystemExit):   # argparse: nothing to evaluate
        validate.main(['--model', 'deit_tiny_patch16_224', '--data-dir', str(root)])
    with pytest.raises(SystemExit, match='not a train.py checkpoint|--use-ema'):
        validate.main([*SMALL, '--checkpoint', str(weights), '--data-dir', str(root), '--use-ema'])
    with pytest.raises(SystemExit, match='--occlusion 1.5'):
        validate.main([*SMALL, '--checkpoint', str(weights), '--data-dir', str(root), '--occlusion', '1.5'])
    assert set(NAMED_SUBSETS) == {'imagenet-a', 'imagenet-r'}


@pytest.mark.slow
def test_robustness_report(colour_model, tmp_path):
    """scripts/robustness.py: one row per checkpoint, clean / occlusion / ImageNet-A / ImageNet-R / ImageNet-O
    columns, a plot. ImageNet-O here holds copies of the val images: every confidence ties, so AUPR = 50 %."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'scripts'))
    import robustness
    root, weights = colour_model
    shared = sorted(set(read_class_subset('imagenet-a')) & set(read_class_subset('imagenet-r')))[:3]
    imagenet = timm.data.ImageNetInfo().label_names()
    state = torch.load(weights, weights_only=True)['model']
    head_w, head_b = torch.zeros(1000, 16), torch.full((1000,), -100.0)   # the colour classes as 3 of 1000
    for c, wnid in enumerate(shared):
        head_w[imagenet.index(wnid)], head_b[imagenet.index(wnid)] = state['head.weight'][c], state['head.bias'][c]
    state['head.weight'], state['head.bias'] = head_w, head_b
    weights = tmp_path / 'colours.pth'
    torch.save(state, weights)
    for target in ('imagenet/val', 'imagenet-a', 'imagenet-r', 'imagenet-o'):
        for c, wnid in enumerate(shared):
            (tmp_path / target / wnid).mkdir(parents=True)
            for image in (root / 'val' / f'class{c}').iterdir():
                (tmp_path / target / wnid / image.name).write_bytes(image.read_bytes())
    copy = tmp_path / 'copy.pth'
    copy.write_bytes(weights.read_bytes())
    out = tmp_path / 'report' / 'robust.md'
    table = robustness.main([str(weights), str(copy), *SMALL, '--data-dir', str(tmp_path / 'imagenet'), '--occlusion', '0.5', '1',
                             '--occlusion-patch', '8', '--imagenet-a', str(tmp_path / 'imagenet-a'),
                             '--imagenet-r', str(tmp_path / 'imagenet-r'), '--imagenet-o', str(tmp_path / 'imagenet-o'),
                             '--output', str(out)])
    assert [label for label, _ in table] == ['colours.pth', 'copy.pth']
    values = table[0][1]
    assert values['clean'] == 100.0 and values['ImageNet-A'] == 100.0 and values['ImageNet-R'] == 100.0
    assert values['occlusion 1'] == pytest.approx(100 / 3) and values['occlusion 0.5'] <= 100.0
    assert values['ImageNet-O AUPR'] == pytest.approx(50.0)
    lines = out.read_text().splitlines()
    assert lines[0] == ('| checkpoint | clean | occlusion 0.5 | occlusion 1 | ImageNet-A | ImageNet-R | '
                        'ImageNet-O AUPR |')
    assert lines[2].startswith('| colours.pth | 100.00 |') and lines[2].endswith('| 33.33 | 100.00 | 100.00 | 50.00 |')
    with Image.open(out.with_suffix('.png')) as plot:
        assert plot.size == (720, 480) and len(plot.convert('RGB').getcolors(1 << 20)) > 3   # drawn, not blank
    csv_out = tmp_path / 'robust.csv'
    robustness.main([str(weights), *SMALL, '--data-dir',
                     str(tmp_path / 'imagenet'), '--occlusion', '--output', str(csv_out)])
    assert csv_out.read_text().splitlines() == ['checkpoint,clean', 'colours.pth,100.0000']
    assert not csv_out.with_suffix('.png').exists()          # no occlusion ratios: nothing to plot


def test_numbered_class_folders_label_their_output(colour_model, tmp_path, capsys):
    """ImageNet-V2's layout: folder 'k' holds images of output k (here 0 and 2: sorting would make 2 label 1)."""
    root, weights = colour_model
    for c in (0, 2):
        (tmp_path / 'v2' / str(c)).mkdir(parents=True)
        for image in (root / 'val' / f'class{c}').iterdir():
            (tmp_path / 'v2' / str(c) / image.name).write_bytes(image.read_bytes())
    rows = validate.main([*SMALL, '--checkpoint', str(weights), '--data-dir', str(tmp_path), '--split', 'v2'])
    assert 'labels the output of that index' in capsys.readouterr().out
    assert rows[0]['samples'] == 24 and rows[0]['top1'] == 100.0
    (tmp_path / 'v2' / '3').mkdir()                                         # the model has 3 outputs: 0, 1, 2
    with pytest.raises(SystemExit, match='v2 are numbers, .* 3 outputs') as err:
        validate.main([*SMALL, '--checkpoint', str(weights), '--data-dir', str(tmp_path), '--split', 'v2'])
    assert '3 name no output' in str(err.value)
def test_occlusion_follows_dataset_indices_across_ranks():
    """Under DDP each rank reads a shard: an image gets the same patches as in a single process."""
    from mixpro.data import ShardSampler
    images = torch.randn(10, 3, 32, 32)
    dataset = torch.utils.data.TensorDataset(images, torch.arange(10))

    def occluded(rank, world):
        loader = torch.utils.data.DataLoader(dataset, batch_size=3, sampler=ShardSampler(10, rank, world))
        batches = OccludedBatches(loader, 0.5, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, patch=8, seed=4)
        return {int(i): x for xs, ys in batches for x, i in zip(xs, ys)}
    single, shards = occluded(0, 1), {**occluded(0, 2), **occluded(1, 2)}
    assert sorted(shards) == list(range(10))
    assert all(torch.equal(single[i], shards[i]) for i in range(10))
    assert not torch.equal(single[0], images[0])


def test_timm_training_checkpoint_and_safetensors(colour_model, tmp_path, capsys):
    """Weights as timm's train.py saves them (args as a Namespace, weights under state_dict) and as safetensors."""
    import argparse
    import safetensors.torch
    root, weights = colour_model
    state = torch.load(weights, weights_only=True)['model']
    torch.save({'epoch': 3, 'arch': 'deit_tiny_patch16_224', 'args': argparse.Namespace(lr=1e-3),
                'state_dict': {f'module.{k}': v for k, v in state.items()}}, tmp_path / 'timm_train.pth.tar')
    safetensors.torch.save_file(state, str(tmp_path / 'colours.safetensors'))
    rows = validate.main([*SMALL, '--checkpoint', str(tmp_path / 'timm_train.pth.tar'),
                          str(tmp_path / 'colours.safetensors'), '--data-dir', str(root)])
    assert [r['top1'] for r in rows] == [100.0, 100.0] and rows[0]['loss'] == pytest.approx(rows[1]['loss'])
    out = capsys.readouterr().out
    assert 'precision: float32' in out and 'without a train.py run' in out


class _Brightness(torch.nn.Module):
    """A 3-class 'model' whose confidence grows with the image's brightness: logits (8 * mean, 0, 0)."""

    def forward(self, x):
        bright = x.mean(dim=(1, 2, 3))
        return torch.stack([8 * bright, torch.zeros_like(bright), torch.zeros_like(bright)], 1)


def _grey_folder(root, wnids, value, count):
    for wnid in wnids:
        (root / wnid).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((32, 32, 3), value, dtype=np.uint8)).save(root / wnid / f'{i}.png')


def test_imagenet_o_scores_out_of_distribution_images_as_the_positives(tmp_path):
    from argparse import Namespace
    from mixpro.distributed import DistInfo
    from mixpro.validation import LoadedModel, ood_detection
    wnids = ['n00000001', 'n00000002', 'n00000003']
    _grey_folder(tmp_path / 'imagenet' / 'val', wnids, 230, 4)            # bright: confident, in-distribution
    _grey_folder(tmp_path / 'imagenet' / 'val', ['n00000009'], 0, 5)      # a class ImageNet-O does not have
    _grey_folder(tmp_path / 'imagenet-o', wnids, 20, 2)                   # dark: unsure, out-of-distribution
    model_args = dict(model='brightness', img_size=32, crop_pct=1.0, amp=False, amp_dtype='bfloat16')
    loaded = LoadedModel(_Brightness(), 'hand-made', model_args, {w: i for i, w in enumerate(wnids)}, False)
    args = Namespace(data_dir=str(tmp_path / 'imagenet'), split='val', dataset='', crop_pct=None, batch_size=5,
                     workers=0, amp=None, amp_dtype=None)
    measures = ood_detection(args, loaded, DistInfo(), str(tmp_path / 'imagenet-o'))
    assert measures['in_images'] == 12 and measures['ood_images'] == 6      # val's other class is not read
    assert measures['aupr'] == pytest.approx(100.0) and measures['auroc'] == pytest.approx(100.0)
    graphs = []

    @torch._dynamo.register_backend
    def ood_counted(graph, inputs):
        graphs.append(graph)
        return torch._dynamo.lookup_backend('aot_eager')(graph, inputs)
    compiled = ood_detection(Namespace(**vars(args), torchcompile='ood_counted'), loaded, DistInfo(),
                             str(tmp_path / 'imagenet-o'))   # validate.py --torchcompile reaches ImageNet-O too
    assert graphs and compiled == pytest.approx(measures)
    # the same images on both sides: every score ties, AUPR is the positives' (ImageNet-O's) share, 6 of 18
    shutil.rmtree(tmp_path / 'imagenet-o')
    _grey_folder(tmp_path / 'imagenet-o', wnids, 230, 2)
    measures = ood_detection(args, loaded, DistInfo(), str(tmp_path / 'imagenet-o'))
    assert measures['aupr'] == pytest.approx(100 / 3) and measures['auroc'] == pytest.approx(50.0)
    shutil.rmtree(tmp_path / 'imagenet' / 'val' / wnids[1])             # val lacks one of ImageNet-O's classes
    with pytest.raises(ConfigError, match=f'1 of its 3 classes have no folder .*{wnids[1]}'):
        ood_detection(args, loaded, DistInfo(), str(tmp_path / 'imagenet-o'))
    with pytest.raises(ConfigError, match='--imagenet-o .*nowhere does not exist'):
        ood_detection(args, loaded, DistInfo(), str(tmp_path / 'nowhere'))
    with pytest.raises(ConfigError, match='--imagenet-o .*1 of its 3 classes') as err:
        ood_detection(args, LoadedModel(_Brightness(), 'hand-made', model_args, dict(zip(wnids[:2], (0, 1))), False),
                      DistInfo(), str(tmp_path / 'imagenet-o'))
    assert 'not classes of the model' in str(err.value)


@pytest.mark.slow
def test_ood_scores_of_every_rank_are_gathered(tmp_path):
    """ImageNet-O under DDP: each rank scores its own shard (of any size); AUPR needs all of them. Two gloo
    processes meet through a file (no port to collide with other jobs)."""
    import os
    import subprocess
    script = tmp_path / 'gather.py'
    script.write_text('import sys, torch, torch.distributed as dist\n'
                      'from mixpro.distributed import gather_cat\n'
                      'rank = int(sys.argv[1])\n'
                      'dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)\n'
                      'whole = gather_cat(torch.arange(rank, dtype=torch.float32) + 10 * rank)\n'
                      'print(f"rank {rank}:", whole.tolist())\n'
                      'dist.destroy_process_group()\n')
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(repo)}
    ranks = [subprocess.Popen([sys.executable, str(script), str(rank), str(tmp_path / 'rendezvous')], cwd=repo,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    for rank, (out, err) in zip(ranks, outputs):
        assert rank.returncode == 0, err
    assert [out.strip() for out, _ in outputs] == ['rank 0: [10.0]', 'rank 1: [10.0]']   # rank 0 had none


def test_robustness_checks_its_folders_before_evaluating(colour_model, tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'scripts'))
    import robustness
    root, weights = colour_model
    out = tmp_path / 'robust.md'
    common = [str(weights), *SMALL, '--data-dir', str(root), '--output', str(out)]
    with pytest.raises(SystemExit):
        robustness.main([*common, '--imagenet-o', str(tmp_path / 'nowhere')])
    err = capsys.readouterr().err
    assert '--imagenet-o' in err and 'nowhere does not exist' in err
    (tmp_path / 'imagenet-o' / 'n01440764').mkdir(parents=True)     # a class the 3-colour model does not name
    with pytest.raises(SystemExit, match='--imagenet-o .*needs the names'):
        robustness.main([*common, '--imagenet-o', str(tmp_path / 'imagenet-o')])
    assert 'evaluating' not in capsys.readouterr().out and not out.exists()   # refused before any evaluation
