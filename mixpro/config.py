"""Command-line options and YAML recipes.

Every option has one name: ``--batch-size`` on the command line, ``batch_size`` in YAML (the same
names as timm's train.py where the meaning is the same). A recipe sets defaults, the command line
overrides them, and anything unknown or mistyped is an error that names the key.
"""
import argparse
import ast
import difflib
import importlib.util
import logging
import math
import re
import sys
from pathlib import Path
from typing import List, Optional

import torch
import yaml

from .mixer import METHODS


_logger = logging.getLogger(__name__)
DEFAULT_WANDB_PROJECT = 'mixpro'


class ConfigError(ValueError):
    """A recipe or command line that cannot be run as written."""


def first_line(err: BaseException) -> str:
    """The first line of an error's message (a library's multi-line message in a one-line error)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


class KeyValueAction(argparse.Action):
    """``--model-kwargs depth=4 patch_size=4`` -> ``{'depth': 4, 'patch_size': 4}``. Unlike timm's
    ParseKwargs it adds to a recipe's dict instead of replacing it, and names a pair without '='."""

    def __call__(self, parser, namespace, values, option_string=None):
        kwargs = dict(getattr(namespace, self.dest, None) or {})   # merge into the recipe's, not replace
        if values[:1] == ['none']:   # drop the recipe's keyword arguments first (e.g. for another --model)
            kwargs, values = {}, values[1:]
        for item in values:
            key, sep, value = item.partition('=')
            if not sep:
                raise ConfigError(f'{option_string} expects key=value pairs, got {item!r}')
            try:
                kwargs[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                kwargs[key] = value
        setattr(namespace, self.dest, kwargs)


INTERPOLATIONS = ('bilinear', 'bicubic', 'nearest', 'lanczos', 'box', 'hamming')   # timm's, by name
SCHEDULES = ('cosine', 'tanh', 'step', 'multistep', 'plateau', 'poly', 'constant', 'rsqrt', 'wsd')   # timm's


def _float_or_none(text: str) -> Optional[float]:
    """A float, or ``none`` to unset a value a recipe gave."""
    if text.lower() == 'none':
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    flag = argparse.BooleanOptionalAction
    group = parser.add_argument_group('data')
    group.add_argument('--data-dir', default='data/digits', help='ImageFolder root with train/ and val/')
    group.add_argument('--dataset', default='',
                       help="timm dataset name: '' = ImageFolder; torch/cifar10, torch/cifar100, torch/fashion_mnist, "
                            "... (torchvision layout under --data-dir), hfds/<name>, wds/<name>")
    group.add_argument('--dataset-download', action=flag, default=False,
                       help='let torch/ datasets download into --data-dir (off: nothing is downloaded)')
    group.add_argument('--train-split', default='train')
    group.add_argument('--val-split', default='val')
    group.add_argument('--num-classes', type=int, default=None, help='default: number of train class folders')
    group.add_argument('--class-map', default='',
                       help='file mapping class folder names to indices, as timm: a .txt with one class name '
                            'per line (line number = index)')
    group.add_argument('--img-size', type=int, default=None, help='default: the model\'s input size')
    group.add_argument('--crop-pct', type=float, default=None, help='eval center-crop fraction')
    group.add_argument('--mean', type=float, nargs=3, default=None)
    group.add_argument('--std', type=float, nargs=3, default=None)
    group.add_argument('--interpolation', default='', choices=['', *INTERPOLATIONS],
                       help="eval resize interpolation (default: the model's)")
    group.add_argument('--train-interpolation', default='random', choices=['random', *INTERPOLATIONS],
                       help='random: one of bilinear and bicubic per image (timm)')
    group.add_argument('--batch-size', '-b', type=int, default=128, help='per-process batch size')
    group.add_argument('--validation-batch-size', type=int, default=None)
    group.add_argument('--workers', '-j', type=int, default=4)
    group.add_argument('--data-backend', default='pillow', choices=['pillow', 'tensor'],
                       help='pillow: timm\'s transforms in the loader workers; tensor: the workers decode and crop '
                            'with torch, RandAugment, normalisation and erasing run per sample on the device')
    group.add_argument('--pin-mem', action=flag, default=False)

    group = parser.add_argument_group('model')
    group.add_argument('--model', default='deit_tiny_patch16_224')
    group.add_argument('--model-kwargs', nargs='*', action=KeyValueAction, default={},
                       help="extra timm create_model arguments, key=value ('none' drops the recipe's)")
    group.add_argument('--pretrained', action=flag, default=False,
                       help="start from timm's pretrained weights for --model (a new run, unlike --resume)")
    group.add_argument('--initial-checkpoint', default='',
                       help='start from these weights: a train.py checkpoint, a timm / official state dict or a '
                            '.safetensors file (a new run, unlike --resume)')
    group.add_argument('--drop', type=float, default=0.0, help='dropout rate')
    group.add_argument('--drop-path', type=float, default=0.1)
    group.add_argument('--channels-last', action=flag, default=False)
    group.add_argument('--grad-checkpointing', action=flag, default=False,
                       help="recompute each block's activations in the backward pass (timm): less memory for "
                            "the large models, at about a third more compute")
    group.add_argument('--sync-bn', action=flag, default=False,
                       help="BatchNorm statistics over the global batch in every step (torch SyncBatchNorm, CUDA "
                            "only); of the Table-1 families only XCiT has BatchNorm")
    group.add_argument('--dist-bn', default='reduce', choices=['reduce', 'broadcast', 'none'],
                       help="after each epoch, before evaluating and saving, give every process the same BatchNorm "
                            "running statistics: their mean (reduce) or rank 0's (broadcast), as timm's --dist-bn")
    group.add_argument('--torchcompile', nargs='?', const='inductor', default=None,
                       help='torch.compile backend (bare flag: inductor)')
    group.add_argument('--torchcompile-mode', default=None,
                       help="torch.compile mode for inductor: default, reduce-overhead (CUDA graphs), max-autotune, "
                            "max-autotune-no-cudagraphs (timm's --torchcompile-mode)")

    group = parser.add_argument_group('optimizer and schedule')
    group.add_argument('--opt', default='adamw')
    group.add_argument('--opt-eps', type=float, default=1e-8)
    group.add_argument('--opt-betas', type=float, nargs=2, default=None)
    group.add_argument('--opt-kwargs', nargs='*', action=KeyValueAction, default={},
                       help='extra optimizer arguments, key=value (timm create_optimizer_v2)')
    group.add_argument('--layer-decay', type=float, default=None, help='layer-wise lr decay (timm), e.g. 0.65')
    group.add_argument('--momentum', type=float, default=0.9)
    group.add_argument('--weight-decay', type=float, default=0.05)
    group.add_argument('--clip-grad', type=float, default=None)
    group.add_argument('--clip-mode', default='norm', choices=['norm', 'value', 'agc'])
    group.add_argument('--lr', type=_float_or_none, default=None,
                       help="absolute lr; default (or 'none', over a recipe's lr): lr_base scaled by global batch")
    group.add_argument('--lr-base', type=float, default=5e-4)
    group.add_argument('--lr-base-size', type=int, default=512, help='global batch at which lr = lr_base')
    group.add_argument('--lr-base-scale', default='linear', choices=['linear', 'sqrt'])
    group.add_argument('--sched', default='cosine', choices=SCHEDULES)
    group.add_argument('--sched-on-updates', action=flag, default=False,
                       help='step the lr schedule (and its warmup) every optimizer update instead of every epoch')
    group.add_argument('--epochs', type=int, default=300)
    group.add_argument('--warmup-epochs', type=int, default=5)
    group.add_argument('--warmup-lr', type=float, default=1e-6)
    group.add_argument('--min-lr', type=float, default=1e-5)
    group.add_argument('--cooldown-epochs', type=int, default=0)
    group.add_argument('--decay-epochs', type=float, default=90, help="step: epochs between decays; wsd/rsqrt: the "
                       "decay phase's length")
    group.add_argument('--decay-milestones', type=int, nargs='+', default=[90, 180, 270],
                       help='multistep: the epochs at which the lr is multiplied by --decay-rate')
    group.add_argument('--decay-rate', type=float, default=0.1)
    group.add_argument('--patience-epochs', type=int, default=10,
                       help='plateau: epochs without improvement of --eval-metric before the lr decays')
    group.add_argument('--warmup-prefix', action=flag, default=False,
                       help='the schedule starts after the warmup instead of counting the warmup epochs in it')
    group.add_argument('--grad-accum-steps', type=int, default=1)

    group = parser.add_argument_group('augmentation')
    group.add_argument('--scale', type=float, nargs=2, default=[0.08, 1.0], help='random-resized-crop scale')
    group.add_argument('--ratio', type=float, nargs=2, default=[3. / 4., 4. / 3.])
    group.add_argument('--hflip', type=float, default=0.5)
    group.add_argument('--vflip', type=float, default=0.0)
    group.add_argument('--color-jitter', type=float, default=0.3)
    group.add_argument('--aa', default='rand-m9-mstd0.5-inc1', help='timm auto-augment policy; "none" for none')
    group.add_argument('--reprob', type=float, default=0.25, help='random erasing probability')
    group.add_argument('--remode', default='pixel')
    group.add_argument('--recount', type=int, default=1)
    group.add_argument('--aug-repeats', type=int, default=0, help='repeated augmentation (DeiT: 3)')
    group.add_argument('--smoothing', type=float, default=0.1)
    group.add_argument('--bce-loss', action=flag, default=False,
                       help='binary cross-entropy on the (mixed, attention-labelled) soft targets instead of CE')

    group = parser.add_argument_group('mixing (MixPro, TransMix, Mixup/CutMix)')
    group.add_argument('--mix-method', default='mixpro', choices=list(METHODS))
    group.add_argument('--mixup', type=float, default=0.8, help='Mixup alpha, 0 = off')
    group.add_argument('--cutmix', type=float, default=1.0, help='CutMix alpha, 0 = off')
    group.add_argument('--mixup-prob', type=float, default=1.0, help='probability of mixing a batch')
    group.add_argument('--mixup-switch-prob', type=float, default=None,
                       help='CutMix probability when both are on (default 0.8 transmix, else 0.5)')
    group.add_argument('--mixup-off-epoch', type=int, default=0, help='stop mixing from this epoch (0 = never)')
    group.add_argument('--maskmix-prob', type=float, default=0.5, help='mixpro: probability of MaskMix + PAL')
    group.add_argument('--maskmix-alpha', type=float, default=1.0)
    group.add_argument('--mask-cell', type=int, default=64, help='MaskMix cell size in pixels')
    group.add_argument('--maskmix-lam', default='exact', choices=['exact', 'cells'],
                       help='MaskMix lambda: the kept pixel area, or kept cells / cells (official; the same '
                            'where the cells divide the image)')
    group.add_argument('--membership', default='area', choices=['area', 'nearest'])
    group.add_argument('--pal-smoothing', type=float, default=0.0,
                       help='label smoothing of the PAL target (official MixPro: none)')
    group.add_argument('--pal-detach-alpha', action=flag, default=True,
                       help='stop gradients through PAL alpha (official code: --no-pal-detach-alpha)')
    group.add_argument('--compile-mixer', nargs='?', const='inductor', default=None,
                       help="torch.compile MaskMix's composition (off the CPU) and the PAL label into a few "
                            'fused kernels each (bare flag: inductor); the random draws stay eager')

    group = parser.add_argument_group('EMA, precision, run')
    group.add_argument('--model-ema', action=flag, default=False)
    group.add_argument('--model-ema-decay', type=float, default=0.99996)
    group.add_argument('--model-ema-warmup', action=flag, default=False,
                       help="warm the EMA decay up from 0 (timm ModelEmaV3 use_warmup)")
    group.add_argument('--amp', action=flag, default=False)
    group.add_argument('--amp-dtype', default='float16', choices=['float16', 'bfloat16'])
    group.add_argument('--seed', type=int, default=42)
    group.add_argument('--output', default='output', help='parent folder of run folders')
    group.add_argument('--experiment', default=None, help='run folder name (default: the config file name)')
    group.add_argument('--resume', default='auto', help="'auto' (run folder's last checkpoint), a path, or 'none'")
    group.add_argument('--checkpoint-hist', type=int, default=3, help='best checkpoints kept')
    group.add_argument('--eval-metric', default='top1', choices=EVAL_METRICS,
                       help='what ranks the best checkpoints and drives a plateau schedule (timm); ema_* rank by '
                            'the EMA weights (--model-ema); a loss ranks lowest first')
    group.add_argument('--recovery-interval', type=int, default=0,
                       help='also save a resumable state every N steps within an epoch (interrupted.pth.tar), so '
                            'a hard crash (node failure, kill -9) loses at most N steps; 0: at epoch ends and on '
                            'stop signals only')
    group.add_argument('--val-interval', type=int, default=1,
                       help='evaluate every N epochs and after the last (timm); the best-k checkpoints are ranked '
                            'among the evaluated epochs, and a plateau schedule counts evaluations')
    group.add_argument('--log-interval', type=int, default=50)
    group.add_argument('--image-grid-interval', type=int, default=10,
                       help='epochs between TensorBoard grids of mixed samples (0 = never)')
    group.add_argument('--log-wandb', action=flag, default=False,
                       help="also log to Weights & Biases (pip install wandb; offline: WANDB_MODE=offline)")
    group.add_argument('--wandb-tags', nargs='+', default=None, help='tags of the W&B run')
    group.add_argument('--wandb-project', default=None,
                       help='W&B project (default: mixpro; the run is named --experiment)')
    group.add_argument('--device', default=None, help='default: cuda when available, else cpu')


# --eval-metric: <metric> of the raw weights' evaluation, ema_<metric> of the EMA weights'
EVAL_METRICS = ['top1', 'top5', 'loss', 'ema_top1', 'ema_top5', 'ema_loss']


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except None: an unset option's help says what happens instead."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class _OneLineParser(argparse.ArgumentParser):
    """argparse's refusals as one ConfigError line (its usage message is 59 lines long), naming the nearest
    valid choice."""

    def error(self, message):
        choice = re.match(r"argument (\S+): invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            near = difflib.get_close_matches(choice.group(2), re.findall(r"'([^']*)'", choice.group(3)), n=1)
            message += f"; did you mean '{near[0]}'?" if near else ''
        raise ConfigError(message)


