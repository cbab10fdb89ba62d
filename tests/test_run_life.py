"""A run's life beyond its own process: a launcher killed outright, a crash between an epoch's checkpoint
and its summary.csv row, a run resumed at another precision."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import train
from conftest import load_state, read_summary, train_args
from mixpro.logger import RunLogger

REPO = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize('under_torchrun', [True, False])
def test_a_rank_whose_launcher_is_killed_stops(tmp_path, under_torchrun):
    """A launcher (torchrun's agent) killed with SIGKILL passes no signal on: the rank must notice itself."""
    rank = textwrap.dedent(f"""
        import os, signal, sys, time
        sys.path.insert(0, {str(REPO)!r})
        from mixpro.run_folder import stop_when_orphaned
        signal.signal(signal.SIGTERM, lambda *_: (open({str(tmp_path / 'stopped')!r}, 'w').close(), os._exit(0)))
        stop_when_orphaned(interval=0.1)
        print(os.getpid(), flush=True)
        time.sleep(60)
    """)
    launcher = textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, '-c', {rank!r}], stdout=sys.stdout)
        time.sleep(60)
    """)
    env = {**os.environ, 'TORCHELASTIC_RUN_ID': 'test'} if under_torchrun else \
        {k: v for k, v in os.environ.items() if k != 'TORCHELASTIC_RUN_ID'}
    agent = subprocess.Popen([sys.executable, '-c', launcher], stdout=subprocess.PIPE, text=True, env=env)
    rank_pid = int(agent.stdout.readline())
    agent.kill()
    agent.wait()
    deadline = time.time() + (10 if under_torchrun else 3)   # the watch polls every 0.1 s
    while _alive(rank_pid) and time.time() < deadline:
        time.sleep(0.1)
    try:
        assert (tmp_path / 'stopped').exists() == under_torchrun
        assert _alive(rank_pid) != under_torchrun   # outside torchrun nothing watches (a plain python parent)
    finally:
        if _alive(rank_pid):
            os.kill(rank_pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize('epochs', [3, 2])   # a middle epoch; the last one, after which the run is finished
def test_a_crash_between_checkpoint_and_summary_row_loses_no_row(data_dir, tmp_path, monkeypatch, epochs):
    real = RunLogger.log_epoch

    def crash_at_epoch_one(self, epoch, *args, **kwargs):
        if epoch == 1:
            raise KeyboardInterrupt('killed after the checkpoint, before the row')
        return real(self, epoch, *args, **kwargs)
    monkeypatch.setattr(RunLogger, 'log_epoch', crash_at_epoch_one)
    argv = train_args(data_dir, tmp_path, 'run', 'mixup_cutmix', epochs, '--val-interval', '2')
    with pytest.raises(KeyboardInterrupt):
        train.main(argv)
    run_dir = tmp_path / 'run'
    assert load_state(run_dir / 'last.pth.tar')['epoch'] == 1
    assert [r['epoch'] for r in read_summary(run_dir)] == ['0']   # never ahead of the checkpoint
    monkeypatch.setattr(RunLogger, 'log_epoch', real)
    train.main(argv)
    rows = read_summary(run_dir)
    assert [r['epoch'] for r in rows] == [str(e) for e in range(epochs)]
    assert rows[1]['eval_top1'] != '' and rows[0]['eval_top1'] == '' and float(rows[1]['train_loss']) > 0


@pytest.mark.slow
def test_a_run_resumes_at_another_precision(data_dir, tmp_path, capsys):
    train.main(train_args(data_dir, tmp_path, 'run', 'mixpro', 1, '--amp', '--amp-dtype', 'float16'))
    capsys.readouterr()
    result = train.main(train_args(data_dir, tmp_path, 'run', 'mixpro', 2, '--no-amp'))
    assert result['epoch'] == 1 and 'trained in amp float16 and goes on in float32' in capsys.readouterr().out
    assert load_state(tmp_path / 'run' / 'last.pth.tar')['args']['amp'] is False
