#!/usr/bin/env python
"""Launch and report the paper's Table 1: 14 models x {baseline, +TransMix, +MixPro} on ImageNet-1k.

    python scripts/table1.py plan --data-dir /data/imagenet [--nodes 1 --gpus-per-node 8] [--scale-batch] \
        [--slurm DIR [--partition P --account A --qos Q --time 72:00:00 --sbatch-header FILE --python PATH]] \
        [-- more train.py options for every run, e.g. --log-wandb --wandb-project table1]
    python scripts/table1.py report [--runs output/] [--csv table1.csv] [--markdown table1.md]

`plan` prints one launch command per run (42 runs, recipes configs/<model>_<method>.yaml), each run
keeping its recipe's global batch of 1024 on the GPUs given (`plan --help`); with `--slurm DIR` it writes
one sbatch file per run into DIR plus DIR/submit_all.sh (each job requeues itself at the time limit until
its run is done, see scripts/slurm_train.sbatch). `report` reads the
run folders output/<model>_<method>/ (via compare_runs.py) and prints Table 1 beside the paper's
numbers: reproduced top-1 (final and best, EMA best noted), the difference to the paper, and which
runs are missing or unfinished.
"""
import argparse
import csv
import importlib.util
import re
import shlex
import sys
from pathlib import Path
from typing import NamedTuple

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
# Every Table-1 recipe's batch_size is per GPU on the 8 GPUs it was published with: 8 x 128 = 1024
# (configs/README.md; "Global batch 1024 = 8 GPUs x batch_size" atop each configs/base/<model>.yaml).
RECIPE_GPUS = 8
RDZV_PORT = 29500
DEFAULT_TIME = '72:00:00'   # the time limit in scripts/slurm_train.sbatch's header
# Slurm: the same time-limit signal and requeue as scripts/slurm_train.sbatch (see there): 300 s before
# the limit the batch shell gets SIGUSR1, train.py saves mid-epoch, the job requeues and resumes.
SIGNAL_LEAD_S = 300
SLURM_SIGNAL = f'B:USR1@{SIGNAL_LEAD_S}'
# sbatch --time: the forms Slurm accepts, with each field's length in seconds
TIME_FORMATS = (
    (r'(\d+)', (60,)),                                   # MM
    (r'(\d+):(\d+)', (60, 1)),                           # MM:SS
    (r'(\d+):(\d+):(\d+)', (3600, 60, 1)),               # HH:MM:SS
    (r'(\d+)-(\d+)', (86400, 3600)),                     # D-HH
    (r'(\d+)-(\d+):(\d+)', (86400, 3600, 60)),           # D-HH:MM
    (r'(\d+)-(\d+):(\d+):(\d+)', (86400, 3600, 60, 1)),  # D-HH:MM:SS
)
# #SBATCH options every generated file sets; a header file setting one again would contradict it
PLAN_SBATCH = ('--job-name', '--nodes', '--ntasks-per-node', '--gpus-per-node', '--cpus-per-task', '--time',
               '--partition', '--account', '--qos', '--signal', '--requeue', '--open-mode', '--output')
SBATCH_SHORT = {'-J': '--job-name', '-N': '--nodes', '-c': '--cpus-per-task', '-t': '--time', '-p': '--partition',
                '-A': '--account', '-q': '--qos', '-o': '--output'}
SLURM_ONLY = ('--partition', '--account', '--qos', '--time', '--sbatch-header', '--python')
PLAN_OWNED = ('--config', '-c', '--experiment', '--output', '--data-dir')
# what a Table-1 run is: after --, these would train something else into the recipe-named folders
RECIPE_OWNED = ('--model', '--model-kwargs', '--mix-method', '--epochs', '--img-size', '--num-classes', '--dataset')


class Run(NamedTuple):
    """One planned run: its recipe, and the batch and lr it trains with on the plan's GPUs."""
    name: str
    config: str
    batch_size: int            # per GPU: the --batch-size the plan passes
    grad_accum_steps: int      # the recipe's, or given after --
    global_batch: int          # batch_size x GPUs x grad_accum_steps
    lr: float
    lr_scales: bool            # lr = lr_base x global batch / lr_base_size (no absolute lr)
    recipe_global_batch: int   # what the recipe trains with on its RECIPE_GPUS
    recipe_lr: float
    workers: int               # data-loading processes per GPU


