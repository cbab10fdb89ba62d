#!/usr/bin/env python
"""Evaluate a train.py checkpoint: top-1, top-5 and loss, as JSON or CSV.

    python validate.py --checkpoint output/quickstart_mixpro/model_best.pth.tar --data-dir data/digits
    torchrun --nproc_per_node=8 validate.py --checkpoint ... --data-dir /data/imagenet --use-ema
"""
import argparse
import sys

from mixpro.checkpoint import CheckpointError
from mixpro.config import ConfigError
from mixpro.validation import run


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--checkpoint', required=True, help='a .pth.tar written by train.py')
    parser.add_argument('--data-dir', default=None,
                        help="ImageFolder root with <split>/<class>/, or a --dataset's folder (default: the run's)")
    parser.add_argument('--dataset', default=None,
                        help="timm dataset name, e.g. torch/cifar100 (default: the checkpoint's; '' = ImageFolder)")
    parser.add_argument('--dataset-download', action='store_true', help='let torch/ datasets download into --data-dir')
    parser.add_argument('--split', default='val')
    parser.add_argument('--use-ema', action='store_true', help='evaluate the EMA weights')
    parser.add_argument('--model', default=None, help="timm model name (default: the checkpoint's)")
    parser.add_argument('--img-size', type=int, default=None)
    parser.add_argument('--crop-pct', type=float, default=None)
    parser.add_argument('--batch-size', '-b', type=int, default=256)
    parser.add_argument('--workers', '-j', type=int, default=4)
    parser.add_argument('--amp', action=argparse.BooleanOptionalAction, default=None,
                        help="autocast the forward pass (default: as the checkpoint's run trained and evaluated)")
    parser.add_argument('--amp-dtype', default=None, choices=['float16', 'bfloat16'],
                        help="autocast dtype (default: the checkpoint's)")
    parser.add_argument('--device', default=None)
    parser.add_argument('--results-file', default=None, help='write results here (.json or .csv)')
    return parser.parse_args(argv)


def main(argv=None):
    try:
        return run(parse_args(argv))
    except (ConfigError, ValueError, FileNotFoundError, CheckpointError) as err:
        sys.exit(f'error: {err}')


if __name__ == '__main__':
    main()
