"""scripts/quickstart.sh's options and reruns, and compare_runs.py --group-seeds on hand-made run folders."""
import csv
import importlib.util
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import make_image_folder

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / 'scripts' / 'quickstart.sh'
spec = importlib.util.spec_from_file_location('compare_runs', REPO / 'scripts' / 'compare_runs.py')
compare_runs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_runs)


def write_run(folder, method, top1s, epochs=None):
    """A run folder as train.py leaves it: config.yaml and summary.csv with one eval_top1 per epoch."""
    folder.mkdir(parents=True)
    config = dict(model='deit_tiny_patch16_224', mix_method=method, epochs=epochs or len(top1s))
    (folder / 'config.yaml').write_text(yaml.safe_dump(config))
    with open(folder / 'summary.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=['epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5'])
        writer.writeheader()
        for epoch, top1 in enumerate(top1s):
            writer.writerow(dict(epoch=epoch, train_loss=1.0, eval_loss=1.0, eval_top1=top1, eval_top5=99.0))
    return folder


@pytest.fixture
def seed_runs(tmp_path):
    """MixPro over three seeds, the baseline over two, and a run without a seed suffix."""
    out = tmp_path / 'output'
    # final top-1 60, 70, 80 (mean 70, sample std 10); best 65, 75, 85
    write_run(out / 'quickstart_mixpro_s1', 'mixpro', [65.0, 60.0])
    write_run(out / 'quickstart_mixpro_s2', 'mixpro', [75.0, 70.0])
    write_run(out / 'quickstart_mixpro_s3', 'mixpro', [85.0, 80.0])
    # final 70, 73 (mean 71.5, std 2.12); the second stopped after 2 of 3 epochs
    write_run(out / 'quickstart_baseline_s1', 'mixup_cutmix', [50.0, 60.0, 70.0])
    write_run(out / 'quickstart_baseline_s2', 'mixup_cutmix', [50.0, 73.0], epochs=3)
    write_run(out / 'other', 'transmix', [40.0, 42.5])
    return out


def group_table(capsys, *args):
    """{group name: {column header: cell}} of the printed --group-seeds table."""
    assert compare_runs.main([*map(str, args), '--group-seeds']) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('| ')]
    header = [c.strip() for c in lines[0].split('|')[1:-1]]
    rows = [dict(zip(header, (c.strip() for c in line.split('|')[1:-1]))) for line in lines[1:]]
    return {row['runs']: row for row in rows}


def test_seed_group_takes_only_a_final_s_number():
    assert compare_runs.seed_group('quickstart_mixpro_s42') == ('quickstart_mixpro', '42')
    assert compare_runs.seed_group('a_s1_s2') == ('a_s1', '2')
    for name in ('quickstart_mixpro', 'run_s', 'run_seed1', 'run_s1x', '_s1'):
        assert compare_runs.seed_group(name) == (name, None)


def test_group_seeds_prints_mean_std_range_and_n(seed_runs, capsys):
    table = group_table(capsys, seed_runs)
    assert list(table) == ['other', 'quickstart_baseline', 'quickstart_mixpro']   # the folders' order: by name
    mixpro = table['quickstart_mixpro']
    assert (mixpro['n'], mixpro['seeds'], mixpro['method']) == ('3', '1 2 3', 'mixpro')
    assert mixpro['top-1 final'] == '70.0 ± 10.0 [60.0–80.0]'
    assert mixpro['top-1 best'] == '75.0 ± 10.0 [65.0–85.0]'
    assert mixpro['note'] == ''
    baseline = table['quickstart_baseline']
    assert baseline['n'] == '2' and baseline['top-1 final'] == '71.5 ± 2.1 [70.0–73.0]'
    assert baseline['note'] == '1 unfinished'
    other = table['other']   # one run: its numbers as they are, no spread
    assert (other['n'], other['seeds'], other['top-1 final'], other['top-1 best']) == ('1', '', '42.5', '42.5')
    assert 'EMA top-1 best' not in mixpro   # no run has EMA numbers: no empty column


def test_group_seeds_sorts_groups_by_their_mean(seed_runs, capsys):
    assert list(group_table(capsys, seed_runs, '--sort', 'top1')) == [
        'quickstart_baseline', 'quickstart_mixpro', 'other']
    assert list(group_table(capsys, seed_runs, '--sort', 'best_top1')) == [
        'quickstart_mixpro', 'quickstart_baseline', 'other']


def test_group_seeds_csv_keeps_one_row_per_run(seed_runs, tmp_path, capsys):
    out_csv = tmp_path / 'runs.csv'
    group_table(capsys, seed_runs, '--csv', out_csv)
    with open(out_csv, newline='') as f:
        assert len(list(csv.DictReader(f))) == 6


def write_robustness(path, rows):
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['checkpoint', 'clean', 'occlusion 0.5'])
        for run, clean, occluded in rows:
            writer.writerow([f'{run}/model_best.pth.tar', clean, occluded])
    return path


def test_robustness_columns_beside_the_top1(seed_runs, tmp_path, capsys):
    robustness = write_robustness(tmp_path / 'robustness.csv', [
        ('quickstart_mixpro_s1', 65.0, 30.0), ('quickstart_mixpro_s2', 75.0, 40.0),
        ('quickstart_mixpro_s3', 85.0, 50.0), ('quickstart_baseline_s1', 70.0, 20.0)])
    table = group_table(capsys, seed_runs, '--robustness', robustness)
    assert table['quickstart_mixpro']['clean'] == '75.0 ± 10.0'   # no [min–max] in these columns
    assert table['quickstart_mixpro']['occlusion 0.5'] == '40.0 ± 10.0'
    assert table['quickstart_baseline']['occlusion 0.5'] == '20.0'
    assert table['quickstart_baseline']['note'] == '1 unfinished; 1 not in the robustness table'
    assert table['other']['occlusion 0.5'] == '' and 'not in the robustness table' in table['other']['note']


