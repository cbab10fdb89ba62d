"""Soft targets: area labels, TransMix, PAL, the schedule and reproducibility."""
from collections import Counter

import pytest
import torch
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy

from mixpro import Mixer
from mixpro.targets import pal_lambda

K = 10


def expected_target(labels, partner, lam, smoothing):
    """The formula, written out: lam * smoothed(y) + (1 - lam) * smoothed(y_partner)."""
    off, on = smoothing / K, 1 - smoothing + smoothing / K
    rows = []
    for i in range(len(labels)):
        own = torch.full((K,), off); own[labels[i]] = on
        other = torch.full((K,), off); other[labels[partner[i]]] = on
        rows.append(lam[i] * own + (1 - lam[i]) * other)
    return torch.stack(rows)


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
@pytest.mark.parametrize('method', ['mixup_cutmix', 'maskmix', 'mixpro', 'transmix'])
def test_area_target_rows_follow_the_formula(method, smoothing):
    mixer = Mixer(method, num_classes=K, label_smoothing=smoothing, mask_cell=32, seed=1)
    kinds = set()
    for _ in range(12):
        y = torch.randint(0, K, (8,))
        _, target = mixer(torch.randn(8, 3, 64, 64), y)
        step = mixer.last
        kinds.add(step.kind)
        assert torch.allclose(target, expected_target(y, step.partner, step.lam_area, smoothing), atol=1e-6)
        assert torch.allclose(target.sum(1), torch.ones(8))
    assert kinds == {'maskmix'} if method == 'maskmix' else len(kinds) >= 2


def test_mixup_and_cutmix_steps_match_timm():
    mixer = Mixer('mixup_cutmix', num_classes=K, label_smoothing=0.1, seed=2)
    seen = set()
    for _ in range(10):
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, K, (4,))
        mixed, target = mixer(x.clone(), y)
        step = mixer.last
        seen.add(step.kind)
        lam = float(step.lam_area[0])
        assert torch.allclose(target, mixup_target(y, K, lam, 0.1), atol=1e-6)   # timm pairs i with B-1-i
        if step.kind == 'mixup':
            assert torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
        else:
            pasted = (mixed != x).any(1)                          # [B, H, W] pixels taken from the partner
            assert abs(1 - pasted[0].float().mean() - lam) < 1e-6
    assert seen == {'mixup', 'cutmix'}


def kind_frequencies(method, steps=4000, **kwargs):
    mixer = Mixer(method, num_classes=K, mask_cell=16, token_size=16, seed=7, **kwargs)
    x, y = torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)
    counts = Counter()
    for _ in range(steps):
        mixer(x, y)
        counts[mixer.last.kind] += 1
    return {k: v / steps for k, v in counts.items()}


@pytest.mark.slow
def test_mixpro_schedule_is_half_maskmix_then_cutmix_or_mixup():
    freq = kind_frequencies('mixpro')
    assert freq['maskmix'] == pytest.approx(0.5, abs=0.03)
    assert freq['cutmix'] == pytest.approx(0.25, abs=0.03)
    assert freq['mixup'] == pytest.approx(0.25, abs=0.03)


def test_transmix_schedule_is_eighty_percent_cutmix():
    freq = kind_frequencies('transmix')
    assert freq['cutmix'] == pytest.approx(0.8, abs=0.03)
    assert freq['mixup'] == pytest.approx(0.2, abs=0.03)


def test_mix_prob_and_mixup_enabled_switch_off_mixing():
    assert kind_frequencies('mixpro', steps=2000, mix_prob=0.3)['none'] == pytest.approx(0.7, abs=0.04)
    mixer = Mixer('mixpro', num_classes=K, label_smoothing=0.1, mask_cell=16)
    mixer.mixup_enabled = False
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    for _ in range(5):
        mixed, target = mixer(x.clone(), y)
        assert mixer.last.kind == 'none' and not mixer.needs_attention
        assert torch.equal(mixed, x)
        assert torch.allclose(target, expected_target(y, torch.arange(4), torch.ones(4), 0.1))