def recipe_args(config: str, options=(), check_machine: bool = True):
    """The recipe's resolved train.py options (after ``base:`` and defaults), ``options`` applied."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from mixpro.config import parse_train_args
    return parse_train_args(['--config', str(REPO / config), *options], check_machine=check_machine)


def shares(batch_size: int, gpus: int, steps: int) -> str:
    """How a global batch is made: '64 per GPU x 16 GPUs' (x accumulation steps)."""
    return f'{batch_size} per GPU x {gpus} GPUs' + (f' x {steps} accumulation steps' if steps > 1 else '')


def slurm_seconds(text: str):
    """The length of a Slurm time limit in seconds (inf for 'infinite'), None when it is not one."""
    if text.lower() in ('infinite', 'unlimited'):
        return float('inf')
    for pattern, units in TIME_FORMATS:
        match = re.fullmatch(pattern, text)
        if match:
            return sum(int(value) * unit for value, unit in zip(match.groups(), units))
    return None


def read_sbatch_header(path: str) -> list:
    """The lines of an --sbatch-header file: #SBATCH lines first (sbatch stops reading them at the first
    command), and none of the options the plan writes itself."""
    file = Path(path)
    if not file.is_file():
        sys.exit(f'error: --sbatch-header {path}: no such file')
    lines = file.read_text().splitlines()
    command_seen = False
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if number == 1 and text.startswith('#!'):   # each job file has its own #!/bin/bash
            continue
        if text.startswith('#SBATCH'):
            if command_seen:
                sys.exit(f'error: --sbatch-header {path} line {number}: sbatch ignores #SBATCH lines after the '
                         f'first command: put them at the top')
            option = (text.split()[1:] or [''])[0].split('=', 1)[0]
            option = SBATCH_SHORT.get(option, option)
            if option in ('--nodes', '--gpus-per-node', '--time', '--partition', '--account', '--qos'):
                sys.exit(f'error: --sbatch-header {path} line {number}: #SBATCH {option}: give it as the plan\'s '
                         f'{option} instead')
            if option in PLAN_SBATCH:
                sys.exit(f'error: --sbatch-header {path} line {number}: #SBATCH {option} is set by the plan for '
                         f'every job: leave it out of the header')
        elif text and not text.startswith('#'):
            command_seen = True
    return lines[1:] if lines[:1] and lines[0].startswith('#!') else lines


def check_plan_options(args) -> None:
    """Stop on plan options that Slurm or torchrun would refuse only once the jobs start."""
    for name in ('nodes', 'gpus_per_node'):
        if getattr(args, name) < 1:
            sys.exit(f'error: --{name.replace("_", "-")} {getattr(args, name)}: give 1 or more')
    if not args.slurm:
        given = [option for option in SLURM_ONLY if getattr(args, option[2:].replace('-', '_')) is not None]
        if given:
            sys.exit(f'error: {given[0]} goes into the sbatch files: add --slurm DIR')
        return
    if args.head_node:
        sys.exit('error: --head-node is for the printed torchrun commands: each Slurm job finds its first node '
                 'itself; leave it out')
    for option in ('partition', 'account', 'qos'):
        value = getattr(args, option)
        if value is not None and (not value or any(c.isspace() for c in value)):
            sys.exit(f'error: --{option} {value!r}: give a Slurm name (no spaces)')
    if args.time is None:
        args.time = DEFAULT_TIME
    seconds = slurm_seconds(args.time)
    if seconds is None:
        sys.exit(f'error: --time {args.time}: not a Slurm time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or '
                 f'D-HH:MM:SS)')
    if seconds <= SIGNAL_LEAD_S:
        sys.exit(f'error: --time {args.time}: the jobs are asked to save {SIGNAL_LEAD_S} s before the limit: '
                 f'give more than {SIGNAL_LEAD_S // 60} minutes')
    args.header_lines = read_sbatch_header(args.sbatch_header) if args.sbatch_header else []


def _given(flags, options: list) -> list:
    """The ``flags`` among the command-line ``options`` (``--flag value`` or ``--flag=value``)."""
    return [flag for flag in flags for option in options if option == flag or option.startswith(flag + '=')]


def check_train_options(configs: list, options: list) -> dict:
    """Stop on train.py options it would refuse with any of the plan's recipes, before 42 jobs are written or
    submitted (what depends on the machine, such as a GPU or the wandb package, is left to the jobs: this may
    be a login node). Returns each recipe's resolved options with them."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from mixpro.config import ConfigError, parse_train_args
    given = ' '.join(options)
    owned = _given(PLAN_OWNED, options)
    if owned:   # each run has its own recipe and folder; the data and output folders are the plan's options
        sys.exit(f'error: {owned[0]} after -- is set by the plan for each run (each run is its recipe, in the '
                 f'folder named after it; --data-dir and --output are options of plan itself, before --)')
    defining = _given(RECIPE_OWNED, options)
    if defining:   # a smoke test with -- --epochs 1 would fill the folders the real runs resume from
        sys.exit(f'error: {defining[0]} after -- changes what a Table-1 run is, in its recipe-named folder: '
                 f'train such a run with train.py and its own --experiment')
    resolved = {}
    try:
        for config in configs:   # recipes differ (e.g. PVT and CA-Swin train without an EMA)
            resolved[config] = parse_train_args(['--config', str(REPO / config), *options], check_machine=False)
    except ConfigError as err:   # train.py's parser refuses in one line, argparse's refusals included
        sys.exit(f'error: the train.py options after -- ({given}) are refused with {config}: {err}')
    return resolved


