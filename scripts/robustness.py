#!/usr/bin/env python
"""Robustness report: top-1 of each checkpoint on clean, occluded, ImageNet-A and ImageNet-R images, and
its ImageNet-O out-of-distribution detection (AUPR).

    python scripts/robustness.py RUN_A/model_best.pth.tar RUN_B/model_best.pth.tar --data-dir /data/imagenet \\
        --imagenet-a /data/imagenet-a --imagenet-r /data/imagenet-r --imagenet-o /data/imagenet-o \\
        --output robustness.md
    python scripts/robustness.py --model deit_small_patch16_224 --pretrained --data-dir /data/imagenet \\
        --occlusion 0.5 --output deit_s.csv

One row per checkpoint; columns: clean top-1, ImageNet-ReaL top-1 with --real-labels [FILE] (validate.py's
option, on the clean images), top-1 at every --occlusion ratio (default 0.1 … 0.9, the
information-loss axis of TransMix's occlusion study), ImageNet-A and ImageNet-R top-1 (over their 200
classes) where their folders are given, and the ImageNet-O AUPR (%, Hendrycks et al.'s protocol: the
ImageNet-O images against the --data-dir validation images of the same 200 classes, scored by the
confidence over those classes). FILE is markdown, or CSV when it ends in .csv; FILE with .png is
a plot of top-1 against the occlusion ratio. The table is rewritten after each checkpoint. Every other
option (--model, --pretrained, --use-ema, --batch-size, --workers, --device, --amp, --img-size,
--occlusion-seed, ...) is validate.py's, with its meaning. Runs under torchrun like validate.py.
"""
import argparse
import copy
import csv
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import validate  # noqa: E402
from mixpro.checkpoint import CheckpointError, atomic_write_text  # noqa: E402
from mixpro.config import ConfigError  # noqa: E402
from mixpro.distributed import cleanup, init_distributed  # noqa: E402
from mixpro.pictures import line_plot  # noqa: E402
from mixpro.robustness import check_occlusion_options, read_class_subset, subset_outputs  # noqa: E402
from mixpro.validation import (check_occlusion_for_all, check_ood_inputs, evaluate_loaded, load_model,  # noqa: E402
                               ood_detection)

DEFAULT_RATIOS = [round(0.1 * k, 1) for k in range(1, 10)]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('checkpoints', nargs='*', metavar='CHECKPOINT',
                        help='train.py checkpoints, or state dicts of --model')
    parser.add_argument('--data-dir', default=None,
                        help="ImageNet-style root with <split>/<class>/ (default: a train.py checkpoint's own)")
    parser.add_argument('--split', default=None, help="default: a train.py checkpoint's val split, else val")
    parser.add_argument('--occlusion', type=float, nargs='*', default=DEFAULT_RATIOS, metavar='R',
                        help='occlusion ratios (default 0.1 … 0.9; none: no occlusion columns)')
    parser.add_argument('--imagenet-a', default=None, metavar='DIR', help='the ImageNet-A folder (<wnid>/<images>)')
    parser.add_argument('--imagenet-r', default=None, metavar='DIR', help='the ImageNet-R folder (<wnid>/<images>)')
    parser.add_argument('--imagenet-o', default=None, metavar='DIR', help='the ImageNet-O folder (<wnid>/<images>)')
    parser.add_argument('--output', required=True, metavar='FILE', help='the table: .md (markdown) or .csv')
    own, rest = parser.parse_known_args(argv)
    for flag, folder in (('--imagenet-a', own.imagenet_a), ('--imagenet-r', own.imagenet_r),
                         ('--imagenet-o', own.imagenet_o)):
        if folder and not Path(folder).is_dir():
            parser.error(f'{flag} {folder} does not exist')
    for name in ('--class-subset', '--results-file', '--dataset'):
        if any(arg == name or arg.startswith(name + '=') for arg in rest):
            parser.error(f'{name} is set by this script')
    checkpoints = ['--checkpoint', *own.checkpoints] if own.checkpoints else []
    data = (['--data-dir', own.data_dir] if own.data_dir else []) + (['--split', own.split] if own.split else [])
    base = validate.parse_args([*checkpoints, *rest, *data])
    check_occlusion_options(own.occlusion, base.occlusion_patch)   # before the first evaluation, not after it
    base.dataset = ''   # ImageFolder data, whatever dataset the checkpoints trained on
    return own, base


def _label(source: str, sources) -> str:
    """A checkpoint's short name: its file name, with its run folder where that says more."""
    path = Path(source)
    generic = path.name.startswith(('model_best', 'last', 'checkpoint-'))
    repeated = sum(Path(other).name == path.name for other in sources) > 1
    return f'{path.parent.name}/{path.name}' if generic or repeated else path.name


