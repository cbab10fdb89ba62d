"""scripts/table1.py: the launch plan and the report against the paper's Table 1."""
import csv
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location('table1', REPO / 'scripts' / 'table1.py')
table1 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(table1)


def fake_run(root, name, last_top1s, done=None, ema=None, **settings):
    """A run folder of recipe configs/<name>.yaml (``settings`` change its config.yaml) that trained ``done``
    epochs (default: all the recipe's), the last ones reaching ``last_top1s`` (and ``ema``)."""
    recipe = vars(table1.recipe_args(f'configs/{name}.yaml', check_machine=False))
    config = {'model': recipe['model'], 'mix_method': recipe['mix_method'], 'epochs': recipe['epochs'],
              'img_size': recipe['img_size'], 'num_classes': 1000, **settings}
    done = done or config['epochs']
    top1s = [1.0] * (done - len(last_top1s)) + list(last_top1s)
    emas = [1.0] * (done - len(ema)) + list(ema) if ema else None
    folder = root / name
    folder.mkdir(parents=True)
    (folder / 'config.yaml').write_text(yaml.safe_dump(config))
    with open(folder / 'summary.csv', 'w', newline='') as f:
        fields = ['epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr'] + (['eval_ema_top1'] if ema else [])
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for epoch, top1 in enumerate(top1s):
            row = {'epoch': epoch, 'train_loss': 3.0, 'eval_loss': 1.0, 'eval_top1': top1, 'eval_top5': 90.0,
                   'lr': 1e-4}
            if ema:
                row['eval_ema_top1'] = emas[epoch]
            writer.writerow(row)
    return config['epochs']


def test_plan_lists_42_runs_with_their_recipes(capsys, tmp_path):
    planned = table1.main(['plan', '--data-dir', '/d', '--nodes', '2', '--gpus-per-node', '4'])
    assert len(planned) == 42 and len({run.name for run in planned}) == 42
    commands = [line for line in capsys.readouterr().out.splitlines() if line.startswith('torchrun')]
    assert len(commands) == 42
    assert all('--nnodes 2' in c and '--nproc_per_node=4' in c for c in commands)
    assert any('configs/ca_swin_s_mixpro.yaml' in c for c in commands)
    table1.main(['plan', '--data-dir', '/d', '--nodes', '2', '--gpus-per-node', '4', '--slurm',
                 str(tmp_path / 'sbatch')])
    assert len(list((tmp_path / 'sbatch').glob('*.sbatch'))) == 42
    assert (tmp_path / 'sbatch' / 'submit_all.sh').read_text().count('sbatch ') == 42


@pytest.mark.slow
def test_options_after_two_dashes_reach_every_run_and_typos_stop_the_plan(tmp_path, capsys):
    table1.main(['plan', '--data-dir', '/d', '--', '--log-wandb', '--wandb-project', 'table 1'])
    commands = [line for line in capsys.readouterr().out.splitlines() if line.startswith('torchrun')]
    assert len(commands) == 42 and all(c.endswith("--log-wandb --wandb-project 'table 1'") for c in commands)
    planned = table1.main(['plan', '--data-dir', '/d', '--slurm', str(tmp_path), '--', '--log-wandb',
                           '--wandb-project', 'table 1'])
    for run in planned:
        assert "--log-wandb --wandb-project 'table 1'" in (tmp_path / f'{run.name}.sbatch').read_text()
    with pytest.raises(SystemExit, match='refused with .*unknown option --lgo-wandb') as err:
        table1.main(['plan', '--data-dir', '/d', '--slurm', str(tmp_path / 'typo'), '--', '--lgo-wandb'])
    assert 'mean --log-wandb' in str(err.value)
    assert not (tmp_path / 'typo').exists()                  # nothing written for 42 jobs that would fail
    for refused, message in ((['--compile-mixer', 'nope'], 'is not a torch.compile backend'),
                             (['--experiment', 'all'], 'set by the plan for each run'),
                             (['--output=/elsewhere'], 'set by the plan for each run'),
                             (['--log-interval', 'abc'], "refused with .*--log-interval: invalid int value: 'abc'$"),
                             # fine for DeiT, refused for the recipes without an EMA (PVT, CA-Swin)
                             (['--eval-metric', 'ema_top1'], 'refused with .*(pvt|ca_swin)_.*--model-ema')):
        with pytest.raises(SystemExit, match=message):
            table1.main(['plan', '--data-dir', '/d', '--slurm', str(tmp_path / 'bad'), '--', *refused])
    assert not (tmp_path / 'bad').exists()


