"""mixpro.tensor_augment against timm's own Pillow RandAugment: same draws, same pixels, batched."""
import math
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment

from mixpro import augment  # noqa: F401  posterize(bits <= 0) gives black, as in training
from mixpro.tensor_augment import (APPLIED, ARG, GEOMETRIC, OP, OP_ID, OP_NAMES, PARAMS_WIDTH, RESAMPLE,
                                   RandAugmentParams, apply_rand_augment, is_supported, unsupported_reason)

RECIPE = 'rand-m9-mstd0.5-inc1'  # every ImageNet recipe here
HPARAMS = dict(img_mean=(124, 116, 104), translate_const=28)  # what timm's factory passes, for a 64 px crop
NEAREST, BILINEAR, BICUBIC = 0, 2, 3

# Mean |difference| in grey levels allowed against Pillow, per op class. Measured on x86-64
# (Pillow 13.0, this machine): 0 for every op, magnitude and resample filter (tests below hold
# the max too).
# - Integer lookup tables (Invert, Posterize*, Solarize*, SolarizeAdd, Equalize): the LUTs are
#   Pillow's integer formulas, nothing can round differently -> exact.
# - Float arithmetic (AutoContrast's float64 LUT, Image.blend's float32 a + f * (b - a) for Color,
#   Contrast, Brightness, Sharpness, Desaturate, the SMOOTH filter's float32 sums, the affine ops'
#   float64 coordinates and bilinear / bicubic samplers): the same operations in the same order
#   give the same bits, and do here. The slack covers a Pillow built to fuse a * b + c into one FMA
#   (compilers do by default on aarch64): a value sitting on an integer can then truncate one lower,
#   at a few pixels -> at most 1 level, on under 1 % of pixels.
EXACT_OPS = {'Invert', 'Posterize', 'PosterizeIncreasing', 'PosterizeOriginal', 'Solarize',
             'SolarizeIncreasing', 'SolarizeAdd', 'Equalize'}
FLOAT_OP_BOUND = 0.01


def mean_bound(name):
    return 0.0 if name in EXACT_OPS else FLOAT_OP_BOUND


def natural_image(height=64, width=64, seed=0):
    """Gradients, ripples, sensor-like noise and two solid shapes: every grey level busy."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 40 + 150 * xx / width + 30 * np.sin(yy / 5)
    g = 200 - 120 * yy / height + 20 * np.cos(xx / 7)
    b = 100 + 60 * np.sin((xx + yy) / 9)
    img = np.stack([r, g, b], -1) + rng.normal(0, 12, (height, width, 3))
    img[height // 6:height // 2, width // 2:width * 7 // 8] = (230, 40, 60)
    img[((yy - 0.7 * height) ** 2 + (xx - 0.3 * width) ** 2) < (height / 6) ** 2] = (20, 30, 200)
    return np.clip(img, 0, 255).round().astype(np.uint8)


def flat_image(height=48, width=56):
    """Large flat regions (a background, white and black blocks) and hard edges, not square."""
    img = np.empty((height, width, 3), np.uint8)
    img[:] = (90, 160, 30)
    img[5:20, 5:40] = 250
    img[25:, :20] = 0
    return img


IMAGES = {'natural': natural_image(), 'flat': flat_image()}


def to_tensor(img):
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).contiguous()


def to_array(t):
    return t.permute(1, 2, 0).numpy()


def single_op(name, magnitude, resample=BICUBIC, prob=1.0):
    """timm's RandAugment with one op (one layer): its draws are that op's only."""
    hparams = dict(HPARAMS, magnitude_std=0, interpolation=resample)
    return auto_augment.RandAugment([auto_augment.AugmentOp(name, prob, magnitude, hparams)], 1)


def both(rand_augment, img, seed):
    """(Pillow output of timm's transform, our params and output), from the same seeded RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    params = RandAugmentParams(rand_augment)()
    random.seed(seed)
    np.random.seed(seed)
    reference = np.asarray(rand_augment(Image.fromarray(img)))
    ours = to_array(apply_rand_augment(to_tensor(img)[None], params[None])[0])
    return reference, params, ours


# ---------------------------------------------------------------------------------------------
# (a) each op against Pillow at low, middle and top magnitude


def _op_cases():
    for name in OP_NAMES:
        for resample in (NEAREST, BILINEAR, BICUBIC) if name in GEOMETRIC else (BICUBIC,):
            yield pytest.param(name, resample, id=f'{name}-{resample}' if name in GEOMETRIC else name)


@pytest.mark.parametrize('name, resample', list(_op_cases()))
def test_each_op_matches_pillow(name, resample):
    signs = set()
    for magnitude in (0, 5, 10):
        for seed in (0, 1):  # seed 0 flips the sign of a signed argument, seed 1 does not
            for label, img in IMAGES.items():
                reference, params, ours = both(single_op(name, magnitude, resample), img, seed)
                diff = np.abs(ours.astype(np.int16) - reference.astype(np.int16))
                where = f'{name} m{magnitude} resample {resample} seed {seed} {label} arg {params[0, ARG].item()}'
                assert diff.mean() <= mean_bound(name), where
                assert diff.max() <= (0 if name in EXACT_OPS else 1), where
                signs.add(math.copysign(1, params[0, ARG].item()))
    if name in ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'TranslateXRel', 'TranslateYRel'):
        assert signs == {1, -1}  # both directions were compared


