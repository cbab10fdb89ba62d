"""The tensor data backend (mixpro/tensor_data.py) against timm's Pillow pipeline: same pixels from the
decoders, same random draws and near-equal pixels from the transforms, unreadable files handled as today."""
import io
import logging
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import ImageDataset, create_dataset, create_transform
from timm.data import transforms as timm_transforms
from timm.data.transforms import RandomResizedCropAndInterpolation
from timm.data.transforms_factory import transforms_imagenet_train

from mixpro import tensor_data
from mixpro.skipped import UNREADABLE, MeasuredSamples, measured, name_skipped_files
from mixpro.tensor_data import (TensorEvalTransform, TensorTrainTransform, decode_image, read_as_tensors,
                                tensor_collate)

# torchvision 0.29 deprecates its decoders in favour of TorchCodec; they still work
pytestmark = pytest.mark.filterwarnings('ignore:The image decoding and encoding capabilities:DeprecationWarning')


def photo(width=160, height=120, seed=0) -> Image.Image:
    """A photo-like RGB image: smooth colour gradients, soft blobs, edges and sensor noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([80 + 100 * xx / width, 60 + 120 * yy / height, 140 - 60 * (xx + yy) / (width + height)], -1)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(8, 40)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
        image += blob * rng.uniform(-90, 90, 3)
    image[height // 3:height // 2, width // 5:width // 2] += 50   # a hard-edged rectangle
    image += rng.normal(0, 6, image.shape)
    return Image.fromarray(image.clip(0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt='JPEG', **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def pillow_decode(data: bytes) -> torch.Tensor:
    """What timm's reader gives: Image.open(file).convert('RGB'), as a tensor."""
    return torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert('RGB'))).permute(2, 0, 1)


def mean_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a.float() - b.float()).abs().mean().item()


