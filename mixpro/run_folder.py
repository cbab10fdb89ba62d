"""The life cycle of a run folder: one run at a time (a lock), stop requests from cluster signals, and the
record of every start in ``run_info.yaml``."""
import datetime
import errno
import fcntl
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import yaml

from .checkpoint import atomic_write_text

_logger = logging.getLogger(__name__)


class RunError(RuntimeError):
    """A run that cannot start or go on: the message says why and what to do."""


class RunLock:
    """An exclusive ``flock`` on ``<run dir>/.lock`` for the whole run. The kernel releases it when the
    holder dies, however it dies, so a lock left by a killed run is simply taken over."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / '.lock'
        self.fd = None
        self.made_folder = False

    def acquire(self) -> Optional[str]:
        """Make the run folder where needed and take the lock; returns a note when the previous holder ended
        without releasing it."""
        self.made_folder = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.read(fd, 4096).decode(errors='replace').strip() or 'another process'
            if err.errno in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP):   # e.g. Lustre mounted noflock
                os.close(fd)
                _logger.info(f'note: {self.path.parent} is on a filesystem without flock ({err.strerror}): '
                             f'running without the one-run-per-folder lock')
                return None
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunError(f'{self.path.parent} is in use by another run ({holder}); wait for it to end, '
                               f'or give this run its own --experiment') from err
            raise
        previous = os.read(fd, 4096).decode(errors='replace').strip()
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        started = datetime.datetime.now().isoformat(timespec='seconds')
        os.write(fd, f'pid {os.getpid()} on {socket.gethostname()}, started {started}\n'.encode())
        self.fd = fd
        if previous:
            return f'the previous run in this folder ({previous}) ended without releasing its lock: taken over'
        return None

    def release(self) -> None:
        if self.fd is not None:
            folder = self.path.parent
            if self.made_folder and [p.name for p in folder.iterdir()] == [self.path.name]:
                try:   # a run that stopped before writing anything leaves no empty folder behind
                    self.path.unlink()
                    folder.rmdir()
                except OSError:   # another run took the folder meanwhile: it is theirs now
                    pass
            os.ftruncate(self.fd, 0)   # empty = released cleanly
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class StopRequest:
    """SIGTERM (Slurm preemption, scancel), SIGUSR1 (``sbatch --signal``) and SIGINT (Ctrl-C, or torchrun
    passing one on) ask the run to stop: the training loop finishes its optimizer step, saves where it is,
    and exits. Every rank stops at the same step: ``requested()`` takes the maximum over ranks on a CPU
    (gloo) group, so no device sync is needed."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, distributed: bool = False):
        self.received = 0    # set by the handler, on this rank
        self.signum = 0      # agreed by all ranks in requested()
        self._previous = {}
        self._group = dist.new_group(backend='gloo') if distributed else None

    def install(self) -> None:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self):
        self.install()
        return self

    def __exit__(self, *_exc) -> None:
        self.uninstall()

    def _handle(self, signum, _frame) -> None:
        self.received = self.received or signum   # no printing here: the handler may interrupt a print

    def requested(self) -> bool:
        # a signal that lands during the all-reduce stays in `received` for the next call
        flag = torch.tensor([self.received])
        if self._group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        self.signum = int(flag)
        return self.signum != 0

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ''


def stop_when_orphaned(interval: float = 5.0) -> None:
    """Under torchrun, send this rank SIGTERM (a stop request: it saves and exits) when its launcher is gone,
    e.g. killed with SIGKILL, which cannot pass a signal on: the ranks would otherwise train on as orphans,
    holding their GPUs."""
    if 'TORCHELASTIC_RUN_ID' not in os.environ:
        return
    launcher = os.getppid()

    def watch():
        while os.getppid() == launcher:
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, name='stop-when-orphaned', daemon=True).start()


def broadcast_path(path: Optional[Path]) -> Optional[Path]:
    """Rank 0's choice on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return path
    box = [str(path) if path else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0]) if box[0] else None


def git_commit() -> str:
    import subprocess
    try:
        root = Path(__file__).resolve().parents[1]
        commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return commit + ('-dirty' if dirty else '')
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


def save_run_info(run_dir: Path, args, world_size: int, resumed_from: Optional[Path]) -> None:
    """``config.yaml`` (the resolved options, itself a valid ``--config``) and ``run_info.yaml``: the first
    start's command line and versions, and one entry per resumption under ``resumes``."""
    import timm
    # relaunched from config.yaml, the run goes on from its own folder, not again from a --resume PATH
    resolved = {**{k: v for k, v in vars(args).items() if k != 'config'}, 'resume': 'auto'}
    atomic_write_text(run_dir / 'config.yaml', yaml.safe_dump(resolved, sort_keys=False))
    start = {'command': ' '.join(sys.argv), 'git_commit': git_commit(), 'world_size': world_size,
             'torch': str(torch.__version__), 'timm': timm.__version__,
             'time': datetime.datetime.now().isoformat(timespec='seconds')}
    if resumed_from:
        start['from'] = str(Path(resumed_from).resolve())
    info_path = run_dir / 'run_info.yaml'
    info = yaml.safe_load(info_path.read_text()) if (resumed_from and info_path.exists()) else None
    if isinstance(info, dict):
        info.setdefault('resumes', []).append(start)
    else:   # a first start (which may continue another folder's checkpoint)
        info = start
    atomic_write_text(info_path, yaml.safe_dump(info, sort_keys=False))
