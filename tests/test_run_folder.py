"""One run per folder: the lock, a dead holder, a run that fails before writing, --resume none (issue 7)."""
import pytest
import torch

import train
from conftest import load_state, train_args
from mixpro.run_folder import RunLock


@pytest.mark.slow
def test_a_locked_folder_is_refused_and_a_dead_holder_taken_over(data_dir, tmp_path, capsys):
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    holder = RunLock(run_dir)
    holder.acquire()
    with pytest.raises(SystemExit, match=r'run is in use by another run \(pid \d+'):
        train.main(train_args(data_dir, tmp_path, 'run', 'mixpro', 1))
    holder.release()
    assert not list(run_dir.glob('*.pth.tar'))
    (run_dir / '.lock').write_text('pid 999999 on a-dead-node, started 2026-01-01T00:00:00\n')   # killed holder
    train.main(train_args(data_dir, tmp_path, 'run', 'mixpro', 1))
    assert 'pid 999999 on a-dead-node' in capsys.readouterr().out
    assert (run_dir / '.lock').read_text() == ''             # released cleanly at the end


def test_a_failed_start_leaves_no_folder_but_keeps_one_it_found(data_dir, tmp_path):
    with pytest.raises(SystemExit, match="'no_such_model' is not a timm model"):
        train.main([*train_args(data_dir, tmp_path, 'new', 'mixpro', 1), '--model', 'no_such_model'])
    assert not (tmp_path / 'new').exists()
    (tmp_path / 'mine').mkdir()                               # made by the user: stays, even empty
    with pytest.raises(SystemExit, match="model 'no_such_model'"):
        train.main([*train_args(data_dir, tmp_path, 'mine', 'mixpro', 1), '--model', 'no_such_model'])
    assert (tmp_path / 'mine').is_dir()


@pytest.mark.slow
def test_resume_none_refuses_a_folder_with_checkpoints(data_dir, tmp_path):
    train.main(train_args(data_dir, tmp_path, 'kept', 'mixup_cutmix', 1))
    before = load_state(tmp_path / 'kept' / 'last.pth.tar')['state_dict']
    with pytest.raises(SystemExit, match='--resume none') as err:
        train.main([*train_args(data_dir, tmp_path, 'kept', 'mixup_cutmix', 1), '--resume', 'none'])
    assert 'kept holds the checkpoints' in str(err.value)
    after = load_state(tmp_path / 'kept' / 'last.pth.tar')['state_dict']
    assert all(torch.equal(before[k], after[k]) for k in before)