@pytest.mark.slow
def test_sbatch_files_requeue_at_the_time_limit_and_size_cpus_from_the_recipe(tmp_path, capsys):
    from mixpro.config import parse_train_args
    planned = table1.main(['plan', '--data-dir', '/d', '--nodes', '2', '--gpus-per-node', '4',
                           '--slurm', str(tmp_path)])
    capsys.readouterr()
    for run in planned:
        config = run.config
        text = (tmp_path / f'{run.name}.sbatch').read_text()
        header = dict(re.findall(r'^#SBATCH --([\w-]+)(?:=(\S+))?$', text, re.M))
        assert header['signal'] == 'B:USR1@300' and 'requeue' in header and header['open-mode'] == 'append'
        workers = parse_train_args(['--config', str(REPO / config)]).workers
        assert int(header['cpus-per-task']) == 4 * (workers + 1)
        assert header['nodes'] == '2' and header['gpus-per-node'] == '4'
        assert re.search(r'^exec bash scripts/slurm_train\.sbatch ' + re.escape(config) + ' ', text, re.M)
    # the cpus follow the recipe's workers (quickstart: workers 2), not a fixed number
    quickstart = 'configs/quickstart_mixpro.yaml'
    args = table1.get_args_parser().parse_args(['plan', '--data-dir', '/d', '--gpus-per-node', '2', '--slurm',
                                                str(tmp_path)])
    table1.check_plan_options(args)
    text = table1.sbatch_file(table1.plan_run('q', quickstart, table1.recipe_args(quickstart, check_machine=False),
                                              args), args)
    workers = parse_train_args(['--config', str(REPO / 'configs' / 'quickstart_mixpro.yaml')]).workers
    assert f'#SBATCH --cpus-per-task={2 * (workers + 1)}\n' in text


def test_report_puts_runs_beside_the_paper(tmp_path, capsys):
    epochs = fake_run(tmp_path, 'deit_t_mixpro', [70.0, 74.1, 73.5], ema=[69.0, 73.0, 74.4])
    fake_run(tmp_path, 'deit_t_baseline', [60.0, 71.0], done=2)
    fake_run(tmp_path, 'pvt_s_transmix', [80.9])
    (tmp_path / 'unrelated_run').mkdir()
    csv_path = tmp_path / 'table.csv'
    table = table1.main(['report', '--runs', str(tmp_path), '--csv', str(csv_path)])
    rows = {r['run']: r for r in table}
    assert len(table) == 42

    mixpro = rows['deit_t_mixpro']
    assert mixpro['paper_top1'] == 73.8 and mixpro['final_top1'] == 73.5
    assert mixpro['best_top1'] == 74.1 and mixpro['best_epoch'] == epochs - 2 and mixpro['best_ema_top1'] == 74.4
    assert mixpro['delta_final'] == pytest.approx(-0.3) and mixpro['status'] == 'done'
    assert rows['deit_t_baseline']['status'].startswith(f'unfinished (2/{epochs}')
    assert rows['pvt_s_transmix']['delta_final'] == pytest.approx(0.4)
    assert rows['xcit_l_mixpro']['status'] == 'missing' and rows['xcit_l_mixpro']['final_top1'] is None

    out = capsys.readouterr().out
    assert f'| DeiT-T | +MixPro | 73.8 | 73.50 | -0.30 | 74.10 ({epochs - 2}) | 74.40 | done |' in out
    assert '2/42 runs finished' in out
    with open(csv_path) as f:
        assert len(list(csv.DictReader(f))) == 42


def test_report_shows_no_numbers_for_a_folder_that_is_not_its_recipes_run(tmp_path):
    """A debug run copied or named into a Table-1 folder must not stand in the table as that run."""
    fake_run(tmp_path, 'deit_t_transmix', [27.1], done=2, mix_method='mixpro', epochs=2, num_classes=4)
    fake_run(tmp_path, 'deit_s_mixpro', [81.0], model='deit_tiny_patch16_224')
    fake_run(tmp_path, 'deit_b_mixpro', [82.0], model_kwargs={})                  # {} is the recipe's None
    fake_run(tmp_path, 'pvt_t_mixpro', [75.0], model_kwargs={'depths': [1, 1, 1, 1]})   # a depth-cut debug run
    fake_run(tmp_path, 'pvt_s_mixpro', [80.0], dataset='wds/imagenet')      # ImageNet read from shards: fine
    rows = {r['run']: r for r in table1.main(['report', '--runs', str(tmp_path)])}
    status = rows['pvt_t_mixpro']['status']
    assert 'not the recipe' in status and "model_kwargs {'depths': [1, 1, 1, 1]}" in status and 'none' in status
    assert rows['pvt_s_mixpro']['status'] == 'done' and rows['pvt_s_mixpro']['final_top1'] == 80.0
    debug = rows['deit_t_transmix']
    assert debug['final_top1'] is None and debug['delta_final'] is None and debug['best_top1'] is None
    assert 'not the recipe' in debug['status']
    for difference in ('method mixpro (recipe: transmix)', 'epochs 2 (recipe: 300)', '4 classes (ImageNet-1k: 1000)'):
        assert difference in debug['status']
    status = rows['deit_s_mixpro']['status']
    assert 'not the recipe' in status and 'deit_tiny_patch16_224 (recipe: deit_' in status
    assert rows['deit_b_mixpro']['status'] == 'done' and rows['deit_b_mixpro']['final_top1'] == 82.0


def test_report_names_a_missing_runs_folder(tmp_path):
    with pytest.raises(SystemExit, match='nowhere does not exist'):
        table1.main(['report', '--runs', str(tmp_path / 'nowhere')])
