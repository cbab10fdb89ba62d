"""Recipes and command line: one name per option, clear errors, CLI over YAML."""
import re
from pathlib import Path

import pytest
import torch

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
    ('bach_size: 64\n', "unknown key 'bach_size'.*'batch_size'"),
    ('mixpro_prob: 0.5\n', "unknown key 'mixpro_prob'.*'mixup_prob'"),
    ('lr: fast\n', "key 'lr' expects float, got str 'fast'"),
    ('epochs: 1.5\n', "key 'epochs' expects int"),
    ('model_ema: 1\n', "key 'model_ema' expects true or false"),
    ('scale: 0.5\n', "key 'scale' expects a list of float"),
    ('scale: [0.1, 0.5, 1.0]\n', "key 'scale' expects 2 values"),
    ('mix_method: cutmixup\n', "'mix_method' expects one of .*mixpro"),
    ('sched: cosin\n', "'sched' expects one of .*cosine, tanh"),                    # timm's scheduler names
    ('train_interpolation: foo\n', "'train_interpolation'.*random, bilinear"),
    ('- lr\n', 'must be a mapping'),
])
def test_bad_recipes_name_the_key(tmp_path, text, message):
    recipe = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message):
        parse_train_args(['--config', recipe])


def test_missing_recipe_is_named(tmp_path):
    with pytest.raises(ConfigError, match='nope.yaml does not exist'):
        parse_train_args(['--config', str(tmp_path / 'nope.yaml')])


def test_command_line_values_are_checked_too():
    with pytest.raises(ConfigError, match="invalid choice: 'cutmixup'"):
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


def test_a_model_that_does_not_take_rgb_is_refused_before_the_first_step(tmp_path):
    import validate
    with pytest.raises(ConfigError, match='in_chans=1: .*3-channel'):
        parse_train_args(['--model-kwargs', 'in_chans=1', '--output', str(tmp_path)])
    with pytest.raises(SystemExit, match='in_chans=4: .*3-channel'):
        validate.main(['--model', 'resnet18', '--pretrained', '--model-kwargs', 'in_chans=4'])
    assert parse_train_args(['--model-kwargs', 'in_chans=3', '--output', str(tmp_path)]).model_kwargs == {
        'in_chans': 3}
    cleared = write(tmp_path, 'model_kwargs:\n')                       # a bare key clears a base recipe's
    assert parse_train_args(['--config', cleared, '--output', str(tmp_path)]).model_kwargs is None


def test_lr_base_beside_an_absolute_lr_is_refused_not_ignored(tmp_path):
    recipe = write(tmp_path, 'lr: 0.002\n')
    with pytest.raises(ConfigError, match='--lr-base would change nothing') as err:
        parse_train_args(['--config', recipe, '--lr-base', '5e-4', '--output', str(tmp_path)])
    assert 'recipe.yaml' in str(err.value) and 'lr 0.002' in str(err.value)
    with pytest.raises(ConfigError, match='--lr-base-size would change nothing') as err:
        parse_train_args(['--lr', '1e-3', '--lr-base-size=256', '--output', str(tmp_path)])
    assert '--lr sets' in str(err.value)
    assert parse_train_args(['--config', recipe, '--lr', '1e-3', '--output', str(tmp_path)]).lr == 1e-3
    assert parse_train_args(['--lr-base', '1e-3', '--output', str(tmp_path)]).lr_base == 1e-3
    unset = parse_train_args(['--config', recipe, '--lr', 'none', '--lr-base', '1e-3', '--output', str(tmp_path)])
    assert (unset.lr, unset.lr_base) == (None, 1e-3)   # the recipe's absolute lr given up for the scaled one
    with pytest.raises(ConfigError, match='--lr-base-si would change nothing'):   # argparse's abbreviation
        parse_train_args(['--lr', '1e-3', '--lr-base-si', '256', '--output', str(tmp_path)])


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path, 'base: b.yaml\n', 'a.yaml')
    write(tmp_path, 'base: a.yaml\n', 'b.yaml')
    with pytest.raises(ConfigError, match='includes itself'):
        parse_train_args(['--config', str(tmp_path / 'a.yaml')])


