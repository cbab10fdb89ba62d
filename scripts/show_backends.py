#!/usr/bin/env python
"""The same images through both data backends, side by side: what ``--data-backend tensor`` changes.

    python scripts/show_backends.py --output docs/backends.png [--seed 0] [--data-dir D] [--images 4]

Each row is one sample, read by both paths under the sample's seed as training reads it
(``mixpro.data.SeededSamples``: python, numpy and torch generators seeded with the sample's seed), so both
backends draw the same crop, flips and RandAugment ops:

- Pillow: timm's train transform in the loader worker (random resized crop, flip, RandAugment on Pillow);
- tensor: the worker's ``TensorTrainTransform`` (torch decode, crop, resize, flip, RandAugment's parameters)
  then the device stage's ``apply_rand_augment`` (here on the CPU);
- their absolute difference, amplified (x40 by default): black where the pixels are equal.

The caption names the crop box, the flip and the RandAugment ops drawn (a skipped op is marked), and the mean
and largest difference in grey levels. Both outputs are uint8 images before normalisation and random
erasing (which follow on the device, with the same code, on both paths). The photos are scikit-learn's
bundled samples unless ``--data-dir`` names an ImageFolder (its first train images are used).
"""
import argparse
import sys
from pathlib import Path

import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from timm.data.auto_augment import RandAugment

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mixpro.config import parse_train_args  # noqa: E402
from mixpro.data import SeededSamples  # noqa: E402
from mixpro.pictures import compose  # noqa: E402
from mixpro.tensor_augment import APPLIED, ARG, OP, OP_NAMES, RandAugmentParams, apply_rand_augment  # noqa: E402
from mixpro.tensor_data import TensorTrainTransform, decode_image  # noqa: E402

TITLES = ['Pillow (timm, in the workers)', 'tensor (workers + device stage)']
NO_ARGUMENT = ('AutoContrast', 'Equalize', 'Invert')   # ops whose params row has no argument (ARG 0)


def sample_files(data_dir=None, count=4):
    """Image files to show: the first ``count`` of ``data_dir``'s train split (sorted), else scikit-learn's
    two sample photos, repeated (each repeat is another sample, with its own seed)."""
    if data_dir:
        files = sorted(p for p in (Path(data_dir) / 'train').rglob('*') if p.suffix.lower() in ('.jpg', '.jpeg', '.png'))
        if not files:
            raise SystemExit(f'--data-dir {data_dir}: no .jpg/.jpeg/.png files under {data_dir}/train; give an '
                             f'ImageFolder root, or leave --data-dir out to use the sample photos')
        return files[:count]
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        raise SystemExit('show_backends needs scikit-learn for its sample photos (pip install scikit-learn), '
                         'or --data-dir with an ImageFolder')
    photos = load_sample_images().filenames
    return [Path(photos[i % len(photos)]) for i in range(count)]


class PillowPath(torch.utils.data.Dataset):
    """File ``index`` as timm's ImageFolder reader opens it (Pillow, RGB), through the Pillow train transform:
    uint8 [3, S, S] (the transform is built for a prefetcher, so it ends before normalisation)."""

    def __init__(self, files, transform):
        self.files, self.transform = files, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        with Image.open(self.files[index]) as image:
            return torch.as_tensor(self.transform(image.convert('RGB')))   # timm gives a tensor or an array


class TensorPath(torch.utils.data.Dataset):
    """File ``index`` decoded by torch (``decode_image``, as ``read_as_tensors``), through the worker's
    ``TensorTrainTransform``, then the device stage's RandAugment (here on the CPU). Returns (uint8 [3, S, S],
    the RandAugment parameters, what was drawn: the crop box and the flips)."""

    def __init__(self, files, transform):
        self.files, self.transform = files, transform
        self.drawn = {}
        noted = transform.crop.get_params   # timm's box sampler (a staticmethod), wrapped to note the box

        def get_params(*args, **kwargs):
            self.drawn['box'] = noted(*args, **kwargs)
            return self.drawn['box']
        transform.crop.get_params = get_params
        transform.flips = [_NotedFlip(flip, self.drawn) for flip in transform.flips]

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        path = self.files[index]
        self.drawn.clear()
        image, params = self.transform(decode_image(path.read_bytes(), str(path)))
        return apply_rand_augment(image[None], params[None])[0], params, dict(self.drawn)


class _NotedFlip:
    """A torchvision flip transform that notes in ``drawn`` whether it flipped."""

    def __init__(self, flip, drawn):
        self.flip, self.drawn = flip, drawn

    def __call__(self, image):
        out = self.flip(image)
        self.drawn[type(self.flip).__name__] = out is not image   # the transform returns its input when it does not flip
        return out


