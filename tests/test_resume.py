"""Resume: which checkpoint, a damaged one, a longer schedule, a finished run, an older checkpoint or
another folder's, and what must still fit (issue 7)."""
import pytest
import torch
import yaml

import train
from conftest import load_state, make_image_folder, nan_loss_at, read_summary, train_args
from mixpro.checkpoint import atomic_save, load_checkpoint
from mixpro.state import choose_resume_checkpoint


def parse(argv):
    from mixpro.config import parse_train_args
    return parse_train_args(argv)


@pytest.mark.slow
def test_resume_falls_back_to_the_newest_intact_checkpoint(data_dir, tmp_path, capsys):
    args = train_args(data_dir, tmp_path, 'torn', 'transmix', 2)
    train.main(args)
    run_dir = tmp_path / 'torn'
    best = load_checkpoint(run_dir / 'model_best.pth.tar')['epoch']
    with open(run_dir / 'last.pth.tar', 'r+b') as f:
        f.truncate(1000)                                        # a file damaged by a copy or a filesystem fault
    path, notes = choose_resume_checkpoint(parse(args).resume, run_dir)
    assert path.name == f'checkpoint-{max(e for _, e in load_checkpoint(path)["checkpoint_ranking"])}.pth.tar'
    assert 'last.pth.tar cannot be read' in notes[0] and 'falling back' in notes[-1]
    capsys.readouterr()
    train.main(args[:-1] + ['3'])
    out = capsys.readouterr().out
    assert 'falling back to checkpoint-' in out and 'resumed from' in out
    assert load_checkpoint(run_dir / 'last.pth.tar')['epoch'] == 2
    assert best in (0, 1)


def test_the_newer_of_interrupted_and_last_is_resumed(tmp_path):
    atomic_save({'epoch': 3, 'resume_at': [4, 0]}, tmp_path / 'last.pth.tar')
    atomic_save({'epoch': 3, 'resume_at': [3, 7]}, tmp_path / 'interrupted.pth.tar')   # stale: last is newer
    assert choose_resume_checkpoint('auto', tmp_path)[0].name == 'last.pth.tar'
    atomic_save({'epoch': 4, 'resume_at': [4, 2]}, tmp_path / 'interrupted.pth.tar')
    assert choose_resume_checkpoint('auto', tmp_path)[0].name == 'interrupted.pth.tar'


def test_a_summary_row_cut_off_by_a_kill_is_dropped_on_resume(tmp_path):
    from mixpro.logger import RunLogger
    (tmp_path / 'summary.csv').write_text('epoch,train_loss,eval_top1\n0,2.0,40.0\n1,1.5,55.0\n1')   # '1' of '12,...'
    RunLogger(tmp_path, start_epoch=2).close()
    assert (tmp_path / 'summary.csv').read_text().split() == ['epoch,train_loss,eval_top1', '0,2.0,40.0', '1,1.5,55.0']
    assert (tmp_path / 'summary.csv').read_text().endswith('\n')        # the next epoch's row starts a line


@pytest.mark.slow
def test_more_epochs_on_resume_stretch_the_schedule(data_dir, tmp_path, capsys):
    train.main(train_args(data_dir, tmp_path, 'longer', 'mixup_cutmix', 2))
    train.main(train_args(data_dir, tmp_path, 'longer', 'mixup_cutmix', 4))
    out = capsys.readouterr().out
    assert '--epochs 2 -> 4' in out and 'schedule is stretched' in out
    train.main(train_args(data_dir, tmp_path, 'fresh', 'mixup_cutmix', 4))
    stretched = [float(r['lr']) for r in read_summary(tmp_path / 'longer')]
    fresh = [float(r['lr']) for r in read_summary(tmp_path / 'fresh')]
    assert stretched[2:] == pytest.approx(fresh[2:])           # not min_lr: the 4-epoch cosine
    assert fresh[3] > 1e-5
    info = yaml.safe_load((tmp_path / 'longer' / 'run_info.yaml').read_text())
    assert len(info['resumes']) == 1 and info['resumes'][0]['from'].endswith('last.pth.tar')
    config = (tmp_path / 'longer' / 'config.yaml').read_text()
    train.main(train_args(data_dir, tmp_path, 'longer', 'mixup_cutmix', 3))   # fewer: nothing to do
    assert 'already finished its 4 epochs' in capsys.readouterr().out
    assert (tmp_path / 'longer' / 'config.yaml').read_text() == config         # the record is untouched


@pytest.mark.slow
def test_resume_auto_refuses_to_start_over_when_no_checkpoint_can_be_read(data_dir, tmp_path):
    args = train_args(data_dir, tmp_path, 'unreadable', 'mixup_cutmix', 1)
    train.main(args)
    for path in (tmp_path / 'unreadable').glob('*.pth.tar'):
        path.write_bytes(b'damaged')
    with pytest.raises(SystemExit, match='no checkpoint in .*unreadable can be read') as err:
        train.main(args)
    assert '--resume auto' in str(err.value)
    assert (tmp_path / 'unreadable' / 'last.pth.tar').read_bytes() == b'damaged'    # nothing overwritten


