"""compare_runs.py on hand-made run folders, and prepare_digits.py on the real sklearn digits."""
import csv
import importlib.util
from pathlib import Path

import pytest
import yaml

SCRIPTS = Path(__file__).resolve().parents[1] / 'scripts'


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compare_runs = load_script('compare_runs')


def write_run(folder, config=None, summary=None, columns=None):
    """A run folder as train.py leaves it: config.yaml and a timm-style summary.csv (header + one row per epoch)."""
    folder.mkdir(parents=True)
    if config is not None:
        (folder / 'config.yaml').write_text(yaml.safe_dump(config))
    if summary is not None:
        with open(folder / 'summary.csv', 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=columns or list(summary[0]))
            writer.writeheader()
            writer.writerows(summary)
    return folder


@pytest.fixture
def runs(tmp_path):
    out = tmp_path / 'output'
    # finished run with EMA; best top-1 is not the last epoch; columns in an unusual order
    write_run(
        out / 'deit_mixpro',
        config=dict(model='deit_tiny_patch16_224', mix_method='mixpro', epochs=3, experiment='deit_mixpro'),
        columns=['epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr',
                 'eval_ema_top5', 'eval_ema_top1', 'eval_ema_loss'],
        summary=[
            dict(epoch=0, train_loss=2.3, eval_loss=1.9, eval_top1=41.5, eval_top5=80.0, lr=1e-3,
                 eval_ema_loss=2.2, eval_ema_top1=30.0, eval_ema_top5=70.0),
            dict(epoch=1, train_loss=1.8, eval_loss=1.2, eval_top1=72.25, eval_top5=95.0, lr=8e-4,
                 eval_ema_loss=1.5, eval_ema_top1=60.5, eval_ema_top5=90.0),
            dict(epoch=2, train_loss=1.6, eval_loss=1.3, eval_top1=68.0, eval_top5=96.5, lr=5e-4,
                 eval_ema_loss=1.4, eval_ema_top1=58.0, eval_ema_top5=91.0),
        ])
    # stopped after 2 of 5 epochs, no EMA columns
    write_run(
        out / 'deit_cutmix',
        config=dict(model='deit_tiny_patch16_224', mix_method='mixup_cutmix', epochs=5, experiment='deit_cutmix'),
        summary=[
            dict(epoch=0, train_loss=2.4, eval_loss=2.0, eval_top1=35.0, eval_top5=75.0, lr=1e-3),
            dict(epoch=1, train_loss=2.0, eval_loss=1.6, eval_top1=50.0, eval_top5=85.0, lr=9e-4),
        ])
    # only TensorBoard events, no summary.csv
    from torch.utils.tensorboard import SummaryWriter
    tb_run = write_run(out / 'cait_transmix',
                       config=dict(model='cait_xxs24_224', mix_method='transmix', epochs=4, experiment='x'))
    writer = SummaryWriter(log_dir=str(tb_run))
    for epoch, (loss, top1, top5, ema1) in enumerate([(2.2, 40.0, 81.0, 20.0), (1.9, 55.0, 88.0, 45.0),
                                                      (1.7, 62.5, 92.0, 52.0), (1.5, 61.0, 93.5, 57.5)]):
        writer.add_scalar('train/loss', loss, epoch)
        writer.add_scalar('eval/top1', top1, epoch)
        writer.add_scalar('eval/top5', top5, epoch)
        writer.add_scalar('eval_ema/top1', ema1, epoch)
        writer.add_scalar('mix/lam_area', 0.5, epoch)
    writer.close()
    # a run whose config is not valid YAML and whose summary.csv is empty
    broken = write_run(out / 'broken')
    (broken / 'config.yaml').write_text('model: [unclosed\n')
    (broken / 'summary.csv').write_text('')
    # a folder that is no run at all
    (out / 'notes').mkdir()
    return out


def by_name(rows):
    return {r['run']: r for r in rows}