def plan_run(name: str, config: str, with_options, args) -> Run:
    """One run's per-GPU batch: its recipe's global batch shared by the plan's GPUs (and by the
    --grad-accum-steps of ``with_options``, the recipe with the options after --), or with --scale-batch
    the recipe's per-GPU batch."""
    from mixpro.build import resolve_lr
    recipe = recipe_args(config, check_machine=False)
    gpus = args.nodes * args.gpus_per_node
    steps = with_options.grad_accum_steps
    recipe_global = recipe.batch_size * RECIPE_GPUS * recipe.grad_accum_steps
    if args.scale_batch:
        batch_size = recipe.batch_size
    elif recipe_global % (gpus * steps):
        sys.exit(f'error: {gpus} GPUs' + (f' x {steps} accumulation steps' if steps > 1 else '')
                 + f' do not divide the global batch {recipe_global} of {config}: use a GPU count that does, or '
                 f'--scale-batch to keep its per-GPU batch {recipe.batch_size}')
    else:
        batch_size = recipe_global // (gpus * steps)
    planned = recipe_args(config, ['--batch-size', str(batch_size), *args.train_options], check_machine=False)
    if planned.batch_size != batch_size:   # the options after -- come after the plan's --batch-size, and win
        sys.exit(f'error: --batch-size after -- would replace the per-GPU batch {batch_size} the plan sets for '
                 f'{config}: leave it out (--scale-batch keeps the recipes\' per-GPU batch)')

    def lr(run_args, global_batch):
        return resolve_lr(run_args.lr, lr_base=run_args.lr_base, lr_base_size=run_args.lr_base_size,
                          lr_base_scale=run_args.lr_base_scale, global_batch=global_batch)

    global_batch = batch_size * gpus * steps
    return Run(name, config, batch_size, steps, global_batch, lr(with_options, global_batch),
               with_options.lr is None, recipe_global, lr(recipe, recipe_global), recipe.workers)