def train_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        description='Train a timm model with MixPro, TransMix or Mixup/CutMix.', formatter_class=_HelpFormatter)
    parser.add_argument('--config', '-c', default=None,
                        help="YAML recipe; its keys are these options, plus 'base: other.yaml' to build on another")
    _add_train_options(parser)
    return parser


def _options(parser: argparse.ArgumentParser) -> dict:
    return {a.dest: a for a in parser._actions if a.dest not in ('help', 'config')}


# timm train.py options not offered here, with why (named when given, instead of a bare 'unknown option')
NOT_OFFERED = {
    '--mixup-mode': 'the mixer draws its mixing per batch (MaskMix cells and partners per sample); timm\'s '
                    'pair/elem modes are not implemented',
    '--cutmix-minmax': 'CutMix boxes follow Beta(--cutmix, --cutmix) as in DeiT and TransMix',
    '--no-resume-opt': 'a resume restores the whole training state; to start afresh from its weights use '
                       '--initial-checkpoint PATH',
    '--input-size': 'the loaders give RGB images: use --img-size N',
    '--local_rank': 'ranks come from torchrun\'s environment (RANK, LOCAL_RANK)',
}

# names other codebases use for an option, checked before the nearest-spelling guess
# ('learning_rate' is closer to 'decay_rate' than to 'lr')
ALIASES = {'learning_rate': 'lr', 'base_lr': 'lr_base', 'batchsize': 'batch_size', 'bs': 'batch_size',
           'num_workers': 'workers', 'epoch': 'epochs', 'warmup': 'warmup_epochs', 'wd': 'weight_decay',
           'label_smoothing': 'smoothing', 'model_name': 'model', 'arch': 'model', 'data': 'data_dir',
           'data_path': 'data_dir', 'output_dir': 'output', 'ema': 'model_ema', 'ema_decay': 'model_ema_decay'}