def test_robustness_needs_group_seeds_and_a_readable_file(seed_runs, tmp_path, capsys):
    with pytest.raises(SystemExit):
        compare_runs.main([str(seed_runs), '--robustness', str(tmp_path / 'r.csv')])
    assert 'add --group-seeds' in capsys.readouterr().err
    with pytest.raises(SystemExit, match='not a readable robustness.py CSV'):
        compare_runs.main([str(seed_runs), '--group-seeds', '--robustness', str(tmp_path / 'missing.csv')])


def quickstart(*args, dry_run=True, cwd=REPO, timeout=60):
    env = dict(os.environ, QUICKSTART_DRY_RUN='1' if dry_run else '')
    return subprocess.run(['bash', str(QUICKSTART), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def commands(stdout, script):
    """The argument lists of the dry run's lines that run `script`."""
    lines = [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith('+ ')]
    return [argv for argv in lines if len(argv) > 1 and argv[1] == script]


def option(argv, name):
    return argv[argv.index(name) + 1]


def test_dry_run_passes_output_and_seeds_to_every_command(tmp_path):
    out = str(tmp_path / 'runs dir')   # a space: every command must keep it one argument
    result = quickstart('--seeds', '5 6', '--output', out, '--epochs', '1')
    assert result.returncode == 0, result.stderr
    trains = commands(result.stdout, 'train.py')
    names = [f'quickstart_{recipe}_s{seed}' for seed in (5, 6) for recipe in ('baseline', 'transmix', 'mixpro')]
    assert [option(argv, '--experiment') for argv in trains] == names
    for argv, name in zip(trains, names):
        assert option(argv, '--config') == f"configs/quickstart_{name.split('_')[1]}.yaml"
        assert option(argv, '--output') == out and option(argv, '--seed') == name[-1]
        assert option(argv, '--resume') == 'auto' and option(argv, '--epochs') == '1'
    run_dirs = [f'{out}/{name}' for name in names]
    (robustness,) = commands(result.stdout, 'scripts/robustness.py')
    assert robustness[2:8] == [f'{d}/model_best.pth.tar' for d in run_dirs]
    assert option(robustness, '--occlusion-patch') == '4' and option(robustness, '--output') == f'{out}/robustness.csv'
    (show_mix,) = commands(result.stdout, 'scripts/show_mix.py')
    assert option(show_mix, '--checkpoint') == f'{out}/quickstart_mixpro_s5/model_best.pth.tar'
    assert option(show_mix, '--output') == f'{out}/show_mix.png'
    (compare,) = commands(result.stdout, 'scripts/compare_runs.py')
    assert compare[2:8] == run_dirs and '--group-seeds' in compare
    assert option(compare, '--robustness') == f'{out}/robustness.csv'
    assert 'not which recipe is better' in result.stdout and f'{out}/show_mix.png' in result.stdout


def test_dry_run_defaults_and_equals_forms(tmp_path):
    result = quickstart()
    assert result.returncode == 0, result.stderr
    trains = commands(result.stdout, 'train.py')
    assert [option(argv, '--seed') for argv in trains] == ['42'] * 3 + ['43'] * 3
    assert {option(argv, '--output') for argv in trains} == {'output/quickstart'}
    result = quickstart('--seeds=7', f'--output={tmp_path}')
    trains = commands(result.stdout, 'train.py')
    assert [(option(a, '--seed'), option(a, '--output')) for a in trains] == [('7', str(tmp_path))] * 3


@pytest.mark.parametrize('args, message', [
    (['--seed', '1'], 'pass --seeds'),
    (['--experiment', 'seed1'], 'use --output DIR'),
    (['--resume', 'none'], 'to train afresh delete'),
    (['--seeds', '42 x'], "not 'x'"),
    (['--seeds', ' '], '--seeds is empty'),
    (['--output'], '--output needs a value'),
])
def test_refused_options_say_what_to_do_and_run_nothing(args, message):
    result = quickstart(*args)
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count('\n') == 1
    assert '+ ' not in result.stdout


@pytest.mark.slow
def test_quickstart_trains_then_a_rerun_only_reports(tmp_path):
    """One epoch of each recipe on a tiny image folder, run twice: the second run trains nothing."""
    data = make_image_folder(tmp_path / 'data', size=32)
    out = tmp_path / 'out'
    args = ('--seeds', '3', '--output', str(out), '--data-dir', str(data), '--epochs', '1', '--workers', '0',
            '--device', 'cpu')
    first = quickstart(*args, dry_run=False, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    for recipe in ('baseline', 'transmix', 'mixpro'):
        assert (out / f'quickstart_{recipe}_s3' / 'model_best.pth.tar').is_file()
    assert (out / 'show_mix.png').is_file() and (out / 'robustness.csv').is_file()
    summary = first.stdout[first.stdout.index('== results'):]
    assert '| quickstart_mixpro | 1 | 3 | mixpro |' in summary and 'occlusion 0.75' in summary

    second = quickstart(*args, dry_run=False, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (second.stdout + second.stderr).count('already finished') == 3
    assert 'occlusion robustness' not in second.stdout   # nothing newer to measure
    assert second.stdout[second.stdout.index('== results'):] == summary
