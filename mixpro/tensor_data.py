"""The ``tensor`` data backend: loader workers decode and crop, the device augments.

timm's Pillow pipeline spends a loader worker's time on Pillow: decoding, the random resized crop, and
RandAugment's dozen per-image operations. This backend splits that work:

* a loader worker decodes the file with torchvision's libjpeg-turbo / libpng decoders (Pillow for what
  they cannot decode as Pillow does: CMYK JPEGs, palette and 16-bit PNGs, other formats, broken files),
  draws the crop box, interpolation and flips exactly as timm's train transform draws them (timm's own
  ``RandomResizedCropAndInterpolation.get_params``, torchvision's flip transforms), crops and resizes the
  uint8 image with torch's antialiased resize, and, given ``aug_params``, draws the sample's RandAugment
  parameters (a small float tensor);
* ``tensor_collate`` stacks a batch into one uint8 tensor, the targets and the parameters;
* the device applies RandAugment to the whole uint8 batch from those parameters
  (``mixpro.tensor_augment``), then normalises it as timm's prefetcher does.

Seeded alike, a sample gets the same crop box, interpolation and flips on both paths, so ``SeededSamples``
makes the two backends see the same crops; the pixels differ by rounding (< 0.05 grey levels on average).

How the bytes reach the transform: ``read_as_tensors(dataset)`` makes a timm ``ImageDataset``'s reader
decode each file with ``decode_image`` inside timm's own skip-on-error loop, so an unreadable file is
skipped with the same warning (``mixpro.skipped`` names the file) and its neighbour stands in, as today.
"""
import io
import random
from typing import Optional, Sequence, Tuple, Union

import PIL
import torch
from PIL import Image, UnidentifiedImageError
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from timm.data.transforms_factory import transforms_imagenet_eval
from torch.utils.data import default_collate
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg, decode_png
from torchvision.transforms.functional import _compute_resized_output_size
from torchvision.transforms.v2 import functional as F

from .skipped import ReaderWrapper, _RememberingReader
from .tensor_augment import apply_rand_augment

_JPEG_START = b'\xff\xd8\xff'
_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
_PNG_DIRECT_COLOUR_TYPES = (0, 2, 4, 6)   # grey, RGB, grey + alpha, RGBA (3 is a palette)
# SOF markers: C0-CF except DHT (C4), JPG (C8) and DAC (CC), which share the range
_JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Pillow 13 resizes vertically first when the height shrinks by more than twice as many pixels as the width
# (python-pillow/Pillow#9549), earlier versions and torch horizontally first; the order moves rounding
# (0.2 grey levels on average for such a crop)
_PILLOW_VERTICAL_FIRST = int(PIL.__version__.split('.')[0]) >= 13


def decode_image(data: Union[bytes, bytearray, memoryview], path: str = '') -> torch.Tensor:
    """An image file's bytes as a uint8 RGB tensor [3, H, W], the pixels Pillow's
    ``Image.open(file).convert('RGB')`` gives (timm's reader). ``path`` only names the file in errors.

    Baseline and progressive JPEGs (grey or colour) and 8-bit PNGs go to torchvision's decoders, the same
    libjpeg-turbo / libpng Pillow uses: equal pixels, about twice as fast. Everything else, and whatever
    torchvision refuses (a truncated or corrupt file), goes to Pillow, which decodes it or raises the
    ``OSError`` it raises today. EXIF orientation is not applied, as timm's reader does not apply it."""
    if _torch_decodes(data):
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)   # a writable copy: torch wants one
        decode = decode_jpeg if data[:3] == _JPEG_START else decode_png
        try:
            return decode(encoded, mode=ImageReadMode.RGB, apply_exif_orientation=False)
        except RuntimeError:
            pass   # truncated or corrupt: Pillow decides, as today (it reads some files libjpeg warns about)
    return _decode_with_pillow(data, path)


def _torch_decodes(data) -> bool:
    """Whether torchvision decodes this file to the pixels Pillow gives."""
    if data[:3] == _JPEG_START:
        # 4 components are CMYK or YCCK: Pillow inverts Adobe CMYK itself; keep its conversion
        return _jpeg_components(data) in (1, 3)
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b'IHDR':
        bit_depth, colour_type = data[24], data[25]
        # Pillow clips 16-bit grey to 255 instead of scaling, and expands palettes and 1/2/4-bit grey itself
        return bit_depth == 8 and colour_type in _PNG_DIRECT_COLOUR_TYPES
    return False   # WebP, GIF, BMP, TIFF, ...: Pillow, as today


def _jpeg_components(data) -> int:
    """The number of colour components in a JPEG's frame header (0 when the header cannot be read)."""
    position = 2   # after the start-of-image marker
    while position + 9 < len(data):
        if data[position] != 0xFF:
            return 0
        marker = data[position + 1]
        if marker == 0xFF:   # a fill byte before a marker
            position += 1
            continue
        if marker in _JPEG_FRAME_MARKERS:
            return data[position + 9]   # FF Cn, length (2), precision (1), height (2), width (2), components
        position += 2 + int.from_bytes(data[position + 2:position + 4], 'big')
    return 0