def test_finished_run_from_summary(runs):
    (row,) = compare_runs.collect_runs([runs / 'deit_mixpro'])
    assert row['model'] == 'deit_tiny_patch16_224'
    assert row['method'] == 'mixpro'
    assert row['source'] == 'summary.csv'
    assert (row['epochs_done'], row['epochs_planned']) == (3, 3)
    assert row['final_top1'] == pytest.approx(68.0)
    assert row['best_top1'] == pytest.approx(72.25)
    assert row['best_epoch'] == 1
    assert row['best_ema_top1'] == pytest.approx(60.5)
    assert row['final_top5'] == pytest.approx(96.5)
    assert row['final_train_loss'] == pytest.approx(1.6)
    assert row['unfinished'] is False
    assert row['note'] is None


def test_unfinished_run_without_ema(runs):
    (row,) = compare_runs.collect_runs([runs / 'deit_cutmix'])
    assert (row['epochs_done'], row['epochs_planned']) == (2, 5)
    assert row['unfinished'] is True
    assert 'unfinished' in row['note']
    assert row['best_ema_top1'] is None
    assert row['final_top1'] == pytest.approx(50.0)
    assert row['best_epoch'] == 1


def test_an_unfinished_run_with_val_interval_names_the_epoch_its_final_top1_is_from(runs):
    empty = dict(eval_loss='', eval_top1='', eval_top5='')
    write_run(runs / 'sparse', config=dict(model='deit_tiny_patch16_224', mix_method='mixpro', epochs=6),
              summary=[dict(epoch=0, train_loss=2.4, **empty, lr=1e-3),
                       dict(epoch=1, train_loss=2.2, eval_loss=1.8, eval_top1=40.0, eval_top5=80.0, lr=1e-3),
                       dict(epoch=2, train_loss=2.0, **empty, lr=1e-3)])
    (row,) = compare_runs.collect_runs([runs / 'sparse'])
    assert row['epochs_done'] == 3 and row['final_top1'] == pytest.approx(40.0) and row['best_epoch'] == 1
    assert "epoch 1's" in row['note'] and 'latest evaluated' in row['note']
    table1 = load_script('table1')
    assert table1._cell(row) == (40.0, 'unfinished (3/6 epochs; final: epoch 1)')


@pytest.mark.parametrize('cut_at', ['2,1.6,1.3,68', '2,1.6'])
def test_a_row_cut_off_mid_write_is_left_out_and_said(runs, cut_at):
    """A kill during the append leaves '...,68' for 68.0 or a row missing its cells: never shown as measured."""
    summary = runs / 'deit_mixpro' / 'summary.csv'
    lines = summary.read_text().splitlines(keepends=True)
    summary.write_text(''.join(lines[:-1]) + cut_at)                # the last row, cut, without its newline
    (row,) = compare_runs.collect_runs([runs / 'deit_mixpro'])
    assert row['epochs_done'] == 2 and row['final_top1'] == pytest.approx(72.25) and row['unfinished'] is True
    assert 'cut off mid-write' in row['note']


def test_tensorboard_fallback(runs):
    (row,) = compare_runs.collect_runs([runs / 'cait_transmix'])
    assert row['source'] == 'tensorboard'
    assert row['method'] == 'transmix'
    assert (row['epochs_done'], row['epochs_planned']) == (4, 4)
    assert row['final_top1'] == pytest.approx(61.0)
    assert row['best_top1'] == pytest.approx(62.5)
    assert row['best_epoch'] == 2
    assert row['best_ema_top1'] == pytest.approx(57.5)
    assert row['final_top5'] == pytest.approx(93.5)
    assert row['final_train_loss'] == pytest.approx(1.5)
    assert row['unfinished'] is False


