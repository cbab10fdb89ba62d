"""Builders for what a run trains with: model, optimizer, schedule, mixer, precision, wrapping, lr.

Each takes explicit keyword arguments, as timm's ``create_model`` / ``create_loader`` do, so training,
validation and the scripts build the same objects the same way.
"""
import logging
import re
from contextlib import nullcontext
from typing import Optional

import timm
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from .config import ConfigError
from .mixer import Mixer
from .probe import AttentionProbe, find_attention_source, patch_size

_logger = logging.getLogger(__name__)

NEEDS_ATTENTION = ('transmix', 'mixpro')   # methods whose labels read the class attention


def create_model(name: str, num_classes: int, *, model_kwargs: Optional[dict] = None,
                 img_size: Optional[int] = None, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 grad_checkpointing: bool = False):
    """A randomly initialised timm model; ``img_size`` goes to models that size their position embedding.
    Pretrained weights are loaded by the caller (finetune.py), so a resumed run never fetches them."""
    kwargs = dict(model_kwargs or {})
    common = dict(pretrained=False, num_classes=num_classes, drop_rate=drop_rate, drop_path_rate=drop_path_rate)
    try:
        model = None
        if img_size is not None and 'img_size' not in kwargs:
            try:
                model = timm.create_model(name, img_size=img_size, **common, **kwargs)
            except TypeError as err:      # convnets take no img_size: the data config alone sets it
                if 'img_size' not in str(err):
                    raise
        if model is None:
            model = timm.create_model(name, **common, **kwargs)
    except RuntimeError as err:
        if 'Unknown model' in str(err):
            raise ConfigError(f"model '{name}' is not a timm model: {err}") from err
        raise
    except TypeError as err:   # a keyword the model does not take, or a value of the wrong type
        raise ConfigError(f"model '{name}' cannot be built with model_kwargs {kwargs}: {err} "
                          f"(--model-kwargs none drops a recipe's)") from err
    if grad_checkpointing:
        try:
            model.set_grad_checkpointing(True)
        except (AttributeError, NotImplementedError, AssertionError) as err:
            raise ConfigError(f"--grad-checkpointing: model '{name}' cannot recompute its blocks "
                              f'({type(err).__name__}: {err}); train it without') from err
    return model


def model_options(args) -> dict:
    """``create_model``'s keyword arguments from train.py's options (a run's or a recipe's)."""
    return dict(model_kwargs=args.model_kwargs, img_size=args.img_size, drop_rate=args.drop,
                drop_path_rate=args.drop_path, grad_checkpointing=args.grad_checkpointing)


def use_sync_bn(model, distributed: bool):
    """``model`` with SyncBatchNorm in place of BatchNorm (--sync-bn), where that can act."""
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if not (has_bn and distributed):
        name = getattr(model, 'pretrained_cfg', {}).get('architecture', type(model).__name__)
        why = f"model '{name}' has no BatchNorm layer" if not has_bn else 'the run has one process'
        _logger.info(f'note: --sync-bn changes nothing: {why}')
        return model
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def label_token_size(model) -> int:
    """Token size of the attention grid (for the MaskMix cell check); the patch size where there is none."""
    try:
        return find_attention_source(model).token_size
    except ValueError:
        return patch_size(model) or 1


def attention_probe(model, mix_method: str) -> Optional[AttentionProbe]:
    """The class-attention probe for the methods whose labels read it; None for the others."""
    if mix_method not in NEEDS_ATTENTION:
        return None
    try:
        return AttentionProbe(model)
    except ValueError as err:   # a model without a class token
        raise ConfigError(f'mix_method {mix_method}: {err}') from err


def create_mixer(method: str, num_classes: int, token_size: int, *, seed: int, mixup: float = 0.8,
                 cutmix: float = 1.0, mixup_prob: float = 1.0, mixup_switch_prob: Optional[float] = None,
                 smoothing: float = 0.1, maskmix_prob: float = 0.5, maskmix_alpha: float = 1.0,
                 mask_cell: int = 64, maskmix_lam: str = 'exact', membership: str = 'area',
                 pal_smoothing: float = 0.0, pal_detach_alpha: bool = True,
                 compile_mixer: Optional[str] = None) -> Mixer:
    """The Mixer for a recipe's mixing options (named as the options are)."""
    try:
        return Mixer(method, num_classes=num_classes, label_smoothing=smoothing, mixup_alpha=mixup,
                     cutmix_alpha=cutmix, switch_prob=mixup_switch_prob, mix_prob=mixup_prob,
                     maskmix_prob=maskmix_prob, maskmix_alpha=maskmix_alpha, mask_cell=mask_cell,
                     token_size=token_size, maskmix_lam=maskmix_lam, membership=membership,
                     pal_smoothing=pal_smoothing, pal_detach_alpha=pal_detach_alpha, seed=seed,
                     compile_backend=compile_mixer)
    except ValueError as err:   # what depends on the model: a cell that is not a whole number of tokens
        raise ConfigError(f'mixing options: {err}') from err