def test_posterize_to_zero_bits_is_black():
    """PosterizeIncreasing at magnitude 10 keeps 0 bits: black, as mixpro.augment makes Pillow 13 do."""
    reference, params, ours = both(single_op('PosterizeIncreasing', 10), IMAGES['natural'], 0)
    assert params[0, ARG] == 0
    assert ours.max() == 0 and np.array_equal(ours, reference)


def test_fill_and_outside_pixels_follow_pillow():
    """A translation by half the width: the uncovered half is exactly the fill colour."""
    reference, params, ours = both(single_op('TranslateXRel', 10, BILINEAR), IMAGES['flat'], 1)
    assert params[0, ARG] == pytest.approx(0.45)  # seed 1: no sign flip, content moves left
    assert (ours[:, -20:] == HPARAMS['img_mean']).all()
    assert np.array_equal(ours, reference)


# ---------------------------------------------------------------------------------------------
# (b) draw for draw: timm's RandAugment and RandAugmentParams make the same random calls


def record_timm(monkeypatch, rand_augment):
    """Make timm's ops log every call: op name, whether it ran, its arguments and chosen resample."""
    log = []
    call = auto_augment.AugmentOp.__call__

    def logged_call(self, img):
        log.append(dict(name=self.name, applied=False, args=(), resample=-1))
        return call(self, img)

    def logged_fn(fn):
        def run(img, *args, **kwargs):
            log[-1].update(applied=True, args=args)
            return fn(img, *args, **kwargs)
        return run

    interpolation = auto_augment._interpolation

    def logged_interpolation(kwargs):
        log[-1]['resample'] = int(interpolation(kwargs))
        return log[-1]['resample']

    monkeypatch.setattr(auto_augment.AugmentOp, '__call__', logged_call)
    monkeypatch.setattr(auto_augment, '_interpolation', logged_interpolation)
    for op in rand_augment.ops:
        op.aug_fn = logged_fn(op.aug_fn)
    return log


@pytest.mark.parametrize('config, hparams', [
    (RECIPE, HPARAMS),  # resample drawn: bilinear or bicubic
    ('rand-m9-mstd0.5', dict(HPARAMS, interpolation=BICUBIC)),  # fixed resample: no choice drawn
    ('rand-m8-n3-mstd101-p0.7', HPARAMS),  # mstd > 100: uniform magnitude
    ('rand-m7-mstd1-mmax15-tweights', HPARAMS),  # weighted choice without replacement, clip at 15
])
def test_draws_match_timm_draw_for_draw(monkeypatch, config, hparams):
    rand_augment = auto_augment.rand_augment_transform(config, dict(hparams))
    sampler = RandAugmentParams(rand_augment)
    log = record_timm(monkeypatch, rand_augment)
    img = Image.fromarray(IMAGES['natural'][:8, :8])  # tiny: only the draws matter here
    random.seed(5)
    np.random.seed(5)
    timm_states = []
    for _ in range(300):
        rand_augment(img)
        timm_states.append((random.getstate(), np.random.get_state()[1][:8].tolist(), np.random.get_state()[2]))
    random.seed(5)
    np.random.seed(5)
    ours = []
    for i in range(300):
        ours.extend(sampler().tolist())
        # the same RNG position after every image: a resumed loader draws the same next image
        assert (random.getstate(), np.random.get_state()[1][:8].tolist(), np.random.get_state()[2]) == timm_states[i]
    assert len(ours) == len(log) == 300 * rand_augment.num_layers
    for row, timm_call in zip(ours, log):
        assert OP_NAMES[int(row[OP])] == timm_call['name']
        assert bool(row[APPLIED]) == timm_call['applied']
        assert row[ARG] == (timm_call['args'][0] if timm_call['args'] else 0.0)
        assert int(row[RESAMPLE]) == timm_call['resample']
    assert 0 < sum(c['applied'] for c in log) < len(log)