def describe_batch(run: Run, gpus: int) -> str:
    """What the plan does to a recipe's batch and lr, in words."""
    made = f'--batch-size {shares(run.batch_size, gpus, run.grad_accum_steps)} = global batch {run.global_batch}'
    if run.global_batch == run.recipe_global_batch:
        batch = f'{made}, as the recipe'
    else:
        batch = f'{made} instead of the recipe\'s {run.recipe_global_batch} (--scale-batch)'
    if run.lr == run.recipe_lr:
        return f'{batch}; lr {run.lr:g}, as the recipe'
    why = 'lr_base scaled by the global batch' if run.lr_scales else 'the absolute lr given after --'
    return f'{batch}; lr {run.lr:g} instead of the recipe\'s {run.recipe_lr:g} ({why})'


def batch_summary(planned: list, args) -> list:
    """Comment lines saying what the plan does to the recipes' batch and lr: one per kind of run."""
    kinds = {}
    for run in planned:
        kinds.setdefault(describe_batch(run, args.nodes * args.gpus_per_node), []).append(run.name)
    return [f'# {"all runs" if len(names) == len(planned) else ", ".join(names)}: {text}'
            for text, names in kinds.items()]


def launch_command(run: Run, args) -> str:
    train = ['train.py', '--config', run.config, '--data-dir', args.data_dir, '--output', args.output,
             '--batch-size', str(run.batch_size), *args.train_options]
    if args.nodes > 1:
        endpoint = f'{args.head_node or "$HEAD_NODE"}:{RDZV_PORT}'
        rendezvous = ['--nnodes', str(args.nodes), '--rdzv_backend', 'c10d', '--rdzv_endpoint', endpoint,
                      '--rdzv_id', run.name]
    else:
        rendezvous = ['--standalone']
    launcher = ['torchrun', *rendezvous, f'--nproc_per_node={args.gpus_per_node}']
    return ' '.join(shlex.quote(a) if not a.startswith('$') else a for a in launcher + train)


def sbatch_file(run: Run, args) -> str:
    # per node: one training process per GPU plus its data workers
    cpus = args.gpus_per_node * (run.workers + 1)
    cluster = [f'#SBATCH --{option}={getattr(args, option)}' for option in ('partition', 'account', 'qos')
               if getattr(args, option) is not None]
    header = [f'# from --sbatch-header {args.sbatch_header}:', *args.header_lines] if args.header_lines else []
    python = [f'export PYTHON={shlex.quote(args.python)}'] if args.python else []   # else the repo's .venv
    train = [run.config, '--data-dir', args.data_dir, '--output', args.output, '--batch-size', str(run.batch_size),
             *args.train_options]
    return '\n'.join([
        '#!/bin/bash',
        f'#SBATCH --job-name={run.name}',
        f'#SBATCH --nodes={args.nodes}',
        '#SBATCH --ntasks-per-node=1',
        f'#SBATCH --gpus-per-node={args.gpus_per_node}',
        f'#SBATCH --cpus-per-task={cpus}',
        f'#SBATCH --time={args.time}',
        *cluster,
        f'#SBATCH --signal={SLURM_SIGNAL}',
        '#SBATCH --requeue',
        '#SBATCH --open-mode=append',
        f'#SBATCH --output=slurm-{run.name}-%j.out',
        *header,
        f'# {describe_batch(run, args.nodes * args.gpus_per_node)}',
        f'export GPUS_PER_NODE={args.gpus_per_node}',
        f'export MIXPRO_REPO={shlex.quote(str(REPO))}',
        *python,
        'cd "$MIXPRO_REPO"',
        '# exec: the signals Slurm sends to this shell reach slurm_train.sbatch, which forwards them and requeues',
        'exec bash scripts/slurm_train.sbatch ' + ' '.join(shlex.quote(a) for a in train),
        '',
    ])


PLAN_HELP = f"""Every run keeps its recipe's global batch (the paper's 1024 = {RECIPE_GPUS} GPUs x 128), and so
its lr: the plan passes --batch-size 1024 / (nodes x GPUs per node) and refuses a GPU count that
does not divide 1024. --scale-batch keeps the recipes' 128 per GPU instead: the global batch grows
with the GPUs, and so does the lr (lr_base x global batch / 512).
On fewer GPUs than {RECIPE_GPUS} the per-GPU batch grows (4 GPUs: 256). If that does not fit in memory,
add -- --grad-accum-steps 2: the plan halves the per-GPU batch, the global batch stays 1024.
"""


