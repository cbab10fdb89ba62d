import math
import random

import pytest
import torch

from conftest import source_coded_batch
from mixpro import Mixer
from mixpro.mixer import MixerCompileError


def maskmix_step(size, cell, batch=16, seed=0, **kwargs):
    mixer = Mixer('maskmix', num_classes=10, mask_cell=cell, token_size=16, seed=seed, **kwargs)
    x = source_coded_batch(batch, size)
    y = torch.arange(batch) % 10
    mixed, target = mixer(x.clone(), y)
    return mixer, x, mixed, target


@pytest.mark.parametrize('size,cell', [(224, 32), (224, 64), (224, 112), (160, 96)])
def test_every_token_comes_from_one_image(size, cell):
    mixer, x, mixed, _ = maskmix_step(size, cell)
    step = mixer.last
    source = mixed[:, 0] - 1                                   # [B, H, W] index of the source image
    tokens = source.unfold(1, 16, 16).unfold(2, 16, 16)        # [B, h, w, 16, 16]
    per_token_min = tokens.amin(dim=(-1, -2))
    per_token_max = tokens.amax(dim=(-1, -2))
    assert torch.equal(per_token_min, per_token_max), 'a token mixes pixels of two images'
    own = torch.arange(source.shape[0]).view(-1, 1, 1)
    assert torch.all((source == own) | (source == step.partner.view(-1, 1, 1)))


@pytest.mark.parametrize('size,cell', [(224, 32), (224, 64), (224, 112), (160, 96)])
def test_lambda_is_visible_pixel_fraction(size, cell):
    mixer, x, mixed, _ = maskmix_step(size, cell)
    step = mixer.last
    own = torch.arange(x.shape[0]).view(-1, 1, 1)
    shows_own = (mixed[:, 0] - 1) == own
    moved = step.partner != torch.arange(x.shape[0])   # a sample paired with itself shows itself everywhere
    assert moved.any()
    assert torch.allclose(step.lam_area[moved], shows_own[moved].float().mean(dim=(1, 2)), atol=1e-6)
    assert torch.allclose(step.lam_area, step.keep.float().mean(dim=(1, 2, 3)), atol=1e-6)


def test_cropped_grid_counts_cells_per_sample_and_exactly():
    # 224 px with 96-px cells: a 3x3 grid whose last row and column are only 32 px wide
    mixer = Mixer('maskmix', num_classes=10, mask_cell=96, token_size=16, seed=3)
    mixer(source_coded_batch(32, 224), torch.zeros(32, dtype=torch.long))
    step = mixer.last
    cells = step.keep[:, 0, ::96, ::96]                         # one pixel per cell: [B, 3, 3]
    counts = cells.flatten(1).sum(1)
    assert torch.all(counts == counts[0]) and 1 <= counts[0] <= 9   # n = ceil(T*r) for every sample
    assert not torch.all(cells == cells[0]), 'every sample should pick its own cells'
    areas = torch.tensor([96., 96., 32.])
    expected = (cells.float() * areas.view(1, 3, 1) * areas.view(1, 1, 3)).sum((1, 2)) / 224 ** 2
    assert torch.allclose(step.lam_area, expected, atol=1e-6)
    if counts[0] < 9:
        assert not torch.allclose(step.lam_area, counts.float() / 9)


def test_official_cell_count_lambda_option():
    mixer = Mixer('maskmix', num_classes=10, mask_cell=96, token_size=16, maskmix_lam='cells', seed=3)
    mixer(source_coded_batch(8, 224), torch.zeros(8, dtype=torch.long))
    counts = mixer.last.keep[:, 0, ::96, ::96].flatten(1).sum(1).float()
    assert torch.allclose(mixer.last.lam_area, counts / 9)


def test_cell_count_follows_ceil_of_ratio():
    counts = set()
    for seed in range(40):
        mixer, *_ = maskmix_step(64, 16, batch=2, seed=seed)
        counts.add(int(mixer.last.keep[0, 0, ::16, ::16].sum()))
    assert min(counts) >= 1 and max(counts) <= 16 and len(counts) > 5


@pytest.mark.parametrize('cell,token', [(40, 16), (48, 32), (8, 16)])
def test_cell_not_multiple_of_token_is_rejected(cell, token):
    with pytest.raises(ValueError, match=f'mask_cell={cell}.*token_size={token}'):
        Mixer('mixpro', mask_cell=cell, token_size=token)


