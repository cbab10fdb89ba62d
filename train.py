#!/usr/bin/env python
"""Train a timm model with MixPro, TransMix or Mixup/CutMix.

    python train.py --config configs/quickstart_mixpro.yaml
    torchrun --nproc_per_node=8 train.py --config configs/deit_t_mixpro.yaml --data-dir /data/imagenet

Exit status: 0 when the run finished, 1 on an error (one line naming it), 128 + the signal number
(143 for SIGTERM, 138 for SIGUSR1, 130 for SIGINT / Ctrl-C) when a signal stopped the run after it saved
where it was.
"""
import sys

from mixpro.checkpoint import CheckpointError
from mixpro.config import ConfigError, parse_train_args
from mixpro.engine import NonFiniteLoss
from mixpro.mixer import MixerCompileError
from mixpro.run_folder import RunError
from mixpro.training import run

USER_ERRORS = (ConfigError, FileNotFoundError, CheckpointError, NonFiniteLoss, RunError, MixerCompileError)


def main(argv=None):
    try:
        result = run(parse_train_args(argv))
    except USER_ERRORS as err:
        sys.exit(f'error: {err}')
    if result.get('stopped_by'):
        sys.exit(128 + result['stopped_by'])
    return result


if __name__ == '__main__':
    main()