def forced_transmix_cutmix(size=64, batch=4, seed=0, **kwargs):
    mixer = Mixer('transmix', num_classes=K, mixup_alpha=0.0, seed=seed, **kwargs)
    y = torch.arange(batch)
    mixer(torch.randn(batch, 3, size, size), y)
    assert mixer.last.kind == 'cutmix' and mixer.needs_attention
    return mixer, y


def test_transmix_label_with_known_attention_and_box():
    for seed in range(5):
        mixer, y = forced_transmix_cutmix(seed=seed, label_smoothing=0.1)
        keep = mixer.last.keep[0, 0]
        attention = torch.rand(4, 16)                       # 4x4 grid of 16-px tokens
        # by hand: each token's share of original pixels, weighted by its attention
        share = torch.tensor([float(keep[16 * r:16 * r + 16, 16 * c:16 * c + 16].float().mean())
                              for r in range(4) for c in range(4)])
        lam_attn = (attention * share).sum(1) / attention.sum(1)
        lam_area = keep.float().mean()
        target = mixer.relabel(torch.randn(4, K), attention)
        lam = (lam_area + lam_attn) / 2
        assert torch.allclose(mixer.last.lam_attn, lam_attn, atol=1e-6)
        assert torch.allclose(target, expected_target(y, mixer.last.partner, lam, 0.1), atol=1e-6)


def test_transmix_label_on_a_box_of_whole_tokens():
    mixer, y = forced_transmix_cutmix(size=32, batch=2)
    keep = torch.ones(1, 1, 32, 32, dtype=torch.bool)
    keep[..., :16, :16] = False                              # the partner shows in token 0 only
    mixer.last.keep, mixer.last.lam_area = keep, torch.full((2,), 0.75)
    attention = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])
    mixer.relabel(torch.zeros(2, K), attention)
    assert torch.allclose(mixer.last.lam_attn, torch.tensor([0.9, 0.6]))


def test_transmix_mixup_steps_keep_the_area_label():
    mixer = Mixer('transmix', num_classes=K, cutmix_alpha=0.0)
    _, target = mixer(torch.randn(4, 3, 32, 32), torch.arange(4))
    assert mixer.last.kind == 'mixup' and not mixer.needs_attention
    assert mixer.relabel(torch.randn(4, K)) is target


def test_relabel_asks_for_attention_and_checks_its_grid():
    mixer, _ = forced_transmix_cutmix()
    with pytest.raises(ValueError, match='probe.enabled'):
        mixer.relabel(torch.randn(4, K), None)
    with pytest.raises(ValueError, match='token_size'):
        mixer.relabel(torch.randn(4, K), torch.rand(4, 64))


def test_pal_limits():
    lam_area, lam_attn = torch.tensor([0.3, 0.6]), torch.tensor([0.9, 0.1])
    y_tilde = torch.tensor([[0.3, 0.7, 0.0], [0.6, 0.0, 0.4]])
    agree = torch.log(y_tilde.clamp_min(1e-30))              # softmax(agree) == y_tilde: alpha = 1
    lam, alpha = pal_lambda(agree, y_tilde, lam_area, lam_attn)
    assert torch.allclose(alpha, torch.ones(2), atol=1e-5) and torch.allclose(lam, lam_attn, atol=1e-5)
    disagree = torch.tensor([[0., 0., 60.], [0., 60., 0.]])  # all mass on a class y_tilde lacks: alpha = 0
    lam, alpha = pal_lambda(disagree, y_tilde, lam_area, lam_attn)
    assert torch.allclose(alpha, torch.zeros(2), atol=1e-5) and torch.allclose(lam, lam_area, atol=1e-5)


def mixpro_maskmix_step(**kwargs):
    mixer = Mixer('mixpro', num_classes=K, maskmix_prob=1.0, mask_cell=16, seed=4, **kwargs)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    mixer(torch.randn(6, 3, 64, 64), y)
    assert mixer.last.kind == 'maskmix' and mixer.needs_attention
    return mixer, y