def seed_all(seed: int) -> None:
    """As SeededSamples seeds a sample."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.mark.parametrize('options', [dict(quality=90), dict(quality=75, subsampling=0),
                                     dict(quality=95, subsampling=1), dict(quality=90, progressive=True)])
def test_jpeg_decode_equals_pillow(options):
    data = encode(photo(), **options)
    image = decode_image(data)
    assert image.dtype == torch.uint8 and image.shape == (3, 120, 160)
    assert torch.equal(image, pillow_decode(data))   # both libjpeg-turbo: the same pixels


@pytest.mark.parametrize('name, data, by_pillow', [
    ('grey JPEG', encode(photo().convert('L')), False),
    ('CMYK JPEG', encode(photo().convert('CMYK')), True),
    ('RGB PNG', encode(photo(), 'PNG'), False),
    ('RGBA PNG', encode(photo().convert('RGBA'), 'PNG'), False),
    ('grey PNG', encode(photo().convert('L'), 'PNG'), False),
    ('palette PNG', encode(photo().convert('P', palette=Image.ADAPTIVE), 'PNG'), True),
    ('1-bit PNG', encode(photo().convert('1'), 'PNG'), True),
    ('16-bit PNG', encode(Image.fromarray(np.array(photo().convert('L'), np.uint16) * 257), 'PNG'), True),
    ('WebP', encode(photo(), 'WEBP', quality=90), True),
    ('GIF', encode(photo(), 'GIF'), True),
    ('BMP', encode(photo(), 'BMP'), True),
])
def test_other_images_decode_as_pillow_does(monkeypatch, name, data, by_pillow):
    used = []
    pillow = tensor_data._decode_with_pillow
    monkeypatch.setattr(tensor_data, '_decode_with_pillow', lambda *a: used.append(1) or pillow(*a))
    image = decode_image(data)
    assert bool(used) == by_pillow, name
    assert image.dtype == torch.uint8 and image.shape == (3, 120, 160)
    assert torch.equal(image, pillow_decode(data)), name   # 16-bit grey: Pillow's clipping, kept


def test_exif_orientation_is_not_applied():
    exif = Image.Exif()
    exif[0x0112] = 6   # "rotate 90° clockwise to display"
    data = encode(photo(), quality=90, exif=exif.tobytes())
    assert torch.equal(decode_image(data), pillow_decode(data))   # (3, 120, 160): stored, not displayed, shape


def test_truncated_jpeg_fails_as_pillow_does():
    data = encode(photo(), quality=90)[:-200]
    with pytest.raises(OSError) as pillow_error:
        pillow_decode(data)
    with pytest.raises(OSError) as error:
        decode_image(data, 'x.jpg')
    assert str(error.value) == str(pillow_error.value)   # "image file is truncated (... bytes not processed)"


def test_undecodable_file_is_named():
    with pytest.raises(OSError, match=r"cannot identify image file '/data/a/b\.jpg'"):
        decode_image(b'\xff\xd8\xff' + b'not a jpeg' * 20, '/data/a/b.jpg')   # torch refuses, then Pillow
    with pytest.raises(OSError, match=r"cannot identify image file '/data/a/c\.jpg'"):
        decode_image(b'<html>404</html>', '/data/a/c.jpg')



@pytest.mark.parametrize('interpolation', ['bilinear', 'bicubic'])
def test_crops_resize_as_pillow_does(interpolation):
    """torch's antialiased uint8 resize against Pillow's on random crops, tall ones included (Pillow 13
    resizes those vertically first; the tensor path follows its order)."""
    data = encode(photo(), quality=90)
    pillow, image = Image.open(io.BytesIO(data)).convert('RGB'), decode_image(data)
    mode = timm_transforms.str_to_interp_mode(interpolation)
    pillow_mode = timm_transforms.str_to_pil_interp(interpolation)
    rng = random.Random(0)
    boxes = [(0, 0, 120, 20), (5, 60, 110, 40), (0, 0, 120, 160)] + [
        (rng.randint(0, 60), rng.randint(0, 80), rng.randint(4, 60), rng.randint(4, 80)) for _ in range(40)]
    for top, left, height, width in boxes:
        result = tensor_data._resized_crop(image, top, left, height, width, (48, 64), mode)
        expected = pillow.crop((left, top, left + width, top + height)).resize((64, 48), pillow_mode)
        expected = torch.from_numpy(np.array(expected)).permute(2, 0, 1)
        assert mean_abs(result, expected) < 0.05, (top, left, height, width)
        # ±1 from rounding; a pixel or two at 2 where bicubic enlarges a few rows a dozen times
        assert (result.int() - expected.int()).abs().max() <= 2

def _record(monkeypatch, owner, name, log):
    original = getattr(owner, name)

    def recording(image, *args, **kwargs):
        log.append(args + tuple(kwargs.values()))
        return original(image, *args, **kwargs)
    monkeypatch.setattr(owner, name, recording)


def test_train_transform_draws_as_timm(monkeypatch):
    """Seeded alike, the same box, interpolation and flips as timm's Pillow train transform, and pixels
    within rounding of its."""
    data = encode(photo(), quality=90)
    pillow_tf = create_transform(64, is_training=True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5,
                                 vflip=0.5, color_jitter=None, interpolation='random', use_prefetcher=True)
    tensor_tf = TensorTrainTransform(64, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, vflip=0.5,
                                     interpolation='random')
    pillow_calls, tensor_calls, hflips, vflips = [], [], [], []
    _record(monkeypatch, timm_transforms.F, 'resized_crop', pillow_calls)   # timm's crop: (i, j, h, w, size, interp)
    _record(monkeypatch, tensor_data, '_resized_crop', tensor_calls)
    _record(monkeypatch, timm_transforms.F, 'hflip', hflips)   # torchvision's flip transforms, Pillow or tensor
    _record(monkeypatch, timm_transforms.F, 'vflip', vflips)
    flips_seen = set()
    for seed in range(24):
        seed_all(seed)
        expected = pillow_tf(Image.open(io.BytesIO(data)).convert('RGB'))
        pillow_flips = len(hflips), len(vflips)
        seed_all(seed)
        image, params = tensor_tf(data)
        assert params is None
        i, j, h, w, size, interpolation = tensor_calls[-1]
        assert (i, j, h, w, tuple(size), interpolation) == pillow_calls[-1]   # box, output size, interpolation
        assert (len(hflips), len(vflips)) == (2 * pillow_flips[0], 2 * pillow_flips[1])   # the same flips
        flips_seen.add(pillow_flips)
        hflips.clear(), vflips.clear()
        assert image.shape == expected.shape == (3, 64, 64) and image.dtype == torch.uint8
        assert mean_abs(image, expected) < 0.05
        for dims in ([2], [1]):   # flipped otherwise, the pictures would differ by far more
            assert mean_abs(image.flip(dims), expected) > 1
    assert {call[-1].value for call in pillow_calls} == {'bilinear', 'bicubic'}   # both were drawn
    assert flips_seen == {(0, 0), (0, 1), (1, 0), (1, 1)}

def test_train_transform_calls_timms_crop_sampler(monkeypatch):
    calls = []

    def get_params(img, scale, ratio):
        calls.append((tuple(img.shape), scale, ratio))
        return 10, 20, 50, 70

    monkeypatch.setattr(RandomResizedCropAndInterpolation, 'get_params', staticmethod(get_params))
    data = encode(photo(), quality=90)
    image, _ = TensorTrainTransform(32, scale=(0.3, 0.9), ratio=(0.5, 2.0), hflip=0.)(data)
    assert calls == [((3, 120, 160), (0.3, 0.9), (0.5, 2.0))]
    box = Image.open(io.BytesIO(data)).convert('RGB').crop((20, 10, 90, 60)).resize((32, 32), Image.BILINEAR)
    assert mean_abs(image, torch.from_numpy(np.array(box)).permute(2, 0, 1)) < 0.5


def test_aug_params_drawn_where_randaugment_draws():
    """The parameters are drawn after the crop and flips: from the random state timm's RandAugment sees."""
    data = encode(photo(), quality=90)
    primary, _, _ = transforms_imagenet_train(48, hflip=0.5, vflip=0.5, interpolation='random', separate=True)

    def draw():   # from torch's and python's generators, as timm's augmentations do
        return torch.cat([torch.rand(2, 1), torch.tensor([[random.random()]] * 2)], 1)

    tensor_tf = TensorTrainTransform(48, hflip=0.5, vflip=0.5, interpolation='random', aug_params=draw)
    for seed in range(4):
        seed_all(seed)
        primary(Image.open(io.BytesIO(data)).convert('RGB'))
        expected = draw()
        seed_all(seed)
        _, params = tensor_tf(data)
        assert torch.equal(params, expected)


