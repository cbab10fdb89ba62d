#!/usr/bin/env python
"""Compare training runs: one markdown table row per run folder (optionally also a CSV).

    python scripts/compare_runs.py RUN [RUN ...] [--csv FILE] [--sort {none,name,top1,best_top1,ema_top1}]
    python scripts/compare_runs.py output/quickstart --group-seeds [--robustness output/quickstart/robustness.csv]

A RUN is a folder written by train.py (summary.csv, config.yaml, TensorBoard events). A folder
that is not a run itself is replaced by its run subfolders, so `compare_runs.py output/` compares
every run below it. Metrics come from summary.csv (timm's format, columns read by name) and from
the TensorBoard scalars when summary.csv is absent or empty. Broken runs become rows with the
reason in the note column instead of stopping the report.

--group-seeds prints one row per recipe instead: run folders whose names differ only in a `_s<seed>`
suffix (quickstart_mixpro_s42, quickstart_mixpro_s43) form a group, and every cell is the mean ± sample
standard deviation over the group's runs, with [min–max] for the top-1 columns. --robustness adds the
columns of a scripts/robustness.py CSV (its rows name RUN/model_best.pth.tar) the same way.

`collect_runs(paths)` and `to_markdown(rows)` are meant to be reused by report scripts.
"""
import argparse
import csv
import re
import statistics
import sys
from pathlib import Path

import yaml

# TensorBoard scalar tag -> summary.csv column, so both sources feed the same code
TB_TAGS = {
    'train/loss': 'train_loss',
    'eval/top1': 'eval_top1',
    'eval/top5': 'eval_top5',
    'eval/loss': 'eval_loss',
    'eval_ema/top1': 'eval_ema_top1',
    'eval_ema/top5': 'eval_ema_top5',
    'train/lr': 'lr',
}

# every row from collect_runs has these keys, in this order (also the CSV column order)
FIELDS = ('run', 'path', 'experiment', 'model', 'method', 'epochs_done', 'epochs_planned',
          'final_top1', 'best_top1', 'best_epoch', 'best_ema_top1', 'final_top5', 'final_train_loss',
          'unfinished', 'source', 'note')

SORT_KEYS = {'top1': 'final_top1', 'best_top1': 'best_top1', 'ema_top1': 'best_ema_top1'}


def _has_events(folder):
    return any(folder.glob('events.out.tfevents.*'))


def is_run_dir(folder):
    folder = Path(folder)
    return (folder / 'summary.csv').is_file() or (folder / 'config.yaml').is_file() or _has_events(folder)


def expand_paths(paths):
    """Run folders for the given arguments; a non-run folder stands for its run subfolders."""
    runs = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f'run path does not exist: {p}')
        if not p.is_dir() or is_run_dir(p):
            runs.append(p)
            continue
        children = sorted(c for c in p.iterdir() if c.is_dir() and is_run_dir(c))
        # nothing below it either: keep the folder so it shows up as a row saying why
        runs.extend(children or [p])
    return runs


def _number(text):
    if text is None:
        return None
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def read_summary(path, notes=None):
    """{epoch: {column: float}} from a timm summary.csv; a resumed run's repeated epoch keeps its last row.

    A row cut off by a kill during its write is left out (its last cell could read 33 for 33.33), with a
    line in ``notes``: the file's last line when it does not end in a newline, and any row with missing cells."""
    text = Path(path).read_text()
    lines = text.splitlines(keepends=True)
    dropped = 0
    if lines and not lines[-1].endswith('\n') and len(lines) > 1:
        lines, dropped = lines[:-1], 1
    epochs = {}
    for row in csv.DictReader(lines):
        epoch = _number(row.get('epoch'))
        if epoch is None:
            continue
        if any(value is None for key, value in row.items() if key is not None):   # fewer cells than the header
            dropped += 1
            continue
        # key None holds surplus cells of a row longer than the header: not addressable by name
        epochs[int(epoch)] = {k: _number(v) for k, v in row.items() if k not in (None, 'epoch')}
    if dropped and notes is not None:
        notes.append(f'summary.csv: {dropped} row(s) cut off mid-write left out')
    return epochs