def _suggest(key: str, options) -> Optional[str]:
    """The option that an unknown ``key`` probably meant, or None."""
    if ALIASES.get(key) in options:
        return ALIASES[key]
    near = difflib.get_close_matches(key, list(options), n=1)
    return near[0] if near else None


def _value_type(action: argparse.Action):
    """The type a recipe value of ``action`` must have (``--lr none`` is a command-line spelling only)."""
    return float if action.type is _float_or_none else action.type


def _type_error(value, action: argparse.Action) -> Optional[str]:
    """Why ``value`` cannot stand for option ``action``, or None when it can."""
    if value is None:
        return None
    if isinstance(action, argparse.BooleanOptionalAction) or action.const is True:
        return None if isinstance(value, bool) else 'expects true or false'
    if isinstance(action, KeyValueAction):
        return None if isinstance(value, dict) else 'expects a mapping of keyword arguments'
    kind = _value_type(action) or str
    if action.nargs not in (None, '?'):
        if not isinstance(value, (list, tuple)):
            return f'expects a list of {kind.__name__}'
        if isinstance(action.nargs, int) and len(value) != action.nargs:
            return f'expects {action.nargs} values, got {len(value)}'
        items = value
    else:
        items = [value]
    for item in items:
        ok = isinstance(item, bool) is False and (
            isinstance(item, kind) or (kind is float and isinstance(item, int)))
        if not ok:
            return f'expects {kind.__name__}, got {type(item).__name__} {item!r}'
        if action.choices is not None and item not in action.choices:
            return f'expects one of {", ".join(map(str, action.choices))}, got {item!r}'
    return None


