"""scripts/table1.py plan on a real cluster: Slurm settings in every sbatch file, the recipes' global batch
kept on any GPU count, the rendezvous, and the options' checks. Reads the generated text; no Slurm needed."""
import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

from mixpro.build import resolve_lr
from mixpro.config import parse_train_args

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location('table1', REPO / 'scripts' / 'table1.py')
table1 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(table1)

RUNS = [run for *_, run in table1.runs()]


def plan(*options):
    return table1.main(['plan', '--data-dir', '/data/imagenet', *options])


def sbatch_options(text):
    """The #SBATCH options of a job file, in order: [(name, value)]."""
    return re.findall(r'^#SBATCH --([\w-]+)(?:=(\S+))?$', text, re.M)


def trained_with(text, gpus):
    """(per-GPU batch, global batch, lr) of the train.py call an sbatch file makes on ``gpus`` GPUs, read
    back from its exec line the way train.py resolves it."""
    line = next(line for line in text.splitlines() if line.startswith('exec bash scripts/slurm_train.sbatch '))
    config, *options = line.split()[3:]
    args = parse_train_args(['--config', str(REPO / config), *options], check_machine=False)
    global_batch = args.batch_size * gpus * args.grad_accum_steps
    lr = resolve_lr(args.lr, lr_base=args.lr_base, lr_base_size=args.lr_base_size,
                    lr_base_scale=args.lr_base_scale, global_batch=global_batch)
    return args.batch_size, global_batch, lr


def one_line_error(err):
    message = str(err.value)
    assert message.startswith('error: ') and '\n' not in message, message
    return message


def test_cluster_settings_and_header_land_in_every_sbatch_file(tmp_path, capsys):
    header = tmp_path / 'site.sh'
    header.write_text('#!/bin/bash\n#SBATCH --mem=0\n#SBATCH --constraint=a100\nmodule load cuda/12.1\n')
    folder = tmp_path / 'jobs'
    plan('--slurm', str(folder), '--partition', 'gpu', '--account', 'proj42', '--qos', 'high',
         '--time', '2-00:00:00', '--sbatch-header', str(header), '--python', '/opt/env/bin/python')
    capsys.readouterr()
    files = sorted(folder.glob('*.sbatch'))
    assert [f.stem for f in files] == sorted(RUNS)
    for file in files:
        text = file.read_text()
        options = dict(sbatch_options(text))
        assert (options['partition'], options['account'], options['qos'], options['time']) == \
            ('gpu', 'proj42', 'high', '2-00:00:00')
        assert options['mem'] == '0' and options['constraint'] == 'a100'
        lines = text.splitlines()
        assert lines.count('#!/bin/bash') == 1                   # the header's own #! is not copied
        # the header's lines come after the plan's #SBATCH lines and before the first command
        last_own = lines.index(f'#SBATCH --output=slurm-{file.stem}-%j.out')
        first_command = next(i for i, line in enumerate(lines) if line and not line.startswith('#'))
        assert last_own < lines.index('#SBATCH --mem=0') < lines.index('module load cuda/12.1') == first_command
        assert 'export PYTHON=/opt/env/bin/python' in lines
        assert subprocess.run(['bash', '-n', str(file)]).returncode == 0


def test_defaults_time_from_slurm_train_and_the_repos_venv(tmp_path, capsys):
    plan('--slurm', str(tmp_path))
    capsys.readouterr()
    sbatch_time = dict(sbatch_options((REPO / 'scripts' / 'slurm_train.sbatch').read_text()))['time']
    text = (tmp_path / 'deit_t_mixpro.sbatch').read_text()
    options = dict(sbatch_options(text))
    assert options['time'] == sbatch_time == '72:00:00'
    assert not {'partition', 'account', 'qos'} & set(options)   # the cluster's defaults: not written
    assert 'PYTHON' not in text                                 # slurm_train.sbatch runs .venv/bin/python


@pytest.mark.parametrize('limit', ['90', '30:00', '12:00:00', '2-00', '1-12:30', '1-00:00:00', 'infinite'])
def test_slurm_time_formats_are_accepted(tmp_path, capsys, limit):
    plan('--slurm', str(tmp_path), '--time', limit)
    assert dict(sbatch_options((tmp_path / 'xcit_l_mixpro.sbatch').read_text()))['time'] == limit