def columns(own) -> list:
    return (['clean'] + (['ReaL'] if own.real_labels else []) + [f'occlusion {r:g}' for r in own.occlusion] +
            (['ImageNet-A'] if own.imagenet_a else []) + (['ImageNet-R'] if own.imagenet_r else []) +
            (['ImageNet-O AUPR'] if own.imagenet_o else []))


def to_markdown(table: list, names: list) -> str:
    lines = ['| checkpoint | ' + ' | '.join(names) + ' |', '|---|' + '---:|' * len(names)]
    for label, values in table:
        lines.append(f'| {label} | ' + ' | '.join(f'{values[n]:.2f}' if values.get(n) is not None else ''
                                                  for n in names) + ' |')
    return '\n'.join(lines) + '\n'


def to_csv(table: list, names: list) -> str:
    text = io.StringIO(newline='')
    writer = csv.writer(text)
    writer.writerow(['checkpoint', *names])
    for label, values in table:
        writer.writerow([label, *(f'{values[n]:.4f}' if values.get(n) is not None else '' for n in names)])
    return text.getvalue()


def write_report(table: list, own) -> None:
    output = Path(own.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    names = columns(own)
    atomic_write_text(output, to_csv(table, names) if output.suffix == '.csv' else to_markdown(table, names))
    if own.occlusion:
        series = {label: [(0.0, values['clean'])] + [(r, values[f'occlusion {r:g}']) for r in own.occlusion]
                  for label, values in table}
        line_plot(series, output.with_suffix('.png'), 'Top-1 under random patch occlusion',
                  f'fraction of {own.occlusion_patch}-px patches dropped', 'top-1 (%)')


def subset_args(base, folder: str, subset: str):
    """validate.py's options for an ImageNet-A/R folder: the folder is the split, its wnids the classes."""
    args = copy.copy(base)
    folder = Path(folder).resolve()
    args.data_dir, args.split, args.class_subset = str(folder.parent), folder.name, subset
    args.real_labels = None   # ReaL labels the ImageNet val images only
    return args


def check_inputs(own, base, loaded) -> None:
    """What the ImageNet-A/R/O columns need of the model and the folders."""
    for folder, subset in ((own.imagenet_a, 'imagenet-a'), (own.imagenet_r, 'imagenet-r')):
        if folder:
            subset_outputs(read_class_subset(subset), loaded.class_to_idx, subset)
    if own.imagenet_o:
        check_ood_inputs(base, loaded, own.imagenet_o)


def main(argv=None):
    try:
        own, base = parse_args(argv)
    except ConfigError as err:
        sys.exit(f'error: {err}')
    own.occlusion_patch, own.real_labels = base.occlusion_patch, base.real_labels
    dist_info = init_distributed(base.device)
    table = []
    try:
        sources = base.checkpoint or [None]
        if len(sources) > 1:
            check_occlusion_for_all(base, own.occlusion)
        for checkpoint in sources:
            loaded = load_model(base, checkpoint)
            check_inputs(own, base, loaded)   # before an hour of evaluations, not after them
            values = {}
            rows = evaluate_loaded(base, loaded, dist_info, [0.0, *own.occlusion])
            values['clean'] = rows[0]['top1']
            if own.real_labels:   # None where no image has a ReaL label: an empty cell
                values['ReaL'] = rows[0]['real_top1']
            values.update({f'occlusion {r:g}': row['top1'] for r, row in zip(own.occlusion, rows[1:])})
            for folder, subset, name in ((own.imagenet_a, 'imagenet-a', 'ImageNet-A'),
                                         (own.imagenet_r, 'imagenet-r', 'ImageNet-R')):
                if folder:
                    values[name] = evaluate_loaded(subset_args(base, folder, subset), loaded, dist_info)[0]['top1']
            if own.imagenet_o:
                values['ImageNet-O AUPR'] = ood_detection(base, loaded, dist_info, own.imagenet_o)['aupr']
            table.append((_label(loaded.source, [str(s) for s in sources if s]), values))
            if dist_info.is_primary:
                write_report(table, own)
        if dist_info.is_primary:
            print(f'\nwrote {own.output}' + (f' and {Path(own.output).with_suffix(".png")}' if own.occlusion else ''))
            print(to_markdown(table, columns(own)), end='')
        return table
    except (ConfigError, ValueError, FileNotFoundError, CheckpointError) as err:
        sys.exit(f'error: {err}')
    finally:
        cleanup()


if __name__ == '__main__':
    main()
