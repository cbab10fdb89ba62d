"""Preemption: a signal mid-epoch saves the position, exits 128 + the signal, and --resume auto goes on
bit-exactly (in-process, from the command line, under torchrun) (issue 7)."""
import os
import signal
import subprocess
import sys

import pytest
import torch

import train
from conftest import REPO, STEPS, load_state, read_summary, signal_during_mixer_call, train_args, xcit_train_args

pytestmark = pytest.mark.slow   # subprocesses or several training runs: seconds each


def test_sigterm_mid_epoch_saves_and_the_resumed_run_is_bit_exact_with_workers(data_dir, tmp_path, monkeypatch,
                                                                                capsys):
    extra = ('--workers', '2', '--model-ema', '--model-ema-decay', '0.9', '--drop-path', '0.1')
    train.main(train_args(data_dir, tmp_path, 'straight', 'mixpro', 3, *extra))
    straight = load_state(tmp_path / 'straight' / 'last.pth.tar')

    args = train_args(data_dir, tmp_path, 'stopped', 'mixpro', 3, *extra)
    signal_during_mixer_call(monkeypatch, STEPS + 2, signal.SIGTERM)    # epoch 1, step 2 of 4
    with pytest.raises(SystemExit) as stopped:
        train.main(args)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert 'SIGTERM: stopped at epoch 1 step 2/4' in capsys.readouterr().out
    run_dir = tmp_path / 'stopped'
    assert load_state(run_dir / 'interrupted.pth.tar')['resume_at'] == [1, 2]
    assert load_state(run_dir / 'last.pth.tar')['epoch'] == 0                 # the epoch-0 state is untouched
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL           # handlers restored after the run

    monkeypatch.undo()
    train.main(args)                                                     # --resume auto
    assert 'resumed from' in capsys.readouterr().out
    resumed = load_state(run_dir / 'last.pth.tar')
    assert not (run_dir / 'interrupted.pth.tar').exists()
    for key in ('state_dict', 'state_dict_ema'):
        for name, tensor in straight[key].items():
            assert torch.equal(tensor, resumed[key][name]), f'{key}.{name} differs after the mid-epoch resume'
    assert read_summary(run_dir) == read_summary(tmp_path / 'straight')  # losses, top-1, lr: all equal


@pytest.mark.parametrize('signum,to_group,workers', [(signal.SIGUSR1, False, '0'), (signal.SIGTERM, True, '2'),
                                                     (signal.SIGINT, True, '2')],
                         ids=['usr1-to-the-process', 'term-to-the-process-group-with-workers',
                              'ctrl-c-to-the-process-group-with-workers'])
def test_a_signal_to_the_command_line_saves_and_exits_128_plus_it(data_dir, tmp_path, signum, to_group, workers):
    """A cluster signals every process of the job: the data-loading workers and their forkserver too."""
    args = train_args(data_dir, tmp_path, 'signalled', 'mixup_cutmix', 200, '--workers', workers)
    proc = subprocess.Popen([sys.executable, str(REPO / 'train.py'), *args, '--log-interval', '1'], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith('epoch 1 ['):            # training for real: preempt it
            os.killpg(proc.pid, signum) if to_group else proc.send_signal(signum)
            break
    lines += proc.stdout.readlines()
    assert proc.wait(timeout=120) == 128 + signum, ''.join(lines)
    text = ''.join(lines)
    assert f'{signal.Signals(signum).name}: stopped' in text and '--resume auto continues' in text
    saved = [p for p in (tmp_path / 'signalled').glob('*.pth.tar') if p.name in ('interrupted.pth.tar', 'last.pth.tar')]
    position = max(tuple(load_state(p).get('resume_at', [0, 0])) for p in saved)
    assert position >= (1, 1)


def _torchrun(args, **popen):
    launch = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    return subprocess.Popen([*launch, str(REPO / 'train.py'), *args], cwd=REPO, text=True,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'}, **popen)


def test_sigterm_to_torchrun_stops_every_rank_at_one_step_and_resumes_exactly(data_dir, tmp_path):
    """XCiT with EMA: within an epoch each rank's EMA has its own BatchNorm statistics (DDP syncs only the
    model's), which the mid-epoch save must keep per rank for --dist-bn to average the same ones."""
    extra = ('--batch-size', '4', '--workers', '1', '--log-interval', '1', '--image-grid-interval', '0',
             '--model-ema', '--model-ema-decay', '0.9')
    assert _torchrun(xcit_train_args(data_dir, tmp_path, 'straight', 'transmix', 3, *extra)).wait(timeout=300) == 0
    args = xcit_train_args(data_dir, tmp_path, 'stopped', 'transmix', 3, *extra)
    proc = _torchrun(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith('epoch 1 ['):
            proc.send_signal(signal.SIGTERM)        # torchrun forwards it to every rank (and their workers)
            break
    lines += proc.stdout.readlines()
    proc.wait(timeout=120)
    assert 'SIGTERM: stopped' in ''.join(lines), ''.join(lines)[-3000:]
    assert _torchrun(args).wait(timeout=300) == 0
    straight = load_state(tmp_path / 'straight' / 'last.pth.tar')
    resumed = load_state(tmp_path / 'stopped' / 'last.pth.tar')
    assert len(resumed['rng_states']) == 2
    for weights in ('state_dict', 'state_dict_ema'):
        for name, tensor in straight[weights].items():
            assert torch.equal(tensor, resumed[weights][name]), f'{weights} {name} differs after the resume'
    assert read_summary(tmp_path / 'stopped') == read_summary(tmp_path / 'straight')
