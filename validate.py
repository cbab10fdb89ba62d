#!/usr/bin/env python
"""Evaluate models: top-1, top-5 and loss (and ImageNet-ReaL top-1/top-5), as JSON or CSV.

    python validate.py --checkpoint output/quickstart/quickstart_mixpro_s42/model_best.pth.tar --data-dir data/digits
    python validate.py --checkpoint run_a/model_best.pth.tar run_b/model_best.pth.tar --occlusion 0 0.5
    python validate.py --model deit_small_patch16_224 --pretrained --data-dir /data/imagenet
    python validate.py --model deit_small_patch16_224 --checkpoint deit_small.pth --data-dir /data --split imagenet-a \\
        --class-subset imagenet-a
    python validate.py --model deit_small_patch16_224 --pretrained --data-dir /data/imagenet --real-labels
    torchrun --nproc_per_node=8 validate.py --checkpoint ... --data-dir /data/imagenet --use-ema
"""
import argparse
import os
import sys
from pathlib import Path

from mixpro.checkpoint import CheckpointError
from mixpro.config import (INTERPOLATIONS, ConfigError, KeyValueAction, check_compile_backends, check_device,
                           check_input_channels, check_value)
from mixpro.real_labels import TIMM_REAL_LABELS
from mixpro.robustness import check_occlusion_options
from mixpro.validation import run


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    weights = parser.add_argument_group('what to evaluate')
    weights.add_argument('--checkpoint', nargs='+', default=[], metavar='FILE',
                         help='train.py checkpoints (.pth.tar), or plain state dicts / .safetensors of --model')
    weights.add_argument('--model', default=None,
                         help="timm model name (default: a train.py checkpoint's own; required for other weights)")
    weights.add_argument('--pretrained', action='store_true', help="timm's published weights of --model")
    weights.add_argument('--model-kwargs', nargs='*', action=KeyValueAction, default={},
                         help='keyword arguments building --model, e.g. depth=6 (not for train.py checkpoints)')
    weights.add_argument('--num-classes', type=int, default=None,
                         help="class count of --model (default: read from the weights' classifier)")
    weights.add_argument('--use-ema', action='store_true', help='evaluate the EMA weights of a train.py checkpoint')
    data = parser.add_argument_group('data')
    data.add_argument('--data-dir', default=None,
                      help="ImageFolder root with <split>/<class>/, or a --dataset's folder (default: the run's)")
    data.add_argument('--dataset', default=None,
                      help="timm dataset name, e.g. torch/cifar100 (default: the checkpoint's; '' = ImageFolder)")
    data.add_argument('--dataset-download', action='store_true', help='let torch/ datasets download into --data-dir')
    data.add_argument('--split', default=None,
                      help="folder / split under --data-dir (default: the run's val split, else val; '' = --data-dir itself)")
    data.add_argument('--class-map', default=None,
                      help="names of the model's outputs, timm format (default: the checkpoint's, or ImageNet-1k's)")
    data.add_argument('--class-subset', default=None, metavar='imagenet-a|imagenet-r|FILE',
                      help='evaluate over these classes only (logits of the others are left out)')
    data.add_argument('--real-labels', nargs='?', const=TIMM_REAL_LABELS, default=None, metavar='FILE',
                      help="also report ImageNet-ReaL top-1/top-5 (Beyer et al. 2020) on an ImageNet val folder; "
                           "labels from FILE (default: timm's shipped copy)")
    data.add_argument('--img-size', type=int, default=None)
    data.add_argument('--crop-pct', type=float, default=None)
    data.add_argument('--interpolation', default=None,
                      choices=INTERPOLATIONS,
                      help="resize interpolation (default: the run's, else the timm model's)")
    data.add_argument('--batch-size', '-b', type=int, default=256)
    data.add_argument('--workers', '-j', type=int, default=min(4, os.cpu_count() or 1))
    robust = parser.add_argument_group('occlusion (TransMix / Naseer et al.: random patches turned black)')
    robust.add_argument('--occlusion', type=float, nargs='+', default=None, metavar='R',
                        help='fraction(s) of the patches dropped from every image; one result per ratio')
    robust.add_argument('--occlusion-patch', type=int, default=16, help='patch side in pixels')
    robust.add_argument('--occlusion-seed', type=int, default=0, help='which patches: same seed, same patches')
    run_group = parser.add_argument_group('run')
    run_group.add_argument('--amp', action=argparse.BooleanOptionalAction, default=None,
                           help="autocast the forward pass (default: as the checkpoint's run; off for other weights)")
    run_group.add_argument('--amp-dtype', default=None, choices=['float16', 'bfloat16'],
                           help="autocast dtype; implies --amp (default: the checkpoint's)")
    run_group.add_argument('--torchcompile', nargs='?', const='inductor', default=None, metavar='BACKEND',
                           help='torch.compile the model (bare flag: inductor); the numbers are the same, the '
                                'first batches slower while it compiles')
    run_group.add_argument('--device', default=None)
    run_group.add_argument('--results-file', default=None,
                           help='write results here (.json: an object, or a list for several rows; .csv)')
    args = parser.parse_args(argv)
    if not args.checkpoint and not args.pretrained:
        parser.error('give --checkpoint FILE… or --model NAME --pretrained')
    # what would fail only after an evaluation (hours on ImageNet) is refused before the first one
    if args.results_file:
        results = Path(args.results_file)
        if results.is_dir():
            raise ConfigError(f'--results-file {args.results_file} is a folder: name a .json or .csv file')
        existing = next(p for p in results.absolute().parents if p.exists())   # its folder is made if missing
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise ConfigError(f'--results-file {args.results_file}: cannot create its folder ({existing} is '
                              f'{"not a folder" if not existing.is_dir() else "not writable"})')
    for checkpoint in args.checkpoint:
        if not Path(checkpoint).is_file():
            raise ConfigError(f'--checkpoint {checkpoint} does not exist' if not Path(checkpoint).exists()
                              else f'--checkpoint {checkpoint} is not a file')
    check_occlusion_options(args.occlusion or [], args.occlusion_patch)
    check_input_channels(args.model_kwargs)
    check_compile_backends({'--torchcompile': args.torchcompile})
    check_value('crop_pct', args.crop_pct, '--crop-pct')   # train.py's rule
    return args


def main(argv=None):
    """Returns one result row per checkpoint and occlusion ratio."""
    try:
        args = parse_args(argv)
        check_device(args.device)
        return run(args)
    except (ConfigError, ValueError, FileNotFoundError, CheckpointError) as err:
        sys.exit(f'error: {err}')


if __name__ == '__main__':
    main()
