"""--data-backend tensor through train.py: it trains, resumes bit-exactly mid-epoch with workers, evaluates as
Pillow does, and falls back to Pillow, with a note naming the option, where it cannot do what a recipe asks."""
import signal

import pytest
import torch

import train
from conftest import STEPS, load_state, read_summary, signal_during_mixer_call, train_args
from mixpro.config import parse_train_args

TENSOR = ('--data-backend', 'tensor', '--aa', 'rand-m9-mstd0.5-inc1', '--reprob', '0.25')


@pytest.mark.slow
def test_a_mid_epoch_resume_through_the_tensor_backend_is_bit_exact(data_dir, tmp_path, monkeypatch, capsys):
    extra = (*TENSOR, '--workers', '2')
    train.main(train_args(data_dir, tmp_path, 'straight', 'mixpro', 2, *extra))
    straight = load_state(tmp_path / 'straight' / 'last.pth.tar')
    assert 'tensor cannot train' not in capsys.readouterr().out   # it really ran on tensors

    args = train_args(data_dir, tmp_path, 'stopped', 'mixpro', 2, *extra)
    signal_during_mixer_call(monkeypatch, STEPS + 2, signal.SIGTERM)    # epoch 1, step 2 of 4
    with pytest.raises(SystemExit):
        train.main(args)
    monkeypatch.undo()
    train.main(args)
    resumed = load_state(tmp_path / 'stopped' / 'last.pth.tar')
    for name, tensor in straight['state_dict'].items():
        assert torch.equal(tensor, resumed['state_dict'][name]), name
    assert read_summary(tmp_path / 'stopped') == read_summary(tmp_path / 'straight')


@pytest.mark.slow
def test_workers_do_not_change_what_the_tensor_backend_trains(data_dir, tmp_path):
    """The RandAugment parameters are drawn in the workers from each sample's own seed."""
    alone = train.main(train_args(data_dir, tmp_path, 'w0', 'transmix', 1, *TENSOR, '--workers', '0'))
    two = train.main(train_args(data_dir, tmp_path, 'w2', 'transmix', 1, *TENSOR, '--workers', '2'))
    assert alone['eval'] == two['eval']
    weights = [load_state(tmp_path / run / 'last.pth.tar')['state_dict'] for run in ('w0', 'w2')]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.slow
def test_the_tensor_backend_evaluates_as_pillow_does(data_dir, tmp_path):
    """Its own evaluation of the same weights: torch's resize against Pillow's differs by rounding only."""
    import validate
    train.main(train_args(data_dir, tmp_path, 'run', 'mixup_cutmix', 1, '--data-backend', 'tensor'))
    path = str(tmp_path / 'run' / 'last.pth.tar')
    saved = load_state(path)['eval_metrics']['eval']
    pillow = validate.main(['--checkpoint', path, '--workers', '0', '--device', 'cpu'])[0]   # the run's backend
    assert pillow['top1'] == pytest.approx(saved['top1']) and pillow['loss'] == pytest.approx(saved['loss'])


@pytest.mark.parametrize('extra, phrase', [
    (('--color-jitter', '0.4'), '--color-jitter 0.4'),
    (('--aa', 'augmix-m5-w4-d2'), '--aa augmix-m5-w4-d2'),
    (('--aa', 'rand-m9-mstd0.5-inc1-t3a'), 'GaussianBlur'),
])
def test_options_the_tensor_backend_cannot_train_fall_back_to_pillow_with_a_note(data_dir, tmp_path, capsys,
                                                                                 extra, phrase):
    train.main(train_args(data_dir, tmp_path, 'run', 'mixup_cutmix', 1, '--data-backend', 'tensor', *extra,
                          '--epochs', '1'))
    out = capsys.readouterr().out
    assert 'tensor cannot train with' in out and phrase in out and 'training with pillow' in out
    assert 'data_backend: pillow' in (tmp_path / 'run' / 'config.yaml').read_text()   # what it trained with


@pytest.mark.skipif(torch.cuda.is_available(), reason='the CPU default')
def test_a_recipes_tensor_backend_is_pillow_on_the_cpu_unless_asked(capsys):
    recipe = 'configs/deit_t_mixpro.yaml'
    assert parse_train_args(['--config', recipe]).data_backend == 'pillow'
    assert "recipe's data_backend tensor is pillow on the CPU" in capsys.readouterr().out
    assert parse_train_args(['--config', recipe, '--data-backend', 'tensor']).data_backend == 'tensor'
    assert parse_train_args(['--config', recipe], check_machine=False).data_backend == 'tensor'