@pytest.mark.parametrize('argv,message', [
    (['--reprob', '-1'], '--reprob must be in [0, 1], got -1.0'),
    (['--mixup-prob', '1.5'], '--mixup-prob must be in [0, 1], got 1.5'),
    (['--mixup-switch-prob', '2'], '--mixup-switch-prob must be in [0, 1], got 2.0'),
    (['--smoothing', 'nan'], '--smoothing must be in [0, 1], got nan'),
    (['--model-ema-decay', '1.1'], '--model-ema-decay must be in [0, 1], got 1.1'),
    (['--epochs', '0'], '--epochs must be >= 1, got 0'),
    (['--batch-size', '0'], '--batch-size must be >= 1, got 0'),
    (['--validation-batch-size', '0'], '--validation-batch-size must be >= 1, got 0'),
    (['--grad-accum-steps', '0'], '--grad-accum-steps must be >= 1, got 0'),
    (['--workers', '-1'], '--workers must be >= 0, got -1'),
    (['--img-size', '0'], '--img-size must be >= 1, got 0'),
    (['--mask-cell', '0'], '--mask-cell must be >= 1, got 0'),
    (['--cutmix', '-0.5'], '--cutmix must be >= 0, got -0.5'),
    (['--warmup-epochs', '-1'], '--warmup-epochs must be >= 0, got -1'),
    (['--lr', '0'], '--lr must be > 0, got 0.0'),
    (['--lr-base=-1e-3'], '--lr-base must be > 0, got -0.001'),
    (['--clip-grad', '0'], '--clip-grad must be > 0, got 0.0'),
    (['--drop-path', '1'], '--drop-path must be in [0, 1), got 1.0'),
    (['--checkpoint-hist', '0'], 'checkpoint_hist must be >= 1, got 0'),
    (['--crop-pct', '3'], '--crop-pct must be in (0, 1], got 3.0'),
])
def test_out_of_range_values_name_the_option_and_value(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_train_args(argv)


def test_out_of_range_values_in_a_recipe_are_caught_too(tmp_path):
    with pytest.raises(ConfigError, match=re.escape('--epochs must be >= 1, got None')):
        parse_train_args(['--config', write(tmp_path, 'epochs: null\n')])
    with pytest.raises(ConfigError, match=re.escape('--reprob must be in [0, 1], got -0.25')):
        parse_train_args(['--config', write(tmp_path, 'reprob: -0.25\n', 'b.yaml')])


def test_unset_and_boundary_values_are_accepted():
    args = parse_train_args(['--reprob', '0', '--hflip', '1', '--workers', '0', '--mixup', '0', '--warmup-epochs',
                             '0', '--drop-path', '0', '--epochs', '1', '--image-grid-interval', '0'])
    assert args.lr is None and args.clip_grad is None and args.img_size is None
    assert args.mixup_switch_prob is None and args.validation_batch_size is None


@pytest.mark.parametrize('key,meant', [('learning_rate', 'lr'), ('num_workers', 'workers'),
                                       ('output_dir', 'output'), ('ema', 'model_ema')])
def test_names_from_other_codebases_suggest_ours(tmp_path, key, meant):
    with pytest.raises(ConfigError, match=f"unknown key '{key}'.*'{meant}'"):
        parse_train_args(['--config', write(tmp_path, f'{key}: 1\n')])


def test_unknown_flags_suggest_ours():
    with pytest.raises(ConfigError, match='unknown option --learning-rate') as err:
        parse_train_args(['--learning-rate', '0.001'])
    assert '--lr?' in str(err.value)
    with pytest.raises(ConfigError, match='unknown option --bach-size') as err:
        parse_train_args(['--bach-size=4'])
    assert '--batch-size?' in str(err.value)


def test_output_that_is_a_file_is_an_error(tmp_path):
    file = tmp_path / 'good.pth.tar'
    file.write_text('')
    with pytest.raises(ConfigError, match=re.escape(f'--output {file} is a file')):
        parse_train_args(['--output', str(file)])
    with pytest.raises(ConfigError, match=re.escape(f'{file} is a file')):
        parse_train_args(['--output', str(file / 'runs')])
    (tmp_path / 'runs').mkdir()
    (tmp_path / 'runs' / 'exp').write_text('')
    with pytest.raises(ConfigError, match='run folder .*exp is a file'):
        parse_train_args(['--output', str(tmp_path / 'runs'), '--experiment', 'exp'])
    assert parse_train_args(['--output', str(tmp_path / 'new' / 'folder')]).output   # need not exist yet


def test_cuda_device_without_cuda_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(ConfigError, match='--device cuda: no CUDA device') as err:
        parse_train_args(['--device', 'cuda'])
    assert 'use --device cpu' in str(err.value)
    with pytest.raises(ConfigError, match="--device 'gpu' is not a device"):
        parse_train_args(['--device', 'gpu'])
    assert parse_train_args(['--device', 'cpu']).device == 'cpu'


def test_class_map_option(tmp_path):
    assert parse_train_args([]).class_map == ''
    assert parse_train_args(['--config', write(tmp_path, 'class_map: classes.txt\n')]).class_map == 'classes.txt'



@pytest.mark.parametrize('flags, message', [
    (['--torchcompile-mode', 'max-autotune'], 'max-autotune needs --torchcompile'),
    (['--torchcompile', 'aot_eager', '--torchcompile-mode', 'max-autotune'], 'aot_eager would ignore it'),
    (['--torchcompile', '--torchcompile-mode', 'fastest'], "fastest: inductor's modes .*max-autotune"),
    (['--torchcompile', 'nope'], '--torchcompile nope .*backend.*inductor'),
    (['--compile-mixer', 'nope'], '--compile-mixer nope .*backend'),
])
def test_compile_settings_that_would_fail_later_or_do_nothing_are_refused(flags, message):
    with pytest.raises(ConfigError, match=message):
        parse_train_args(['--config', str(REPO / 'configs' / 'quickstart_mixpro.yaml'), *flags])
    args = parse_train_args(['--config', str(REPO / 'configs' / 'quickstart_mixpro.yaml'), '--torchcompile',
                             '--torchcompile-mode', 'max-autotune', '--compile-mixer', 'aot_eager'])
    assert (args.torchcompile, args.torchcompile_mode, args.compile_mixer) == ('inductor', 'max-autotune', 'aot_eager')