@pytest.mark.parametrize('limit, reason', [('3h', 'not a Slurm time limit'), ('1-2-3', 'not a Slurm time limit'),
                                           ('72:00:00:00', 'not a Slurm time limit'),
                                           ('5', 'more than 5 minutes'), ('04:30', 'more than 5 minutes')])
def test_a_bad_time_is_a_one_line_error(tmp_path, limit, reason):
    with pytest.raises(SystemExit) as err:
        plan('--slurm', str(tmp_path / 'jobs'), '--time', limit)
    message = one_line_error(err)
    assert message.startswith(f'error: --time {limit}: ') and reason in message
    assert not (tmp_path / 'jobs').exists()


def test_header_problems_are_one_line_errors_naming_the_file(tmp_path):
    missing = tmp_path / 'nope.sh'
    with pytest.raises(SystemExit) as err:
        plan('--slurm', str(tmp_path / 'jobs'), '--sbatch-header', str(missing))
    assert one_line_error(err) == f'error: --sbatch-header {missing}: no such file'
    header = tmp_path / 'header.sh'
    for text, reason in (('module load cuda\n#SBATCH --mem=0\n', 'line 2: sbatch ignores #SBATCH lines after'),
                         ('#SBATCH -t 10:00:00\n', "#SBATCH --time: give it as the plan's --time"),
                         ('#SBATCH --partition gpu\n', "give it as the plan's --partition"),
                         ('#SBATCH --signal=USR1@60\n', '#SBATCH --signal is set by the plan')):
        header.write_text(text)
        with pytest.raises(SystemExit) as err:
            plan('--slurm', str(tmp_path / 'jobs'), '--sbatch-header', str(header))
        message = one_line_error(err)
        assert message.startswith(f'error: --sbatch-header {header}') and reason in message
    assert not (tmp_path / 'jobs').exists()


def test_slurm_settings_without_slurm_and_bad_names_are_refused(tmp_path):
    for options, message in ((['--partition', 'gpu'], '--partition goes into the sbatch files: add --slurm'),
                             (['--time', '10:00:00'], '--time goes into the sbatch files'),
                             (['--slurm', str(tmp_path), '--account', 'my account'], "--account 'my account'"),
                             (['--slurm', str(tmp_path), '--head-node', 'n1'], '--head-node is for the printed'),
                             (['--nodes', '0'], '--nodes 0: give 1 or more')):
        with pytest.raises(SystemExit) as err:
            plan(*options)
        assert message in one_line_error(err)


def test_two_nodes_keep_the_global_batch_and_the_lr(tmp_path, capsys):
    plan('--nodes', '2', '--gpus-per-node', '8', '--slurm', str(tmp_path))
    out = capsys.readouterr().out
    deit = (tmp_path / 'deit_t_mixpro.sbatch').read_text()
    assert trained_with(deit, 16) == (64, 1024, pytest.approx(1e-3))
    # the paper's DeiT run: 8 GPUs x 128, lr 5e-4 x 1024 / 512
    assert trained_with('exec bash scripts/slurm_train.sbatch configs/deit_t_mixpro.yaml', 8) == \
        (128, 1024, pytest.approx(1e-3))
    for run in RUNS:   # every family's recipe is 8 x 128 = 1024
        assert trained_with((tmp_path / f'{run}.sbatch').read_text(), 16)[:2] == (64, 1024), run
    assert '# all runs: --batch-size 64 per GPU x 16 GPUs = global batch 1024, as the recipe; lr 0.001' in out


def test_scale_batch_keeps_128_per_gpu_and_says_the_lr_grows(tmp_path, capsys):
    plan('--nodes', '2', '--gpus-per-node', '8', '--slurm', str(tmp_path), '--scale-batch')
    out = capsys.readouterr().out
    assert trained_with((tmp_path / 'deit_s_transmix.sbatch').read_text(), 16) == (128, 2048, pytest.approx(2e-3))
    assert "global batch 2048 instead of the recipe's 1024 (--scale-batch)" in out
    assert "lr 0.002 instead of the recipe's 0.001 (lr_base scaled by the global batch)" in out


