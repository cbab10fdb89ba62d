#!/usr/bin/env python
"""Launch and report the paper's Table 1: 14 models x {baseline, +TransMix, +MixPro} on ImageNet-1k.

    python scripts/table1.py plan [--nodes 1 --gpus-per-node 8] [--data-dir /data/imagenet] [--slurm DIR] \
        [-- more train.py options for every run, e.g. --log-wandb --wandb-project table1]
    python scripts/table1.py report [--runs output/] [--csv table1.csv] [--markdown table1.md]

`plan` prints one launch command per run (42 runs, recipes configs/<model>_<method>.yaml); with
`--slurm DIR` it writes one sbatch file per run into DIR plus DIR/submit_all.sh (each job requeues itself
at the time limit until its run is done, see scripts/slurm_train.sbatch). `report` reads the
run folders output/<model>_<method>/ (via compare_runs.py) and prints Table 1 beside the paper's
numbers: reproduced top-1 (final and best, EMA best noted), the difference to the paper, and which
runs are missing or unfinished.
"""
import argparse
import contextlib
import csv
import importlib.util
import io
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ('baseline', 'transmix', 'mixpro')
METHOD_TITLES = {'baseline': 'baseline', 'transmix': '+TransMix', 'mixpro': '+MixPro'}

# Table 1 of MixPro (ICLR 2023), ImageNet-1k top-1 %, in the paper's row order; the baselines are the
# numbers TransMix (Chen et al., CVPR 2022) reports. (row title, config prefix) -> baseline, TransMix, MixPro
PAPER = {
    ('DeiT-T', 'deit_t'): (72.2, 72.6, 73.8),
    ('PVT-T', 'pvt_t'): (75.1, 75.5, 76.7),
    ('XCiT-T', 'xcit_t'): (79.4, 80.1, 81.2),
    ('CA-Swin-T', 'ca_swin_t'): (81.6, 81.8, 82.8),
    ('CaiT-XXS', 'cait_xxs'): (79.1, 79.8, 80.6),
    ('DeiT-S', 'deit_s'): (79.8, 80.7, 81.3),
    ('PVT-S', 'pvt_s'): (79.8, 80.5, 81.2),
    ('XCiT-S', 'xcit_s'): (82.0, 82.3, 82.9),
    ('CA-Swin-S', 'ca_swin_s'): (82.8, 83.2, 83.7),
    ('PVT-M', 'pvt_m'): (81.2, 82.1, 82.7),
    ('PVT-L', 'pvt_l'): (81.7, 82.4, 82.9),
    ('XCiT-M', 'xcit_m'): (82.7, 83.4, 84.1),
    ('DeiT-B', 'deit_b'): (81.8, 82.4, 82.9),
    ('XCiT-L', 'xcit_l'): (82.9, 83.8, 84.7),
}


