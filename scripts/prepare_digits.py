#!/usr/bin/env python
"""Turn scikit-learn's bundled 8x8 handwritten digits into a small ImageFolder dataset.

    python scripts/prepare_digits.py [--out data/digits] [--size 32] [--val-fraction 0.2] [--seed 0]

Writes <out>/train/<digit>/<index>.png and <out>/val/<digit>/<index>.png as 8-bit grayscale PNGs
(timm's loader converts them to RGB). The data ships inside the sklearn package, so nothing is
downloaded. The split is stratified and deterministic: each class is shuffled with the seed and
its last val_fraction goes to val. Running it again with the same arguments changes nothing.
"""
import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

SPLITS = ('train', 'val')


def split_indices(labels, val_fraction, seed):
    """{split: [(dataset_index, label), ...]}, stratified per class and fixed by the seed."""
    rng = np.random.RandomState(seed)
    plan = {split: [] for split in SPLITS}
    for label in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == label)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        cut = len(idx) - n_val
        plan['train'] += [(int(i), int(label)) for i in idx[:cut]]
        plan['val'] += [(int(i), int(label)) for i in idx[cut:]]
    return plan


def expected_files(plan):
    return {Path(split, str(label), f'{i}.png') for split, items in plan.items() for i, label in items}


def is_complete(out, plan, size):
    """True when `out` holds exactly the planned files, at the requested image size."""
    if not out.is_dir():
        return False
    found = {p.relative_to(out) for p in out.rglob('*') if p.is_file()}
    if found != expected_files(plan):
        return False
    # same file names but another --size must still trigger a rebuild; reading headers is cheap
    for rel in found:
        with Image.open(out / rel) as im:
            if im.size != (size, size) or im.mode != 'L':
                return False
    return True


def write_dataset(root, images, plan, size):
    for split, items in plan.items():
        for i, label in items:
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            # 0..16 -> 0..255, then upscale so ViT patch sizes have something to work with
            pixels = np.round(images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
            img = Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR)
            img.save(folder / f'{i}.png')


def prepare_digits(out, size=32, val_fraction=0.2, seed=0):
    """Build the dataset at `out` unless it is already there; returns {split: {'0': n, ...}, 'total': n}."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f'val_fraction must be in [0, 1), got {val_fraction}')
    out = Path(out)
    digits = load_digits()
    plan = split_indices(digits.target, val_fraction, seed)

    if is_complete(out, plan, size):
        print(f'{out} already holds the expected {len(expected_files(plan))} images; nothing to do')
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        # build beside the target and swap it in at the end, so a crash never leaves a half dataset
        tmp = Path(tempfile.mkdtemp(prefix=out.name + '.tmp-', dir=out.parent))
        try:
            write_dataset(tmp, digits.images, plan, size)
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=out.name + '.old-', dir=out.parent))
                out.rename(old / out.name)
                tmp.rename(out)
                shutil.rmtree(old)
            else:
                tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    counts = {split: {} for split in SPLITS}
    for split, items in plan.items():
        for _, label in items:
            counts[split][str(label)] = counts[split].get(str(label), 0) + 1
    counts['total'] = sum(len(items) for items in plan.values())
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default='data/digits', help='output folder (default: data/digits)')
    parser.add_argument('--size', type=int, default=32, help='image side in pixels (default: 32)')
    parser.add_argument('--val-fraction', type=float, default=0.2, help='share of each class for val')
    parser.add_argument('--seed', type=int, default=0, help='seed of the per-class shuffle')
    args = parser.parse_args(argv)

    counts = prepare_digits(args.out, size=args.size, val_fraction=args.val_fraction, seed=args.seed)
    for split in SPLITS:
        per_class = ' '.join(f'{k}:{v}' for k, v in sorted(counts[split].items(), key=lambda kv: int(kv[0])))
        print(f'{split}: {sum(counts[split].values())} images ({per_class})')
    print(f'total: {counts["total"]} images of {args.size}x{args.size} in {args.out}')


if __name__ == '__main__':
    main()