def _decode_with_pillow(data, path: str) -> torch.Tensor:
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as err:
        if not path:
            raise
        # Pillow names a file it opened itself; this one it sees as bytes
        raise UnidentifiedImageError(f'cannot identify image file {path!r}') from err
    return F.pil_to_tensor(image.convert('RGB'))   # convert decodes: a truncated file raises OSError here


def as_image_tensor(image) -> torch.Tensor:
    """A sample as a uint8 RGB tensor [3, H, W]: file bytes are decoded, a Pillow image (a torchvision
    dataset's) converted to RGB, a tensor (``read_as_tensors``' samples) passed through."""
    if isinstance(image, torch.Tensor):
        return image
    if isinstance(image, Image.Image):
        return F.pil_to_tensor(image.convert('RGB'))
    return decode_image(image)


def _resize(image: torch.Tensor, size, interpolation) -> torch.Tensor:
    """torch's antialiased uint8 resize to ``size`` (height, width), which matches Pillow's to ±1 grey level
    (mostly exactly). It is fastest on channels-last memory; the decoders give that layout already, so this
    copy only packs a crop's rows. Both resize in two passes, rounding in between: the passes go in
    Pillow's order."""
    batch = image.unsqueeze(0).contiguous(memory_format=torch.channels_last)
    height, width = image.shape[-2:]
    if _PILLOW_VERTICAL_FIRST and height - size[0] > max(0, 2 * (width - size[1])):
        batch = F.resize(batch, [size[0], width], interpolation=interpolation, antialias=True)
    return F.resize(batch, list(size), interpolation=interpolation, antialias=True)[0]


class TensorTrainTransform:
    """timm's train transform up to RandAugment (``create_transform(..., is_training=True)``: random
    resized crop with interpolation, horizontal and vertical flip), on uint8 tensors, with the same
    random draws in the same order. Returns ``(image [3, S, S] uint8, aug_params() or None)``.

    No colour jitter: timm turns it off when RandAugment is on."""

    def __init__(self, input_size, scale: Optional[Sequence[float]] = None,
                 ratio: Optional[Sequence[float]] = None, hflip: float = 0.5, vflip: float = 0.,
                 interpolation: str = 'bilinear', aug_params=None):
        size = input_size[-2:] if isinstance(input_size, (tuple, list)) else input_size   # as create_transform
        # timm's own crop: its get_params draws the box, its interpolation setting ('random': a tuple)
        self.crop = RandomResizedCropAndInterpolation(
            size, scale=tuple(scale or (0.08, 1.0)), ratio=tuple(ratio or (3. / 4., 4. / 3.)),
            interpolation=interpolation)
        # torchvision's flips, as transforms_imagenet_train adds them: each draws torch.rand(1)
        self.flips = ([transforms.RandomHorizontalFlip(p=hflip)] if hflip > 0. else []) + \
                     ([transforms.RandomVerticalFlip(p=vflip)] if vflip > 0. else [])
        self.aug_params = aug_params

    def __call__(self, image) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        image = as_image_tensor(image)
        top, left, height, width = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
        interpolation = self.crop.interpolation
        if isinstance(interpolation, (tuple, list)):
            interpolation = random.choice(interpolation)   # after the box, as RandomResizedCropAndInterpolation
        image = _resized_crop(image, top, left, height, width, self.crop.size, interpolation)
        for flip in self.flips:
            image = flip(image)
        params = self.aug_params() if self.aug_params is not None else None   # where RandAugment draws today
        return image, params

    def __repr__(self):
        return f'{type(self).__name__}({self.crop!r}, flips={self.flips}, aug_params={self.aug_params!r})'


def _resized_crop(image: torch.Tensor, top: int, left: int, height: int, width: int, size, interpolation):
    return _resize(image[:, top:top + height, left:left + width], size, interpolation)


class TensorEvalTransform:
    """timm's eval transform (``create_transform(..., is_training=False)``, centre crop mode) on uint8
    tensors: the shorter side resized to ``floor(size / crop_pct)``, then the centre crop. The sizes come
    from timm's own eval transform. Returns the uint8 image [3, S, S]."""

    def __init__(self, input_size, crop_pct: Optional[float] = None, interpolation: str = 'bilinear'):
        size = input_size[-2:] if isinstance(input_size, (tuple, list)) else input_size
        resize, crop, *_ = transforms_imagenet_eval(size, crop_pct=crop_pct, interpolation=interpolation,
                                                    use_prefetcher=True).transforms
        if not isinstance(resize, transforms.Resize) or not isinstance(crop, transforms.CenterCrop):
            raise NotImplementedError(f'the tensor backend evaluates square input sizes only, not {input_size}: '
                                      f'timm resizes others with {type(resize).__name__}')
        self.resize_size = [resize.size] if isinstance(resize.size, int) else list(resize.size)
        self.interpolation = resize.interpolation
        self.crop_size = list(crop.size)

    def __call__(self, image) -> torch.Tensor:
        image = as_image_tensor(image)
        # the function torchvision's Resize uses for Pillow images: the same size as timm's, by construction
        size = _compute_resized_output_size(tuple(image.shape[-2:]), self.resize_size)
        return F.center_crop(_resize(image, size, self.interpolation), self.crop_size)

    def __repr__(self):
        return (f'{type(self).__name__}(resize={self.resize_size}, interpolation={self.interpolation.value}, '
                f'crop={self.crop_size})')


