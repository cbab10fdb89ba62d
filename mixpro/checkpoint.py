"""Checkpoints written atomically and loadable with ``torch.load(weights_only=True)``.

Run folder layout (timm's names): ``last.pth.tar`` after every epoch, ``checkpoint-<epoch>.pth.tar``
for the best ``keep_best`` epochs by top-1 (or ``--eval-metric``), ``model_best.pth.tar``, and
``interrupted.pth.tar`` while a run that was stopped mid-epoch (preemption) waits to be resumed.

Crash consistency: ``last.pth.tar`` is the commit point. The best-k files of an epoch are written before
it, so the ranking stored in ``last`` never names a file that was not written; what a kill leaves
behind (temp files, files of epochs the ranking no longer holds) is removed by ``tidy()`` on the next start.
"""
import os
import shutil
import tempfile
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from .config import first_line

LAST, BEST, INTERRUPTED = 'last.pth.tar', 'model_best.pth.tar', 'interrupted.pth.tar'


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or written."""


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_MODE = _file_mode()   # what open() would give: mkstemp creates files 0600 whatever the umask


def _atomic_write(path: Path, write) -> None:
    """``write(tmp)`` into a temp file in the same folder, then rename: a crash never leaves a torn file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    os.close(fd)
    try:
        write(tmp)
        if os.stat(tmp).st_nlink == 1:   # a hard link (atomic_copy) shares a file that has its mode already
            os.chmod(tmp, _MODE)
        _fsync(tmp)            # on disk before the rename: a node crash leaves the old file, not a torn one
        os.replace(tmp, path)
        _fsync(path.parent)    # and the rename itself
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj, path: Path) -> None:
    try:
        _atomic_write(path, lambda tmp: torch.save(obj, tmp))
    except (OSError, RuntimeError) as err:   # torch reports a full disk as a RuntimeError of its zip writer
        raise CheckpointError(f'could not write {path} (disk full or over quota?): {err}; '
                              f'the checkpoints written before are intact') from err


