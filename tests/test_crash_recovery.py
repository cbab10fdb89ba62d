"""A non-finite loss and a hard crash: what is saved, and the resume from a recovery save (issue 7)."""
import pytest
import torch

import train
from conftest import STEPS, load_state, nan_loss_at, read_summary, train_args


def test_a_nan_loss_stops_the_run_before_anything_is_saved(data_dir, tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, STEPS + 2)
    with pytest.raises(SystemExit, match='loss is not finite') as err:
        train.main(train_args(data_dir, tmp_path, 'nan', 'transmix', 3))
    assert 'epoch 1 step 2/4' in str(err.value)
    run_dir = tmp_path / 'nan'
    last = load_state(run_dir / 'last.pth.tar')
    assert last['epoch'] == 0 and all(torch.isfinite(t).all() for t in last['state_dict'].values())
    assert load_state(run_dir / 'model_best.pth.tar')['epoch'] == 0
    assert [r['epoch'] for r in read_summary(run_dir)] == ['0']
    assert not (run_dir / 'interrupted.pth.tar').exists()


@pytest.mark.slow
def test_recovery_saves_survive_a_hard_crash_and_the_resumed_run_is_bit_exact(data_dir, tmp_path, monkeypatch,
                                                                               capsys):
    """--recovery-interval 2: a resumable state after steps 2 of every epoch, so a crash (no signal, no
    save of its own) at epoch 1 step 4 resumes from step 2 and ends as the run that never crashed."""
    from mixpro.mixer import Mixer
    extra = ('--workers', '2', '--model-ema', '--model-ema-decay', '0.9')
    train.main(train_args(data_dir, tmp_path, 'straight', 'mixpro', 2, *extra))
    straight = load_state(tmp_path / 'straight' / 'last.pth.tar')

    args = train_args(data_dir, tmp_path, 'crashed', 'mixpro', 2, *extra, '--recovery-interval', '2')
    real, calls = Mixer.__call__, {'n': 0}

    def crashing(self, x, y):
        calls['n'] += 1
        if calls['n'] == STEPS + 4:                                     # epoch 1, step 4 of 4
            raise RuntimeError('node lost')
        return real(self, x, y)
    monkeypatch.setattr(Mixer, '__call__', crashing)
    with pytest.raises(RuntimeError, match='node lost'):
        train.main(args)
    run_dir = tmp_path / 'crashed'
    assert load_state(run_dir / 'interrupted.pth.tar')['resume_at'] == [1, 2]
    assert load_state(run_dir / 'last.pth.tar')['epoch'] == 0

    monkeypatch.undo()
    train.main(args)                                                     # --resume auto
    out = capsys.readouterr().out
    assert 'resumed from' in out and 'interrupted.pth.tar at epoch 1 step 2' in out
    resumed = load_state(run_dir / 'last.pth.tar')
    assert not (run_dir / 'interrupted.pth.tar').exists()                # superseded by the epoch's end
    for key in ('state_dict', 'state_dict_ema'):
        for name, tensor in straight[key].items():
            assert torch.equal(tensor, resumed[key][name]), f'{key}.{name} differs after the crash and resume'
    assert read_summary(run_dir) == read_summary(tmp_path / 'straight')


@pytest.mark.slow
def test_a_recovery_save_never_holds_non_finite_weights(data_dir, tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, STEPS + 1)
    with pytest.raises(SystemExit, match='loss is not finite') as err:
        train.main(train_args(data_dir, tmp_path, 'nan', 'mixpro', 2, '--recovery-interval', '1',
                              '--log-interval', '0'))
    assert 'epoch 1 step 1/4' in str(err.value)
    run_dir = tmp_path / 'nan'
    assert not (run_dir / 'interrupted.pth.tar').exists()
    assert load_state(run_dir / 'last.pth.tar')['epoch'] == 0