def _coerce(value, action: argparse.Action):
    """YAML reads ``5e-4`` (no dot) as a string, and a bare ``true`` for an optional-value flag:
    turn those into what the command line would have given."""
    if action.nargs == '?' and action.const is not None and isinstance(value, bool):
        return action.const if value else None
    kind = _value_type(action)
    if kind in (int, float):
        items = value if isinstance(value, list) else [value]
        try:
            items = [kind(v) if isinstance(v, str) else v for v in items]
        except ValueError:
            return value          # reported by _type_error with the key's name
        return items if isinstance(value, list) else items[0]
    return value


def load_recipe(path: str, parser: argparse.ArgumentParser, _chain=()) -> dict:
    """Read a YAML recipe and check every key and value against the parser's options."""
    file = Path(path)
    if file.resolve() in _chain:
        raise ConfigError(f'config file {path} includes itself through base:')
    if not file.is_file():
        near = difflib.get_close_matches(file.name, [p.name for p in file.parent.glob('*.yaml')], n=1) \
            if file.parent.is_dir() else []
        hint = f'; did you mean {file.parent / near[0]}?' if near else ''
        raise ConfigError(f'config file {path} does not exist{hint}')
    try:
        recipe = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f'config file {path} is not valid YAML: {err}') from err
    if not isinstance(recipe, dict):
        raise ConfigError(f'config file {path} must be a mapping of option: value')
    base = recipe.pop('base', None)
    if base is not None:   # a recipe may build on another: its keys override the base's
        recipe = {**load_recipe(str(file.parent / base), parser, _chain + (file.resolve(),)), **recipe}
    options = _options(parser)
    for key, value in recipe.items():
        if key not in options:
            near = _suggest(str(key), options)
            hint = f"; did you mean '{near}'?" if near else ''
            raise ConfigError(f"{path}: unknown key '{key}'{hint}")
        value = recipe[key] = _coerce(value, options[key])
        problem = _type_error(value, options[key])
        if problem:
            raise ConfigError(f"{path}: key '{key}' {problem}")
        if isinstance(value, tuple):
            recipe[key] = list(value)
    return recipe