def plan(args) -> list:
    configs = {run: f'configs/{run}.yaml' for *_, run in runs()}
    missing = [config for config in configs.values() if not (REPO / config).is_file()]
    if missing:
        sys.exit('error: missing recipes: ' + ', '.join(missing))
    check_plan_options(args)
    given = check_train_options(list(configs.values()), args.train_options)
    planned = [plan_run(name, config, given[config], args) for name, config in configs.items()]
    print(f'# {len(planned)} runs, {args.nodes} node(s) x {args.gpus_per_node} GPU(s) each')
    for line in batch_summary(planned, args):
        print(line)
    if args.slurm:
        folder = Path(args.slurm)
        folder.mkdir(parents=True, exist_ok=True)
        for run in planned:
            (folder / f'{run.name}.sbatch').write_text(sbatch_file(run, args))
        submit = ['#!/bin/bash', 'set -e'] + [f'sbatch {shlex.quote(str(folder / f"{run.name}.sbatch"))}'
                                              for run in planned]
        (folder / 'submit_all.sh').write_text('\n'.join(submit) + '\n')
        if not args.python and not (REPO / '.venv' / 'bin' / 'python').exists():
            print(f'note: the jobs run {REPO}/.venv/bin/python, which does not exist: create that environment '
                  f'or give --python PATH', file=sys.stderr)
        print(f'# wrote {len(planned)} sbatch files to {folder}; submit them all with: bash {folder}/submit_all.sh')
        print('\n'.join(submit[2:]))
        return planned
    if args.nodes > 1 and args.head_node:
        print(f'# run each command on all {args.nodes} nodes; they meet at {args.head_node}:{RDZV_PORT}')
    elif args.nodes > 1:
        print(f'# run each command on all {args.nodes} nodes after `export HEAD_NODE=<first node\'s host name>` '
              f'(or give plan --head-node HOST)')
    for run in planned:
        print(launch_command(run, args))
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


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest='command', required=True)
    plan_cmd = commands.add_parser(
        'plan', help='print (or write as sbatch files) the 42 launch commands', description=PLAN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add = plan_cmd.add_argument
    add('--data-dir', metavar='DIR', required=True, help='ImageNet folder (train/, val/) as the jobs see it')
    add('--output', metavar='DIR', default='output', help='folder of the run folders (default: output)')
    add('--nodes', metavar='N', type=int, default=1, help='nodes per run (default: 1)')
    add('--gpus-per-node', metavar='G', type=int, default=8, help='GPUs per node (default: 8)')
    add('--scale-batch', action='store_true', help="keep the recipes' per-GPU batch (global batch grows)")
    add('--head-node', metavar='HOST', help="first node's host for multi-node torchrun commands")
    add('--slurm', metavar='DIR', help='write one sbatch file per run here + submit_all.sh')
    add('--partition', metavar='NAME', help='Slurm partition of every job')
    add('--account', metavar='NAME', help='Slurm account charged for every job')
    add('--qos', metavar='NAME', help='Slurm QOS of every job')
    add('--time', metavar='LIMIT', help=f'Slurm time limit per job (default: {DEFAULT_TIME})')
    add('--sbatch-header', metavar='FILE', help='lines added to every job after its #SBATCH lines')
    add('--python', metavar='PATH', help="jobs' Python (default: the repo's .venv/bin/python)")
    add('train_options', nargs=argparse.REMAINDER, help='after --: train.py options for every run')
    report_cmd = commands.add_parser('report', help='Table 1 from the run folders, beside the paper')
    report_cmd.add_argument('--runs', default='output', help='folder of the run folders (default: output)')
    report_cmd.add_argument('--csv', metavar='FILE', help='also write the table as CSV')
    report_cmd.add_argument('--markdown', metavar='FILE', help='also write the table as Markdown')
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.command == 'plan':
        args.train_options = args.train_options[1:] if args.train_options[:1] == ['--'] else args.train_options
    return plan(args) if args.command == 'plan' else report(args)


if __name__ == '__main__':
    main()
