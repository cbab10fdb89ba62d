"""The attention probe against a hand-computed full attention matrix, on stock timm models."""
import copy

import pytest
import timm
import torch
from timm.models.cait import ClassAttn

from mixpro import AttentionProbe

# shallow versions of the real architectures keep the test fast; the label layer is the same
MODELS = {
    'deit': ('deit_tiny_patch16_224', dict(depth=2)),
    'deit_distilled': ('deit_tiny_distilled_patch16_224', dict(depth=2)),
    'vit_registers': ('deit_tiny_patch16_224', dict(depth=2, reg_tokens=4)),
    'cait': ('cait_xxs24_224', dict(depth=2, depth_token_only=2)),
    'xcit': ('xcit_tiny_12_p16_224', dict(depth=2, cls_attn_layers=2)),
}


def build(key):
    name, kwargs = MODELS[key]
    return timm.create_model(name, num_classes=10, **kwargs).eval()


def full_attention_cls_row(layer, x, num_prefix):
    """The whole N x N attention matrix computed the slow way, then its class-token row."""
    B, N, C = x.shape
    if isinstance(layer, ClassAttn):
        q, k = layer.q(x), layer.k(x)
        heads = layer.num_heads
    else:
        q, k, _ = layer.qkv(x).reshape(B, N, 3, C).unbind(2)
        heads = layer.num_heads
    q = q.reshape(B, N, heads, -1).transpose(1, 2)
    k = k.reshape(B, N, heads, -1).transpose(1, 2)
    attn = ((q * layer.scale) @ k.transpose(-2, -1)).softmax(-1)    # [B, H, N, N]
    return attn[:, :, 0].mean(1)[:, num_prefix:]


@pytest.mark.parametrize('key', list(MODELS))
def test_probe_equals_full_attention(key):
    model = build(key)
    probe = AttentionProbe(model)
    assert probe.layer.fused_attn, 'fused attention must stay on'
    inputs = []
    probe.layer.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    x = torch.randn(2, 3, 224, 224)
    probe.enabled = True
    with torch.no_grad():
        model(x)
    expected = full_attention_cls_row(probe.layer, inputs[-1], probe.num_prefix_tokens)
    assert probe.attention.shape == (2, 196) and probe.attention.dtype == torch.float32
    assert probe.token_size == 16
    assert torch.allclose(probe.attention, expected, atol=1e-5)
    assert expected.sum(1).lt(1.0 + 1e-6).all()


@pytest.mark.parametrize('key', ['deit', 'cait'])
def test_no_gradient_reaches_the_attention_and_logits_are_untouched(key):
    model = build(key).train()
    probe = AttentionProbe(model)
    x = torch.randn(2, 3, 224, 224)
    torch.manual_seed(0)
    plain = model(x)
    probe.enabled = True
    torch.manual_seed(0)
    probed = model(x)
    assert torch.equal(plain, probed)
    assert not probe.attention.requires_grad and probe.attention.grad_fn is None
    probed.sum().backward()     # the graph does not go through the probe


def test_disabled_probe_costs_nothing_and_keeps_no_attention():
    model = build('deit')
    probe = AttentionProbe(model)
    model(torch.randn(1, 3, 224, 224))
    assert probe.attention is None


def test_deep_copies_get_an_inert_probe():
    model = build('deit')
    probe = AttentionProbe(model)
    ema = copy.deepcopy(model)
    probe.enabled = True
    ema(torch.randn(1, 3, 224, 224))
    assert probe.attention is None, 'the EMA copy must not compute attention'
    model(torch.randn(1, 3, 224, 224))
    assert probe.attention is not None


def test_probe_switches_under_torch_compile():
    model = build('deit')
    probe = AttentionProbe(model)
    compiled = torch.compile(model, backend='eager')
    x = torch.randn(2, 3, 224, 224)
    probe.enabled = True
    compiled(x)
    on = probe.attention
    assert on is not None and on.shape == (2, 196)
    probe.attention, probe.enabled = None, False
    compiled(x)
    assert probe.attention is None
    probe.enabled = True
    compiled(x)
    assert torch.allclose(probe.attention, on, atol=1e-6)


@pytest.mark.parametrize('name,kwargs', [
    ('swin_tiny_patch4_window7_224', dict(depths=(1, 1, 1, 1))),
    ('pvt_v2_b0', {}),
    ('deit_tiny_patch16_224', dict(depth=1, class_token=False, global_pool='avg')),
    ('resnet18', {}),
])
def test_models_without_class_token_are_refused_by_name(name, kwargs):
    model = timm.create_model(name, **kwargs)
    with pytest.raises(ValueError, match=name):
        AttentionProbe(model)