def parse_train_args(argv: Optional[List[str]] = None, check_machine: bool = True) -> argparse.Namespace:
    """Options from the recipe (``--config``) overridden by the command line. ``check_machine=False`` leaves
    out the checks that depend on this machine (device, packages, output folder): for planning runs
    elsewhere."""
    parser = train_parser()
    known, _ = parser.parse_known_args(argv)
    recipe = load_recipe(known.config, parser) if known.config else {}
    parser.set_defaults(**recipe)
    args, extra = parser.parse_known_args(argv)
    for item in extra:   # an unknown --flag: name the option it probably meant (argparse reports the rest)
        if item.startswith('--'):
            flag = item.split('=', 1)[0]
            if flag in NOT_OFFERED:
                raise ConfigError(f'{flag} is not offered: {NOT_OFFERED[flag]}')
            options = _options(parser)
            near = _suggest(flag[2:].replace('-', '_'), options)
            hint = f'; did you mean {options[near].option_strings[0]}?' if near else ''
            raise ConfigError(f'unknown option {flag}{hint}')
    if extra:   # words that belong to no option
        raise ConfigError(f'unexpected argument {extra[0]}: options are named, e.g. --data-dir {extra[0]}')
    given = {item.split('=', 1)[0] for item in (sys.argv[1:] if argv is None else argv) if item.startswith('--')}
    scaling = sorted(flag for flag in given if flag.startswith('--lr-b'))   # argparse takes abbreviations too
    if scaling and args.lr is not None:   # an absolute lr wins: the scaling options would silently do nothing
        source = '--lr' if '--lr' in given else f'the recipe {args.config}'
        raise ConfigError(f'{", ".join(scaling)} would change nothing: {source} sets the absolute lr '
                          f'{args.lr:g}, which wins over the batch-scaled lr_base; give --lr to change it '
                          f'(--lr none: the batch-scaled lr_base instead)')
    if recipe.get('model_kwargs') and args.model != recipe.get('model') and '--model-kwargs' not in given:
        _logger.info(f"note: --model {args.model} is built with the recipe's model_kwargs {recipe['model_kwargs']} "
                     f'(made for {recipe.get("model")}); --model-kwargs none drops them (its --mask-cell and '
                     f'--img-size may need changing too)')
    if args.experiment is None:
        args.experiment = Path(args.config).stem if args.config else f'{args.model}_{args.mix_method}'
    if args.aa in ('none', ''):
        args.aa = None
    check_values(args, parser, check_machine)
    on_cpu = check_machine and _device(args).type == 'cpu'
    if on_cpu and args.amp and not given & {'--amp', '--amp-dtype'}:
        args.amp = False   # float16 autocast runs several times slower than float32 on a CPU
        _logger.info("note: the recipe's amp is off on the CPU, where autocast is slower than float32; "
                     "--amp turns it on")
    if on_cpu and args.data_backend == 'tensor' and '--data-backend' not in given:
        args.data_backend = 'pillow'   # on the CPU the device stage would run in the training process alone
        _logger.info("note: the recipe's data_backend tensor is pillow on the CPU, where the loader workers "
                     "augment in parallel; --data-backend tensor turns it on")
    return args