# ---------------------------------------------------------------------------------------------
# (c) the distributions of rand-m9-mstd0.5-inc1 over many draws


def test_recipe_distributions():
    sampler = RandAugmentParams.from_string(RECIPE, HPARAMS)
    random.seed(0)
    np.random.seed(0)
    rows = torch.cat([sampler() for _ in range(20000)])  # 40000 layers
    ops, applied, arg = rows[:, OP].long(), rows[:, APPLIED] > 0, rows[:, ARG]
    names = auto_augment._RAND_INCREASING_TRANSFORMS
    assert set(OP_NAMES[i] for i in ops.tolist()) == set(names)
    # 15 ops drawn uniformly with replacement: 1/15 each (binomial sd 0.0012 at n=40000: 5 sd)
    freq = torch.bincount(ops, minlength=len(OP_NAMES)).double() / len(ops)
    for name in names:
        assert abs(freq[OP_ID[name]].item() - 1 / 15) < 0.006, name
    assert abs(applied.double().mean().item() - 0.5) < 0.0125  # p=0.5, 5 sd
    # magnitude: N(9, 0.5) clipped to [0, 10], read back from ops whose argument is linear in it
    per_unit = {'Rotate': 3.0, 'ShearX': 0.03, 'ShearY': 0.03, 'TranslateXRel': 0.045, 'TranslateYRel': 0.045}
    linear = torch.zeros_like(applied)
    magnitude = torch.zeros_like(arg)
    for name, unit in per_unit.items():
        chosen = applied & (ops == OP_ID[name])
        linear |= chosen
        magnitude[chosen] = arg[chosen].abs() / unit
    m = magnitude[linear]
    assert len(m) > 5000
    assert m.min() >= 0 and m.max() <= 10 + 1e-9
    assert abs(m.mean().item() - 8.996) < 0.03  # mean of the clipped normal; sd of the mean 0.007
    assert abs(m.std().item() - 0.49) < 0.02
    assert abs((m >= 10 - 1e-9).double().mean().item() - 0.0228) < 0.006  # P(N(9, .5) > 10)
    # the sign flip and the resample choice: fair coins
    signed = arg[linear]
    assert abs((signed < 0).double().mean().item() - 0.5) < 0.03
    geometric = applied & torch.isin(ops, torch.tensor([OP_ID[n] for n in GEOMETRIC]))
    resample = rows[geometric, RESAMPLE]
    assert set(resample.tolist()) == {BILINEAR, BICUBIC}
    assert abs((resample == BICUBIC).double().mean().item() - 0.5) < 0.03


# ---------------------------------------------------------------------------------------------
# (d) batched application: per-sample ops, same result as one sample at a time


def drawn_batch(seed, height, width, count=64):
    """``count`` natural images and their RandAugment parameters, drawn from seeded RNGs."""
    sampler = RandAugmentParams.from_string('rand-m9-mstd0.5-inc1-p0.9', HPARAMS)
    random.seed(seed)
    np.random.seed(seed)
    params = torch.stack([sampler() for _ in range(count)])
    return torch.stack([to_tensor(natural_image(height, width, seed=i)) for i in range(count)]), params


def test_batch_equals_one_at_a_time():
    images, params = drawn_batch(3, 20, 24)
    batched = apply_rand_augment(images, params)
    singles = torch.cat([apply_rand_augment(images[i:i + 1], params[i:i + 1]) for i in range(64)])
    assert torch.equal(batched, singles)
    assert batched.dtype == torch.uint8 and batched.shape == images.shape
    # different samples really got different ops (and filters): one batch held many combinations
    applied = params[:, :, APPLIED] > 0
    layers = {tuple(row) for row in (params[:, :, [OP, RESAMPLE]] * applied.unsqueeze(2)).flatten(1).tolist()}
    assert len(layers) > 40
    assert len(set(params[applied][:, OP].long().tolist())) >= 12
    assert (batched != images).flatten(1).any(1).sum() > 50