def test_pal_target_follows_the_formula_without_smoothing_by_default():
    mixer, y = mixpro_maskmix_step(label_smoothing=0.1)
    logits, attention = torch.randn(6, K), torch.rand(6, 16)
    target = mixer.relabel(logits, attention)
    step = mixer.last
    p = logits.softmax(1)
    alpha = (p * step.area_target).sum(1) / (p.norm(dim=1) * step.area_target.norm(dim=1))
    membership = step.keep[:, 0, ::16, ::16].flatten(1).float()
    lam_attn = (membership * attention).sum(1) / attention.sum(1)
    lam = alpha * lam_attn + (1 - alpha) * step.lam_area
    assert torch.allclose(step.alpha, alpha, atol=1e-6)
    assert torch.allclose(target, expected_target(y, step.partner, lam, 0.0), atol=1e-6)
    mixer, y = mixpro_maskmix_step(label_smoothing=0.1, pal_smoothing=0.1)
    target = mixer.relabel(logits, attention)
    lam = mixer.last.alpha * mixer.last.lam_attn + (1 - mixer.last.alpha) * mixer.last.lam_area
    assert torch.allclose(target, expected_target(y, mixer.last.partner, lam, 0.1), atol=1e-6)


@pytest.mark.parametrize('detach', [True, False])
def test_pal_gradient_through_alpha(detach):
    mixer, _ = mixpro_maskmix_step(pal_detach_alpha=detach)
    logits = torch.randn(6, K, requires_grad=True)
    target = mixer.relabel(logits, torch.rand(6, 16))
    SoftTargetCrossEntropy()(logits, target).backward()
    plain_ce_grad = (logits.softmax(1) - target.detach()) / 6   # the gradient when the target is a constant
    assert target.requires_grad is (not detach)
    if detach:
        assert torch.allclose(logits.grad, plain_ce_grad, atol=1e-6)
    else:
        assert (logits.grad - plain_ce_grad).abs().max() > 1e-4


def run_steps(mixer, steps=6):
    out = []
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = torch.randn(8, 3, 64, 64, generator=gen), torch.randint(0, K, (8,), generator=gen)
        mixed, target = mixer(x, y)
        out.append((mixer.last.kind, mixed, target, mixer.last.partner, mixer.last.keep))
    return out


def assert_same_steps(a, b):
    for (ka, xa, ta, pa, ma), (kb, xb, tb, pb, mb) in zip(a, b):
        assert ka == kb and torch.equal(xa, xb) and torch.equal(ta, tb) and torch.equal(pa, pb)
        assert (ma is None and mb is None) or torch.equal(ma, mb)


def test_same_seed_same_masks_partners_and_targets():
    a = run_steps(Mixer('mixpro', num_classes=K, mask_cell=32, seed=11))
    b = run_steps(Mixer('mixpro', num_classes=K, mask_cell=32, seed=11))
    c = run_steps(Mixer('mixpro', num_classes=K, mask_cell=32, seed=12))
    assert_same_steps(a, b)
    assert {s[0] for s in a} >= {'maskmix'}
    assert any(not torch.equal(sa[2], sc[2]) for sa, sc in zip(a, c))


def test_state_dict_resumes_the_random_stream():
    reference = Mixer('mixpro', num_classes=K, mask_cell=32, seed=5)
    run_steps(reference, 3)
    resumed = Mixer('mixpro', num_classes=K, mask_cell=32, seed=99)
    resumed.load_state_dict(reference.state_dict())
    assert_same_steps(run_steps(reference), run_steps(resumed))


@pytest.mark.parametrize('lam', [torch.tensor([0.25, 0.75], dtype=torch.bfloat16), torch.tensor(0.5)],
                         ids=['bf16_per_sample', 'one_scalar'])
def test_mix_target_is_fp32_whatever_the_lambda_s_dtype_and_shape(lam):
    from mixpro.targets import mix_target, smoothed_one_hot
    y, partner = torch.tensor([0, 1]), torch.tensor([1, 2])
    target = mix_target(y, partner, lam, 3, 0.1)
    weight = lam.float().expand(2).view(-1, 1)
    expected = weight * smoothed_one_hot(y, 3, 0.1) + (1 - weight) * smoothed_one_hot(partner, 3, 0.1)
    assert target.dtype == torch.float32 and torch.allclose(target, expected, atol=1e-6)
