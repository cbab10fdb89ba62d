"""scripts/slurm_train.sbatch: signal forwarding and requeueing, with fake srun / scancel / scontrol.

The fake `srun` logs its arguments and runs a small Python "training" that says it is ready, records
the signals it gets and exits with a chosen status; the fake `scancel --signal=SIG JOB` sends SIG to
that training (as Slurm signals the job steps); the fake `scontrol` answers `show hostnames` and logs
`requeue`. The tests send the signals to the batch shell only, as `--signal=B:USR1@300` does.
"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'scripts' / 'slurm_train.sbatch'
JOB_ID = '4242'

FAKE_TRAIN = r'''
import os, signal, sys, time
folder = os.environ['FAKE_DIR']
mode = os.environ['FAKE_MODE']            # wait: until a signal | ok: exit 0 | fail: exit 1
def on_signal(signum, frame):
    with open(os.path.join(folder, 'train.signals'), 'a') as f:
        f.write(signal.Signals(signum).name + '\n')
    sys.exit(int(os.environ.get('FAKE_SIGNAL_EXIT', 128 + signum)))
signal.signal(signal.SIGUSR1, on_signal)
signal.signal(signal.SIGTERM, on_signal)
with open(os.path.join(folder, 'train.pid'), 'w') as f:
    f.write(str(os.getpid()))
os.rename(os.path.join(folder, 'train.pid'), os.path.join(folder, 'train.ready'))
if mode == 'ok':
    sys.exit(0)
if mode == 'fail':
    sys.exit(1)
deadline = time.time() + 20                 # never hang the test suite
while time.time() < deadline:
    time.sleep(0.01)
sys.exit(99)
'''

FAKE_SRUN = '''#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_DIR/srun.args"
"$FAKE_PYTHON" "$FAKE_DIR/fake_train.py"
'''

FAKE_SCANCEL = '''#!/bin/bash
echo "$*" >> "$FAKE_DIR/scancel.log"
sig=
for arg in "$@"; do
  case $arg in --signal=*) sig=${arg#--signal=} ;; esac
done
[ -n "$sig" ] && [ -f "$FAKE_DIR/train.ready" ] && kill -s "$sig" "$(cat "$FAKE_DIR/train.ready")" 2>/dev/null
exit 0
'''

FAKE_SCONTROL = '''#!/bin/bash
echo "$*" >> "$FAKE_DIR/scontrol.log"
if [ "$1" = show ] && [ "$2" = hostnames ]; then
  printf 'gpu-node-07\\ngpu-node-08\\n'
fi
exit 0
'''


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for name, text in (('srun', FAKE_SRUN), ('scancel', FAKE_SCANCEL), ('scontrol', FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / 'fake_train.py').write_text(FAKE_TRAIN)
    env = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'FAKE_'))}
    env.update(PATH=f'{bin_dir}{os.pathsep}{env.get("PATH", "")}', FAKE_DIR=str(tmp_path), FAKE_PYTHON=sys.executable,
               SLURM_JOB_ID=JOB_ID, SLURM_JOB_NODELIST='gpu-node-[07-08]', SLURM_NNODES='2',
               GPUS_PER_NODE='4', MIXPRO_REPO=str(tmp_path), PYTHON='/venv/bin/python')
    env.pop('SHUTDOWN_TIMEOUT', None)
    env.pop('MAX_REQUEUES', None)
    return tmp_path, env


def start(env, mode, **extra):
    env = dict(env, FAKE_MODE=mode, **extra)
    return subprocess.Popen(['bash', str(SCRIPT), 'configs/deit_b_mixpro.yaml', '--data-dir', '/data/imagenet'],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_ready(folder, proc, timeout=10):
    deadline = time.time() + timeout
    while not (folder / 'train.ready').exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline, 'the fake training never started'
        time.sleep(0.01)


def finish(proc, timeout=15):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def lines(path):
    return path.read_text().splitlines() if path.exists() else []


def requeues(folder):
    return [line for line in lines(folder / 'scontrol.log') if line.startswith('requeue')]


@pytest.mark.parametrize('train_exit', ['138', '1'])   # train.py's own status / what torchrun returns after a signal
def test_time_limit_signal_is_forwarded_and_the_job_requeued(fake_slurm, train_exit):
    folder, env = fake_slurm
    proc = start(env, 'wait', FAKE_SIGNAL_EXIT=train_exit)
    wait_ready(folder, proc)
    os.kill(proc.pid, signal.SIGUSR1)        # --signal=B:USR1@300: the batch shell only
    status, out = finish(proc)
    assert lines(folder / 'scancel.log') == [f'--signal=USR1 {JOB_ID}']
    assert lines(folder / 'train.signals') == ['SIGUSR1']
    assert requeues(folder) == [f'requeue {JOB_ID}']
    assert status == 0, out
    assert 'time limit near' in out and 'requeueing' in out


def test_torchrun_forwards_usr1_and_waits_for_the_checkpoint(fake_slurm):
    folder, env = fake_slurm
    status, out = finish(start(env, 'ok'))
    assert status == 0, out
    args = lines(folder / 'srun.args')
    torchrun = args[args.index('torch.distributed.run') + 1:args.index('train.py')]
    handled = next(a.split('=', 1)[1] for a in torchrun if a.startswith('--signals-to-handle='))
    assert {'SIGUSR1', 'SIGTERM'} <= set(handled.split(','))
    timeout = int(next(a.split('=', 1)[1] for a in torchrun if a.startswith('--shutdown-timeout=')))
    lead = int(re.search(r'^#SBATCH --signal=B:USR1@(\d+)$', SCRIPT.read_text(), re.M).group(1))
    assert 60 <= timeout < lead             # time to write a large checkpoint, killed before the time limit
    assert '--rdzv_endpoint=gpu-node-07:29500' in torchrun and '--nnodes=2' in torchrun
    assert '--nproc_per_node=4' in torchrun and f'--rdzv_id={JOB_ID}' in torchrun
    assert args[:2] == ['--kill-on-bad-exit=1', '/venv/bin/python']
    assert args[args.index('train.py'):] == ['train.py', '--config', 'configs/deit_b_mixpro.yaml',
                                             '--data-dir', '/data/imagenet']
    status, out = finish(start(env, 'ok', SLURM_RESTART_COUNT='1'))   # a requeued start: from where it stopped
    assert status == 0, out
    assert lines(folder / 'srun.args')[-2:] == ['--resume', 'auto']


def test_normal_finish_exits_0_without_requeue(fake_slurm):
    folder, env = fake_slurm
    status, out = finish(start(env, 'ok'))
    assert status == 0, out
    assert requeues(folder) == [] and lines(folder / 'scancel.log') == []
    assert 'training finished' in out


def test_failure_without_signal_is_not_requeued(fake_slurm):
    folder, env = fake_slurm
    status, out = finish(start(env, 'fail'))
    assert status == 1, out
    assert requeues(folder) == [] and lines(folder / 'scancel.log') == []
    assert 'not requeueing' in out


def test_preemption_term_is_forwarded_without_scontrol_requeue(fake_slurm):
    folder, env = fake_slurm
    proc = start(env, 'wait')
    wait_ready(folder, proc)
    os.kill(proc.pid, signal.SIGTERM)
    status, out = finish(proc)
    assert lines(folder / 'scancel.log') == [f'--signal=USR1 {JOB_ID}']
    assert lines(folder / 'train.signals') == ['SIGUSR1']
    assert requeues(folder) == []
    assert status == 143, out


def test_run_that_finishes_at_the_time_limit_is_not_requeued(fake_slurm):
    folder, env = fake_slurm
    proc = start(env, 'wait', FAKE_SIGNAL_EXIT='0')   # train.py finished its last step as the signal came
    wait_ready(folder, proc)
    os.kill(proc.pid, signal.SIGUSR1)
    status, out = finish(proc)
    assert lines(folder / 'train.signals') == ['SIGUSR1']
    assert requeues(folder) == [] and status == 0, out


def test_requeues_stop_at_max_requeues(fake_slurm):
    folder, env = fake_slurm
    proc = start(env, 'wait', SLURM_RESTART_COUNT='3', MAX_REQUEUES='3')
    wait_ready(folder, proc)
    os.kill(proc.pid, signal.SIGUSR1)
    status, out = finish(proc)
    assert lines(folder / 'train.signals') == ['SIGUSR1']
    assert requeues(folder) == [] and status == 138, out
    assert 'MAX_REQUEUES=3' in out


def test_header_cpus_follow_the_imagenet_recipes():
    from mixpro.config import parse_train_args
    header = dict(re.findall(r'^#SBATCH --([\w-]+)(?:=(\S+))?$', SCRIPT.read_text(), re.M))
    assert header['signal'] == 'B:USR1@300' and 'requeue' in header and header['open-mode'] == 'append'
    workers = parse_train_args(['--config', str(REPO / 'configs' / 'deit_b_mixpro.yaml')]).workers
    assert int(header['cpus-per-task']) == int(header['gpus-per-node']) * (workers + 1)


def test_table1_sbatch_file_hands_the_signals_to_the_launcher(fake_slurm):
    """table1.py's sbatch files `exec` slurm_train.sbatch: a USR1 to the batch shell still requeues."""
    import importlib.util
    spec = importlib.util.spec_from_file_location('table1', REPO / 'scripts' / 'table1.py')
    table1 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table1)
    folder, env = fake_slurm
    table1.main(['plan', '--data-dir', '/data/imagenet', '--nodes', '2', '--slurm', str(folder / 'jobs')])
    sbatch = folder / 'jobs' / 'deit_t_mixpro.sbatch'
    proc = subprocess.Popen(['bash', str(sbatch)], env=dict(env, FAKE_MODE='wait'), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_ready(folder, proc)
    os.kill(proc.pid, signal.SIGUSR1)
    status, out = finish(proc)
    assert lines(folder / 'train.signals') == ['SIGUSR1']
    assert requeues(folder) == [f'requeue {JOB_ID}'] and status == 0, out
    assert '--nproc_per_node=8' in lines(folder / 'srun.args')
