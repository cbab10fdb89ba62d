#!/usr/bin/env python
"""ImageNet-like JPEGs for timing the input pipeline, without a download: an ImageFolder
``OUT/{train,val}/<class>/*.JPEG`` of photo-like JPEGs, 500x375 px, quality 90, 4:2:0 chroma subsampling
(ImageNet's typical file: about 110 KB on average).

    python scripts/make_jpegs.py --out /tmp/jpegs --images 512 --classes 8
    python scripts/benchmark.py --sections pipeline --recipe configs/deit_s_mixpro.yaml --data-dir /tmp/jpegs ...

Every image is cut from scikit-learn's two bundled sample photos (``load_sample_images()``: china.jpg and
flower.jpg, 640x427) by a random crop of the target's shape, a rescale to the target size, a random
horizontal flip and a small colour shift (gain per channel, brightness offset). The two photos are smoother
than ImageNet's (about 52 KB per file at these settings), so each view is also sharpened and given
sensor-like grain, which brings the files to ImageNet's bytes per pixel: decoding time grows with them.
The labels mean nothing: the images are for measuring speed.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

SUBSAMPLING_420 = 2   # Pillow's code for 4:2:0 chroma subsampling (libjpeg's default, as most ImageNet files)


def sample_photos():
    """scikit-learn's bundled sample photos as uint8 [H, W, 3] arrays (they ship inside the package)."""
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        raise SystemExit('make_jpegs needs scikit-learn for its bundled sample photos: pip install scikit-learn')
    return load_sample_images().images


def photo_like(photo: np.ndarray, size, rng: np.random.Generator) -> Image.Image:
    """One random view of ``photo`` at ``size`` (width, height): a crop of that shape covering 55-100 % of
    the largest such crop's height, rescaled, maybe mirrored, sharpened, colours shifted a little, grain added."""
    width, height = size
    photo_h, photo_w = photo.shape[:2]
    largest_h = min(photo_h, photo_w * height / width)   # the tallest crop of the target's aspect that fits
    crop_h = int(round(largest_h * rng.uniform(0.55, 1.0)))
    crop_w = min(photo_w, int(round(crop_h * width / height)))
    top = int(rng.integers(0, photo_h - crop_h + 1))
    left = int(rng.integers(0, photo_w - crop_w + 1))
    crop = Image.fromarray(photo[top:top + crop_h, left:left + crop_w])
    image = crop.resize((width, height), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # the detail the smooth sample photos lack: sharper edges (as a camera's own sharpening) ...
    image = image.filter(ImageFilter.UnsharpMask(radius=2, percent=int(rng.integers(200, 301)), threshold=0))
    pixels = np.asarray(image, dtype=np.float32)
    gain = rng.uniform(0.9, 1.1, size=3)          # a white-balance shift
    offset = rng.uniform(-12.0, 12.0)              # an exposure shift
    grain = rng.normal(0.0, rng.uniform(8.0, 16.0), size=pixels.shape[:2] + (1,))   # ... and luminance grain
    pixels = pixels * gain + offset + grain
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def write_split(root: Path, count: int, classes: int, photos, size, quality: int, rng) -> list:
    """``count`` JPEGs dealt round-robin into ``classes`` folders under ``root``; returns their sizes in bytes."""
    sizes = []
    for index in range(count):
        folder = root / f'class{index % classes:03d}'
        folder.mkdir(parents=True, exist_ok=True)
        image = photo_like(photos[int(rng.integers(len(photos)))], size, rng)
        path = folder / f'img{index:06d}.JPEG'   # ImageNet's extension; timm reads it in any case
        image.save(path, 'JPEG', quality=quality, subsampling=SUBSAMPLING_420)
        sizes.append(path.stat().st_size)
    return sizes


def make_jpegs(out, images: int, classes: int, val_images=None, size=(500, 375), quality: int = 90,
               seed: int = 0) -> dict:
    """Write ``images`` train and ``val_images`` (default: a tenth, at least one per class) val JPEGs.
    Returns {'train': n, 'val': n, 'mean_kb': mean file size in KB (1000 bytes)}."""
    if classes < 1 or images < classes:
        raise ValueError(f'--images {images} must give every one of --classes {classes} at least one image')
    val_images = max(classes, images // 10) if val_images is None else val_images
    if val_images < classes:
        raise ValueError(f'--val-images {val_images} must give every one of --classes {classes} at least one '
                         f'image (the val split uses the train classes)')
    rng = np.random.default_rng(seed)
    photos = sample_photos()
    out = Path(out)
    sizes = write_split(out / 'train', images, classes, photos, size, quality, rng)
    sizes += write_split(out / 'val', val_images, classes, photos, size, quality, rng)
    return {'train': images, 'val': val_images, 'mean_kb': sum(sizes) / len(sizes) / 1e3}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', required=True, help='the ImageFolder root to write (train/ and val/ inside)')
    parser.add_argument('--images', type=int, default=512, help='train images')
    parser.add_argument('--classes', type=int, default=8)
    parser.add_argument('--val-images', type=int, default=None, help='default: a tenth of --images')
    parser.add_argument('--size', type=int, nargs=2, default=(500, 375), metavar=('WIDTH', 'HEIGHT'))
    parser.add_argument('--quality', type=int, default=90, help='JPEG quality (ImageNet: mostly about 90)')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    try:
        made = make_jpegs(args.out, args.images, args.classes, args.val_images, tuple(args.size), args.quality,
                          args.seed)
    except ValueError as err:
        parser.error(str(err))
    print(f"wrote {made['train']} train and {made['val']} val JPEGs ({args.size[0]}x{args.size[1]}, quality "
          f"{args.quality}, 4:2:0) to {args.out}: mean file size {made['mean_kb']:.1f} KB (ImageNet: about 110 KB)")
    return made


if __name__ == '__main__':
    sys.exit(0 if main() else 1)
