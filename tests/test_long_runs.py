"""A long run in the real world: preemption signals, a NaN, bad class folders, two runs in one folder,
kills around checkpoint writes, a longer schedule on resume, validate.py's precision (issue 7)."""
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from timm.loss import SoftTargetCrossEntropy

import train
import validate
from conftest import make_image_folder, read_summary, signal_during_mixer_call, train_args, xcit_train_args
from mixpro import checkpoint, training
from mixpro.checkpoint import CheckpointError, CheckpointKeeper, atomic_save, load_checkpoint
from mixpro.data import image_folder
from mixpro.run_folder import RunLock, choose_resume_checkpoint

REPO = Path(__file__).resolve().parents[1]
STEPS = 4   # 3 classes x 12 train images, batch 8, drop_last


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


# ---- 2. preemption ------------------------------------------------------------------------------
def test_sigterm_mid_epoch_saves_and_the_resumed_run_is_bit_exact_with_workers(data_dir, tmp_path, monkeypatch,
                                                                                capsys):
    extra = ('--workers', '2', '--model-ema', '--model-ema-decay', '0.9', '--drop-path', '0.1')
    train.main(train_args(data_dir, tmp_path, 'straight', 'mixpro', 3, *extra))
    straight = _load(tmp_path / 'straight' / 'last.pth.tar')

    args = train_args(data_dir, tmp_path, 'stopped', 'mixpro', 3, *extra)
    signal_during_mixer_call(monkeypatch, STEPS + 2, signal.SIGTERM)    # epoch 1, step 2 of 4
    with pytest.raises(SystemExit) as stopped:
        train.main(args)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert 'SIGTERM: stopped at epoch 1 step 2/4' in capsys.readouterr().out
    run_dir = tmp_path / 'stopped'
    assert _load(run_dir / 'interrupted.pth.tar')['resume_at'] == [1, 2]
    assert _load(run_dir / 'last.pth.tar')['epoch'] == 0                 # the epoch-0 state is untouched
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL           # handlers restored after the run

    monkeypatch.undo()
    train.main(args)                                                     # --resume auto
    assert 'resumed from' in capsys.readouterr().out
    resumed = _load(run_dir / 'last.pth.tar')
    assert not (run_dir / 'interrupted.pth.tar').exists()
    for key in ('state_dict', 'state_dict_ema'):
        for name, tensor in straight[key].items():
            assert torch.equal(tensor, resumed[key][name]), f'{key}.{name} differs after the mid-epoch resume'
    assert read_summary(run_dir) == read_summary(tmp_path / 'straight')  # losses, top-1, lr: all equal


@pytest.mark.parametrize('signum,to_group,workers', [(signal.SIGUSR1, False, '0'), (signal.SIGTERM, True, '2'),
                                                     (signal.SIGINT, True, '2')],
                         ids=['usr1-to-the-process', 'term-to-the-process-group-with-workers',
                              'ctrl-c-to-the-process-group-with-workers'])