def test_bad_keywords_name_themselves():
    with pytest.raises(ValueError, match='method'):
        Mixer('mixpr0')
    with pytest.raises(ValueError, match='maskmix_prob'):
        Mixer('mixpro', maskmix_prob=1.5)
    with pytest.raises(ValueError, match='membership'):
        Mixer('transmix', membership='bilinear')


def test_maskmix_images_match_an_independent_composition():
    mixer = Mixer('maskmix', num_classes=10, mask_cell=32, token_size=16, seed=5)
    x = torch.randn(6, 3, 96, 96)
    mixed, _ = mixer(x.clone(), torch.zeros(6, dtype=torch.long))
    keep, partner = mixer.last.keep, mixer.last.partner
    expected = keep * x + (~keep) * x[partner]
    assert torch.equal(mixed, expected)
    assert sorted(partner.tolist()) == list(range(6))     # partners form a permutation
    assert math.isclose(float(keep.float().mean()), float(mixer.last.lam_area.mean()), rel_tol=1e-6)


# ---- the previous implementation, kept here as the reference for the seeded random stream -----------------
class PreviousMixer:
    """The maths of the mixer before the one-pass MaskMix (same host and device random streams): a full
    pixel mask, ``where(keep, x, x[partner])``, pooled token membership, label formulas written out."""

    def __init__(self, method, num_classes, seed, label_smoothing=0.1, mixup_alpha=0.8, cutmix_alpha=1.0,
                 switch_prob=None, maskmix_prob=0.5, mask_cell=64, token_size=16, maskmix_lam='exact',
                 membership='area', pal_smoothing=0.0):
        self.method, self.k, self.smoothing = method, num_classes, label_smoothing
        self.mixup_alpha, self.cutmix_alpha, self.maskmix_prob = mixup_alpha, cutmix_alpha, maskmix_prob
        self.switch_prob = {'transmix': 0.8}.get(method, 0.5) if switch_prob is None else switch_prob
        self.cell, self.token, self.lam_mode, self.membership = mask_cell, token_size, maskmix_lam, membership
        self.pal_smoothing = pal_smoothing
        self.rng, self.gen = random.Random(seed), torch.Generator().manual_seed(seed)

    def target(self, y, yp, lam, smoothing):
        off, on = smoothing / self.k, 1.0 - smoothing + smoothing / self.k
        own = torch.full((len(y), self.k), off).scatter_(1, y.view(-1, 1), on)
        other = torch.full((len(y), self.k), off).scatter_(1, yp.view(-1, 1), on)
        return own * lam.view(-1, 1) + other * (1.0 - lam.view(-1, 1))

    def __call__(self, x, y):
        rng, (b, _, h, w) = self.rng, x.shape
        rng.random()   # mix_prob draw
        if self.method == 'maskmix' or (self.method == 'mixpro' and rng.random() < self.maskmix_prob):
            kind = 'maskmix'
        else:
            kind = 'cutmix' if rng.random() < self.switch_prob else 'mixup'
        partner, lam_area, keep = torch.arange(b - 1, -1, -1), torch.ones(b), None
        if kind == 'mixup':
            lam = rng.betavariate(self.mixup_alpha, self.mixup_alpha)
            other = x.flip(0).mul_(1.0 - lam)
            x.mul_(lam).add_(other)
            lam_area.fill_(lam)
        elif kind == 'cutmix':
            lam = rng.betavariate(self.cutmix_alpha, self.cutmix_alpha)
            ratio = math.sqrt(1.0 - lam)
            ch, cw = int(h * ratio), int(w * ratio)
            cy, cx = rng.randrange(h), rng.randrange(w)
            y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
            x[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
            lam_area.fill_(1.0 - (y1 - y0) * (x1 - x0) / float(h * w))
            keep = torch.ones(1, 1, h, w, dtype=torch.bool)
            keep[..., y0:y1, x0:x1] = False
        else:
            gh, gw = math.ceil(h / self.cell), math.ceil(w / self.cell)
            n_keep = math.ceil(gh * gw * rng.betavariate(1.0, 1.0))
            scores = torch.rand(b, gh * gw, generator=self.gen)
            cells = torch.zeros(b, gh * gw, dtype=torch.bool).scatter_(1, scores.topk(n_keep, dim=1).indices, True)
            partner = torch.randperm(b, generator=self.gen)
            keep = cells.view(b, gh, 1, gw, 1).expand(b, gh, self.cell, gw, self.cell)
            keep = keep.reshape(b, gh * self.cell, gw * self.cell)[:, None, :h, :w]
            torch.where(keep, x, x[partner], out=x)
            if self.lam_mode == 'exact':
                rows = (h - self.cell * torch.arange(gh)).clamp(max=self.cell).float()
                cols = (w - self.cell * torch.arange(gw)).clamp(max=self.cell).float()
                lam_area = cells.float() @ ((rows[:, None] * cols[None, :]).flatten() / float(h * w))
            else:
                lam_area = torch.full((b,), n_keep / (gh * gw))
        self.last = dict(kind=kind, y=y, partner=partner, lam_area=lam_area, keep=keep,
                         target=self.target(y, y[partner], lam_area, self.smoothing))
        return x, self.last['target']

    def relabel(self, logits, attention):
        s = self.last
        if s['kind'] == 'mixup' or (s['kind'] == 'cutmix' and self.method != 'transmix') or \
                (s['kind'] == 'maskmix' and self.method != 'mixpro'):
            return s['target']
        keep = s['keep'].float()
        if self.membership == 'area':
            m = torch.nn.functional.avg_pool2d(keep, self.token).flatten(1)
        else:
            m = torch.nn.functional.interpolate(keep, size=(keep.shape[-2] // self.token, keep.shape[-1] // self.token),
                                                mode='nearest').flatten(1)
        s['lam_attn'] = (m * attention).sum(1) / attention.sum(1).clamp_min(1e-12)
        yp = s['y'][s['partner']]
        if s['kind'] == 'cutmix':
            return self.target(s['y'], yp, 0.5 * (s['lam_area'] + s['lam_attn']), self.smoothing)
        alpha = torch.nn.functional.cosine_similarity(logits.float().softmax(1), s['target'], dim=1)
        s['alpha'] = alpha
        lam = alpha * s['lam_attn'] + (1.0 - alpha) * s['lam_area']
        return self.target(s['y'], yp, lam, self.pal_smoothing)


@pytest.mark.parametrize('method,size,cell,token,kwargs', [
    ('mixpro', 64, 16, 16, {}),                                    # whole cells, mixed with CutMix/Mixup steps
    ('mixpro', 80, 32, 16, dict(label_smoothing=0.0, pal_smoothing=0.1)),   # cropped border cells (16-px blocks)
    ('maskmix', 72, 32, 8, dict(maskmix_lam='cells')),             # 8-px blocks, official cell-count lambda
    ('mixpro', 96, 48, 16, dict(membership='nearest', maskmix_prob=1.0)),
    ('transmix', 64, 64, 16, {}),
])
@pytest.mark.parametrize('in_place', [True, False], ids=['cpu_copy', 'one_gather'])
def test_same_seed_gives_the_previous_implementation_s_masks_partners_and_targets(method, size, cell, token, kwargs,
                                                                               in_place, monkeypatch):
    """Masks, partners, images, lam_area and lam_attn bit for bit; targets and PAL's alpha within float
    rounding (they are now summed in fewer operations). Except where the permutation pairs a sample with
    itself: that image is unchanged, so its keep mask is now all True and lam_area / lam_attn are exactly 1
    (the old code counted its cells). Both compositions: the CPU's in-place copy and the accelerators' one
    gather (run here on the CPU)."""
    monkeypatch.setattr(Mixer, 'cpu_in_place', in_place)
    new = Mixer(method, num_classes=10, mask_cell=cell, token_size=token, seed=3, **kwargs)
    old = PreviousMixer(method, 10, seed=3, mask_cell=cell, token_size=token, **kwargs)
    gen = torch.Generator().manual_seed(0)
    tokens = (size // token) ** 2
    kinds, self_pairs = set(), 0
    for _ in range(12):
        x = torch.randn(16, 3, size, size, generator=gen)
        y = torch.randint(0, 10, (16,), generator=gen)
        logits, attention = torch.randn(16, 10, generator=gen), torch.rand(16, tokens, generator=gen)
        mixed_new, target_new = new(x.clone(), y)
        mixed_old, target_old = old(x.clone(), y)
        step, ref = new.last, old.last
        kinds.add(step.kind)
        assert step.kind == ref['kind']
        assert torch.equal(step.partner, ref['partner'])
        assert torch.equal(mixed_new, mixed_old)
        moved = step.partner != torch.arange(16)
        self_pairs += int((~moved).sum()) if step.kind == 'maskmix' else 0
        same = moved if step.kind == 'maskmix' else torch.ones(16, dtype=torch.bool)
        assert torch.equal(step.lam_area[same], ref['lam_area'][same])
        assert torch.allclose(target_new, target_old, atol=1e-6, rtol=0)
        assert (step.keep is None) == (step.kind == 'mixup' or (step.kind == 'cutmix' and method != 'transmix'))
        if step.keep is not None:
            keep_old = ref['keep'].clone()
            if step.kind == 'maskmix':
                keep_old[~same] = True
            assert torch.equal(step.keep, keep_old)
        final_new = new.relabel(logits, attention if new.needs_attention else None)
        final_old = old.relabel(logits, attention)
        assert torch.allclose(final_new, final_old, atol=1e-6, rtol=0)
        if step.lam_attn is not None:
            assert torch.equal(step.lam_attn[same], ref['lam_attn'][same])
            assert torch.all(step.lam_attn[~same] == 1.0)
        if step.alpha is not None:
            assert torch.allclose(step.alpha[same], ref['alpha'][same], atol=1e-6, rtol=0)
    only_maskmix = method == 'maskmix' or kwargs.get('maskmix_prob') == 1.0
    assert kinds == {'maskmix'} if only_maskmix else len(kinds) >= 2
    if 'maskmix' in kinds:
        assert self_pairs > 0, 'the check should meet a sample paired with itself'


def test_a_sample_paired_with_itself_is_whole_and_labelled_as_itself():
    for seed in range(20):
        mixer = Mixer('mixpro', num_classes=10, maskmix_prob=1.0, mask_cell=16, token_size=16, seed=seed,
                      label_smoothing=0.1)
        x, y = source_coded_batch(4, 64), torch.tensor([1, 2, 3, 4])
        mixed, target = mixer(x.clone(), y)
        step = mixer.last
        alone = step.partner == torch.arange(4)
        if not alone.any() or alone.all():
            continue
        assert torch.equal(mixed[alone], x[alone])                       # the image is unchanged
        assert torch.all(step.lam_area[alone] == 1.0)
        assert torch.all(step.keep[alone])
        smoothed = torch.full((4, 10), 0.01).scatter_(1, y.view(-1, 1), 0.91)
        assert torch.allclose(target[alone], smoothed[alone], atol=1e-7)
        final = mixer.relabel(torch.randn(4, 10), torch.rand(4, 16))
        assert torch.all(step.lam_attn[alone] == 1.0)
        assert torch.allclose(final[alone], torch.nn.functional.one_hot(y, 10).float()[alone], atol=1e-6)
        moved = ~alone                                                    # the others still mix
        assert torch.all(step.lam_area[moved] < 1.0) or step.keep[moved].all()
        return
    pytest.fail('no seed paired one sample with itself')


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize('size,cell', [(64, 16), (80, 32), (72, 32), (30, 8)])
def test_one_pass_and_in_place_compositions_equal_where(size, cell, dtype):
    # the accelerator path (one gather into a new tensor or a buffer) and the CPU path (in place) give the
    # where() composition
    from mixpro.masks import CellGeometry, cells_to_pixels, maskmix_cells, mix_cells, mix_cells_in_place
    gen = torch.Generator().manual_seed(1)
    geometry = CellGeometry(6, size, size + cell // 2, cell, 'cpu')
    cells = maskmix_cells(6, geometry.grid, 3, gen)
    partner = torch.randperm(6, generator=gen)
    x = (torch.rand(6, 3, size, size + cell // 2, generator=gen) * 200).to(dtype)
    keep = cells_to_pixels(cells, cell, size, size + cell // 2)
    expected = torch.where(keep, x, x[partner])
    before = x.clone()
    assert torch.equal(mix_cells(x, cells, partner, geometry), expected)
    buffer = torch.empty_like(x)
    assert mix_cells(x, cells, partner, geometry, out=buffer) is buffer and torch.equal(buffer, expected)
    assert torch.equal(x, before), 'x itself is not written'
    strided = x.transpose(-1, -2).contiguous().transpose(-1, -2)          # a non-contiguous batch
    assert torch.equal(mix_cells(strided, cells, partner, geometry), expected)
    assert mix_cells_in_place(strided, cells, partner, geometry) is strided and torch.equal(strided, expected)
    assert mix_cells_in_place(x, cells, partner, geometry) is x and torch.equal(x, expected)
    kept = torch.ones_like(cells)                                         # nothing to take: unchanged
    assert torch.equal(mix_cells_in_place(before.clone(), kept, partner, geometry), before)


@pytest.mark.parametrize('lam_mode', ['exact', 'cells'])
def test_the_compiled_mixer_gives_the_eager_one_s_images_and_labels(lam_mode):
    """--compile-mixer traces MaskMix's composition and the PAL label whole (fullgraph: a graph break is an
    error). aot_eager runs the traced graphs without a C++ compiler: equal bit for bit."""
    graphs = []

    def aot_eager_counted(graph, inputs):
        graphs.append(graph)
        return torch._dynamo.lookup_backend('aot_eager')(graph, inputs)

    kwargs = dict(num_classes=10, mask_cell=16, token_size=8, maskmix_lam=lam_mode, seed=5, label_smoothing=0.1)
    eager, compiled = Mixer('mixpro', **kwargs), Mixer('mixpro', compile_backend=aot_eager_counted, **kwargs)
    # the accelerators' composition, the one that compiles (the CPU's in-place copy syncs: it stays eager)
    eager.cpu_in_place = compiled.cpu_in_place = False
    gen = torch.Generator().manual_seed(1)
    kinds = set()
    for _ in range(8):
        x, y = torch.randn(6, 3, 40, 40, generator=gen), torch.randint(0, 10, (6,), generator=gen)
        logits, attention = torch.randn(6, 10, generator=gen), torch.rand(6, 25, generator=gen)
        (mixed_e, area_e), (mixed_c, area_c) = eager(x.clone(), y), compiled(x.clone(), y)
        kinds.add(compiled.last.kind)
        assert torch.equal(mixed_c, mixed_e) and torch.equal(area_c, area_e)
        assert torch.equal(compiled.last.lam_area, eager.last.lam_area)
        final_e = eager.relabel(logits, attention if eager.needs_attention else None)
        final_c = compiled.relabel(logits, attention if compiled.needs_attention else None)
        assert torch.equal(final_c, final_e)
        if compiled.last.kind == 'maskmix':
            assert torch.equal(compiled.last.lam_attn, eager.last.lam_attn)
            assert torch.equal(compiled.last.alpha, eager.last.alpha)
    assert 'maskmix' in kinds and len(kinds) >= 2
    assert len(graphs) == 2   # the composition and the PAL label, each traced once for this batch shape


def test_an_unknown_compile_backend_is_named():
    with pytest.raises(ValueError, match="compile_backend 'nope'"):
        Mixer('mixpro', compile_backend='nope')


@pytest.mark.slow
def test_a_compiler_that_fails_is_one_error_naming_the_option():
    def broken_compiler(graph, inputs):
        raise RuntimeError('no C++ compiler found')
    mixer = Mixer('maskmix', num_classes=10, mask_cell=8, token_size=8, compile_backend=broken_compiler)
    mixer.cpu_in_place = False
    with pytest.raises(MixerCompileError, match='could not compile compose_maskmix') as err:
        mixer(torch.randn(4, 3, 16, 16), torch.arange(4))
    assert '--compile-mixer' in str(err.value) and 'no C++ compiler found' in str(err.value)


@pytest.mark.slow
def test_the_compiled_mixer_takes_any_batch_size():
    """dynamo's recompile limit is a hard error under fullgraph: sizes must not each cost a graph."""
    mixer = Mixer('mixpro', num_classes=10, mask_cell=8, token_size=8, maskmix_prob=1.0, compile_backend='eager')
    mixer.cpu_in_place = False
    for batch in range(2, 14):
        mixed, _ = mixer(torch.randn(batch, 3, 16, 16), torch.arange(batch) % 10)
        mixer.relabel(torch.randn(batch, 10), torch.rand(batch, 4))
        assert mixed.shape[0] == batch


@pytest.mark.skipif(not torch.cuda.is_available(), reason='inductor on the GPU: CUDA only')
def test_the_inductor_compiled_mixer_on_cuda_matches_the_eager_one():
    kwargs = dict(num_classes=1000, seed=5, label_smoothing=0.1, maskmix_prob=1.0)
    eager, compiled = Mixer('mixpro', **kwargs), Mixer('mixpro', compile_backend='inductor', **kwargs)
    gen = torch.Generator(device='cuda').manual_seed(1)
    for _ in range(3):
        x = torch.randn(64, 3, 224, 224, device='cuda', generator=gen)
        y = torch.randint(0, 1000, (64,), device='cuda', generator=gen)
        logits = torch.randn(64, 1000, device='cuda', generator=gen)
        attention = torch.rand(64, 196, device='cuda', generator=gen)
        (mixed_e, area_e), (mixed_c, area_c) = eager(x, y), compiled(x, y)
        assert torch.equal(mixed_c, mixed_e)
        assert torch.allclose(area_c, area_e, atol=1e-6, rtol=0)
        final_e, final_c = eager.relabel(logits, attention), compiled.relabel(logits, attention)
        assert torch.allclose(final_c, final_e, atol=1e-6, rtol=0)
        assert torch.allclose(compiled.last.lam_attn, eager.last.lam_attn, atol=1e-6, rtol=0)
