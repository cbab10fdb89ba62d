"""The Table-1 recipes: configs/<model>_<method>.yaml on top of configs/base/<model>.yaml.

Fast checks only (no model is built): every YAML parses with the real option parser, the 42 recipes exist,
the three recipes of one model differ only in the mixing method, and the shared numbers are the ones
configs/README.md documents.
"""
from functools import lru_cache
from pathlib import Path

import pytest

from mixpro.config import parse_train_args
from mixpro.build import resolve_lr

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'

MODELS = {   # file prefix -> timm / repo model name (README, "Table 1")
    'deit_t': 'deit_tiny_patch16_224', 'deit_s': 'deit_small_patch16_224', 'deit_b': 'deit_base_patch16_224',
    'pvt_t': 'pvt_tiny', 'pvt_s': 'pvt_small', 'pvt_m': 'pvt_medium', 'pvt_l': 'pvt_large',
    'xcit_t': 'xcit_tiny_24_p16_224', 'xcit_s': 'xcit_small_12_p16_224',
    'xcit_m': 'xcit_medium_24_p16_224', 'xcit_l': 'xcit_large_24_p16_224',
    'cait_xxs': 'cait_xxs36_224',
    'ca_swin_t': 'ca_swin_tiny', 'ca_swin_s': 'ca_swin_small',
}
METHODS = {'baseline': 'mixup_cutmix', 'transmix': 'transmix', 'mixpro': 'mixpro'}
# Keys allowed to differ between the three recipes of one model (plus 'config', the file itself).
METHOD_KEYS = {'mix_method', 'mixup_switch_prob', 'maskmix_prob', 'mask_cell', 'pal_smoothing',
               'pal_detach_alpha', 'membership', 'maskmix_lam', 'maskmix_alpha', 'experiment', 'config'}

# prefix: epochs, warmup, drop_path, clip_grad, aug_repeats, model_ema, crop_pct  (configs/README.md table)
RECIPES = {
    'deit_t': (300, 5, 0.1, None, 3, True, 0.875),
    'deit_s': (300, 5, 0.1, None, 3, True, 0.875),
    'deit_b': (300, 5, 0.1, None, 3, True, 0.875),
    'pvt_t': (300, 5, 0.1, None, 3, False, 0.875),
    'pvt_s': (300, 5, 0.1, None, 3, False, 0.875),
    'pvt_m': (300, 5, 0.3, 1.0, 3, False, 0.875),
    'pvt_l': (300, 5, 0.3, 1.0, 3, False, 0.875),
    'xcit_t': (400, 5, 0.05, None, 3, True, 1.0),
    'xcit_s': (400, 5, 0.05, None, 3, True, 1.0),
    'xcit_m': (400, 5, 0.15, None, 3, True, 1.0),
    'xcit_l': (400, 5, 0.25, None, 3, True, 1.0),
    'cait_xxs': (400, 5, 0.1, None, 3, True, 1.0),
    'ca_swin_t': (300, 20, 0.2, 5.0, 0, False, 0.875),
    'ca_swin_s': (300, 20, 0.3, 5.0, 0, False, 0.875),
}
GPUS = 8   # the recipes' batch_size is per GPU for an 8-GPU run


def recipe_path(prefix: str, method: str) -> Path:
    return CONFIGS / f'{prefix}_{method}.yaml'


def resolve(path: Path) -> dict:
    return dict(_resolve(str(path)))


@lru_cache(maxsize=None)
def _resolve(path: str) -> tuple:
    return tuple(vars(parse_train_args(['--config', path])).items())


def token_size(prefix: str) -> int:
    """Side in pixels of one token of the attention grid used for labels (README, "The algorithms, as implemented")."""
    return 32 if prefix.startswith(('pvt_', 'ca_swin_')) else 16


ALL_YAML = sorted(CONFIGS.glob('*.yaml')) + sorted(CONFIGS.glob('base/*.yaml'))
TABLE1 = [(prefix, method) for prefix in MODELS for method in METHODS]


