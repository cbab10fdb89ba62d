#!/usr/bin/env python
"""Train a timm model with MixPro, TransMix or Mixup/CutMix.

    python train.py --config configs/quickstart_mixpro.yaml
    torchrun --nproc_per_node=8 train.py --config configs/deit_t_mixpro.yaml --data-dir /data/imagenet
"""
import sys

from mixpro.config import ConfigError, parse_train_args
from mixpro.training import run


def main(argv=None):
    try:
        args = parse_train_args(argv)
        return run(args)
    except (ConfigError, FileNotFoundError) as err:
        sys.exit(f'error: {err}')


if __name__ == '__main__':
    main()
