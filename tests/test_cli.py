"""What train.py says about its options on day one: one line with the nearest valid value, the options timm's
train.py has and this one does not, another model than the recipe's, AMP on the CPU, the lr schedules."""
import pytest
import torch

from mixpro.build import create_scheduler
from mixpro.config import ConfigError, parse_train_args
from mixpro.state import check_same_run

QUICKSTART = 'configs/quickstart_mixpro.yaml'


@pytest.mark.parametrize('argv, phrases', [
    (['--mix-method', 'mixprp'], ("invalid choice: 'mixprp'", "did you mean 'mixpro'")),
    (['/data/imagenet'], ('unexpected argument /data/imagenet', '--data-dir /data/imagenet')),
    (['--config', 'configs/deit_t_mixpr.yaml'], ('does not exist', 'did you mean configs/deit_t_mixpro.yaml')),
    (['--mixup-mode', 'pair'], ('--mixup-mode is not offered', 'per batch')),
    (['--no-resume-opt'], ('--no-resume-opt is not offered', '--initial-checkpoint')),
    (['--input-size', '3', '224', '224'], ('--input-size is not offered', '--img-size')),
])
def test_a_mistyped_command_line_is_one_line_naming_the_fix(argv, phrases, capsys):
    with pytest.raises(ConfigError) as err:
        parse_train_args(argv)
    assert all(phrase in str(err.value) for phrase in phrases), str(err.value)
    assert 'usage:' not in capsys.readouterr().err   # argparse's 59-line usage is not printed


def test_another_model_than_the_recipes_names_the_recipes_model_kwargs(capsys):
    args = parse_train_args(['--config', QUICKSTART, '--model', 'vit_tiny_patch16_224'])
    out = capsys.readouterr().out
    assert "recipe's model_kwargs" in out and '--model-kwargs none' in out and args.model_kwargs
    args = parse_train_args(['--config', QUICKSTART, '--model', 'vit_tiny_patch16_224', '--model-kwargs', 'none'])
    assert args.model_kwargs == {} and 'model_kwargs' not in capsys.readouterr().out
    both = parse_train_args(['--config', QUICKSTART, '--model-kwargs', 'none', 'depth=2'])   # drop, then set
    assert both.model_kwargs == {'depth': 2}
    same = parse_train_args(['--config', QUICKSTART])
    assert same.model_kwargs and 'model_kwargs' not in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason='the CPU default')
def test_a_recipes_amp_is_off_on_the_cpu_unless_asked(capsys):
    assert parse_train_args(['--config', 'configs/deit_t_mixpro.yaml']).amp is False
    assert "recipe's amp is off on the CPU" in capsys.readouterr().out
    assert parse_train_args(['--config', 'configs/deit_t_mixpro.yaml', '--amp']).amp is True
    assert parse_train_args(['--config', 'configs/deit_t_mixpro.yaml', '--amp-dtype', 'bfloat16']).amp is True
    assert parse_train_args(['--config', 'configs/deit_t_mixpro.yaml'], check_machine=False).amp is True


def test_multistep_milestones_and_plateau_patience_reach_the_schedule(capsys):
    args = parse_train_args(['--sched', 'multistep', '--decay-milestones', '2', '4', '--epochs', '6',
                             '--warmup-epochs', '0', '--lr', '1.0', '--decay-rate', '0.5'])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler, _ = create_scheduler(optimizer, sched=args.sched, epochs=args.epochs, updates_per_epoch=1,
                                    on_updates=False, lower_is_better=False, decay_milestones=args.decay_milestones,
                                    decay_rate=args.decay_rate, warmup_epochs=0, warmup_lr=1e-6, min_lr=0.0)
    lrs = []
    for epoch in range(6):
        scheduler.step(epoch)
        lrs.append(optimizer.param_groups[0]['lr'])
    assert lrs == [1.0, 0.5, 0.5, 0.25, 0.25, 0.25]   # timm's multistep: the lr of epoch m - 1 is decayed
    parse_train_args(['--sched', 'multistep', '--epochs', '50'])   # timm's 90/180/270 after the end
    assert 'multistep never decays in 50 epochs' in capsys.readouterr().out
    assert parse_train_args(['--patience-epochs', '3', '--warmup-prefix']).patience_epochs == 3


def test_resuming_another_runs_checkpoint_names_every_difference_and_initial_checkpoint(tmp_path):
    saved = {'model': 'deit_small_patch16_224', 'model_kwargs': {'depth': 4}, 'lr': 1.0,
             **{f'option{i}': i for i in range(10)}}
    options = {'model': 'deit_tiny_patch16_224', 'model_kwargs': {}, 'lr': 2.0,
               **{f'option{i}': -i - 1 for i in range(10)}}
    with pytest.raises(ConfigError) as err:
        check_same_run(saved, options, tmp_path / 'other' / 'last.pth.tar', own_folder=False)
    message = str(err.value)
    assert message.index('model:') < message.index('model_kwargs:') < message.index('lr:')   # the model first
    assert 'and 5 more' in message and '--initial-checkpoint' in message and '--experiment' not in message
    with pytest.raises(ConfigError, match='its own --experiment'):
        check_same_run(saved, options, tmp_path / 'run' / 'last.pth.tar', own_folder=True)


@pytest.mark.slow
def test_every_checkpoints_occlusion_is_checked_before_the_first_evaluation(data_dir, tmp_path):
    import train
    import validate
    from conftest import train_args
    train.main(train_args(data_dir, tmp_path, 'big', 'mixup_cutmix', 1, '--img-size', '32', '--mask-cell', '16'))
    train.main(train_args(data_dir, tmp_path, 'small', 'mixup_cutmix', 1))   # 16 px: 16 patches of 4 px
    big, small = (str(tmp_path / name / 'last.pth.tar') for name in ('big', 'small'))
    with pytest.raises(SystemExit) as err:   # 0.05 drops 3 of 64 patches at 32 px, none of 16 at 16 px
        validate.main(['--checkpoint', big, small, '--occlusion', '0.05', '--occlusion-patch', '4',
                       '--workers', '0', '--device', 'cpu', '--results-file', str(tmp_path / 'results.json')])
    assert small in str(err.value) and 'drops none' in str(err.value)
    assert not (tmp_path / 'results.json').exists()   # refused before the first checkpoint was evaluated


@pytest.mark.slow
def test_robustness_reads_the_data_folder_from_the_checkpoint(data_dir, tmp_path):
    import importlib.util
    import train
    from conftest import train_args
    spec = importlib.util.spec_from_file_location('robustness', 'scripts/robustness.py')
    robustness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(robustness)
    train.main(train_args(data_dir, tmp_path, 'run', 'mixup_cutmix', 1))
    table = robustness.main([str(tmp_path / 'run' / 'last.pth.tar'), '--occlusion', '0.5', '--occlusion-patch', '4',
                             '--output', str(tmp_path / 'table.md'), '--workers', '0', '--device', 'cpu'])
    assert (tmp_path / 'table.md').exists() and set(table[0][1]) == {'clean', 'occlusion 0.5'}