def _device(args) -> torch.device:
    return torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))


_AT_LEAST_1 = (lambda v: v >= 1, '>= 1')
_AT_LEAST_0 = (lambda v: v >= 0, '>= 0')
_POSITIVE = (lambda v: v > 0, '> 0')
_PROBABILITY = (lambda v: 0 <= v <= 1, 'in [0, 1]')
_RATE = (lambda v: 0 <= v < 1, 'in [0, 1)')

# option: (predicate, what it must be). Values must be finite numbers; None only for the keys in _UNSET_OK.
VALUE_RULES = {
    **dict.fromkeys(['epochs', 'batch_size', 'validation_batch_size', 'grad_accum_steps', 'checkpoint_hist',
                     'lr_base_size', 'mask_cell', 'img_size', 'recount', 'val_interval'], _AT_LEAST_1),
    **dict.fromkeys(['workers', 'mixup', 'cutmix', 'maskmix_alpha', 'warmup_epochs', 'min_lr', 'log_interval',
                     'recovery_interval',
                     'image_grid_interval', 'aug_repeats', 'mixup_off_epoch'], _AT_LEAST_0),
    **dict.fromkeys(['lr', 'lr_base', 'clip_grad'], _POSITIVE),
    **dict.fromkeys(['reprob', 'mixup_prob', 'mixup_switch_prob', 'maskmix_prob', 'smoothing', 'pal_smoothing',
                     'hflip', 'vflip', 'model_ema_decay', 'layer_decay'], _PROBABILITY),
    **dict.fromkeys(['drop', 'drop_path'], _RATE),
    'crop_pct': (lambda v: 0 < v <= 1, 'in (0, 1]'),
}
_UNSET_OK = {'validation_batch_size', 'img_size', 'lr', 'mixup_switch_prob', 'clip_grad', 'layer_decay', 'crop_pct'}
# named by the YAML key rather than the flag: tests/test_train.py matches this wording
_KEY_NAMED = {'checkpoint_hist'}