def test_folder_expansion_and_broken_runs(runs):
    rows = by_name(compare_runs.collect_runs([runs]))
    # 'notes' holds nothing run-like, so it is not a run of output/
    assert set(rows) == {'deit_mixpro', 'deit_cutmix', 'cait_transmix', 'broken'}
    broken = rows['broken']
    assert 'unreadable config.yaml' in broken['note']
    assert 'summary.csv has no epochs' in broken['note']
    assert broken['final_top1'] is None and broken['epochs_done'] == 0
    # a folder given directly that is not a run becomes a row with the reason
    (notes,) = compare_runs.collect_runs([runs / 'notes'])
    assert 'not a run folder' in notes['note']


def test_nonexistent_path_is_a_clear_error(runs, capsys):
    missing = runs / 'no_such_run'
    with pytest.raises(FileNotFoundError, match='no_such_run'):
        compare_runs.collect_runs([runs / 'deit_mixpro', missing])
    assert compare_runs.main([str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_markdown_and_csv(runs, tmp_path, capsys):
    out_csv = tmp_path / 'table.csv'
    assert compare_runs.main([str(runs), '--sort', 'best_top1', '--csv', str(out_csv)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines[2:] if line.startswith('| ')]
    # sorted by best top-1, best first; the broken run has none and goes last
    assert [r.split('|')[1].strip() for r in rows] == ['deit_mixpro', 'cait_transmix', 'deit_cutmix', 'broken']
    cells = [c.strip() for c in rows[0].split('|')[1:-1]]
    assert cells[:8] == ['deit_mixpro', 'deit_tiny_patch16_224', 'mixpro', '3/3',
                         '68.00', '72.25 (1)', '60.50', '96.50']
    assert '2/5' in rows[2] and 'unfinished' in rows[2]
    with open(out_csv, newline='') as f:
        table = list(csv.DictReader(f))
    assert [r['run'] for r in table] == ['deit_mixpro', 'cait_transmix', 'deit_cutmix', 'broken']
    assert float(table[1]['best_top1']) == pytest.approx(62.5)
    with pytest.raises(SystemExit, match=f'--csv {tmp_path} cannot be written'):   # a folder: one line, table shown
        compare_runs.main([str(runs), '--csv', str(tmp_path)])


@pytest.mark.slow
def test_prepare_digits(tmp_path):
    from PIL import Image

    prepare_digits = load_script('prepare_digits')
    out = tmp_path / 'digits'
    counts = prepare_digits.prepare_digits(out, size=16, val_fraction=0.2, seed=0)

    files = sorted(out.rglob('*.png'))
    assert len(files) == 1797 == counts['total']
    for split in ('train', 'val'):
        assert sorted(p.name for p in (out / split).iterdir()) == [str(d) for d in range(10)]
    # stratified: every class gives about a fifth of its images to val
    for digit in range(10):
        n_train = len(list((out / 'train' / str(digit)).glob('*.png')))
        n_val = len(list((out / 'val' / str(digit)).glob('*.png')))
        assert n_val > 0
        assert abs(n_val - 0.2 * (n_train + n_val)) <= 1
    # a sample never lands in both splits
    train_names = {p.name for p in (out / 'train').rglob('*.png')}
    assert train_names.isdisjoint(p.name for p in (out / 'val').rglob('*.png'))
    with Image.open(files[0]) as im:
        assert im.size == (16, 16) and im.mode == 'L'

    mtimes = {p: p.stat().st_mtime_ns for p in files}
    prepare_digits.prepare_digits(out, size=16, val_fraction=0.2, seed=0)
    assert {p: p.stat().st_mtime_ns for p in out.rglob('*.png')} == mtimes

    # a damaged dataset is rebuilt in full, with nothing left beside it
    files[0].unlink()
    prepare_digits.prepare_digits(out, size=16, val_fraction=0.2, seed=0)
    assert len(list(out.rglob('*.png'))) == 1797
    assert [p.name for p in tmp_path.iterdir()] == ['digits']

    # same file names at another size is not the requested dataset either
    prepare_digits.prepare_digits(out, size=20, val_fraction=0.2, seed=0)
    with Image.open(next(out.rglob('*.png'))) as im:
        assert im.size == (20, 20)