def read_tensorboard(folder):
    """Same shape as read_summary, from every event file under `folder` (later writes win)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    latest = {}  # (column, step) -> (wall_time, value)
    for file in sorted(Path(folder).rglob('events.out.tfevents.*')):
        acc = EventAccumulator(str(file), size_guidance={'scalars': 0})  # 0 = keep every point
        acc.Reload()
        available = set(acc.Tags().get('scalars', []))
        for tag, column in TB_TAGS.items():
            if tag not in available:
                continue
            for ev in acc.Scalars(tag):
                key = (column, int(ev.step))
                if key not in latest or ev.wall_time >= latest[key][0]:
                    latest[key] = (ev.wall_time, float(ev.value))
    epochs = {}
    for (column, step), (_, value) in latest.items():
        epochs.setdefault(step, {})[column] = value
    return epochs


def read_config(path):
    with open(path) as f:
        cfg = yaml.safe_load(f)
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise ValueError('config.yaml is not a mapping')
    return cfg


def summarize(epochs):
    """Final/best numbers from {epoch: {column: value}}; None where a column never appears."""
    order = sorted(epochs)

    def last(column):
        values = [epochs[e][column] for e in order if epochs[e].get(column) is not None]
        return values[-1] if values else None

    def best(column):
        points = [(epochs[e][column], e) for e in order if epochs[e].get(column) is not None]
        if not points:
            return None, None
        top = max(v for v, _ in points)
        return top, next(e for v, e in points if v == top)  # earliest epoch reaching the best

    best_top1, best_epoch = best('eval_top1')
    evaluated = [e for e in order if epochs[e].get('eval_top1') is not None]
    return {
        # train.py numbers epochs from 0; a run resumed into a new folder lacks the early rows
        'epochs_done': int(max(order)) + 1 if order else 0,
        'final_top1': last('eval_top1'),
        'final_epoch': evaluated[-1] if evaluated else None,   # not a CSV column (--val-interval)
        'best_top1': best_top1,
        'best_epoch': best_epoch,
        'best_ema_top1': best('eval_ema_top1')[0],
        'final_top5': last('eval_top5'),
        'final_train_loss': last('train_loss'),
    }


def _reason(what, error):
    # one line, so the note fits in a markdown cell (YAML errors span several lines)
    return f'{what} ({type(error).__name__}: ' + ' '.join(str(error).split()) + ')'


def collect_run(folder):
    folder = Path(folder)
    row = dict.fromkeys(FIELDS)
    row.update(run=folder.name or str(folder), path=str(folder), unfinished=False)
    notes = []

    if not folder.is_dir():
        row['note'] = 'not a folder'
        return row
    if not is_run_dir(folder):
        row['note'] = 'not a run folder (no summary.csv, config.yaml or TensorBoard events)'
        return row

    cfg_path = folder / 'config.yaml'
    if cfg_path.is_file():
        try:
            cfg = read_config(cfg_path)
            row['experiment'] = cfg.get('experiment')
            row['model'] = cfg.get('model')
            row['method'] = cfg.get('mix_method')
            planned = _number(cfg.get('epochs'))
            row['epochs_planned'] = int(planned) if planned is not None else None
        except Exception as e:  # report it and still show whatever metrics there are
            notes.append(_reason('unreadable config.yaml', e))
    else:
        notes.append('no config.yaml')

    epochs = {}
    summary_path = folder / 'summary.csv'
    has_events = any(folder.rglob('events.out.tfevents.*'))
    if summary_path.is_file():
        try:
            epochs = read_summary(summary_path, notes)
            row['source'] = 'summary.csv'
            if not epochs:
                notes.append('summary.csv has no epochs')
        except Exception as e:
            notes.append(_reason('unreadable summary.csv', e))
    if not epochs and has_events:
        try:
            epochs = read_tensorboard(folder)
            if epochs:
                row['source'] = 'tensorboard'
            else:
                notes.append('no metric scalars in TensorBoard events')
        except Exception as e:
            notes.append(_reason('unreadable TensorBoard events', e))
    if not summary_path.is_file() and not has_events:
        notes.append('no metrics (no summary.csv or TensorBoard events)')

    if epochs:
        row.update(summarize(epochs))
        if row['final_epoch'] is not None and row['final_epoch'] + 1 < row['epochs_done']:
            notes.append(f"top-1 final is epoch {row['final_epoch']}'s, the latest evaluated")
    else:
        row['epochs_done'] = 0
    if row['epochs_planned'] is not None and row['epochs_done'] < row['epochs_planned']:
        row['unfinished'] = True
        notes.insert(0, 'unfinished')
    row['note'] = '; '.join(notes) or None
    return row


def collect_runs(paths):
    """One dict per run (keys: FIELDS). Raises FileNotFoundError for a path that does not exist."""
    return [collect_run(folder) for folder in expand_paths(paths)]


def sort_rows(rows, key, name='run', number=lambda row, field: row[field]):
    """Rows (runs, or groups of seeds: ``name`` their name field, ``number(row, field)`` their value) by
    ``--sort``: best first, rows without the number last."""
    if key in (None, 'none'):
        return list(rows)
    if key == 'name':
        return sorted(rows, key=lambda r: r[name])
    field = SORT_KEYS[key]
    return sorted(rows, key=lambda r: (number(r, field) is None, -(number(r, field) or 0.0)))


def _fmt(value, digits=2):
    if value is None:
        return ''
    if isinstance(value, float):
        return f'{value:.{digits}f}'
    return str(value).replace('|', '\\|')  # a bare | would split the markdown cell


def to_markdown(rows):
    header = ['run', 'model', 'method', 'epochs', 'top-1 final', 'top-1 best (epoch)',
              'EMA top-1 best', 'top-5 final', 'train loss', 'note']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for r in rows:
        planned = r['epochs_planned'] if r['epochs_planned'] is not None else '?'
        best = _fmt(r['best_top1'])
        if r['best_epoch'] is not None:
            best += f' ({r["best_epoch"]})'
        cells = [_fmt(r['run']), _fmt(r['model']), _fmt(r['method']),
                 '' if r['epochs_done'] is None else f'{r["epochs_done"]}/{planned}', _fmt(r['final_top1']), best,
                 _fmt(r['best_ema_top1']), _fmt(r['final_top5']), _fmt(r['final_train_loss'], 4),
                 _fmt(r['note'])]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def write_csv(rows, path):
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: '' if r[k] is None else r[k] for k in FIELDS})


SEED_SUFFIX = re.compile(r'^(?P<group>.+)_s(?P<seed>\d+)$')


def seed_group(run):
    """('quickstart_mixpro', '42') for 'quickstart_mixpro_s42'; a name without the suffix is its own group."""
    match = SEED_SUFFIX.match(run)
    return (match['group'], match['seed']) if match else (run, None)


def read_robustness(path):
    """{run folder name: {column: top-1}} from a robustness.py CSV, and its column names in order."""
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        columns = [c for c in reader.fieldnames or [] if c != 'checkpoint']
        table = {}
        for row in reader:
            run = Path(row['checkpoint']).parent.name   # robustness.py labels model_best files RUN/model_best.pth.tar
            table[run] = {c: _number(row[c]) for c in columns}
    return table, columns


def group_seeds(rows, robustness=None):
    """One dict per group of runs (see seed_group), in the order the groups first appear.

    Each holds the group's name, its rows, its seeds, for every number column (the top-1 ones, and the
    robustness columns where a table is given) the list of its runs' values, missing ones left out, and
    how many of its runs the robustness table lacks."""
    robustness = robustness or {}
    groups = {}
    for row in rows:
        name, seed = seed_group(row['run'])
        group = groups.setdefault(name, {'group': name, 'rows': [], 'seeds': [], 'values': {},
                                         'not_in_robustness': 0})
        group['rows'].append(row)
        if seed is not None:
            group['seeds'].append(seed)
        numbers = {field: row[field] for field in ('final_top1', 'best_top1', 'best_ema_top1')}
        if row['run'] in robustness:
            numbers.update(robustness[row['run']])
        else:
            group['not_in_robustness'] += 1
        for column, value in numbers.items():
            values = group['values'].setdefault(column, [])
            if value is not None:
                values.append(value)
    return list(groups.values())


def spread(values, with_range=True):
    """'mean ± std [min–max]' (sample std); one value alone is shown as it is, none as an empty cell."""
    if not values:
        return ''
    if len(values) == 1:
        return f'{values[0]:.1f}'
    text = f'{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}'
    return text + (f' [{min(values):.1f}–{max(values):.1f}]' if with_range else '')


def group_mean(group, field):
    """A group's mean over its seeds of ``field`` (None where no run has it)."""
    values = group['values'].get(field)
    return statistics.mean(values) if values else None


