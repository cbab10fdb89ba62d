"""Data-loading workers never keep a process alive: at exit, after Ctrl-C, after a crash, or when the
training process is killed outright (issue 7)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow   # subprocesses or several training runs: seconds each


KEEPS_A_LOADER = """
import os, signal, sys, time
import torch
from mixpro.data import _data_loader

if __name__ == '__main__':
    dataset = torch.utils.data.TensorDataset(torch.randn(64, 3, 8, 8), torch.arange(64))
    batches = iter(_data_loader(dataset, 2, False, torch.device('cpu'), batch_size=8))   # the iterator only
    next(batches)
    if sys.argv[1] == 'ctrl-c':     # a terminal's Ctrl-C reaches the workers and their forkserver too
        os.killpg(os.getpgrp(), signal.SIGINT)
        time.sleep(5)
    if sys.argv[1] == 'killed':     # the test kills this process outright
        print(' '.join(str(w.pid) for w in batches._workers), flush=True)
        time.sleep(60)
"""


@pytest.mark.parametrize('how,statuses', [('exit', (0,)), ('ctrl-c', (-signal.SIGINT, 128 + signal.SIGINT))])
def test_a_script_holding_a_loader_with_workers_exits(tmp_path, how, statuses):
    """The workers ignore SIGTERM and SIGINT, which is how the interpreter's exit ends daemon children."""
    script = tmp_path / 'keeps_a_loader.py'
    script.write_text(KEEPS_A_LOADER)
    proc = subprocess.Popen([sys.executable, str(script), how], cwd=REPO, start_new_session=True,
                            env={**os.environ, 'PYTHONPATH': str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail('the process did not exit: its data-loading workers kept it waiting')
    assert proc.returncode in statuses, out   # Ctrl-C: KeyboardInterrupt ends Python by SIGINT


def test_loader_workers_end_with_a_training_process_killed_outright(tmp_path):
    script = tmp_path / 'keeps_a_loader.py'
    script.write_text(KEEPS_A_LOADER)
    proc = subprocess.Popen([sys.executable, str(script), 'killed'], cwd=REPO, start_new_session=True,
                            env={**os.environ, 'PYTHONPATH': str(REPO)}, stdout=subprocess.PIPE, text=True)
    workers = [int(pid) for pid in proc.stdout.readline().split()]
    assert len(workers) == 2
    proc.kill()                                     # SIGKILL: no exit hook runs
    proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.1)
    left = [pid for pid in workers if _alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, 'data-loading workers outlived the killed training process'


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_a_crash_with_workers_exits_instead_of_waiting_on_them(data_dir, tmp_path):
    """The workers ignore stop signals; after an exception the interpreter's exit used to wait on them
    forever (a crashed cluster job then held its GPUs until the time limit)."""
    script = tmp_path / 'crash.py'
    script.write_text(
        'import sys\n'
        f'sys.path[:0] = [{str(REPO)!r}, {str(REPO / "tests")!r}]\n'
        'import train\n'
        'from conftest import train_args\n'
        'from mixpro.mixer import Mixer\n'
        'calls = {"n": 0}\n'
        'real = Mixer.__call__\n'
        'def crashing(self, x, y):\n'
        '    calls["n"] += 1\n'
        '    if calls["n"] == 3:\n'
        '        raise RuntimeError("node lost")\n'
        '    return real(self, x, y)\n'
        'Mixer.__call__ = crashing\n'
        'if __name__ == "__main__":\n'
        f'    train.main(train_args({str(data_dir)!r}, {str(tmp_path)!r}, "crash", "mixpro", 1, "--workers", "2"))\n')
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and 'RuntimeError: node lost' in done.stderr, done.stderr[-2000:]
