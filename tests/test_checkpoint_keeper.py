"""The checkpoint files: best-k and last.pth.tar around a kill, tidy(), ties, permissions, a full disk
(issue 7)."""
import os
import stat
from pathlib import Path

import pytest
import torch

from mixpro import checkpoint
from mixpro.checkpoint import CheckpointError, CheckpointKeeper, atomic_save, load_checkpoint


def _keeper_run(tmp_path, top1s, keep=2):
    keeper = CheckpointKeeper(tmp_path, keep_best=keep)
    for epoch, top1 in enumerate(top1s):
        keeper.save({'epoch': epoch, 'w': torch.full((2,), float(epoch))}, epoch, top1)
    return keeper


def test_a_kill_between_the_best_k_files_and_last_is_repaired(tmp_path, monkeypatch):
    _keeper_run(tmp_path, [10.0, 20.0])
    real_copy = checkpoint.atomic_copy

    def killed_before_last(src, dst):
        if Path(dst).name == 'last.pth.tar':
            raise KeyboardInterrupt('killed')
        real_copy(src, dst)
    monkeypatch.setattr(checkpoint, 'atomic_copy', killed_before_last)
    keeper = CheckpointKeeper(tmp_path, 2, load_checkpoint(tmp_path / 'last.pth.tar')['checkpoint_ranking'])
    with pytest.raises(KeyboardInterrupt):
        keeper.save({'epoch': 2, 'w': torch.zeros(2)}, 2, 30.0)    # epoch 2 would be the best
    monkeypatch.undo()
    last = load_checkpoint(tmp_path / 'last.pth.tar')
    assert last['epoch'] == 1                                   # the commit point never moved
    for _, epoch in last['checkpoint_ranking']:                 # the ranking names only written files
        assert (tmp_path / f'checkpoint-{epoch}.pth.tar').exists()
    resumed = CheckpointKeeper(tmp_path, 2, last['checkpoint_ranking'])
    notes = resumed.tidy()
    assert any('checkpoint-2' in n for n in notes) and not (tmp_path / 'checkpoint-2.pth.tar').exists()
    assert load_checkpoint(tmp_path / 'model_best.pth.tar')['epoch'] == 1


def test_tidy_removes_temp_files_and_stale_checkpoints_and_restores_missing_best(tmp_path):
    keeper = _keeper_run(tmp_path, [10.0, 30.0, 20.0])          # keeps epochs 1 and 2; best 1
    (tmp_path / '.last.pth.tar.abc.tmp').write_bytes(b'torn')
    atomic_save({'epoch': 0}, tmp_path / 'checkpoint-0.pth.tar')     # dropped epoch whose unlink was skipped
    (tmp_path / 'checkpoint-2.pth.tar').unlink()                # an older version wrote last before it
    (tmp_path / 'model_best.pth.tar').unlink()
    notes = CheckpointKeeper(tmp_path, 2, keeper.ranking).tidy()
    assert len(notes) == 4, notes
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ['checkpoint-1.pth.tar', 'checkpoint-2.pth.tar', 'last.pth.tar', 'model_best.pth.tar']
    assert load_checkpoint(tmp_path / 'checkpoint-2.pth.tar')['epoch'] == 2     # restored from last
    assert load_checkpoint(tmp_path / 'model_best.pth.tar')['epoch'] == 1


def test_ties_keep_the_earlier_epoch_as_best(tmp_path):
    keeper = _keeper_run(tmp_path, [50.0, 50.0, 40.0])
    assert keeper.ranking[0] == (50.0, 0)
    assert load_checkpoint(tmp_path / 'model_best.pth.tar')['epoch'] == 0


def test_checkpoints_are_readable_like_other_outputs(tmp_path):
    _keeper_run(tmp_path, [1.0])
    umask = os.umask(0)
    os.umask(umask)
    for path in tmp_path.glob('*.pth.tar'):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


def test_a_full_disk_is_named_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    atomic_save({'epoch': 1}, tmp_path / 'last.pth.tar')

    def full_disk(obj, f):
        raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 2028288 vs 2028180')
    monkeypatch.setattr(checkpoint.torch, 'save', full_disk)
    with pytest.raises(CheckpointError, match='could not write .*last.pth.tar') as err:
        atomic_save({'epoch': 2}, tmp_path / 'last.pth.tar')
    assert 'disk full' in str(err.value) and 'over quota' in str(err.value)
    assert load_checkpoint(tmp_path / 'last.pth.tar')['epoch'] == 1
    assert [p.name for p in tmp_path.iterdir()] == ['last.pth.tar']