def groups_to_markdown(groups, robustness_columns=()):
    # the EMA column only where a run has EMA numbers: the quickstart recipes have none
    with_ema = any(g['values'].get('best_ema_top1') for g in groups)
    header = (['runs', 'n', 'seeds', 'method', 'top-1 final', 'top-1 best']
              + (['EMA top-1 best'] if with_ema else []) + list(robustness_columns) + ['note'])
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for g in groups:
        rows = g['rows']
        methods = sorted({r['method'] for r in rows if r['method']})
        notes = []
        unfinished = sum(bool(r['unfinished']) for r in rows)
        if unfinished:
            notes.append(f'{unfinished} unfinished')
        without = sum(r['final_top1'] is None for r in rows)
        if without:
            notes.append(f'{without} without top-1')
        if robustness_columns and g['not_in_robustness']:
            notes.append(f"{g['not_in_robustness']} not in the robustness table")
        cells = [_fmt(g['group']), str(len(rows)), ' '.join(g['seeds']), _fmt(', '.join(methods)),
                 spread(g['values']['final_top1']), spread(g['values']['best_top1'])]
        if with_ema:
            cells.append(spread(g['values']['best_ema_top1']))
        cells += [spread(g['values'].get(c, []), with_range=False) for c in robustness_columns]
        cells.append('; '.join(notes))
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('runs', nargs='+', metavar='RUN', help='run folder, or a folder of run folders')
    parser.add_argument('--csv', metavar='FILE', help='also write every field to this CSV file')
    parser.add_argument('--sort', default='none', choices=['none', 'name', *SORT_KEYS],
                        help='row order: as given (none), by name, or by a top-1 column, best first')
    parser.add_argument('--group-seeds', action='store_true',
                        help='one row per group of runs named NAME_s<seed>: mean ± std over the seeds, and n '
                             '(--csv still writes one row per run)')
    parser.add_argument('--robustness', metavar='FILE',
                        help='with --group-seeds: also the columns of this scripts/robustness.py CSV')
    args = parser.parse_args(argv)
    if args.robustness and not args.group_seeds:
        parser.error('--robustness adds columns to the --group-seeds table; add --group-seeds')

    try:
        rows = collect_runs(args.runs)
    except FileNotFoundError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    rows = sort_rows(rows, args.sort)
    if args.group_seeds:
        robustness, robustness_columns = {}, []
        if args.robustness:
            try:
                robustness, robustness_columns = read_robustness(args.robustness)
            except (OSError, KeyError, csv.Error) as err:   # KeyError: a CSV without the checkpoint column
                sys.exit(f'error: --robustness {args.robustness} is not a readable robustness.py CSV '
                         f'({type(err).__name__}: {err}); write it with scripts/robustness.py --output FILE.csv')
        groups = sort_rows(group_seeds(rows, robustness), args.sort, name='group', number=group_mean)
        print(groups_to_markdown(groups, robustness_columns), end='')
    else:
        print(to_markdown(rows), end='')
    if args.csv:
        try:
            write_csv(rows, args.csv)
        except OSError as err:   # a folder, a missing parent, no permission: the table above is still printed
            sys.exit(f'error: --csv {args.csv} cannot be written: {err}')
        print(f'wrote {args.csv}', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