def tensor_collate(batch):
    """Samples ``(image, target)`` or ``((image, params), target)`` into ``(images, targets)`` or
    ``(images, targets, params)``: images uint8 [B, 3, S, S] (contiguous), targets int64 [B], params
    [B, L, K]. Pinning is the DataLoader's job (``pin_memory``)."""
    images, targets = zip(*batch)
    params = None
    if isinstance(images[0], tuple):
        images, params = zip(*images)
    # default_collate stacks into shared memory inside a loader worker: no copy on the way to the trainer
    images = default_collate(list(images))
    targets = torch.tensor([int(target) for target in targets], dtype=torch.int64)
    if params is None or params[0] is None:
        return images, targets
    return images, targets, default_collate(list(params))


class _Decoded:
    """A decoded image in the place of a file: timm's ``ImageDataset`` with ``load_bytes`` calls
    ``.read()`` on what its reader returns, inside its skip-on-error loop, and hands the result on to
    the transform."""

    def __init__(self, image: torch.Tensor):
        self.image = image

    def read(self) -> torch.Tensor:
        return self.image


class _DecodingReader(ReaderWrapper):
    """A timm reader whose images come decoded by ``decode_image``."""

    def __getitem__(self, index):
        file, target, *features = self.reader[index]
        with file:
            data = file.read()
        # decoded here, in timm's loop: a file that cannot be decoded is skipped with timm's warning
        image = decode_image(data, getattr(file, 'name', ''))
        return (_Decoded(image), target, *features)


def read_as_tensors(dataset):
    """Make a timm ``ImageDataset`` whose reader hands over open files (ImageFolder; tar and hfds/ readers
    do too) give its transform uint8 RGB tensors from ``decode_image``, decoded inside timm's skip-on-error
    loop: an unreadable file is skipped with timm's warning (named by ``mixpro.skipped``), its neighbour
    stands in, and ``MeasuredSamples`` still marks the substitute. Works before or after
    ``name_skipped_files``. Returns ``dataset``."""
    if not hasattr(dataset, 'reader') or not hasattr(dataset, 'load_bytes'):
        raise TypeError(f'{type(dataset).__name__} is no timm ImageDataset: the tensor backend reads image files')
    dataset.load_bytes = True   # timm then calls .read() on the reader's items instead of Image.open
    # inside name_skipped_files' wrapper, which must stay outermost (MeasuredSamples looks for it)
    owner = dataset.reader if isinstance(dataset.reader, _RememberingReader) else dataset
    if not isinstance(owner.reader, _DecodingReader):
        owner.reader = _DecodingReader(owner.reader)
    return dataset


class DeviceAugmentLoader:
    """The device stage around a loader of uint8 batches (``tensor_collate``, or ``fast_collate`` for Pillow
    on CUDA): each batch moved to ``device`` (pinned memory, no wait), RandAugment applied per sample from
    the worker-drawn parameters where the batch has them, then timm's prefetcher's work: normalisation and
    random erasing, done when the batch is handed on (not one batch ahead), so the random state a
    mid-epoch save keeps is the next step's. Yields ``(float images, targets)``; on the CPU it runs in the
    training process."""

    def __init__(self, loader, mean, std, device: torch.device, re_prob: float = 0.0, re_mode: str = 'pixel',
                 re_count: int = 1):
        self.loader, self.device = loader, torch.device(device)
        self.mean = torch.tensor([255 * m for m in mean], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor([255 * s for s in std], device=self.device).view(1, 3, 1, 1)
        self.random_erasing = RandomErasing(probability=re_prob, mode=re_mode, max_count=re_count,
                                            device=self.device) if re_prob > 0 else None

    def __iter__(self):
        for images, targets, *params in self.loader:
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            if params:
                images = apply_rand_augment(images, params[0])   # its parameters stay on the CPU
            images = images.float().sub_(self.mean).div_(self.std)
            if self.random_erasing is not None:
                images = self.random_erasing(images)
            yield images, targets

    def __len__(self):
        return len(self.loader)

    @property
    def sampler(self):
        return self.loader.sampler

    @property
    def dataset(self):
        return self.loader.dataset
