"""Checkpoint files: atomic writes and best-k retention."""
import pytest
import torch

from mixpro import checkpoint
from mixpro.checkpoint import CheckpointError, CheckpointKeeper, atomic_save, load_checkpoint


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / 'last.pth.tar'
    atomic_save({'epoch': 1, 'w': torch.ones(3)}, path)
    real_save = torch.save

    def torn_save(obj, f):
        real_save({'epoch': 2}, f)
        with open(f, 'r+b') as handle:
            handle.truncate(10)                     # half-written file
        raise OSError('disk full')
    monkeypatch.setattr(checkpoint.torch, 'save', torn_save)
    with pytest.raises(CheckpointError, match='last.pth.tar.*disk full'):
        atomic_save({'epoch': 2}, path)
    state = load_checkpoint(path)
    assert state['epoch'] == 1 and torch.equal(state['w'], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ['last.pth.tar']    # no temp file left behind


def test_unreadable_checkpoint_is_named(tmp_path):
    bad = tmp_path / 'bad.pth.tar'
    bad.write_bytes(b'not a checkpoint')
    with pytest.raises(CheckpointError, match='bad.pth.tar cannot be read') as err:
        load_checkpoint(bad)
    assert 'not a file torch.save wrote' in str(err.value)
    torch.save({'epoch': 1}, bad)
    bad.write_bytes(bad.read_bytes()[:40])                    # torn: torch's own reason names what is wrong
    with pytest.raises(CheckpointError, match='bad.pth.tar cannot be read') as err:
        load_checkpoint(bad)
    assert 'not a file torch.save wrote' not in str(err.value)


def test_keeper_keeps_the_best_k_and_model_best(tmp_path):
    keeper = CheckpointKeeper(tmp_path, keep_best=2)
    for epoch, top1 in enumerate([10.0, 30.0, 20.0, 25.0, 5.0]):
        keeper.save({'epoch': epoch}, epoch, top1)
    kept = sorted(p.name for p in tmp_path.glob('checkpoint-*.pth.tar'))
    assert kept == ['checkpoint-1.pth.tar', 'checkpoint-3.pth.tar']
    assert load_checkpoint(tmp_path / 'model_best.pth.tar')['epoch'] == 1
    assert load_checkpoint(tmp_path / 'last.pth.tar')['epoch'] == 4
    assert load_checkpoint(tmp_path / 'last.pth.tar')['checkpoint_ranking'] == [[30.0, 1], [25.0, 3]]
    resumed = CheckpointKeeper(tmp_path, 2, [(30.0, 1), (25.0, 3)])
    resumed.save({'epoch': 5}, 5, 40.0)
    assert sorted(p.name for p in tmp_path.glob('checkpoint-*.pth.tar')) == ['checkpoint-1.pth.tar',
                                                                            'checkpoint-5.pth.tar']
    assert load_checkpoint(tmp_path / 'model_best.pth.tar')['epoch'] == 5


def test_keeper_ranks_a_loss_lowest_first_and_skips_epochs_without_a_metric(tmp_path):
    keeper = CheckpointKeeper(tmp_path, keep_best=2, metric='loss', lower_is_better=True)
    for epoch, loss in enumerate([2.0, 0.5, None, 1.0, 3.0]):
        keeper.save({'epoch': epoch}, epoch, loss)
    assert keeper.ranking == [(0.5, 1), (1.0, 3)]
    assert sorted(p.name for p in tmp_path.glob('checkpoint-*.pth.tar')) == ['checkpoint-1.pth.tar',
                                                                            'checkpoint-3.pth.tar']
    assert load_checkpoint(tmp_path / 'model_best.pth.tar')['epoch'] == 1
    assert load_checkpoint(tmp_path / 'last.pth.tar')['epoch'] == 4


def test_a_best_epoch_is_written_once_and_linked_and_later_saves_leave_it_alone(tmp_path):
    keeper = CheckpointKeeper(tmp_path, keep_best=2)
    keeper.save({'epoch': 0, 'w': torch.zeros(3)}, 0, 50.0)
    best, last, ranked = (tmp_path / n for n in ('model_best.pth.tar', 'last.pth.tar', 'checkpoint-0.pth.tar'))
    assert best.samefile(ranked) and last.samefile(ranked)          # one file, three names
    keeper.save({'epoch': 1, 'w': torch.ones(3)}, 1, 10.0)           # not among the best: a new last
    assert not last.samefile(ranked)
    for path in (best, ranked):                                      # the linked best epoch is unchanged
        assert load_checkpoint(path)['epoch'] == 0 and torch.equal(load_checkpoint(path)['w'], torch.zeros(3))
    assert load_checkpoint(last)['epoch'] == 1


def test_without_hard_links_the_best_files_are_copies(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, 'Operation not permitted')
    monkeypatch.setattr(checkpoint.os, 'link', no_links)
    CheckpointKeeper(tmp_path, keep_best=2).save({'epoch': 0}, 0, 50.0)
    ranked = tmp_path / 'checkpoint-0.pth.tar'
    for name in ('model_best.pth.tar', 'last.pth.tar'):
        assert not (tmp_path / name).samefile(ranked) and load_checkpoint(tmp_path / name)['epoch'] == 0
    assert not list(tmp_path.glob('.*.tmp'))


def test_linking_needs_no_mode_change_and_a_repeated_copy_leaves_no_temp_file(tmp_path, monkeypatch):
    src, dst = tmp_path / 'checkpoint-0.pth.tar', tmp_path / 'model_best.pth.tar'
    atomic_save({'epoch': 0}, src)

    def not_the_owner(path, mode):   # a group-writable run folder whose files another member wrote
        raise PermissionError(1, 'Operation not permitted')
    monkeypatch.setattr(checkpoint.os, 'chmod', not_the_owner)
    checkpoint.atomic_copy(src, dst)
    checkpoint.atomic_copy(src, dst)                                  # already the same file
    assert dst.samefile(src) and not list(tmp_path.glob('.*.tmp'))