def load_compare_runs():
    spec = importlib.util.spec_from_file_location('compare_runs', REPO / 'scripts' / 'compare_runs.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def runs():
    """``(title, prefix, method, run name)`` for all 42 runs, in table order."""
    return [(title, prefix, method, f'{prefix}_{method}') for (title, prefix) in PAPER for method in METHODS]


# ---- plan -------------------------------------------------------------------------------------
def launch_command(config: str, args) -> str:
    train = ['train.py', '--config', config, '--data-dir', args.data_dir, '--output', args.output, *args.train_options]
    if args.nodes > 1:
        rendezvous = ['--nnodes', str(args.nodes), '--rdzv_backend', 'c10d', '--rdzv_endpoint', '$HEAD_NODE:29500',
                      '--rdzv_id', Path(config).stem]
    else:
        rendezvous = ['--standalone']
    launcher = ['torchrun', *rendezvous, f'--nproc_per_node={args.gpus_per_node}']
    return ' '.join(shlex.quote(a) if not a.startswith('$') else a for a in launcher + train)


# Slurm: the same time-limit signal and requeue as scripts/slurm_train.sbatch (see there): 300 s before
# the limit the batch shell gets SIGUSR1, train.py saves mid-epoch, the job requeues and resumes.
SLURM_SIGNAL = 'B:USR1@300'


def recipe_args(config: str, check_machine: bool = True):
    """The recipe's resolved train.py options (after ``base:`` and defaults)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from mixpro.config import parse_train_args
    return parse_train_args(['--config', str(REPO / config)], check_machine=check_machine)


def recipe_workers(config: str) -> int:
    """The recipe's data-loading processes per GPU (``workers``)."""
    return recipe_args(config).workers


def sbatch_file(run: str, config: str, args) -> str:
    # per node: one training process per GPU plus its data workers
    cpus = args.gpus_per_node * (recipe_workers(config) + 1)
    return '\n'.join([
        '#!/bin/bash',
        f'#SBATCH --job-name={run}',
        f'#SBATCH --nodes={args.nodes}',
        '#SBATCH --ntasks-per-node=1',
        f'#SBATCH --gpus-per-node={args.gpus_per_node}',
        f'#SBATCH --cpus-per-task={cpus}',
        '#SBATCH --time=72:00:00',
        f'#SBATCH --signal={SLURM_SIGNAL}',
        '#SBATCH --requeue',
        '#SBATCH --open-mode=append',
        f'#SBATCH --output=slurm-{run}-%j.out',
        f'export GPUS_PER_NODE={args.gpus_per_node}',
        f'export MIXPRO_REPO={shlex.quote(str(REPO))}',
        'cd "$MIXPRO_REPO"',
        '# exec: the signals Slurm sends to this shell reach slurm_train.sbatch, which forwards them and requeues',
        f'exec bash scripts/slurm_train.sbatch {shlex.quote(config)} --data-dir {shlex.quote(args.data_dir)} '
        f'--output {shlex.quote(args.output)}' + ''.join(f' {shlex.quote(a)}' for a in args.train_options),
        '',
    ])


PLAN_OWNED = ('--config', '-c', '--experiment', '--output', '--data-dir')


def check_train_options(configs: list, options: list) -> None:
    """Stop on train.py options it would refuse with any of the plan's recipes, before 42 jobs are written or
    submitted (what depends on the machine, such as a GPU or the wandb package, is left to the jobs: this may
    be a login node)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from mixpro.config import ConfigError, parse_train_args
    given = ' '.join(options)
    owned = [flag for flag in PLAN_OWNED for option in options if option == flag or option.startswith(flag + '=')]
    if owned:   # each run has its own recipe and folder; the data and output folders are the plan's options
        sys.exit(f'error: {owned[0]} after -- is set by the plan for each run (each run is its recipe, in the '
                 f'folder named after it; --data-dir and --output are options of plan itself, before --)')
    usage = io.StringIO()   # argparse's refusal: train.py's whole usage, then the reason on the last line
    try:
        for config in configs:   # recipes differ (e.g. PVT and CA-Swin train without an EMA)
            with contextlib.redirect_stderr(usage):
                parse_train_args(['--config', str(REPO / config), *options], check_machine=False)
    except ConfigError as err:
        sys.exit(f'error: the train.py options after -- ({given}) are refused with {config}: {err}')
    except SystemExit:
        reason = (usage.getvalue().strip().splitlines() or ['refused'])[-1].split('error: ', 1)[-1]
        sys.exit(f'error: the train.py options after -- ({given}) are refused: {reason}')


def plan(args) -> list:
    planned = []
    missing = []
    for _, _, _, run in runs():
        config = f'configs/{run}.yaml'
        if not (REPO / config).is_file():
            missing.append(config)
        planned.append((run, config))
    if missing:
        sys.exit('error: missing recipes: ' + ', '.join(missing))
    check_train_options([config for _, config in planned], args.train_options)
    print(f'# {len(planned)} runs, {args.nodes} node(s) x {args.gpus_per_node} GPU(s) each; global batch = '
          f'{args.nodes * args.gpus_per_node} x the recipe\'s batch_size (lr follows it where a recipe sets lr_base)')
    if args.slurm:
        folder = Path(args.slurm)
        folder.mkdir(parents=True, exist_ok=True)
        for run, config in planned:
            (folder / f'{run}.sbatch').write_text(sbatch_file(run, config, args))
        submit = ['#!/bin/bash', 'set -e'] + [f'sbatch {shlex.quote(str(folder / f"{run}.sbatch"))}'
                                              for run, _ in planned]
        (folder / 'submit_all.sh').write_text('\n'.join(submit) + '\n')
        print(f'wrote {len(planned)} sbatch files and submit_all.sh to {folder}')
    for run, config in planned:
        print(launch_command(config, args))
    return planned


# ---- report -----------------------------------------------------------------------------------
def _cell(row):
    """Reproduced top-1 of one run as shown in the table, and its status."""
    if row is None:
        return None, 'missing'
    if row.get('final_top1') is None:
        return None, row.get('note') or 'no results'
    if row.get('unfinished'):
        behind = row.get('final_epoch') is not None and row['final_epoch'] + 1 < row['epochs_done']
        return row['final_top1'], (f"unfinished ({row['epochs_done']}/{row['epochs_planned']} epochs"
                                   + (f"; final: epoch {row['final_epoch']}" if behind else '') + ')')
    return row['final_top1'], 'done'


# what makes a run folder the Table-1 run of its recipe (a debug run or an --experiment typo is not)
RECIPE_KEYS = (('model', 'model'), ('mix_method', 'method'), ('epochs', 'epochs'), ('img_size', 'image size'),
               ('model_kwargs', 'model_kwargs'))   # e.g. a depth-cut debug run (ImageNet may come as wds/ shards)


def recipe_mismatch(run_dir: Path, run: str) -> str:
    """How the run in ``run_dir`` differs from recipe configs/<run>.yaml on ImageNet-1k ('' when it does not,
    or when it has no readable config.yaml to tell)."""
    try:
        config = load_compare_runs().read_config(run_dir / 'config.yaml')
    except Exception:   # compare_runs notes a missing or unreadable config.yaml itself
        return ''
    recipe = vars(recipe_args(f'configs/{run}.yaml', check_machine=False))
    differences = [f'{label} {config[key]} (recipe: {recipe[key] or "none"})' for key, label in RECIPE_KEYS
                   if key in config and (config[key] or None) != (recipe[key] or None)]   # '', {}, None alike
    if config.get('num_classes') not in (None, 1000):
        differences.append(f"{config['num_classes']} classes (ImageNet-1k: 1000)")
    return ', '.join(differences)


def report_rows(run_rows: dict, runs_dir: Path = None) -> list:
    """One dict per (model, method): paper and reproduced numbers. A run folder whose settings are not its
    recipe's is shown without numbers: they would stand for a run that was not made."""
    table = []
    for (title, prefix), paper in PAPER.items():
        for method, paper_top1 in zip(METHODS, paper):
            row = run_rows.get(f'{prefix}_{method}')
            mismatch = recipe_mismatch(runs_dir / f'{prefix}_{method}', f'{prefix}_{method}') if (
                row is not None and runs_dir is not None) else ''
            if mismatch:
                row = None
            final, status = _cell(row)
            status = f'not the recipe: {mismatch}' if mismatch else status
            table.append({
                'model': title, 'method': METHOD_TITLES[method], 'run': f'{prefix}_{method}',
                'paper_top1': paper_top1, 'final_top1': final,
                'best_top1': row.get('best_top1') if row else None,
                'best_epoch': row.get('best_epoch') if row else None,
                'best_ema_top1': row.get('best_ema_top1') if row else None,
                'delta_final': None if final is None else round(final - paper_top1, 2),
                'status': status,
            })
    return table


def _num(value, sign=False):
    if value is None:
        return '–'
    return f'{value:+.2f}' if sign else f'{value:.2f}'


def to_markdown(table: list) -> str:
    lines = ['| model | method | paper | final | Δ paper | best (epoch) | EMA best | status |',
             '|---|---|---:|---:|---:|---:|---:|---|']
    for r in table:
        best = '–' if r['best_top1'] is None else f"{r['best_top1']:.2f} ({r['best_epoch']})"
        lines.append(f"| {r['model']} | {r['method']} | {r['paper_top1']:.1f} | {_num(r['final_top1'])} | "
                     f"{_num(r['delta_final'], sign=True)} | {best} | {_num(r['best_ema_top1'])} | {r['status']} |")
    done = sum(r['status'] == 'done' for r in table)
    lines.append('')
    lines.append(f'{done}/{len(table)} runs finished. Paper: MixPro (ICLR 2023) Table 1, baselines as reported '
                 f'by TransMix. "final" is the last evaluated epoch\'s top-1 (a finished run\'s last epoch), '
                 f'"Δ paper" = final − paper.')
    return '\n'.join(lines) + '\n'


def report(args) -> list:
    compare_runs = load_compare_runs()
    runs_dir = Path(args.runs)
    if not runs_dir.is_dir():
        sys.exit(f'error: runs folder {runs_dir} does not exist')
    wanted = {run for *_, run in runs()}
    found = [runs_dir / run for run in sorted(wanted) if (runs_dir / run).is_dir()]
    rows = {row['run']: row for row in compare_runs.collect_runs(found)} if found else {}
    table = report_rows(rows, runs_dir)
    markdown = to_markdown(table)
    print(markdown, end='')
    if args.markdown:
        Path(args.markdown).write_text(markdown)
    if args.csv:
        with open(args.csv, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest='command', required=True)
    plan_cmd = commands.add_parser('plan', help='print (or write as sbatch files) the 42 launch commands')
    plan_cmd.add_argument('--nodes', type=int, default=1)
    plan_cmd.add_argument('--gpus-per-node', type=int, default=8)
    plan_cmd.add_argument('--data-dir', default='/data/imagenet')
    plan_cmd.add_argument('--output', default='output')
    plan_cmd.add_argument('--slurm', metavar='DIR', default=None, help='write one sbatch file per run here')
    plan_cmd.add_argument('train_options', nargs=argparse.REMAINDER,
                          help='after --: more train.py options for every run (e.g. -- --log-wandb)')
    report_cmd = commands.add_parser('report', help='Table 1 from the run folders, beside the paper')
    report_cmd.add_argument('--runs', default='output')
    report_cmd.add_argument('--csv', default=None)
    report_cmd.add_argument('--markdown', default=None)
    args = parser.parse_args(argv)
    if args.command == 'plan':
        args.train_options = args.train_options[1:] if args.train_options[:1] == ['--'] else args.train_options
    return plan(args) if args.command == 'plan' else report(args)


if __name__ == '__main__':
    main()
