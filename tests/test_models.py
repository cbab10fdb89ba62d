"""PVT v1 and CA-Swin (mixpro.models): registration, Table 1 sizes, training step, attention probe."""
import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import Attention
from timm.models.cait import ClassAttn

import mixpro.models  # noqa: F401  (registers the models and their probe sources)
from mixpro import AttentionProbe
from mixpro.models.ca_swin import CaSwinTransformer
from mixpro.models.pvt import PyramidVisionTransformer, SpatialReductionAttention

# MixPro Table 1 (= PVT Table 1 and TransMix's CA-Swin): parameters at num_classes=1000
TABLE1_PARAMS = {
    'pvt_tiny': 13.2e6, 'pvt_small': 24.5e6, 'pvt_medium': 44.2e6, 'pvt_large': 61.4e6,
    'ca_swin_tiny': 28.3e6, 'ca_swin_small': 49.6e6,
}
# shallow variants for the training-step tests: the same layers, a fraction of the blocks
SHALLOW = {
    'pvt_tiny': dict(depths=(1, 1, 1, 1), img_size=96, in_chans=1),
    'pvt_small': dict(depths=(1, 1, 1, 2), img_size=64),
    'pvt_medium': dict(depths=(1, 1, 2, 1), img_size=64, in_chans=2),
    'pvt_large': dict(depths=(1, 1, 2, 1), img_size=64, in_chans=4),
    'ca_swin_tiny': dict(depths=(1, 1, 1, 1), img_size=64, in_chans=1),
    'ca_swin_small': dict(depths=(1, 1, 2, 2), img_size=64, in_chans=2),
}


def count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('name', list(TABLE1_PARAMS))
def test_table1_size(name):
    """The real configuration at 224 px; built on the meta device (no memory, no init) to count it fast."""
    with torch.device('meta'):
        model = timm.create_model(name)
    params = count(model)
    assert abs(params - TABLE1_PARAMS[name]) / TABLE1_PARAMS[name] < 0.01, f'{name}: {params:,}'
    cfg = model.pretrained_cfg
    assert cfg['architecture'] == name and not cfg.get('url') and not cfg.get('hf_hub_id')
    assert cfg['input_size'] == (3, 224, 224) and cfg['crop_pct'] == 0.9 and cfg['num_classes'] == 1000
    assert model.num_classes == 1000 and model.get_classifier().out_features == 1000