def test_fewer_gpus_grow_the_per_gpu_batch_unless_gradients_accumulate(capsys):
    plan('--gpus-per-node', '4')
    assert all(' --batch-size 256' in line for line in capsys.readouterr().out.splitlines()
               if line.startswith('torchrun'))
    plan('--gpus-per-node', '4', '--', '--grad-accum-steps', '2')
    commands = [line for line in capsys.readouterr().out.splitlines() if line.startswith('torchrun')]
    assert len(commands) == 42 and all(c.endswith('--batch-size 128 --grad-accum-steps 2') for c in commands)


def test_a_gpu_count_that_does_not_divide_the_global_batch_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        plan('--nodes', '3', '--gpus-per-node', '8', '--slurm', str(tmp_path / 'jobs'))
    assert 'error: 24 GPUs do not divide the global batch 1024 of configs/' in one_line_error(err)
    assert '--scale-batch' in str(err.value)
    assert not (tmp_path / 'jobs').exists()
    plan('--nodes', '3', '--gpus-per-node', '8', '--scale-batch')   # 128 per GPU fits any count
    assert ' --batch-size 128' in capsys.readouterr().out


def test_a_batch_size_after_the_dashes_is_refused():
    with pytest.raises(SystemExit) as err:
        plan('--nodes', '2', '--', '--batch', '128')   # an argparse abbreviation of --batch-size, too
    assert 'error: --batch-size after -- would replace the per-GPU batch 64' in one_line_error(err)


def test_no_head_node_variable_under_slurm(tmp_path, capsys):
    plan('--nodes', '2', '--slurm', str(tmp_path))
    out = capsys.readouterr().out
    assert 'HEAD_NODE' not in out and 'torchrun' not in out
    assert out.count('\nsbatch ') == 42 and f'bash {tmp_path}/submit_all.sh' in out
    for file in tmp_path.glob('*.sbatch'):
        assert 'HEAD_NODE' not in file.read_text()


def test_multi_node_commands_say_how_to_set_the_head_node(capsys):
    plan('--nodes', '2')
    lines = capsys.readouterr().out.splitlines()
    commands = [line for line in lines if line.startswith('torchrun')]
    assert all('--rdzv_endpoint $HEAD_NODE:29500' in c for c in commands)
    assert any(line.startswith('#') and 'export HEAD_NODE=' in line and '--head-node' in line for line in lines)
    plan('--nodes', '2', '--head-node', 'gpu-node-07')
    out = capsys.readouterr().out
    assert 'HEAD_NODE' not in out and out.count('--rdzv_endpoint gpu-node-07:29500') == 42


def test_data_dir_is_required(capsys):
    with pytest.raises(SystemExit) as err:
        table1.main(['plan', '--nodes', '1'])
    assert err.value.code == 2
    assert 'required: --data-dir' in capsys.readouterr().err


def test_help_names_every_plan_option_on_one_line(capsys, monkeypatch):
    monkeypatch.setenv('COLUMNS', '100')
    with pytest.raises(SystemExit):
        table1.main(['plan', '--help'])
    lines = capsys.readouterr().out.splitlines()
    for option in ('--data-dir', '--output', '--nodes', '--gpus-per-node', '--scale-batch', '--head-node', '--slurm',
                   '--partition', '--account', '--qos', '--time', '--sbatch-header', '--python'):
        # the option, its metavar, then its help on the same line
        assert any(re.match(rf'  {option}( [A-Z]+)?  +\S', line) for line in lines), option
    assert any('--grad-accum-steps' in line for line in lines)


@pytest.mark.parametrize('option', [['--epochs', '1'], ['--mix-method=mixpro'], ['--model', 'vit_tiny_patch16_224']])
def test_options_that_change_what_a_run_is_are_refused_after_the_dashes(tmp_path, option):
    with pytest.raises(SystemExit) as err:
        table1.main(['plan', '--data-dir', '/d', '--slurm', str(tmp_path / 'jobs'), '--', *option])
    assert option[0].split('=')[0] in str(err.value) and 'own --experiment' in str(err.value)
    assert not (tmp_path / 'jobs').exists()
