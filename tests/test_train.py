"""End-to-end training, resume, validation and torchrun on tiny generated data (CPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
import validate
from conftest import make_image_folder, read_summary, train_args
from test_compare_runs import load_script
from mixpro import training
from mixpro.config import parse_train_args

REPO = Path(__file__).resolve().parents[1]


def scalar_tags(run_dir):
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return set(events.Tags()['scalars']), set(events.Tags()['images'])


# each method also exercises one more training path
EXTRA = {
    'mixup_cutmix': ['--channels-last', '--aug-repeats', '3'],   # repeated aug needs DDP: skipped, said
    'transmix': ['--grad-accum-steps', '2', '--clip-grad', '1.0'],
    'maskmix': ['--amp', '--amp-dtype', 'bfloat16'],
    'mixpro': ['--torchcompile', 'eager', '--compile-mixer', 'aot_eager'],
}


@pytest.mark.slow
@pytest.mark.parametrize('method', list(EXTRA))
def test_each_method_trains_and_writes_its_run_folder(data_dir, tmp_path, method):
    result = train.main(train_args(data_dir, tmp_path, method, method, 2, '--model-ema',
                                   '--model-ema-decay', '0.9', *EXTRA[method]))
    run_dir = tmp_path / method
    rows = read_summary(run_dir)
    assert [int(r['epoch']) for r in rows] == [0, 1]
    assert {'train_loss', 'eval_top1', 'eval_top5', 'eval_loss', 'eval_ema_top1', 'lr'} <= set(rows[0])
    assert float(rows[-1]['eval_top1']) == pytest.approx(result['eval']['top1'])
    assert result['eval']['count'] == 18
    for name in ('last.pth.tar', 'model_best.pth.tar', 'config.yaml', 'run_info.yaml'):
        assert (run_dir / name).exists(), name
    assert yaml.safe_load((run_dir / 'config.yaml').read_text())['mix_method'] == method
    assert 'git_commit' in yaml.safe_load((run_dir / 'run_info.yaml').read_text())
    scalars, images = scalar_tags(run_dir)
    assert {'train/loss', 'train/lr', 'train/epoch_time_s', 'train/img_per_s', 'eval/top1', 'eval/top5',
            'eval_ema/top1'} <= scalars
    assert 'mix/samples' in images
    labelled = {'mix/lam_area', 'mix/lam_attn'}
    assert (labelled <= scalars) == (method in ('transmix', 'mixpro'))
    assert ('mix/alpha' in scalars) == (method == 'mixpro')
    state = torch.load(run_dir / 'last.pth.tar', weights_only=True)
    assert state['epoch'] == 1 and state['state_dict_ema'] is not None
    assert float(rows[0]['lr']) == pytest.approx(1e-6)     # epoch 0 trained at the warmup lr
    again = parse_train_args(['--config', str(run_dir / 'config.yaml')])   # the saved config is a recipe
    assert again.mix_method == method and again.model_kwargs == state['args']['model_kwargs']


@pytest.mark.slow
def test_val_interval_evaluates_every_nth_and_the_last_epoch_and_ranks_only_those(data_dir, tmp_path, capsys):
    result = train.main(train_args(data_dir, tmp_path, 'sparse', 'mixpro', 3, '--val-interval', '2',
                                   '--model-ema', '--model-ema-decay', '0.5'))
    run_dir = tmp_path / 'sparse'
    lines = {line.split(':')[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith('epoch')}
    assert 'not evaluated (--val-interval)' in lines['epoch 0'] and 'top-1' in lines['epoch 1']
    rows = read_summary(run_dir)
    assert [int(r['epoch']) for r in rows] == [0, 1, 2]
    assert rows[0]['eval_top1'] == rows[0]['eval_ema_loss'] == ''          # left empty, not made up
    assert rows[1]['eval_top1'] != '' and float(rows[2]['eval_top1']) == pytest.approx(result['eval']['top1'])
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert [e.step for e in events.Scalars('eval/top1')] == [1, 2]
    assert [e.step for e in events.Scalars('train/loss')] == [0, 1, 2]
    ranked = torch.load(run_dir / 'last.pth.tar', weights_only=True)['checkpoint_ranking']
    assert sorted(epoch for _, epoch in ranked) == [1, 2]
    assert not (run_dir / 'checkpoint-0.pth.tar').exists()
    compare_runs = load_script('compare_runs')
    (row,) = compare_runs.collect_runs([run_dir])
    assert row['epochs_done'] == 3 and row['best_epoch'] in (1, 2)
    assert row['final_top1'] == pytest.approx(result['eval']['top1'])
    # an epoch that was not evaluated resumes like any other: its checkpoint has no metric
    again = train.main(train_args(data_dir, tmp_path, 'sparse', 'mixpro', 4, '--val-interval', '3',
                                  '--model-ema', '--model-ema-decay', '0.5'))
    assert again['epoch'] == 3 and 'eval' in again                        # the last epoch is evaluated


@pytest.mark.slow
def test_eval_metric_ranks_the_best_checkpoints_by_the_ema_loss(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit, match='--eval-metric ema_loss.*needs --model-ema'):
        train.main(train_args(data_dir, tmp_path, 'r', 'mixpro', 3, '--eval-metric', 'ema_loss'))
    train.main(train_args(data_dir, tmp_path, 'r', 'mixpro', 3, '--eval-metric', 'ema_loss', '--model-ema',
                          '--model-ema-decay', '0.5', '--checkpoint-hist', '1', '--wandb-project', 'p1'))
    losses = {int(r['epoch']): float(r['eval_ema_loss']) for r in read_summary(tmp_path / 'r')}
    best_epoch = min(losses, key=lambda e: (losses[e], e))
    best = torch.load(tmp_path / 'r' / 'model_best.pth.tar', weights_only=True)
    assert best['epoch'] == best_epoch and best['metric'] == pytest.approx(losses[best_epoch], abs=1e-4)
    out = capsys.readouterr().out
    assert f'best ema_loss {best["metric"]:.4f} at epoch {best_epoch}' in out
    assert '--wandb-project p1 logs nothing' in out and 'without --log-wandb' in out


@pytest.mark.slow
def test_resume_continues_at_the_saved_epoch_with_identical_state(data_dir, tmp_path, monkeypatch):
    args = train_args(data_dir, tmp_path, 'straight', 'mixpro', 3, '--model-ema', '--model-ema-decay', '0.9',
                      '--drop-path', '0.1')
    train.main(args)
    straight = torch.load(tmp_path / 'straight' / 'last.pth.tar', weights_only=True)

    crash_args = [a if a != 'straight' else 'crashed' for a in args]
    real_epoch = training.train_one_epoch

    def crash_in_epoch_two(step, loader, monitor, *a, **kw):
        if monitor.epoch == 2:
            raise KeyboardInterrupt('simulated crash')
        return real_epoch(step, loader, monitor, *a, **kw)
    monkeypatch.setattr(training, 'train_one_epoch', crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train.main(crash_args)
    before = torch.load(tmp_path / 'crashed' / 'last.pth.tar', weights_only=True)   # still loads
    assert before['epoch'] == 1
    monkeypatch.setattr(training, 'train_one_epoch', real_epoch)
    train.main(crash_args)   # --resume auto is the default
    resumed = torch.load(tmp_path / 'crashed' / 'last.pth.tar', weights_only=True)

    assert resumed['epoch'] == 2
    for key in ('state_dict', 'state_dict_ema'):
        for name, tensor in straight[key].items():
            assert torch.equal(tensor, resumed[key][name]), f'{key}.{name} differs after resume'
    assert resumed['scheduler'] == straight['scheduler']
    assert resumed['metric'] == straight['metric']
    assert [int(r['epoch']) for r in read_summary(tmp_path / 'crashed')] == [0, 1, 2]


@pytest.mark.slow
def test_auto_resume_refuses_a_run_with_other_settings(data_dir, tmp_path):
    train.main(train_args(data_dir, tmp_path, 'run', 'transmix', 1))
    with pytest.raises(SystemExit, match='other settings') as err:
        train.main([*train_args(data_dir, tmp_path, 'run', 'mixpro', 2), '--seed', '1'])
    assert "mix_method: 'transmix' -> 'mixpro'" in str(err.value) and 'seed: 42 -> 1' in str(err.value)
    assert read_summary(tmp_path / 'run')[0]['epoch'] == '0'
    assert yaml.safe_load((tmp_path / 'run' / 'config.yaml').read_text())['mix_method'] == 'transmix'
    train.main(train_args(data_dir, tmp_path, 'run', 'transmix', 2))        # more epochs: allowed
    assert [int(r['epoch']) for r in read_summary(tmp_path / 'run')] == [0, 1]
    with pytest.raises(SystemExit, match='checkpoint_hist must be >= 1'):
        train.main([*train_args(data_dir, tmp_path, 'other', 'transmix', 1), '--checkpoint-hist', '0'])


class _FakeWandbRun:
    def __init__(self, **settings):
        self.settings, self.logged, self.step_metrics, self.exit_code = settings, [], {}, None

    def define_metric(self, name, step_metric=None):
        self.step_metrics[name] = step_metric

    def log(self, data):
        self.logged.append(data)

    def finish(self, exit_code=0):
        self.exit_code = exit_code


@pytest.fixture
def fake_wandb(monkeypatch):
    """The few calls of the wandb package a run makes, recorded (nothing is sent anywhere)."""
    import importlib.machinery
    import types
    module = types.ModuleType('wandb')
    module.__spec__ = importlib.machinery.ModuleSpec('wandb', None)
    module.runs = []
    module.init = lambda **settings: module.runs.append(_FakeWandbRun(**settings)) or module.runs[-1]
    module.Image = lambda picture: ('picture', picture.size)
    monkeypatch.setitem(sys.modules, 'wandb', module)
    return module


@pytest.mark.slow
def test_log_wandb_mirrors_the_epoch_scalars_into_one_wandb_run_across_resumes(data_dir, tmp_path, fake_wandb):
    wandb_args = ['--log-wandb', '--wandb-project', 'table1']
    train.main([*train_args(data_dir, tmp_path, 'watched', 'mixpro', 2), *wandb_args])
    first = fake_wandb.runs[0]
    assert first.settings['project'] == 'table1' and first.settings['name'] == 'watched'
    assert first.settings['resume'] == 'allow' and first.settings['config']['mix_method'] == 'mixpro'
    assert first.settings['dir'] == str(tmp_path / 'watched')                  # W&B's files in the run folder
    assert {first.step_metrics[f'{p}/*'] for p in ('train', 'mix', 'eval', 'eval_ema')} == {'epoch'}
    assert first.exit_code == 0
    scalars = [d for d in first.logged if 'eval/top1' in d]
    rows = read_summary(tmp_path / 'watched')
    assert [d['epoch'] for d in scalars] == [0, 1]
    for logged, row in zip(scalars, rows):
        assert logged['eval/top1'] == pytest.approx(float(row['eval_top1']))
        assert logged['train/loss'] == pytest.approx(float(row['train_loss']))
    assert any(d.get('mix/samples', (None,))[0] == 'picture' for d in first.logged)

    train.main([*train_args(data_dir, tmp_path, 'watched', 'mixpro', 3), *wandb_args])   # the run goes on
    second = fake_wandb.runs[1]
    assert second.settings['id'] == first.settings['id']             # into the same W&B run
    assert [d['epoch'] for d in second.logged if 'eval/top1' in d] == [2]


def test_a_run_that_crashes_is_marked_failed_on_wandb(data_dir, tmp_path, fake_wandb, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError('CUDA error: an illegal memory access was encountered')
    monkeypatch.setattr(training, 'train_one_epoch', crash)
    with pytest.raises(RuntimeError, match='illegal memory access'):
        train.main([*train_args(data_dir, tmp_path, 'crashing', 'mixpro', 1), '--log-wandb'])
    assert fake_wandb.runs[0].exit_code == 1


def test_a_wandb_that_cannot_start_stops_the_run_before_training_in_one_line(data_dir, tmp_path, fake_wandb):
    def not_logged_in(**settings):
        raise RuntimeError('api_key not configured (no-tty)')
    fake_wandb.init = not_logged_in
    with pytest.raises(SystemExit, match='--log-wandb: W&B did not start') as err:
        train.main([*train_args(data_dir, tmp_path, 'offline', 'mixpro', 1), '--log-wandb'])
    assert 'api_key not configured' in str(err.value)
    assert not list((tmp_path / 'offline').glob('*.pth.tar'))


def test_log_wandb_without_the_package_is_one_line_before_anything_runs(data_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'wandb', None)                  # as if not installed
    with pytest.raises(SystemExit, match='--log-wandb needs .*pip install wandb'):
        train.main([*train_args(data_dir, tmp_path, 'unwatched', 'mixpro', 1), '--log-wandb'])
    assert not (tmp_path / 'unwatched').exists()


@pytest.mark.slow
def test_validate_reproduces_the_in_training_top1(data_dir, tmp_path):
    train.main(train_args(data_dir, tmp_path, 'run', 'transmix', 2, '--model-ema', '--model-ema-decay', '0.5'))
    best = tmp_path / 'run' / 'model_best.pth.tar'
    state = torch.load(best, weights_only=True)
    out = tmp_path / 'made' / 'results.json'         # its folder is made
    results = validate.main(['--checkpoint', str(best), '--data-dir', str(data_dir), '--workers', '0',
                             '--results-file', str(out), '--batch-size', '5'])[0]
    assert results['top1'] == pytest.approx(state['metric'], abs=1e-6)
    assert results['samples'] == 18
    assert json.loads(out.read_text())['top1'] == results['top1']
    ema = validate.main(['--checkpoint', str(best), '--data-dir', str(data_dir), '--workers', '0', '--use-ema',
                         '--results-file', str(tmp_path / 'ema.csv')])[0]
    assert ema['top1'] == pytest.approx(state['eval_metrics']['eval_ema']['top1'], abs=1e-6)
    assert (tmp_path / 'ema.csv').read_text().startswith('checkpoint,')
    assert (results['img_size'], results['crop_pct']) == (16, 1.0)       # the transform measured with
    common = ['--checkpoint', str(best), '--data-dir', str(data_dir), '--workers', '0']
    graphs = []

    @torch._dynamo.register_backend
    def validate_counted(graph, inputs):
        graphs.append(graph)
        return torch._dynamo.lookup_backend('aot_eager')(graph, inputs)
    compiled = validate.main([*common, '--torchcompile', 'validate_counted'])[0]
    assert graphs and compiled['top1'] == results['top1']
    assert compiled['loss'] == pytest.approx(results['loss'], abs=1e-5)
    upsampled = {mode: validate.main([*common, '--crop-pct', '0.5', '--interpolation', mode])[0]
                 for mode in ('nearest', 'bicubic')}                     # 16 px images resized to 32 px
    assert [row['interpolation'] for row in upsampled.values()] == ['nearest', 'bicubic']
    assert upsampled['nearest']['loss'] != pytest.approx(upsampled['bicubic']['loss'], abs=1e-6)
    with pytest.raises(SystemExit, match='--torchcompile no_such is not a .*backend'):
        validate.main(['--checkpoint', str(best), '--torchcompile', 'no_such'])


@pytest.mark.slow
def test_validate_refuses_a_checkpoint_that_does_not_fit(data_dir, tmp_path, capsys):
    train.main(train_args(data_dir, tmp_path, 'run', 'mixup_cutmix', 1))
    checkpoint = str(tmp_path / 'run' / 'last.pth.tar')
    other = make_image_folder(tmp_path / 'four_classes', classes=4, train_per_class=1, val_per_class=1)
    with pytest.raises(SystemExit, match='four_classes/val.*do not have: class3'):
        validate.main(['--checkpoint', checkpoint, '--data-dir', str(other), '--workers', '0'])
    state = torch.load(checkpoint, weights_only=True)
    state['args']['model_kwargs']['depth'] = 3          # weights of 2 blocks for a 3-block model
    torch.save(state, tmp_path / 'deeper.pth.tar')
    with pytest.raises(SystemExit, match="deeper.pth.tar does not fit .*blocks.2"):
        validate.main(['--checkpoint', str(tmp_path / 'deeper.pth.tar'), '--data-dir', str(data_dir)])
    with pytest.raises(SystemExit, match='no EMA weights'):
        validate.main(['--checkpoint', checkpoint, '--data-dir', str(data_dir), '--use-ema'])
    with pytest.raises(SystemExit, match='--num-classes 5 with .*last.pth.tar') as err:
        validate.main(['--checkpoint', checkpoint, '--data-dir', str(data_dir), '--num-classes', '5'])
    assert 'its own class count (3' in str(err.value)
    with pytest.raises(SystemExit, match='--img-size 32: .*last.pth.tar') as err:
        validate.main(['--checkpoint', checkpoint, '--data-dir', str(data_dir), '--img-size', '32'])
    assert 'trained at 16 px' in str(err.value) and 'not fit a 32 px model' in str(err.value)
    with pytest.raises(SystemExit, match="does not fit model 'resnet18'"):   # the model, not the size, is wrong
        validate.main(['--checkpoint', checkpoint, '--data-dir', str(data_dir), '--img-size', '32',
                       '--model', 'resnet18'])
    with pytest.raises(SystemExit, match='missing.pth.tar does not exist'):
        validate.main(['--checkpoint', str(tmp_path / 'missing.pth.tar')])
    # refused before the good checkpoint is evaluated, not after: on ImageNet that is an hour
    for wrong, message in ((['--checkpoint', checkpoint, str(tmp_path / 'typo.pth.tar')], 'typo.pth.tar does not'),
                           (['--checkpoint', checkpoint, '--occlusion', '0', '1.5'], '--occlusion 1.5: a ratio'),
                           (['--checkpoint', checkpoint, '--results-file', checkpoint + '/r.json'],
                            r'cannot create its folder \(.*last.pth.tar is not a folder\)')):
        with pytest.raises(SystemExit, match=message):
            validate.main([*wrong, '--data-dir', str(data_dir), '--workers', '0'])
        assert 'evaluating' not in capsys.readouterr().out


def test_attention_methods_refuse_models_without_class_token(data_dir, tmp_path):
    args = train_args(data_dir, tmp_path, 'r', 'transmix', 1)
    model_kwargs = args.index('--model-kwargs')
    args = args[:model_kwargs + 1] + args[model_kwargs + 5:]     # resnet18 takes none of the ViT kwargs
    with pytest.raises(SystemExit, match="mix_method transmix: model 'resnet18'"):
        train.main([*args, '--model', 'resnet18'])


@pytest.mark.slow
def test_torchrun_two_processes_train_and_validate(data_dir, tmp_path):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    launch = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    subprocess.run([*launch, str(REPO / 'train.py'), *train_args(data_dir, tmp_path, 'ddp', 'mixpro', 1,
                                                                '--batch-size', '4', '--aug-repeats', '2',
                                                                '--grad-accum-steps', '2', '--model-ema',
                                                                '--model-ema-decay', '0.5')],
                   check=True, cwd=REPO, env=env, timeout=300)
    state = torch.load(tmp_path / 'ddp' / 'last.pth.tar', weights_only=True)
    assert len(state['rng_states']) == 2
    out = tmp_path / 'ddp_val.json'
    subprocess.run([*launch, str(REPO / 'validate.py'), '--checkpoint', str(tmp_path / 'ddp' / 'last.pth.tar'),
                    '--data-dir', str(data_dir), '--workers', '0', '--batch-size', '4', '--device', 'cpu',
                    '--results-file', str(out)], check=True, cwd=REPO, env=env, timeout=300)
    results = json.loads(out.read_text())
    assert results['samples'] == 18            # every image exactly once over both ranks
    assert results['top1'] == pytest.approx(state['metric'], abs=1e-6)
    # the in-training EMA evaluation ran on both ranks' EMA copies; it matches the saved (rank-0) EMA
    # only while every rank's EMA is the same model
    ema = validate.main(['--checkpoint', str(tmp_path / 'ddp' / 'last.pth.tar'), '--data-dir', str(data_dir),
                         '--workers', '0', '--use-ema', '--device', 'cpu'])[0]
    assert ema['loss'] == pytest.approx(state['eval_metrics']['eval_ema']['loss'], abs=1e-5)


def pvt_args(data_dir, out, experiment, mask_cell):
    args = train_args(data_dir, out, experiment, 'mixpro', 1)
    model_kwargs = args.index('--model-kwargs')
    args = args[:model_kwargs + 1] + ['depths=(1,1,1,1)'] + args[model_kwargs + 5:]
    return [*args, '--model', 'pvt_tiny', '--img-size', '64', '--mask-cell', str(mask_cell)]


@pytest.mark.slow
def test_pvt_trains_with_mixpro_on_its_32px_token_grid(data_dir, tmp_path):
    result = train.main(pvt_args(data_dir, tmp_path, 'pvt', 32))
    assert result['eval']['count'] == 18
    with pytest.raises(SystemExit, match='mask_cell=16 .*token_size=32'):
        train.main(pvt_args(data_dir, tmp_path, 'pvt_bad', 16))
