"""The attention probe against a hand-computed full attention matrix, on stock timm models."""
import copy

import pytest
import timm
import torch
from timm.models.cait import ClassAttn

from mixpro import AttentionProbe
from mixpro.probe import key_projection

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


@pytest.mark.slow
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


def previous_cls_attention(layer, x, projected, num_prefix_tokens):
    """The probe's maths before the one-matmul form: the query row recomputed in fp32, per-head q·kᵀ."""
    batch, tokens, _ = x.shape
    heads = layer.num_heads
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        cls_input = x[:, :1].float()
        if isinstance(layer, ClassAttn):
            q = torch.nn.functional.linear(cls_input, layer.q.weight.float(),
                                           None if layer.q.bias is None else layer.q.bias.float())
            k = projected
        else:
            dim = layer.attn_dim
            bias = None if layer.qkv.bias is None else layer.qkv.bias.float()[:dim]
            q = torch.nn.functional.linear(cls_input, layer.qkv.weight[:dim].float(), bias)
            k = projected[..., dim:2 * dim]
        q = q.view(batch, 1, heads, -1).transpose(1, 2)
        k = k.float().reshape(batch, tokens, heads, -1).transpose(1, 2)
        if not isinstance(layer, ClassAttn):
            q, k = layer.q_norm(q), layer.k_norm(k)
        weights = (q * layer.scale) @ k.transpose(-2, -1)
        return weights.softmax(dim=-1).mean(dim=1)[:, 0][:, num_prefix_tokens:]


@pytest.mark.parametrize('amp', [False, True], ids=['fp32', 'bf16_autocast'])
@pytest.mark.parametrize('key', ['deit', 'vit_registers', 'cait', 'xcit', 'deit_qk_norm', 'deit_4_heads_no_bias'])
def test_probe_equals_the_previous_probe(key, amp):
    extra = {'deit_qk_norm': ('deit_tiny_patch16_224', dict(depth=2, qk_norm=True)),
             'deit_4_heads_no_bias': ('deit_tiny_patch16_224', dict(depth=2, qkv_bias=False, num_heads=4))}
    name, kwargs = extra.get(key) or MODELS[key]
    model = timm.create_model(name, num_classes=10, **kwargs).eval()
    probe = AttentionProbe(model)
    if key == 'deit_qk_norm':   # non-trivial norms
        for norm in (probe.layer.q_norm, probe.layer.k_norm):
            norm.weight.data.uniform_(0.5, 1.5)
            norm.bias.data.uniform_(-0.2, 0.2)
    captured = {}
    key_projection(probe.layer).register_forward_hook(lambda m, a, out: captured.update(x=a[0], out=out))
    probe.enabled = True
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
        model(torch.randn(3, 3, 224, 224))
    assert captured['out'].dtype == (torch.bfloat16 if amp else torch.float32)
    expected = previous_cls_attention(probe.layer, captured['x'], captured['out'], probe.num_prefix_tokens)
    assert probe.attention.dtype == torch.float32 and probe.attention.shape == expected.shape
    assert torch.allclose(probe.attention, expected, atol=1e-8, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='the half-precision key path is CUDA only')
@pytest.mark.parametrize('key', ['deit', 'cait'])
def test_half_precision_keys_on_cuda_match_fp32_keys(key):
    """Under bf16 autocast on CUDA the keys go into the matmul as they are (fp32 accumulation and output):
    the attention stays within bf16 rounding of the fp32-key maths."""
    model = build(key).cuda()
    probe = AttentionProbe(model)
    captured = {}
    key_projection(probe.layer).register_forward_hook(lambda m, a, out: captured.update(x=a[0], out=out))
    probe.enabled = True
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
        model(torch.randn(4, 3, 224, 224, device='cuda'))
    assert captured['out'].dtype == torch.bfloat16
    expected = previous_cls_attention(probe.layer, captured['x'], captured['out'], probe.num_prefix_tokens)
    assert probe.attention.dtype == torch.float32
    assert torch.allclose(probe.attention, expected, atol=1e-3, rtol=0.1)         # per token: bf16 rounding
    membership = (torch.rand(expected.shape, device='cuda') < 0.5).float()          # what a label weight sums
    assert torch.allclose((membership * probe.attention).sum(1), (membership * expected).sum(1), atol=3e-3)
    assert torch.allclose(probe.attention.sum(1), expected.sum(1), atol=1e-4)
