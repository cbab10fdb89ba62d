"""Recipes and command line: one name per option, clear errors, CLI over YAML."""
from pathlib import Path

import pytest

from mixpro.config import ConfigError, parse_train_args

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text, name='recipe.yaml'):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_yaml_sets_options_and_the_command_line_overrides(tmp_path):
    recipe = write(tmp_path, 'model: xcit_tiny_24_p16_224\nlr: 0.002\nmodel_ema: true\nscale: [0.5, 1.0]\n'
                             'model_kwargs: {depth: 2}\n')
    args = parse_train_args(['--config', recipe, '--lr', '0.1', '--no-model-ema'])
    assert args.model == 'xcit_tiny_24_p16_224' and args.scale == [0.5, 1.0]
    assert args.lr == 0.1 and args.model_ema is False
    assert args.model_kwargs == {'depth': 2}
    assert args.experiment == 'recipe'            # run folder named after the recipe
    assert parse_train_args(['--config', recipe, '--experiment', 'x']).experiment == 'x'


def test_base_recipe_is_inherited_and_overridden(tmp_path):
    write(tmp_path, 'model: deit_small_patch16_224\nepochs: 300\nmix_method: transmix\n', 'base.yaml')
    child = write(tmp_path, 'base: base.yaml\nmix_method: mixpro\n', 'child.yaml')
    args = parse_train_args(['--config', child])
    assert (args.model, args.epochs, args.mix_method) == ('deit_small_patch16_224', 300, 'mixpro')


@pytest.mark.parametrize('text,message', [
    ('bach_size: 64\n', "unknown key 'bach_size'; did you mean 'batch_size'"),
    ('mixpro_prob: 0.5\n', "unknown key 'mixpro_prob'; did you mean 'mixup_prob'"),
    ('lr: fast\n', "key 'lr' expects float, got str 'fast'"),
    ('epochs: 1.5\n', "key 'epochs' expects int"),
    ('model_ema: 1\n', "key 'model_ema' expects true or false"),
    ('scale: 0.5\n', "key 'scale' expects a list of float"),
    ('scale: [0.1, 0.5, 1.0]\n', "key 'scale' expects 2 values"),
    ('mix_method: cutmixup\n', "key 'mix_method' expects one of mixup_cutmix, transmix, maskmix, mixpro"),
    ('- lr\n', 'must be a mapping'),
])
def test_bad_recipes_name_the_key(tmp_path, text, message):
    recipe = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message.replace('(', r'\(').replace('[', r'\[')):
        parse_train_args(['--config', recipe])


def test_missing_recipe_is_named(tmp_path):
    with pytest.raises(ConfigError, match='nope.yaml does not exist'):
        parse_train_args(['--config', str(tmp_path / 'nope.yaml')])


def test_command_line_values_are_checked_too():
    with pytest.raises(SystemExit):
        parse_train_args(['--mix-method', 'cutmixup'])


@pytest.mark.parametrize('recipe', sorted((REPO / 'configs').glob('quickstart_*.yaml')), ids=lambda p: p.name)
def test_quickstart_recipes_parse(recipe):
    args = parse_train_args(['--config', str(recipe)])
    assert args.model and args.mask_cell % 4 == 0


def test_yaml_quirks_read_as_the_command_line_would(tmp_path):
    recipe = write(tmp_path, 'lr: 5e-4\nscale: [8e-2, 1]\ntorchcompile: true\nmodel_kwargs: {depth: 2, patch_size: 4}\n')
    args = parse_train_args(['--config', recipe, '--model-kwargs', 'depth=6'])
    assert args.lr == 5e-4 and args.scale == [0.08, 1.0]       # YAML reads 5e-4 (no dot) as a string
    assert args.torchcompile == 'inductor'
    assert args.model_kwargs == {'depth': 6, 'patch_size': 4}   # the command line merges into the recipe's
    assert parse_train_args(['--config', write(tmp_path, 'torchcompile: false\n', 'b.yaml')]).torchcompile is None


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path, 'base: b.yaml\n', 'a.yaml')
    write(tmp_path, 'base: a.yaml\n', 'b.yaml')
    with pytest.raises(ConfigError, match='includes itself'):
        parse_train_args(['--config', str(tmp_path / 'a.yaml')])
