"""Checkpoints written atomically and loadable with ``torch.load(weights_only=True)``.

Run folder layout (timm's names): ``last.pth.tar`` after every epoch, ``checkpoint-<epoch>.pth.tar``
for the best ``keep_best`` epochs by top-1, and ``model_best.pth.tar``.
"""
import os
import shutil
import tempfile
from pathlib import Path
from typing import List, Optional, Tuple

import torch


def _atomic_write(path: Path, write) -> None:
    """``write(tmp)`` into a temp file in the same folder, then rename: a crash never leaves a torn file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj, path: Path) -> None:
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_copy(src: Path, dst: Path) -> None:
    _atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint {path} does not exist')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:
        raise ValueError(f'checkpoint {path} cannot be read: {err}') from err


class CheckpointKeeper:
    """Saves ``last`` every epoch and keeps the best ``keep_best`` epochs by top-1."""

    def __init__(self, run_dir: Path, keep_best: int = 3, ranking: Optional[List[Tuple[float, int]]] = None):
        self.run_dir = Path(run_dir)
        self.keep_best = keep_best
        self.ranking = sorted(ranking or [], reverse=True)   # [(top1, epoch)], best first

    def path(self, epoch: int) -> Path:
        return self.run_dir / f'checkpoint-{epoch}.pth.tar'

    def save(self, state: dict, epoch: int, top1: float) -> None:
        ranking = sorted(self.ranking + [(top1, epoch)], reverse=True)
        state['checkpoint_ranking'] = [list(r) for r in ranking[:self.keep_best]]
        last = self.run_dir / 'last.pth.tar'
        atomic_save(state, last)
        if (top1, epoch) in ranking[:self.keep_best]:
            atomic_copy(last, self.path(epoch))
            if ranking[0] == (top1, epoch):
                atomic_copy(last, self.run_dir / 'model_best.pth.tar')
        for _, dropped in ranking[self.keep_best:]:
            self.path(dropped).unlink(missing_ok=True)
        self.ranking = ranking[:self.keep_best]