@pytest.mark.parametrize('path', ALL_YAML, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_parses(path):
    args = resolve(path)   # an unknown key or a wrong type raises ConfigError naming the key
    assert args['experiment'] == path.stem


def test_exactly_the_42_table1_recipes_exist():
    found = {p.stem for p in CONFIGS.glob('*.yaml')
             if p.stem.endswith(tuple(f'_{m}' for m in METHODS)) and not p.stem.startswith(('quickstart', 'cifar100'))}
    expected = {f'{prefix}_{method}' for prefix, method in TABLE1}
    assert len(expected) == 42
    assert found == expected, f'missing {sorted(expected - found)}, unexpected {sorted(found - expected)}'
    for prefix in MODELS:
        assert (CONFIGS / 'base' / f'{prefix}.yaml').is_file()


@pytest.mark.parametrize('prefix', list(MODELS))
def test_recipes_of_one_model_differ_only_in_method_keys(prefix):
    resolved = {method: resolve(recipe_path(prefix, method)) for method in METHODS}
    shared = {method: {k: v for k, v in args.items() if k not in METHOD_KEYS} for method, args in resolved.items()}
    reference = shared['baseline']
    for method in ('transmix', 'mixpro'):
        differ = sorted(k for k in reference if reference[k] != shared[method].get(k))
        assert not differ, f'{prefix}_{method} differs from {prefix}_baseline in non-method keys {differ}'
    assert reference['model'] == MODELS[prefix]


@pytest.mark.parametrize('prefix,method', TABLE1)
def test_method_matches_file_name(prefix, method):
    args = resolve(recipe_path(prefix, method))
    assert args['mix_method'] == METHODS[method]
    if method == 'transmix':
        assert args['mixup_switch_prob'] in (None, 0.8)   # None = the method default, 0.8
        assert args['membership'] == 'nearest'            # official TransMix: nn.Upsample of the box mask
    if method == 'baseline':
        assert args['mixup_switch_prob'] in (None, 0.5)   # None = the method default, 0.5 (DeiT)
    if method == 'mixpro':
        assert args['maskmix_prob'] == 0.5
        assert args['pal_smoothing'] == 0.0   # official MixPro: no label smoothing in the PAL target
        assert args['pal_detach_alpha'] is False and args['maskmix_lam'] == 'cells'   # official MixPro


@pytest.mark.parametrize('prefix', list(MODELS))
def test_mixpro_mask_cell_covers_whole_tokens(prefix):
    args = resolve(recipe_path(prefix, 'mixpro'))
    size = token_size(prefix)
    assert args['mask_cell'] > 0 and args['mask_cell'] % size == 0, \
        f'{prefix}_mixpro: mask_cell {args["mask_cell"]} is not a multiple of the {size}-px tokens'
    assert args['img_size'] % size == 0


@pytest.mark.parametrize('prefix', list(MODELS))
def test_shared_recipe_numbers(prefix):
    args = resolve(recipe_path(prefix, 'baseline'))
    epochs, warmup, drop_path, clip, repeats, ema, crop = RECIPES[prefix]
    got = (args['epochs'], args['warmup_epochs'], args['drop_path'], args['clip_grad'], args['aug_repeats'],
           args['model_ema'], args['crop_pct'])
    assert got == (epochs, warmup, drop_path, clip, repeats, ema, crop)
    # every backbone's recipe: 1024 global batch, AdamW, lr 5e-4 x batch / 512 = 1e-3, wd 0.05, 224 px
    assert args['batch_size'] * GPUS * args['grad_accum_steps'] == 1024
    assert args['lr'] is None, 'the lr must follow the real global batch (lr_base / lr_base_size), not be fixed'
    assert resolve_lr(args['lr'], lr_base=args['lr_base'], lr_base_size=args['lr_base_size'],
                      lr_base_scale=args['lr_base_scale'], global_batch=1024) == pytest.approx(1e-3)
    assert (args['opt'], args['weight_decay'], args['sched']) == ('adamw', 0.05, 'cosine')
    # Swin's code steps its timm scheduler every iteration; DeiT, PVT, XCiT and CaiT step it per epoch
    assert args['sched_on_updates'] == prefix.startswith('ca_swin')
    assert (args['img_size'], args['data_dir']) == (224, 'data/imagenet')
    assert (args['aa'], args['reprob'], args['smoothing']) == ('rand-m9-mstd0.5-inc1', 0.25, 0.1)
    assert (args['mixup'], args['cutmix']) == (0.8, 1.0)


@pytest.mark.parametrize('prefix', list(MODELS))
def test_every_base_number_says_where_it_comes_from(prefix):
    for line in (CONFIGS / 'base' / f'{prefix}.yaml').read_text().splitlines():
        if not line.strip() or line.lstrip().startswith('#') or line.startswith(('base:', 'model:')):
            continue
        assert '#' in line, f'base/{prefix}.yaml: no source comment on {line!r}'