@pytest.mark.slow
@pytest.mark.parametrize('name', list(SHALLOW))
def test_training_step_and_timm_api(name):
    kwargs = SHALLOW[name]
    model = timm.create_model(name, num_classes=7, drop_rate=0.1, drop_path_rate=0.2, **kwargs).train()
    size, chans = kwargs['img_size'], kwargs.get('in_chans', 3)
    x = torch.randn(2, chans, size, size)
    logits = model(x)
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    logits.logsumexp(1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f'parameters without gradient: {missing[:5]}'
    assert model.cls_token.grad.abs().sum() > 0

    tokens = (size // 32) ** 2
    if isinstance(model, PyramidVisionTransformer):
        grids = [size // 4, size // 8, size // 16, size // 32]
        assert [s.pos_embed.shape[1] for s in model.stages] == [g * g for g in grids[:3]] + [1 + tokens]
        assert model.stages[0].patch_embed.proj.in_channels == chans
        assert model.stages[-1].blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)   # linear, ends at rate
        assert model.head_drop.p == 0.1
    else:
        assert model.patch_embed.proj.in_channels == chans
        assert len(model.layers[-1].blocks) == kwargs['depths'][-1] - 1   # the last block was replaced
        assert model.cls_attn_block.drop_path.drop_prob == pytest.approx(0.2)
        assert model.head.drop.p == 0.1

    model.eval()
    features = model.forward_features(x)
    assert features.shape == (2, 1 + tokens, model.num_features)
    assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
    assert torch.equal(model.forward_head(features), model(x))
    names = dict(model.named_parameters())
    assert 'cls_token' in model.no_weight_decay() and model.no_weight_decay() <= set(names)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.get_classifier().out_features == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)


def test_pvt_attention_layers():
    model = timm.create_model('pvt_tiny', num_classes=10, depths=(1, 1, 1, 1))
    for stage, sr in zip(model.stages, (8, 4, 2)):
        assert all(isinstance(b.attn, SpatialReductionAttention) and b.attn.sr_ratio == sr for b in stage.blocks)
    assert all(type(b.attn) is Attention for b in model.stages[-1].blocks)
    # spatial reduction: fused attention equals the slow path
    attn = model.stages[0].blocks[0].attn.eval()
    x = torch.randn(2, 56 * 56, 64)
    fused = attn(x, (56, 56))
    attn.fused_attn = False
    assert torch.allclose(fused, attn(x, (56, 56)), atol=1e-5)
    # position embeddings sized for 224 px are resized for other inputs
    assert model.eval()(torch.randn(1, 3, 96, 128)).shape == (1, 10)


def test_pvt_norms_and_weight_decay_follow_the_official_code():
    from timm.optim import create_optimizer_v2
    model = timm.create_model('pvt_tiny', num_classes=10, depths=(1, 1, 1, 1))
    eps = {name: m.eps for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    assert {n for n, e in eps.items() if e == 1e-5} == {f'stages.{i}.patch_embed.norm' for i in range(4)} | {
        f'stages.{i}.blocks.0.attn.norm' for i in range(3)}           # reductions and patch embeddings
    assert eps['norm'] == eps['stages.0.blocks.0.norm1'] == eps['stages.3.blocks.0.norm2'] == 1e-6
    optimizer = create_optimizer_v2(model, opt='adamw', weight_decay=0.05)   # as train.py builds it
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g['weight_decay'] for p in g['params']}
    assert {f'stages.{i}.pos_embed' for i in range(4)} <= decayed and 'cls_token' not in decayed


def full_attention_cls_row(layer, x, num_prefix):
    """The whole N x N attention matrix computed the slow way, then its class-token row."""
    B, N, C = x.shape
    if isinstance(layer, ClassAttn):
        q, k = layer.q(x), layer.k(x)
    else:
        q, k, _ = layer.qkv(x).reshape(B, N, 3, C).unbind(2)
    q = q.reshape(B, N, layer.num_heads, -1).transpose(1, 2)
    k = k.reshape(B, N, layer.num_heads, -1).transpose(1, 2)
    attn = ((q * layer.scale) @ k.transpose(-2, -1)).softmax(-1)    # [B, H, N, N]
    return attn[:, :, 0].mean(1)[:, num_prefix:]


PROBED = {
    'pvt_tiny': lambda m: m.stages[-1].blocks[-1].attn,
    'ca_swin_tiny': lambda m: m.cls_attn_block.attn,
}


@pytest.mark.slow
@pytest.mark.parametrize('name', list(PROBED))
def test_probe_equals_full_attention_and_leaves_logits_untouched(name):
    """The real configuration at 224 px, training mode with stochastic depth."""
    model = timm.create_model(name, num_classes=10, drop_path_rate=0.1).train()
    probe = AttentionProbe(model)
    assert probe.layer is PROBED[name](model)
    assert probe.layer.fused_attn, 'fused attention must stay on'
    inputs = []
    probe.layer.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
    x = torch.randn(2, 3, 224, 224)
    torch.manual_seed(0)
    plain = model(x)
    assert probe.attention is None, 'a disabled probe computes nothing'
    probe.enabled = True
    torch.manual_seed(0)
    probed = model(x)
    assert torch.equal(plain, probed)

    with torch.no_grad():
        expected = full_attention_cls_row(probe.layer, inputs[-1], probe.num_prefix_tokens)
    assert inputs[-1].shape[1] == 50 and probe.num_prefix_tokens == 1
    assert probe.attention.shape == (2, 49) and probe.attention.dtype == torch.float32
    assert probe.token_size == 32
    assert torch.allclose(probe.attention, expected, atol=1e-5)
    assert expected.sum(1).lt(1.0).all()     # the class token's own column is left out
    assert not probe.attention.requires_grad and probe.attention.grad_fn is None
    probed.sum().backward()                  # the graph does not go through the probe


def test_pvt_without_full_last_stage_attention_is_refused_by_name():
    model = timm.create_model('pvt_tiny', depths=(1, 1, 1, 1), sr_ratios=(8, 4, 2, 2))
    with pytest.raises(ValueError, match='pvt_tiny'):
        AttentionProbe(model)


def test_models_are_registered_as_timm_models():
    names = set(timm.list_models('pvt_*')) | set(timm.list_models('ca_swin_*'))
    assert set(TABLE1_PARAMS) <= names
    assert issubclass(CaSwinTransformer, timm.models.swin_transformer.SwinTransformer)