def transforms_of(recipe_path: str):
    """The recipe's Pillow train transform (as ``train_loader`` builds it with a prefetcher: uint8 out, no
    normalisation or erasing) and its tensor train transform with timm's own parsed RandAugment."""
    recipe = parse_train_args(['--config', recipe_path, '--data-backend', 'tensor'], check_machine=False)
    data_config = resolve_data_config(vars(recipe))
    pillow = create_transform(data_config['input_size'], is_training=True, scale=recipe.scale, ratio=recipe.ratio,
                              hflip=recipe.hflip, vflip=recipe.vflip, color_jitter=recipe.color_jitter,
                              auto_augment=recipe.aa, interpolation=recipe.train_interpolation,
                              mean=data_config['mean'], std=data_config['std'], use_prefetcher=True)
    rand_augment = next((t for t in pillow.transforms if isinstance(t, RandAugment)), None)
    if rand_augment is None:
        raise SystemExit(f'--recipe {recipe_path}: its --aa {recipe.aa!r} is no RandAugment policy, so the two '
                         f'backends would differ only by the crop; pick a recipe with aa: rand-...')
    tensor = TensorTrainTransform(data_config['input_size'], scale=recipe.scale, ratio=recipe.ratio,
                                  hflip=recipe.hflip, vflip=recipe.vflip, interpolation=recipe.train_interpolation,
                                  aug_params=RandAugmentParams(rand_augment))
    return pillow, tensor, recipe.aa


def describe_ops(params: torch.Tensor) -> str:
    """The RandAugment layers of one sample: op name and argument, '(skipped)' where its prob test failed."""
    parts = []
    for row in params:
        name = OP_NAMES[int(round(float(row[OP])))]
        if row[APPLIED] < 0.5:
            parts.append(f'{name} (skipped)')
        elif name in NO_ARGUMENT:
            parts.append(name)
        else:
            parts.append(f'{name} {float(row[ARG]):.3g}')
    return ', '.join(parts)


def describe_crop(drawn: dict) -> str:
    top, left, height, width = drawn['box']
    flips = [name.replace('Random', '').replace('Flip', ' flip') for name, flipped in drawn.items()
             if name != 'box' and flipped]
    return f"crop {width}x{height} at x={left} y={top}" + (', ' + ', '.join(flips).lower() if flips else ', no flip')


def to_picture(image: torch.Tensor, size: int) -> Image.Image:
    picture = Image.fromarray(image.permute(1, 2, 0).numpy())
    return picture if picture.size == (size, size) else picture.resize((size, size), Image.Resampling.BILINEAR)


def show_backends(output, seed: int = 0, data_dir=None, count: int = 4, recipe='configs/deit_s_mixpro.yaml',
                  amplify: int = 40, size: int = 224, colours: int = 256) -> dict:
    """Write the picture; returns {'samples': n, 'mean_abs': [per sample], 'max_abs': [per sample]}."""
    pillow_tf, tensor_tf, aa = transforms_of(recipe)
    files = sample_files(data_dir, count)
    # each path reads its sample under the sample's seed, as SeededSamples does in training: the same draws
    pillow_path, tensor_path = SeededSamples(PillowPath(files, pillow_tf)), SeededSamples(TensorPath(files, tensor_tf))
    # one seed per sample, drawn as EpochSampler draws them
    seeds = torch.randint(2 ** 62, (len(files),), generator=torch.Generator().manual_seed(seed)).tolist()
    rows, captions, mean_abs, max_abs = [], [], [], []
    for index, sample_seed in enumerate(seeds):
        pillow = pillow_path[(index, sample_seed)]
        tensor, params, drawn = tensor_path[(index, sample_seed)]
        difference = (pillow.int() - tensor.int()).abs()
        mean_abs.append(difference.float().mean().item())
        max_abs.append(int(difference.max()))
        amplified = (difference * amplify).clamp(max=255).to(torch.uint8)
        rows.append([to_picture(pillow, size), to_picture(tensor, size), to_picture(amplified, size)])
        captions.append([f'{files[index].name}, {describe_crop(drawn)}',
                         f'{aa}: {describe_ops(params)}',
                         f'|difference|: mean {mean_abs[-1]:.3f}, max {max_abs[-1]} grey levels'])
    sheet = compose(rows, captions, size, titles=TITLES + [f'|difference| x{amplify}'])
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    if colours:   # a palette keeps the PNG small enough for the docs (full colour: about 3x the bytes)
        sheet = sheet.quantize(colors=colours, method=Image.Quantize.MEDIANCUT)
    sheet.save(output, optimize=True)
    return {'samples': len(files), 'mean_abs': mean_abs, 'max_abs': max_abs}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--output', required=True, help='the picture (docs/backends.png is made with the defaults)')
    parser.add_argument('--seed', type=int, default=0, help='seeds the per-sample seeds, as a run seeds its epoch')
    parser.add_argument('--data-dir', default=None, help="an ImageFolder root whose first train images to show")
    parser.add_argument('--images', type=int, default=4, help='samples (rows)')
    parser.add_argument('--recipe', default='configs/deit_s_mixpro.yaml', help='the recipe whose train transform to use')
    parser.add_argument('--amplify', type=int, default=40,
                        help='the difference column is |Pillow - tensor| x this (x40: a 1-level difference shows grey)')
    parser.add_argument('--size', type=int, default=224, help='tile size in px (the recipe\'s own size: no resampling)')
    parser.add_argument('--colours', type=int, default=256, help='palette size of the PNG (0: full colour, larger file)')
    args = parser.parse_args(argv)
    shown = show_backends(args.output, args.seed, args.data_dir, args.images, args.recipe, args.amplify, args.size,
                          args.colours)
    for index, (mean, largest) in enumerate(zip(shown['mean_abs'], shown['max_abs'])):
        print(f'sample {index}: |Pillow - tensor| mean {mean:.3f}, max {largest} grey levels')
    print(f'wrote {args.output}')
    return shown


if __name__ == '__main__':
    main()