@pytest.mark.parametrize('size, crop_pct, interpolation', [(64, 0.875, 'bicubic'), (64, 1.0, 'bilinear'),
                                                           (56, 0.9, 'bicubic'), ((3, 48, 48), 0.95, 'bilinear')])
def test_eval_transform_matches_timm(size, crop_pct, interpolation):
    pillow_tf = create_transform(size, is_training=False, crop_pct=crop_pct, interpolation=interpolation,
                                 use_prefetcher=True)
    tensor_tf = TensorEvalTransform(size, crop_pct=crop_pct, interpolation=interpolation)
    for image in (photo(), photo(97, 151, seed=1)):   # landscape and portrait
        data = encode(image, quality=90)
        expected = pillow_tf(Image.open(io.BytesIO(data)).convert('RGB'))
        result = tensor_tf(data)
        assert result.shape == expected.shape and result.dtype == torch.uint8
        assert mean_abs(result, expected) < 0.1
        assert (result.int() - expected.int()).abs().max() <= 1


def test_eval_transform_refuses_what_it_does_not_do():
    with pytest.raises(NotImplementedError):
        TensorEvalTransform((3, 48, 64), crop_pct=0.9)


def test_pillow_images_are_taken_too():
    """torchvision datasets hand over Pillow images (e.g. FashionMNIST's grey ones)."""
    image = photo().convert('L')
    result = TensorEvalTransform(32, crop_pct=1.0)(image)
    assert result.shape == (3, 32, 32)
    assert torch.equal(result[0], result[2])