def resolve_lr(lr: Optional[float], *, lr_base: float, lr_base_size: int, lr_base_scale: str,
               global_batch: int) -> float:
    """``lr`` as given, else ``lr_base`` scaled by global batch / ``lr_base_size`` (DeiT: 5e-4 per 512)."""
    if lr is not None:
        return lr
    ratio = global_batch / lr_base_size
    return lr_base * (ratio if lr_base_scale == 'linear' else ratio ** 0.5)


# optimizer arguments that have their own option: --opt-kwargs may not set them behind its back
_OPT_OWN_OPTIONS = {'opt': '--opt', 'lr': '--lr', 'weight_decay': '--weight-decay', 'momentum': '--momentum',
                    'eps': '--opt-eps', 'layer_decay': '--layer-decay'}


def create_optimizer(model, *, opt: str, lr: float, weight_decay: float, momentum: float = 0.9,
                     opt_eps: Optional[float] = None, opt_betas=None, layer_decay: Optional[float] = None,
                     opt_kwargs: Optional[dict] = None):
    """timm's ``create_optimizer_v2`` as timm's train.py calls it: ``layer_decay`` (the model's
    ``group_matcher`` sets the layers) and ``opt_kwargs`` merged after ``opt_betas``."""
    extra = dict(opt_kwargs or {})
    for key, option in _OPT_OWN_OPTIONS.items():
        if key in extra:
            raise ConfigError(f'--opt-kwargs {key}=...: {key} has its own option, use {option}')
    if opt_betas and 'betas' in extra:
        raise ConfigError('--opt-kwargs betas=... and --opt-betas both set the betas: keep one')
    kwargs = {**({'betas': tuple(opt_betas)} if opt_betas else {}), **extra}
    try:
        return create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                   eps=opt_eps, layer_decay=layer_decay, **kwargs)
    except (TypeError, ValueError) as err:
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if unexpected and unexpected.group(1) in extra:
            key = unexpected.group(1)
            raise ConfigError(f"--opt-kwargs {key}={extra[key]!r}: optimizer '{opt}' has no argument "
                              f"'{key}' ({err})") from err
        if extra:
            given = ' '.join(f'{k}={v!r}' for k, v in extra.items())
            raise ConfigError(f"--opt-kwargs {given}: optimizer '{opt}' refused them: {err}") from err
        if isinstance(err, ValueError):   # e.g. an --opt that timm does not know
            raise ConfigError(f'--opt {opt}: {err}') from err
        raise


def create_scheduler(optimizer, *, sched: str, epochs: int, updates_per_epoch: int, on_updates: bool,
                     lower_is_better: bool, **timing):
    """timm's ``create_scheduler_v2``: ``(scheduler, epochs)``. The engine calls ``step_update()`` after
    every optimizer update and ``step(epoch)`` at each epoch's end, so a per-update schedule moves on the
    first and a per-epoch one on the second. ``timing``: create_scheduler_v2's decay_epochs,
    decay_milestones, decay_rate, patience_epochs, cooldown_epochs, min_lr, warmup_lr, warmup_epochs,
    warmup_prefix."""
    try:
        return create_scheduler_v2(optimizer, sched=sched, num_epochs=epochs, step_on_epochs=not on_updates,
                                   updates_per_epoch=updates_per_epoch,
                                   plateau_mode='min' if lower_is_better else 'max', **timing)
    except ValueError as err:   # e.g. wsd / rsqrt: --decay-epochs is the decay phase, longer than the run
        raise ConfigError(f'--sched {sched}: {err} (--decay-epochs, --epochs, --warmup-epochs)') from err


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """An autocast context for ``dtype``; no autocast for None."""
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype else nullcontext()


def mixed_precision(device: torch.device, amp: bool, amp_dtype: str = 'float16'):
    """(autocast context, GradScaler or None): float16 needs the scaler, bfloat16 does not."""
    dtype = (torch.bfloat16 if amp_dtype == 'bfloat16' else torch.float16) if amp else None
    scaler = torch.amp.GradScaler(torch.device(device).type) if dtype == torch.float16 else None
    if scaler is not None and torch.device(device).type == 'cpu':
        _logger.info('note: float16 autocast on the CPU is many times slower than float32; --amp-dtype bfloat16 '
                     'or --no-amp for CPU runs')
    return autocast(device, dtype), scaler


def wrap_for_training(model, *, device: torch.device, distributed: bool = False,
                      torchcompile: Optional[str] = None, torchcompile_mode: Optional[str] = None,
                      grad_checkpointing: bool = False):
    """(module to train, module to evaluate): compiled before the DDP wrap, as timm does; the compiled
    module also evaluates."""
    train_model = eval_model = model
    if torchcompile:
        if grad_checkpointing:
            # the probe's hook runs inside a checkpointed block and the engine switches it off before the
            # backward: dynamo must not replay that forward side effect in the recompute
            torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
        try:
            train_model = eval_model = torch.compile(model, backend=torchcompile, mode=torchcompile_mode)
        except RuntimeError as err:   # an unknown backend or mode
            raise ConfigError(f'--torchcompile {torchcompile}'
                              + (f' --torchcompile-mode {torchcompile_mode}' if torchcompile_mode else '')
                              + f': {err}') from err
    if distributed:
        device = torch.device(device)
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == 'cuda' else None)
    return train_model, eval_model