def test_whole_recipe_matches_pillow_image_by_image():
    """The recipe as training runs it, two layers per image, against timm's transform."""
    rand_augment = auto_augment.rand_augment_transform(RECIPE, dict(HPARAMS))
    worst = 0.0
    for seed in range(40):
        img = IMAGES['natural'] if seed % 2 else IMAGES['flat']
        reference, _, ours = both(rand_augment, img, seed)
        worst = max(worst, np.abs(ours.astype(np.int16) - reference.astype(np.int16)).mean())
    assert worst <= FLOAT_OP_BOUND


def test_skipped_layers_leave_the_image_alone():
    params = RandAugmentParams.from_string('rand-m9-p0.0', HPARAMS)  # p=0: every layer skipped
    random.seed(0)
    np.random.seed(0)
    batch = torch.stack([params() for _ in range(8)])
    assert (batch[:, :, APPLIED] == 0).all()
    images = torch.stack([to_tensor(IMAGES['natural'])] * 8)
    assert torch.equal(apply_rand_augment(images, batch), images)


# ---------------------------------------------------------------------------------------------
# (e) inputs, and which policies run on the device


@pytest.mark.parametrize('dtype', [torch.float32, torch.int32, torch.float16])
def test_rejects_non_uint8_images(dtype):
    params = torch.zeros(2, 2, PARAMS_WIDTH, dtype=torch.float64)
    with pytest.raises(ValueError, match=str(dtype)):
        apply_rand_augment(torch.zeros(2, 3, 8, 8, dtype=dtype, device='cpu'), params)


def test_rejects_mismatched_params():
    with pytest.raises(ValueError, match='params must be'):
        apply_rand_augment(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(3, 2, PARAMS_WIDTH))


def test_which_policies_run_on_the_device():
    assert is_supported(RECIPE, HPARAMS)
    assert is_supported('rand-m9-mstd0.5-inc1')  # timm's default hparams
    assert is_supported('rand-m9-n3-tweights', dict(HPARAMS, interpolation=NEAREST))
    assert 'GaussianBlur' in unsupported_reason('rand-m9-t3a', HPARAMS)  # 3-Augment's blur: Pillow only
    assert 'only RandAugment' in unsupported_reason('augmix-m5-w4', HPARAMS)
    assert 'only RandAugment' in unsupported_reason('v0', HPARAMS)
    assert 'cannot parse' in unsupported_reason('rand-m9-q7', HPARAMS)
    lanczos = dict(HPARAMS, interpolation=int(Image.Resampling.LANCZOS))
    assert 'resample' in unsupported_reason(RECIPE, lanczos)
    with pytest.raises(ValueError, match='GaussianBlur'):
        RandAugmentParams.from_string('rand-m9-t3a', HPARAMS)
    hparams = dict(HPARAMS)
    RandAugmentParams.from_string('rand-m9-mstd0.5', hparams)
    assert hparams == HPARAMS  # timm's parser writes magnitude_std into its dict: ours is a copy


def test_params_shape_and_columns():
    params = RandAugmentParams.from_string('rand-m9-n3-mstd0.5-inc1', HPARAMS)()
    assert params.shape == (3, PARAMS_WIDTH) and params.dtype == torch.float64
    assert (params[:, 4:7] == torch.tensor(HPARAMS['img_mean'], dtype=torch.float64)).all()


def test_sampler_pickles_for_spawned_workers():
    """forkserver / spawn workers get the dataset's transforms by pickle: the sampler must survive it
    and keep drawing the same."""
    sampler = RandAugmentParams.from_string(RECIPE, HPARAMS)
    copy = pickle.loads(pickle.dumps(sampler))
    random.seed(9)
    np.random.seed(9)
    first = torch.stack([sampler() for _ in range(50)])
    random.seed(9)
    np.random.seed(9)
    assert torch.equal(first, torch.stack([copy() for _ in range(50)]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_equals_cpu():
    images, params = drawn_batch(4, 64, 64)
    assert torch.equal(apply_rand_augment(images.cuda(), params).cpu(), apply_rand_augment(images, params))