@pytest.mark.slow
def test_resume_from_an_older_checkpoint_sets_the_later_ones_aside(data_dir, tmp_path, capsys):
    args = train_args(data_dir, tmp_path, 'older', 'mixup_cutmix', 3, '--checkpoint-hist', '3')
    train.main(args)
    run_dir = tmp_path / 'older'
    later = {name: load_state(run_dir / name)['state_dict'] for name in ('checkpoint-1.pth.tar', 'checkpoint-2.pth.tar',
                                                                   'last.pth.tar')}
    again = train_args(data_dir, tmp_path, 'older', 'mixup_cutmix', 2, '--checkpoint-hist', '3')
    with pytest.raises(SystemExit, match='other settings'):                # refused: nothing is moved
        train.main([*again, '--resume', str(run_dir / 'checkpoint-0.pth.tar'), '--smoothing', '0.2'])
    assert not list(run_dir.glob('abandoned-*')) and (run_dir / 'checkpoint-2.pth.tar').exists()
    train.main([*again, '--resume', str(run_dir / 'checkpoint-0.pth.tar')])   # redo epoch 1 only
    assert 'moved the later checkpoints' in capsys.readouterr().out
    (aside,) = run_dir.glob('abandoned-*')                                   # nothing deleted
    for name, weights in later.items():
        kept = load_state(aside / name)['state_dict']
        assert all(torch.equal(weights[k], kept[k]) for k in weights)
    assert [row['epoch'] for row in read_summary(aside)] == ['0', '1', '2']   # the abandoned epochs' log too
    assert sorted(p.name for p in run_dir.glob('checkpoint-*.pth.tar')) == ['checkpoint-0.pth.tar',
                                                                            'checkpoint-1.pth.tar']
    assert load_state(run_dir / 'model_best.pth.tar')['epoch'] in (0, 1)          # not the abandoned epoch 2
    assert load_state(run_dir / 'last.pth.tar')['epoch'] == 1
    assert train.main(again)['epoch'] == 1      # --resume auto goes on from the new history, not epoch 2


@pytest.mark.slow
def test_resume_from_another_folders_checkpoint_ranks_only_this_folders_epochs(data_dir, tmp_path, monkeypatch,
                                                                              capsys):
    train.main(train_args(data_dir, tmp_path, 'first', 'mixup_cutmix', 2))
    source = tmp_path / 'first' / 'last.pth.tar'
    args = train_args(data_dir, tmp_path, 'second', 'mixup_cutmix', 3)
    nan_loss_at(monkeypatch, 1)       # the first start stops before it saves anything here (as if preempted)
    with pytest.raises(SystemExit):
        train.main([*args, '--resume', str(source)])
    monkeypatch.undo()
    train.main(args)   # a requeued start (--resume auto) goes on from where the first start resumed from
    assert 'holds no checkpoint yet: continuing from' in capsys.readouterr().out
    run_dir = tmp_path / 'second'
    last = load_state(run_dir / 'last.pth.tar')
    assert [epoch for _, epoch in last['checkpoint_ranking']] == [2]       # not the first folder's epochs
    assert load_state(run_dir / 'model_best.pth.tar')['epoch'] == 2
    assert yaml.safe_load((run_dir / 'run_info.yaml').read_text())['from'] == str(source.resolve())
    assert yaml.safe_load((run_dir / 'config.yaml').read_text())['resume'] == 'auto'
    # relaunched from its config.yaml, the run goes on from its own folder (finished), not again from `first`
    written = (run_dir / 'last.pth.tar').stat().st_mtime_ns
    assert train.main(['--config', str(run_dir / 'config.yaml')])['epoch'] == 2
    assert (run_dir / 'last.pth.tar').stat().st_mtime_ns == written     # epoch 2 not trained again


def test_resume_names_an_optimizer_state_that_does_not_fit_the_parameter_groups(data_dir, tmp_path):
    args = train_args(data_dir, tmp_path, 'groups', 'mixup_cutmix', 1)
    train.main(args)
    last = tmp_path / 'groups' / 'last.pth.tar'
    state = load_state(last)
    groups = state['optimizer']['param_groups']   # one parameter moved to the other group, as a model
    groups[1]['params'].append(groups[0]['params'].pop())   # whose weight-decay exemptions changed
    atomic_save(state, last)
    with pytest.raises(SystemExit, match='last.pth.tar: its optimizer state') as err:
        train.main(train_args(data_dir, tmp_path, 'groups', 'mixup_cutmix', 2))
    assert 'does not fit' in str(err.value) and 'run_info.yaml' in str(err.value)
    assert load_state(last)['optimizer']['param_groups'][1]['params'] == groups[1]['params']   # left as it was


def test_resume_refuses_a_data_dir_whose_classes_differ(data_dir, tmp_path):
    train.main(train_args(data_dir, tmp_path, 'classes', 'mixup_cutmix', 1))
    other = make_image_folder(tmp_path / 'other', classes=3, train_per_class=12, val_per_class=6)
    (other / 'train' / 'class2').rename(other / 'train' / 'classX')
    (other / 'val' / 'class2').rename(other / 'val' / 'classX')
    with pytest.raises(SystemExit, match='other classes than .*other has'):
        train.main(train_args(other, tmp_path, 'classes', 'mixup_cutmix', 2))