def test_collate():
    images = [torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8) for _ in range(3)]
    channels_last = images[1].permute(1, 2, 0).contiguous().permute(2, 0, 1)   # as the decoders give
    params = [torch.rand(2, 4) for _ in range(3)]
    batch = [((images[0], params[0]), 1), ((channels_last, params[1]), 2), ((images[2], params[2]), UNREADABLE)]
    x, y, p = tensor_collate(batch)
    assert x.dtype == torch.uint8 and x.shape == (3, 3, 8, 8) and x.is_contiguous()
    assert torch.equal(x, torch.stack(images))
    assert y.dtype == torch.int64 and y.tolist() == [1, 2, -1]
    assert p.shape == (3, 2, 4) and torch.equal(p, torch.stack(params))
    x, y = tensor_collate([((image, None), i) for i, image in enumerate(images)])   # no aug_params
    assert x.shape == (3, 3, 8, 8) and y.tolist() == [0, 1, 2]
    x, y = tensor_collate([(image, i) for i, image in enumerate(images)])           # eval samples
    assert torch.equal(x, torch.stack(images))


@pytest.fixture
def image_folder(tmp_path):
    """train/<class>/ with a truncated and an undecodable file among good ones, sorted between them."""
    for c in range(2):
        folder = tmp_path / 'train' / f'class{c}'
        folder.mkdir(parents=True)
        for i in range(3):
            (folder / f'{i}.jpg').write_bytes(encode(photo(seed=3 * c + i), quality=90))
    (tmp_path / 'train' / 'class0' / '1.jpg').write_bytes(encode(photo(seed=1), quality=90)[:-300])
    (tmp_path / 'train' / 'class1' / '0.jpg').write_bytes(b'<html>not found</html>')
    return tmp_path


@pytest.mark.parametrize('skipped_named_first', [True, False])
def test_image_folder_reads_tensors(image_folder, caplog, skipped_named_first):
    dataset = create_dataset('', root=str(image_folder), split='train', is_training=True)
    if skipped_named_first:
        read_as_tensors(name_skipped_files(dataset))   # image_folder() returns a named dataset
    else:
        name_skipped_files(read_as_tensors(dataset))
    read_as_tensors(dataset)   # a second call changes nothing
    dataset.transform = TensorEvalTransform(32, crop_pct=1.0)
    dataset = pickle.loads(pickle.dumps(dataset))   # as loader workers receive it

    files = dataset.filenames(absolute=True)
    assert [f.split('train/')[1] for f in files] == ['class0/0.jpg', 'class0/1.jpg', 'class0/2.jpg',
                                                     'class1/0.jpg', 'class1/1.jpg', 'class1/2.jpg']
    pillow_eval = create_transform(32, is_training=False, crop_pct=1.0, use_prefetcher=True)
    with caplog.at_level(logging.WARNING, logger='timm.data.dataset'):
        samples = [MeasuredSamples(dataset)[i] for i in range(len(dataset))]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert files[1] in warnings[0] and 'image file is truncated' in warnings[0]
    assert files[3] in warnings[1] and 'cannot identify image file' in warnings[1]
    assert [target for _, target in samples] == [0, UNREADABLE, 0, UNREADABLE, 1, 1]
    for i, (image, _) in enumerate(samples):
        stand_in = {1: 2, 3: 4}.get(i, i)   # the next sample stands in for an unreadable one
        expected = pillow_eval(Image.open(files[stand_in]).convert('RGB'))
        assert mean_abs(image, expected) < 0.1
    assert isinstance(measured(dataset), MeasuredSamples)

    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=tensor_collate)
    images, targets = next(iter(loader))
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.uint8 and targets.tolist() == [0, 0, 0]


def test_image_dataset_with_train_transform(image_folder):
    """timm's ImageDataset built directly, with the train transform and RandAugment-style parameters."""
    dataset = read_as_tensors(ImageDataset(str(image_folder / 'train')))
    dataset.transform = TensorTrainTransform((3, 40, 40), interpolation='random', aug_params=lambda: torch.rand(2, 3))
    batch = tensor_collate([dataset[i] for i in (0, 2, 4)])
    images, targets, params = batch
    assert images.shape == (3, 3, 40, 40) and targets.tolist() == [0, 0, 1] and params.shape == (3, 2, 3)


def test_not_an_image_dataset():
    with pytest.raises(TypeError, match='no timm ImageDataset'):
        read_as_tensors(torch.utils.data.TensorDataset(torch.zeros(2)))
