"""Every Table-1 recipe's model: its size against Table 1, and one MixPro training step."""
from pathlib import Path

import pytest
import timm
import torch
from timm.loss import SoftTargetCrossEntropy

from mixpro import AttentionProbe, Mixer
from mixpro.config import parse_train_args
from mixpro.build import create_model, model_options

pytestmark = pytest.mark.slow   # subprocesses or several training runs: seconds each

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'
# Table 1 parameter counts (MixPro, ICLR 2023); XCiT's are given in whole millions there
TABLE1_PARAMS = {
    'deit_t': 5.7e6, 'deit_s': 22.1e6, 'deit_b': 86.6e6, 'pvt_t': 13.2e6, 'pvt_s': 24.5e6, 'pvt_m': 44.2e6,
    'pvt_l': 61.4e6, 'xcit_t': 12e6, 'xcit_s': 26e6, 'xcit_m': 84e6, 'xcit_l': 189e6, 'cait_xxs': 17.3e6,
    'ca_swin_t': 28.3e6, 'ca_swin_s': 49.6e6,
}
# fewer blocks, same layers: keeps one training step per model fast on a CPU
SHALLOW = {'deit': dict(depth=1), 'xcit': dict(depth=1, cls_attn_layers=1),
           'cait': dict(depth=1, depth_token_only=1), 'pvt': dict(depths=(1, 1, 1, 1)),
           'ca_swin': dict(depths=(1, 1, 1, 1))}


def recipe(prefix, method='mixpro'):
    return parse_train_args(['--config', str(CONFIGS / f'{prefix}_{method}.yaml')])


@pytest.mark.parametrize('prefix', list(TABLE1_PARAMS))
def test_recipe_model_has_the_table1_size(prefix):
    args = recipe(prefix)
    with torch.device('meta'):
        model = create_model(args.model, 1000, **model_options(args))
    params = sum(p.numel() for p in model.parameters())
    assert abs(params - TABLE1_PARAMS[prefix]) / TABLE1_PARAMS[prefix] < 0.01, f'{args.model}: {params:,}'


@pytest.mark.parametrize('prefix', list(TABLE1_PARAMS))
def test_recipe_model_takes_a_mixpro_step(prefix):
    args = recipe(prefix)
    family = prefix.rsplit('_', 1)[0]
    args.model_kwargs = SHALLOW[family]
    model = create_model(args.model, 10, **model_options(args)).train()
    probe = AttentionProbe(model)
    mixer = Mixer('mixpro', num_classes=10, maskmix_prob=1.0, mask_cell=args.mask_cell,
                  token_size=probe.token_size, seed=0)
    x, target = mixer(torch.randn(2, 3, 224, 224), torch.tensor([1, 2]))
    probe.enabled = mixer.needs_attention
    logits = model(x)
    assert probe.attention.shape == (2, (224 // probe.token_size) ** 2)
    target = mixer.relabel(logits, probe.attention)
    SoftTargetCrossEntropy()(logits, target).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert timm.is_model(args.model)