def test_a_signal_to_the_command_line_saves_and_exits_128_plus_it(data_dir, tmp_path, signum, to_group, workers):
    """A cluster signals every process of the job: the data-loading workers and their forkserver too."""
    args = train_args(data_dir, tmp_path, 'signalled', 'mixup_cutmix', 200, '--workers', workers)
    proc = subprocess.Popen([sys.executable, str(REPO / 'train.py'), *args, '--log-interval', '1'], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith('epoch 1 ['):            # training for real: preempt it
            os.killpg(proc.pid, signum) if to_group else proc.send_signal(signum)
            break
    lines += proc.stdout.readlines()
    assert proc.wait(timeout=120) == 128 + signum, ''.join(lines)
    text = ''.join(lines)
    assert f'{signal.Signals(signum).name}: stopped' in text and '--resume auto continues' in text
    saved = [p for p in (tmp_path / 'signalled').glob('*.pth.tar') if p.name in ('interrupted.pth.tar', 'last.pth.tar')]
    position = max(tuple(_load(p).get('resume_at', [0, 0])) for p in saved)
    assert position >= (1, 1)


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


# ---- 3. non-finite loss -------------------------------------------------------------------------
def nan_loss_at(monkeypatch, step: int) -> None:
    """The training loss of the ``step``-th step (counted over epochs, from 1) becomes NaN."""
    class NanAtStep(SoftTargetCrossEntropy):
        calls = 0

        def forward(self, x, target):
            NanAtStep.calls += 1
            loss = super().forward(x, target)
            return loss * float('nan') if NanAtStep.calls == step else loss
    monkeypatch.setattr(training, 'SoftTargetCrossEntropy', NanAtStep)


def test_a_nan_loss_stops_the_run_before_anything_is_saved(data_dir, tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, STEPS + 2)
    with pytest.raises(SystemExit, match=r'loss is not finite \(NaN or inf\) at epoch 1 step 2/4'):
        train.main(train_args(data_dir, tmp_path, 'nan', 'transmix', 3))
    run_dir = tmp_path / 'nan'
    last = _load(run_dir / 'last.pth.tar')
    assert last['epoch'] == 0 and all(torch.isfinite(t).all() for t in last['state_dict'].values())
    assert _load(run_dir / 'model_best.pth.tar')['epoch'] == 0
    assert [r['epoch'] for r in read_summary(run_dir)] == ['0']
    assert not (run_dir / 'interrupted.pth.tar').exists()


def test_recovery_saves_survive_a_hard_crash_and_the_resumed_run_is_bit_exact(data_dir, tmp_path, monkeypatch,
                                                                               capsys):
    """--recovery-interval 2: a resumable state after steps 2 of every epoch, so a crash (no signal, no
    save of its own) at epoch 1 step 4 resumes from step 2 and ends as the run that never crashed."""
    from mixpro.mixer import Mixer
    extra = ('--workers', '2', '--model-ema', '--model-ema-decay', '0.9')
    train.main(train_args(data_dir, tmp_path, 'straight', 'mixpro', 2, *extra))
    straight = _load(tmp_path / 'straight' / 'last.pth.tar')

    args = train_args(data_dir, tmp_path, 'crashed', 'mixpro', 2, *extra, '--recovery-interval', '2')
    real, calls = Mixer.__call__, {'n': 0}

    def crashing(self, x, y):
        calls['n'] += 1
        if calls['n'] == STEPS + 4:                                     # epoch 1, step 4 of 4
            raise RuntimeError('node lost')
        return real(self, x, y)
    monkeypatch.setattr(Mixer, '__call__', crashing)
    with pytest.raises(RuntimeError, match='node lost'):
        train.main(args)
    run_dir = tmp_path / 'crashed'
    assert _load(run_dir / 'interrupted.pth.tar')['resume_at'] == [1, 2]
    assert _load(run_dir / 'last.pth.tar')['epoch'] == 0

    monkeypatch.undo()
    train.main(args)                                                     # --resume auto
    out = capsys.readouterr().out
    assert 'resumed from' in out and 'interrupted.pth.tar at epoch 1 step 2' in out
    resumed = _load(run_dir / 'last.pth.tar')
    assert not (run_dir / 'interrupted.pth.tar').exists()                # superseded by the epoch's end
    for key in ('state_dict', 'state_dict_ema'):
        for name, tensor in straight[key].items():
            assert torch.equal(tensor, resumed[key][name]), f'{key}.{name} differs after the crash and resume'
    assert read_summary(run_dir) == read_summary(tmp_path / 'straight')


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


def test_a_recovery_save_never_holds_non_finite_weights(data_dir, tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, STEPS + 1)
    with pytest.raises(SystemExit, match=r'loss is not finite \(NaN or inf\) at epoch 1 step 1/4'):
        train.main(train_args(data_dir, tmp_path, 'nan', 'mixpro', 2, '--recovery-interval', '1',
                              '--log-interval', '0'))
    run_dir = tmp_path / 'nan'
    assert not (run_dir / 'interrupted.pth.tar').exists()
    assert _load(run_dir / 'last.pth.tar')['epoch'] == 0


# ---- 4. classes ---------------------------------------------------------------------------------
@pytest.fixture
def own_data(tmp_path):
    return make_image_folder(tmp_path / 'data', classes=3, train_per_class=2, val_per_class=2, size=8)


def test_val_takes_the_train_class_index(own_data):
    shutil.rmtree(own_data / 'val' / 'class1')              # a class val does not have
    train_set = image_folder(own_data, 'train', is_training=True)
    val_set = image_folder(own_data, 'val', is_training=False, class_to_idx=train_set.reader.class_to_idx)
    labels = {Path(path).parent.name: label for path, label in val_set.reader.samples}
    assert labels == {'class0': 0, 'class2': 2}            # not shifted to 1


def test_a_stray_image_in_the_split_folder_is_no_class(own_data, capsys):
    shutil.copy(own_data / 'train' / 'class0' / '0.png', own_data / 'train' / 'stray.png')
    train_set = image_folder(own_data, 'train', is_training=True)
    assert train_set.reader.class_to_idx == {'class0': 0, 'class1': 1, 'class2': 2}
    assert len(train_set) == 6
    assert '1 image(s) directly in' in capsys.readouterr().out


@pytest.mark.parametrize('split', ['train', 'val'])
def test_an_empty_class_folder_is_an_error_before_training(own_data, tmp_path, split):
    for image in (own_data / split / 'class1').iterdir():
        image.unlink()
    with pytest.raises(SystemExit, match=f'class folder .*{split}/class1 holds no images'):
        train.main(train_args(own_data, tmp_path / 'out', 'empty', 'mixpro', 1))
    assert not list((tmp_path / 'out' / 'empty').glob('*.pth.tar'))


def test_a_val_class_unknown_to_train_is_named(own_data, tmp_path):
    shutil.copytree(own_data / 'val' / 'class0', own_data / 'val' / 'class9')
    with pytest.raises(SystemExit, match='do not have: class9'):
        train.main(train_args(own_data, tmp_path / 'out', 'unknown', 'mixpro', 1))


def test_class_map_file_sets_labels_and_selects_classes(own_data, tmp_path):
    (own_data / 'classes.txt').write_text('class2\nclass0\n')
    train_set = image_folder(own_data, 'train', is_training=True, class_map=str(own_data / 'classes.txt'))
    assert train_set.reader.class_to_idx == {'class2': 0, 'class0': 1}
    assert sorted({label for _, label in train_set.reader.samples}) == [0, 1] and len(train_set) == 4
    result = train.main([*train_args(own_data, tmp_path / 'out', 'mapped', 'mixup_cutmix', 1, '--batch-size', '2'),
                         '--class-map', str(own_data / 'classes.txt')])
    assert result['eval']['count'] == 4                       # class1's val images are not used
    state = _load(tmp_path / 'out' / 'mapped' / 'last.pth.tar')
    assert state['num_classes'] == 2 and state['class_to_idx'] == {'class2': 0, 'class0': 1}
    (own_data / 'bad.txt').write_text('class7\n')
    with pytest.raises(SystemExit, match="--class-map .*bad.txt names 1 class.*'class7'"):
        train.main([*train_args(own_data, tmp_path / 'out', 'bad', 'mixpro', 1), '--class-map',
                    str(own_data / 'bad.txt')])


def _truncate(image: Path) -> Path:
    data = image.read_bytes()
    image.write_bytes(data[:len(data) // 2])               # a copy that stopped half way
    return image


def test_a_truncated_image_is_named_in_the_skip_warning(own_data, caplog):
    broken = _truncate(own_data / 'train' / 'class1' / '1.png')
    train_set = image_folder(own_data, 'train', is_training=True)
    for index in range(len(train_set)):
        train_set[index]
    skips = [r.getMessage() for r in caplog.records if 'skipped' in r.getMessage()]
    assert len(skips) == 1 and str(broken) in skips[0] and 'truncated' in skips[0], skips


def test_an_unreadable_val_image_is_left_out_of_the_numbers_not_counted_twice(own_data, tmp_path):
    train.main(train_args(own_data, tmp_path / 'out', 'run', 'mixpro', 1, '--batch-size', '2'))
    validate_args = ['--checkpoint', str(tmp_path / 'out' / 'run' / 'last.pth.tar'), '--data-dir', str(own_data),
                     '--workers', '0', '--device', 'cpu', '--batch-size', '4']
    broken = _truncate(own_data / 'val' / 'class1' / '0.png')
    with_broken = validate.main(validate_args)[0]                    # timm hands over class1/1.png in its place
    broken.unlink()
    without = validate.main(validate_args)[0]
    assert with_broken['unreadable'] == 1 and without['unreadable'] == 0
    assert with_broken['samples'] == without['samples'] == 5
    assert with_broken['top1'] == without['top1'] and with_broken['loss'] == pytest.approx(without['loss'], rel=1e-5)


def test_a_loader_worker_names_the_truncated_image(own_data):
    """Workers start from the forkserver and unpickle the dataset: the naming must travel with it."""
    broken = _truncate(own_data / 'val' / 'class2' / '0.png')
    script = ('import torch, sys\n'
              'from mixpro.data import image_folder, _worker_options\n'
              'dataset = image_folder(sys.argv[1], "val", is_training=False)\n'
              'options = _worker_options(1, False, torch.device("cpu"))\n'
              'for _ in torch.utils.data.DataLoader(dataset, collate_fn=list, **options): pass\n')
    run = subprocess.run([sys.executable, '-c', script, str(own_data)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f'skipped unreadable image {broken}' in run.stderr, run.stderr


# ---- 5. one run per folder ----------------------------------------------------------------------
def test_a_second_run_in_a_locked_folder_is_refused_and_a_dead_holder_is_taken_over(data_dir, tmp_path, capsys):
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    holder = RunLock(run_dir)
    holder.acquire()
    with pytest.raises(SystemExit, match=r'run is in use by another run \(pid \d+ on'):
        train.main(train_args(data_dir, tmp_path, 'run', 'mixpro', 1))
    holder.release()
    assert not list(run_dir.glob('*.pth.tar'))
    (run_dir / '.lock').write_text('pid 999999 on a-dead-node, started 2026-01-01T00:00:00\n')   # killed holder
    train.main(train_args(data_dir, tmp_path, 'run', 'mixpro', 1))
    assert 'pid 999999 on a-dead-node' in capsys.readouterr().out
    assert (run_dir / '.lock').read_text() == ''             # released cleanly at the end


def test_a_run_that_fails_before_writing_anything_leaves_no_folder_but_keeps_one_it_found(data_dir, tmp_path):
    with pytest.raises(SystemExit, match="model 'no_such_model' is not a timm model"):
        train.main([*train_args(data_dir, tmp_path, 'new', 'mixpro', 1), '--model', 'no_such_model'])
    assert not (tmp_path / 'new').exists()
    (tmp_path / 'mine').mkdir()                               # made by the user: stays, even empty
    with pytest.raises(SystemExit, match="model 'no_such_model'"):
        train.main([*train_args(data_dir, tmp_path, 'mine', 'mixpro', 1), '--model', 'no_such_model'])
    assert (tmp_path / 'mine').is_dir()


# ---- 6. checkpoints -----------------------------------------------------------------------------
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
    with pytest.raises(CheckpointError, match='could not write .*last.pth.tar \\(disk full or over quota\\?\\)'):
        atomic_save({'epoch': 2}, tmp_path / 'last.pth.tar')
    assert load_checkpoint(tmp_path / 'last.pth.tar')['epoch'] == 1
    assert [p.name for p in tmp_path.iterdir()] == ['last.pth.tar']


def test_a_summary_row_cut_off_by_a_kill_is_dropped_on_resume(tmp_path):
    from mixpro.logger import RunLogger
    (tmp_path / 'summary.csv').write_text('epoch,train_loss,eval_top1\n0,2.0,40.0\n1,1.5,55.0\n1')   # '1' of '12,...'
    RunLogger(tmp_path, start_epoch=2).close()
    assert (tmp_path / 'summary.csv').read_text().split() == ['epoch,train_loss,eval_top1', '0,2.0,40.0', '1,1.5,55.0']
    assert (tmp_path / 'summary.csv').read_text().endswith('\n')        # the next epoch's row starts a line


def test_resume_falls_back_to_the_newest_intact_checkpoint(data_dir, tmp_path, capsys):
    args = train_args(data_dir, tmp_path, 'torn', 'transmix', 2)
    train.main(args)
    run_dir = tmp_path / 'torn'
    best = load_checkpoint(run_dir / 'model_best.pth.tar')['epoch']
    with open(run_dir / 'last.pth.tar', 'r+b') as f:
        f.truncate(1000)                                        # a file damaged by a copy or a filesystem fault
    path, notes = choose_resume_checkpoint(parse(args), run_dir)
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
    args = parse(['--resume', 'auto'])
    assert choose_resume_checkpoint(args, tmp_path)[0].name == 'last.pth.tar'
    atomic_save({'epoch': 4, 'resume_at': [4, 2]}, tmp_path / 'interrupted.pth.tar')
    assert choose_resume_checkpoint(args, tmp_path)[0].name == 'interrupted.pth.tar'


def parse(argv):
    from mixpro.config import parse_train_args
    return parse_train_args(argv)


# ---- 7. resume: a longer schedule, a finished run -----------------------------------------------
def test_more_epochs_on_resume_stretch_the_schedule(data_dir, tmp_path, capsys):
    train.main(train_args(data_dir, tmp_path, 'longer', 'mixup_cutmix', 2))
    train.main(train_args(data_dir, tmp_path, 'longer', 'mixup_cutmix', 4))
    assert '--epochs 2 -> 4: the lr schedule is stretched' in capsys.readouterr().out
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


# ---- 8. validate.py precision -------------------------------------------------------------------
def test_validate_uses_the_checkpoint_precision_unless_told(data_dir, tmp_path, capsys):
    train.main(train_args(data_dir, tmp_path, 'bf16', 'maskmix', 1, '--amp', '--amp-dtype', 'bfloat16'))
    path = tmp_path / 'bf16' / 'last.pth.tar'
    state = _load(path)
    capsys.readouterr()
    own = validate.main(['--checkpoint', str(path), '--workers', '0', '--device', 'cpu'])[0]
    assert 'precision: bfloat16 autocast (from the checkpoint)' in capsys.readouterr().out
    assert own['precision'] == 'bfloat16' and own['loss'] == pytest.approx(state['eval_metrics']['eval']['loss'])
    fp32 = validate.main(['--checkpoint', str(path), '--workers', '0', '--device', 'cpu', '--no-amp'])[0]
    assert 'precision: float32 (as asked)' in capsys.readouterr().out and fp32['precision'] == 'float32'
    train.main(train_args(data_dir, tmp_path, 'fp32', 'maskmix', 1))
    fp16 = validate.main(['--checkpoint', str(tmp_path / 'fp32' / 'last.pth.tar'), '--workers', '0', '--device', 'cpu',
                          '--amp-dtype', 'float16'])[0]                # a dtype alone asks for autocast
    assert 'precision: float16 autocast (as asked)' in capsys.readouterr().out and fp16['precision'] == 'float16'
    with pytest.raises(SystemExit, match='--model-kwargs with .*rebuilds its own model'):
        validate.main(['--checkpoint', str(path), '--workers', '0', '--model-kwargs', 'depth=3'])


# ---- 9. one line instead of a traceback ---------------------------------------------------------
@pytest.mark.parametrize('extra,message', [
    (['--model-kwargs', 'dept=4'], "model 'deit_tiny_patch16_224' cannot be built with model_kwargs"),
    (['--mask-cell', '16'], '--mask-cell 16 covers the whole 16-px image'),
    (['--img-size', '18', '--mask-cell', '4'], 'image size 18 px is not a multiple of the 4-px tokens'),
    (['--batch-size', '64'], 'has 36 images, fewer than one batch of 64'),
    (['--num-classes', '2'], '--num-classes 2: the training data has labels up to 2 (3 classes)'),
    (['--sched', 'wsd'], '--sched wsd: wsd schedule requires 0 < decay_epochs'),   # 90 decay epochs in 1
])
def test_bad_input_is_one_line_naming_it(data_dir, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message.replace('(', r'\(').replace(')', r'\)')):
        train.main(train_args(data_dir, tmp_path, 'bad', 'mixpro', 1, *extra))


def test_an_image_size_off_the_token_grid_is_pointed_out_where_it_is_not_refused(data_dir, tmp_path, capsys):
    train.main(train_args(data_dir, tmp_path, 'off_grid', 'mixup_cutmix', 1, '--img-size', '18'))
    assert "note: image size 18 px is not a multiple of the model's 4-px patches: the last 2 px" in \
        capsys.readouterr().out


def test_an_lr_below_min_lr_is_pointed_out(data_dir, tmp_path, capsys):
    train.main(train_args(data_dir, tmp_path, 'low', 'mixup_cutmix', 1, '--lr', '1e-6', '--min-lr', '1e-5'))
    assert 'note: lr 1.000e-06 is below --min-lr 1.000e-05' in capsys.readouterr().out
    train.main(train_args(data_dir, tmp_path, 'fine', 'mixup_cutmix', 1))
    assert 'is below --min-lr' not in capsys.readouterr().out


def test_validate_with_another_model_or_a_bad_results_file_is_one_line(data_dir, tmp_path):
    train.main(train_args(data_dir, tmp_path, 'run', 'mixup_cutmix', 1))
    path = str(tmp_path / 'run' / 'last.pth.tar')
    with pytest.raises(SystemExit, match="does not fit model 'resnet18'"):
        validate.main(['--checkpoint', path, '--workers', '0', '--model', 'resnet18'])
    (tmp_path / 'file').write_text('')
    with pytest.raises(SystemExit, match='--results-file .*cannot create its folder'):
        validate.main(['--checkpoint', path, '--workers', '0', '--results-file', str(tmp_path / 'file' / 'x.json')])
    assert math.isfinite(_load(path)['metric'])
    (tmp_path / 'folder').mkdir()
    (tmp_path / 'four.txt').write_text('class0\nclass1\nclass2\nclass3\n')
    for extra, message in ((['--results-file', str(tmp_path / 'folder')], 'is a folder: name a .json or .csv file'),
                           (['--class-map', str(tmp_path / 'four.txt')], 'names 4 classes but the model has 3 outputs'),
                           (['--occlusion', '0.9'], r'--occlusion 0.9 drops none of the 1 patch\(es\) of a 16x16'),
                           (['--crop-pct', '0'], r'--crop-pct must be in \(0, 1\]')):
        with pytest.raises(SystemExit, match=message):   # each before anything is evaluated
            validate.main(['--checkpoint', path, '--workers', '0', *extra])


def _torchrun(args, **popen):
    launch = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    return subprocess.Popen([*launch, str(REPO / 'train.py'), *args], cwd=REPO, text=True,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'}, **popen)


def test_sigterm_to_torchrun_stops_every_rank_at_one_step_and_resumes_exactly(data_dir, tmp_path):
    """XCiT with EMA: within an epoch each rank's EMA has its own BatchNorm statistics (DDP syncs only the
    model's), which the mid-epoch save must keep per rank for --dist-bn to average the same ones."""
    extra = ('--batch-size', '4', '--workers', '1', '--log-interval', '1', '--image-grid-interval', '0',
             '--model-ema', '--model-ema-decay', '0.9')
    assert _torchrun(xcit_train_args(data_dir, tmp_path, 'straight', 'transmix', 3, *extra)).wait(timeout=300) == 0
    args = xcit_train_args(data_dir, tmp_path, 'stopped', 'transmix', 3, *extra)
    proc = _torchrun(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith('epoch 1 ['):
            proc.send_signal(signal.SIGTERM)        # torchrun forwards it to every rank (and their workers)
            break
    lines += proc.stdout.readlines()
    proc.wait(timeout=120)
    assert 'SIGTERM: stopped' in ''.join(lines), ''.join(lines)[-3000:]
    assert _torchrun(args).wait(timeout=300) == 0
    straight = _load(tmp_path / 'straight' / 'last.pth.tar')
    resumed = _load(tmp_path / 'stopped' / 'last.pth.tar')
    assert len(resumed['rng_states']) == 2
    for weights in ('state_dict', 'state_dict_ema'):
        for name, tensor in straight[weights].items():
            assert torch.equal(tensor, resumed[weights][name]), f'{weights} {name} differs after the resume'
    assert read_summary(tmp_path / 'stopped') == read_summary(tmp_path / 'straight')


def test_resume_none_refuses_a_folder_with_checkpoints(data_dir, tmp_path):
    train.main(train_args(data_dir, tmp_path, 'kept', 'mixup_cutmix', 1))
    before = _load(tmp_path / 'kept' / 'last.pth.tar')['state_dict']
    with pytest.raises(SystemExit, match='--resume none, but .*kept holds the checkpoints of an earlier run'):
        train.main([*train_args(data_dir, tmp_path, 'kept', 'mixup_cutmix', 1), '--resume', 'none'])
    after = _load(tmp_path / 'kept' / 'last.pth.tar')['state_dict']
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_auto_refuses_to_start_over_when_no_checkpoint_can_be_read(data_dir, tmp_path):
    args = train_args(data_dir, tmp_path, 'unreadable', 'mixup_cutmix', 1)
    train.main(args)
    for path in (tmp_path / 'unreadable').glob('*.pth.tar'):
        path.write_bytes(b'damaged')
    with pytest.raises(SystemExit, match='--resume auto: no checkpoint in .*unreadable can be read'):
        train.main(args)
    assert (tmp_path / 'unreadable' / 'last.pth.tar').read_bytes() == b'damaged'    # nothing overwritten


def test_resume_from_an_older_checkpoint_sets_the_later_ones_aside(data_dir, tmp_path, capsys):
    args = train_args(data_dir, tmp_path, 'older', 'mixup_cutmix', 3, '--checkpoint-hist', '3')
    train.main(args)
    run_dir = tmp_path / 'older'
    later = {name: _load(run_dir / name)['state_dict'] for name in ('checkpoint-1.pth.tar', 'checkpoint-2.pth.tar',
                                                                   'last.pth.tar')}
    again = train_args(data_dir, tmp_path, 'older', 'mixup_cutmix', 2, '--checkpoint-hist', '3')
    with pytest.raises(SystemExit, match='other settings'):                # refused: nothing is moved
        train.main([*again, '--resume', str(run_dir / 'checkpoint-0.pth.tar'), '--smoothing', '0.2'])
    assert not list(run_dir.glob('abandoned-*')) and (run_dir / 'checkpoint-2.pth.tar').exists()
    train.main([*again, '--resume', str(run_dir / 'checkpoint-0.pth.tar')])   # redo epoch 1 only
    assert 'moved the later checkpoints' in capsys.readouterr().out
    (aside,) = run_dir.glob('abandoned-*')                                   # nothing deleted
    for name, weights in later.items():
        kept = _load(aside / name)['state_dict']
        assert all(torch.equal(weights[k], kept[k]) for k in weights)
    assert [row['epoch'] for row in read_summary(aside)] == ['0', '1', '2']   # the abandoned epochs' log too
    assert sorted(p.name for p in run_dir.glob('checkpoint-*.pth.tar')) == ['checkpoint-0.pth.tar',
                                                                            'checkpoint-1.pth.tar']
    assert _load(run_dir / 'model_best.pth.tar')['epoch'] in (0, 1)          # not the abandoned epoch 2
    assert _load(run_dir / 'last.pth.tar')['epoch'] == 1
    assert train.main(again)['epoch'] == 1      # --resume auto goes on from the new history, not epoch 2


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
    last = _load(run_dir / 'last.pth.tar')
    assert [epoch for _, epoch in last['checkpoint_ranking']] == [2]       # not the first folder's epochs
    assert _load(run_dir / 'model_best.pth.tar')['epoch'] == 2
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
    state = _load(last)
    groups = state['optimizer']['param_groups']   # one parameter moved to the other group, as a model
    groups[1]['params'].append(groups[0]['params'].pop())   # whose weight-decay exemptions changed
    atomic_save(state, last)
    with pytest.raises(SystemExit, match="last.pth.tar: its optimizer state does not fit .*run_info.yaml"):
        train.main(train_args(data_dir, tmp_path, 'groups', 'mixup_cutmix', 2))
    assert _load(last)['optimizer']['param_groups'][1]['params'] == groups[1]['params']   # left as it was


def test_resume_refuses_a_data_dir_whose_classes_differ(data_dir, tmp_path):
    train.main(train_args(data_dir, tmp_path, 'classes', 'mixup_cutmix', 1))
    other = make_image_folder(tmp_path / 'other', classes=3, train_per_class=12, val_per_class=6)
    (other / 'train' / 'class2').rename(other / 'train' / 'classX')
    (other / 'val' / 'class2').rename(other / 'val' / 'classX')
    with pytest.raises(SystemExit, match='trained with other classes than .*other has'):
        train.main(train_args(other, tmp_path, 'classes', 'mixup_cutmix', 2))