def check_values(args: argparse.Namespace, parser: Optional[argparse.ArgumentParser] = None,
                 check_machine: bool = True) -> None:
    """Stop on values that would otherwise fail deep inside torch or timm (or silently do nothing)."""
    options = _options(parser or train_parser())
    for key in VALUE_RULES:
        check_value(key, getattr(args, key), key if key in _KEY_NAMED else options[key].option_strings[0])
    check_input_channels(args.model_kwargs)
    if args.eval_metric.startswith('ema_') and not args.model_ema:
        raise ConfigError(f'--eval-metric {args.eval_metric} ranks by the EMA weights: it needs --model-ema')
    _check_compile(args)
    if args.sched == 'multistep' and min(args.decay_milestones) >= args.epochs:
        _logger.info(f'note: --sched multistep never decays in {args.epochs} epochs: --decay-milestones '
                     f'{" ".join(map(str, args.decay_milestones))} are all at or after the end')
    if not check_machine:
        return
    _check_output(args)
    check_device(args.device)
    device = _device(args).type
    if args.sync_bn and device != 'cuda':
        raise ConfigError("--sync-bn needs CUDA: torch's SyncBatchNorm runs on GPUs only (on CPU, --dist-bn "
                          "reduce averages the BatchNorm statistics over processes after each epoch)")
    if args.log_wandb:
        require_wandb()
    elif args.wandb_project not in (None, DEFAULT_WANDB_PROJECT):
        _logger.info(f'note: --wandb-project {args.wandb_project} logs nothing without --log-wandb')
    if args.compile_mixer and (args.mix_method not in ('maskmix', 'mixpro') or
                               (device == 'cpu' and args.mix_method == 'maskmix')):
        _logger.info(f"note: --compile-mixer compiles nothing for {args.mix_method} on {device}: it compiles "
                     f"MaskMix's composition off the CPU and the PAL label of mixpro")


def check_value(key: str, value, name: str) -> None:
    """Stop on a ``value`` of option ``key`` (named ``name`` in the message) outside its VALUE_RULES range."""
    ok, what = VALUE_RULES[key]
    if value is None and key in _UNSET_OK:
        return
    if value is None or isinstance(value, bool) or not math.isfinite(value) or not ok(value):
        raise ConfigError(f'{name} must be {what}, got {value!r}')


def check_input_channels(model_kwargs: dict) -> None:
    """The loaders give RGB images (grayscale ones converted), so the model must take 3 channels."""
    channels = (model_kwargs or {}).get('in_chans', 3)
    if channels != 3:
        raise ConfigError(f'--model-kwargs in_chans={channels}: the data pipeline gives 3-channel (RGB) images, '
                          f'grayscale ones converted to RGB; build the model with in_chans=3')


def require_wandb() -> None:
    """``--log-wandb`` needs the optional ``wandb`` package."""
    if importlib.util.find_spec('wandb') is None:
        raise ConfigError("--log-wandb needs the 'wandb' package: pip install wandb")


def _check_compile(args) -> None:
    """torch.compile settings that would fail only at the first step, or do nothing."""
    mode = args.torchcompile_mode
    if mode and not args.torchcompile:
        raise ConfigError(f'--torchcompile-mode {mode} needs --torchcompile (it is the mode of that compilation)')
    if mode and args.torchcompile != 'inductor':
        raise ConfigError(f'--torchcompile-mode is a mode of the inductor backend: --torchcompile '
                          f'{args.torchcompile} would ignore it')
    check_compile_backends({'--torchcompile': args.torchcompile, '--compile-mixer': args.compile_mixer})
    if mode:
        import torch._inductor
        modes = list(torch._inductor.list_mode_options())
        if mode not in modes:
            raise ConfigError(f'--torchcompile-mode {mode}: inductor\'s modes are {", ".join(modes)}')


def check_compile_backends(backends: dict) -> None:
    """``{flag: backend or None}``: each given backend is one this torch.compile knows."""
    if not any(backends.values()):
        return
    import torch._dynamo   # here: importing it takes seconds, and only compiling runs need it
    known = torch._dynamo.list_backends(exclude_tags=())
    for flag, backend in backends.items():
        if backend and backend not in known:
            raise ConfigError(f'{flag} {backend} is not a torch.compile backend; this torch has: '
                              f'{", ".join(b for b in sorted(known) if "TESTING" not in b)}')


def _check_output(args) -> None:
    run_dir = Path(args.output) / args.experiment
    for path in (run_dir, *run_dir.parents):   # the nearest part that exists must be a folder
        if path.exists():
            if path.is_dir():
                return
            if path == run_dir:
                raise ConfigError(f'--output {args.output}: the run folder {path} is a file, not a folder '
                                  f'(choose another --experiment)')
            raise ConfigError(f'--output {args.output} is a file, not a folder' if path == Path(args.output)
                              else f'--output {args.output}: {path} is a file, not a folder')


def check_device(device: Optional[str]) -> None:
    """``--device`` names a device torch knows and this machine has."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f'--device {device!r} is not a device torch knows (use cpu, cuda or cuda:N)') from err
    if parsed.type == 'cuda' and not torch.cuda.is_available():
        raise ConfigError(f'--device {device}: no CUDA device is available on this machine (use --device cpu)')