def atomic_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes the same file as ``src``: a hard link where the filesystem has them (no bytes written:
    a best epoch's 1-3 GB checkpoint is not written again as checkpoint-N and model_best), a copy elsewhere. Sharing the file
    is safe because checkpoints are never written in place: every save writes a new file and renames it."""
    if Path(dst).exists() and os.path.samefile(src, dst):   # already one file: rename would leave the temp
        return

    def link_or_copy(tmp):
        os.unlink(tmp)                 # mkstemp's empty file: the link takes its name
        try:
            os.link(src, tmp)
        except OSError:                # no hard links here (some network and FUSE filesystems)
            shutil.copyfile(src, tmp)
    try:
        _atomic_write(dst, link_or_copy)
    except OSError as err:
        raise CheckpointError(f'could not write {dst} (disk full or over quota?): {err}; '
                              f'the checkpoints written before are intact') from err


def atomic_write_text(path: Path, text: str) -> None:
    """A small text file (config, run record, summary) written like a checkpoint: whole or not at all."""
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def load_checkpoint(path, mmap: bool = False) -> dict:
    """The whole checkpoint on the CPU; ``mmap`` reads tensors lazily (cheap when only metadata is needed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint {path} does not exist')
    try:
        return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except Exception as err:
        if not _looks_like_torch_save(path):   # torch's own message would suggest weights_only=False
            raise CheckpointError(f'checkpoint {path} cannot be read: it is not a file torch.save wrote') from err
        raise CheckpointError(f'checkpoint {path} cannot be read: {first_line(err)}') from err


def _looks_like_torch_save(path: Path) -> bool:
    """torch.save writes a zip archive (a pickle in the legacy format, which starts with protocol 2); a file
    that cannot be opened keeps torch's own reason (permission denied, I/O error)."""
    try:
        with open(path, 'rb') as f:
            head = f.read(2)
    except OSError:
        return True
    return head in (b'PK', b'\x80\x02')


def resume_position(state: dict) -> Tuple[int, int]:
    """``(epoch, step)`` at which a run resumed from ``state`` continues."""
    if 'resume_at' in state:
        return tuple(state['resume_at'])
    return state['epoch'] + 1, 0   # written before mid-epoch saves existed: always at an epoch's end


class CheckpointKeeper:
    """Saves ``last`` every epoch and keeps the best ``keep_best`` epochs by a metric, top-1 unless told
    otherwise (ties: the earlier epoch); ``lower_is_better`` for a loss."""

    def __init__(self, run_dir: Path, keep_best: int = 3, ranking: Optional[List[Tuple[float, int]]] = None,
                 metric: str = 'top1', lower_is_better: bool = False):
        self.run_dir = Path(run_dir)
        self.keep_best = keep_best
        self.metric, self.sign = metric, 1 if lower_is_better else -1
        self.ranking = self._ranked(ranking or [])   # [(metric, epoch)], best first

    def _ranked(self, entries) -> list:
        return sorted((tuple(e) for e in entries), key=lambda e: (self.sign * e[0], e[1]))

    def path(self, epoch: int) -> Path:
        return self.run_dir / f'checkpoint-{epoch}.pth.tar'

    def save(self, state: dict, epoch: int, value: Optional[float]) -> None:
        """``value``: the epoch's metric; None for an epoch that was not evaluated (--val-interval), saved as
        ``last`` only."""
        if value is None:
            state['checkpoint_ranking'] = [list(r) for r in self.ranking]
            atomic_save(state, self.run_dir / LAST)
            (self.run_dir / INTERRUPTED).unlink(missing_ok=True)
            return
        ranking = self._ranked(self.ranking + [(value, epoch)])
        kept, dropped = ranking[:self.keep_best], ranking[self.keep_best:]
        state['checkpoint_ranking'] = [list(r) for r in kept]
        last = self.run_dir / LAST
        if (value, epoch) in kept:                   # best-k files first, `last` (the commit point) after
            atomic_save(state, self.path(epoch))
            if kept[0] == (value, epoch):
                atomic_copy(self.path(epoch), self.run_dir / BEST)
            atomic_copy(self.path(epoch), last)
        else:
            atomic_save(state, last)
        for _, old in dropped:
            self.path(old).unlink(missing_ok=True)
        (self.run_dir / INTERRUPTED).unlink(missing_ok=True)   # superseded by this epoch's end
        self.ranking = kept

    def save_interrupted(self, state: dict) -> Path:
        state['checkpoint_ranking'] = [list(r) for r in self.ranking]
        path = self.run_dir / INTERRUPTED
        atomic_save(state, path)
        return path

    def tidy(self, prune: bool = True) -> List[str]:
        """Repair what a kill left behind; returns one note per repair. Without ``prune`` (a resume from
        another folder's checkpoint, whose ranking names that run's epochs) only temp files go."""
        notes, last_epoch = [], _epoch_of(self.run_dir / LAST)
        for tmp in self.run_dir.glob('.*.tmp'):
            tmp.unlink(missing_ok=True)
            notes.append(f'removed the unfinished temp file {tmp.name}')
        if not prune:
            return notes
        kept = []
        for value, epoch in self.ranking:
            if not self.path(epoch).exists() and epoch == last_epoch:   # a folder written last-first
                atomic_copy(self.run_dir / LAST, self.path(epoch))
                notes.append(f'restored {self.path(epoch).name} from {LAST}')
            if self.path(epoch).exists():
                kept.append((value, epoch))
            else:
                notes.append(f'epoch {epoch} ({self.metric} {value:.4g}) left the best-k ranking: '
                             f'{self.path(epoch).name} is not in the run folder')
        self.ranking = kept
        ranked = {self.path(epoch).name for _, epoch in kept}
        for path in self.run_dir.glob('checkpoint-*.pth.tar'):
            if path.name not in ranked:
                path.unlink()
                notes.append(f'removed {path.name}, which the best-k ranking does not hold')
        if kept:
            best = self.run_dir / BEST
            best_epoch = _epoch_of(best)
            if best_epoch != kept[0][1]:
                atomic_copy(self.path(kept[0][1]), best)
                notes.append(f'{BEST} now holds epoch {kept[0][1]}, the best (it held '
                             f'{"nothing readable" if best_epoch is None else f"epoch {best_epoch}"})')
        return notes


def _epoch_of(path: Path) -> Optional[int]:
    try:
        return load_checkpoint(path, mmap=True).get('epoch')
    except (FileNotFoundError, CheckpointError):
        return None
