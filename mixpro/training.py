"""A whole training run: build everything from the options, then epoch after epoch."""
import argparse
import math
import random
import re
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Optional

import timm
import torch
import torch.distributed as dist
from timm.data import resolve_data_config
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, distribute_bn

from .checkpoint import LAST, CheckpointError, CheckpointKeeper, load_checkpoint, resume_position
from .config import ConfigError
from .data import (build_dataset, class_index_of, dataset_size, eval_loader, is_stream, num_classes_of,
                   set_loader_epoch, stop_workers, train_loader)
from .distributed import DistInfo, barrier, cleanup, init_distributed
from .engine import current_lr, evaluate, train_one_epoch, updates_per_epoch
from .finetune import load_initial_weights
from .logger import RunLogger, format_eta
from .mixer import Mixer
from .probe import AttentionProbe, find_attention_source
from .run_folder import (RunLock, StopRequest, broadcast_path, choose_resume_checkpoint, in_folder, rolls_back,
                         save_run_info, set_aside_later_states)

NEEDS_ATTENTION = ('transmix', 'mixpro')
DEFAULT_WANDB_PROJECT = 'mixpro'


def build_model(args, num_classes: int):
    """timm model from the options; ``img_size`` goes to models that size their position embedding.
    Always randomly initialised: ``--pretrained`` / ``--initial-checkpoint`` weights are loaded by run()
    for a new run only (finetune.py), so a resumed run or validate.py never fetches them."""
    kwargs = dict(args.model_kwargs or {})
    common = dict(pretrained=False, num_classes=num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path)
    try:
        model = None
        if args.img_size is not None and 'img_size' not in kwargs:
            try:
                model = timm.create_model(args.model, img_size=args.img_size, **common, **kwargs)
            except TypeError as err:      # convnets take no img_size: the data config alone sets it
                if 'img_size' not in str(err):
                    raise
        if model is None:
            model = timm.create_model(args.model, **common, **kwargs)
    except RuntimeError as err:
        if 'Unknown model' in str(err):
            raise ConfigError(f"model '{args.model}' is not a timm model: {err}") from err
        raise
    except TypeError as err:   # a keyword the model does not take, or a value of the wrong type
        raise ConfigError(f"model '{args.model}' cannot be built with model_kwargs {kwargs}: {err}") from err
    if getattr(args, 'grad_checkpointing', False):
        try:
            model.set_grad_checkpointing(True)
        except (AttributeError, NotImplementedError, AssertionError) as err:
            raise ConfigError(f"--grad-checkpointing: model '{args.model}' cannot recompute its blocks "
                              f'({type(err).__name__}: {err}); train it without') from err
    return model


def use_sync_bn(model, args, dist_info: DistInfo):
    """``model`` with SyncBatchNorm in place of BatchNorm where --sync-bn asks for it and it can act."""
    if not args.sync_bn:
        return model
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if not (has_bn and dist_info.distributed):
        if dist_info.is_primary:
            why = f"model '{args.model}' has no BatchNorm layer" if not has_bn else 'the run has one process'
            print(f'note: --sync-bn changes nothing: {why}', flush=True)
        return model
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def share_bn_statistics(models, args, dist_info: DistInfo) -> None:
    """Give every process the same BatchNorm running statistics (--dist-bn), so that the sharded evaluation
    scores one model, the one the checkpoint saves (rank 0's): each rank's last forward updated its own."""
    if dist_info.distributed and args.dist_bn != 'none':
        for model in models:
            distribute_bn(model, dist_info.world_size, reduce=args.dist_bn == 'reduce')


def patch_stride(model) -> Optional[int]:
    """The pixel stride of a model's top-level patch embedding (ViT-like models), None where there is none."""
    size = getattr(getattr(model, 'patch_embed', None), 'patch_size', None)
    size = size[0] if isinstance(size, (tuple, list)) else size
    return size if isinstance(size, int) else None


def label_token_size(model) -> int:
    """Token size of the attention grid (for the MaskMix cell check); patch size where there is none."""
    try:
        return find_attention_source(model).token_size
    except ValueError:
        size = getattr(getattr(model, 'patch_embed', None), 'patch_size', 1)
        return size if isinstance(size, int) else size[0]


def build_mixer(args, num_classes: int, token_size: int, rank: int) -> Mixer:
    try:
        return Mixer(args.mix_method, num_classes=num_classes, label_smoothing=args.smoothing,
                     mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, switch_prob=args.mixup_switch_prob,
                     mix_prob=args.mixup_prob, maskmix_prob=args.maskmix_prob, maskmix_alpha=args.maskmix_alpha,
                     mask_cell=args.mask_cell, token_size=token_size, maskmix_lam=args.maskmix_lam,
                     membership=args.membership, pal_smoothing=args.pal_smoothing,
                     pal_detach_alpha=args.pal_detach_alpha, seed=args.seed + rank,
                     compile_backend=args.compile_mixer)
    except ValueError as err:
        raise ConfigError(f'mixing options: {err}') from err


def resolve_lr(args, world_size: int) -> float:
    """``lr`` as given, else ``lr_base`` scaled by global batch / ``lr_base_size`` (DeiT: 5e-4 per 512)."""
    if args.lr is not None:
        return args.lr
    ratio = args.batch_size * world_size * args.grad_accum_steps / args.lr_base_size
    return args.lr_base * (ratio if args.lr_base_scale == 'linear' else ratio ** 0.5)


# optimizer arguments that have their own option: --opt-kwargs may not set them behind its back
_OPT_OWN_OPTIONS = {'opt': '--opt', 'lr': '--lr', 'weight_decay': '--weight-decay', 'momentum': '--momentum',
                    'eps': '--opt-eps', 'layer_decay': '--layer-decay'}


def build_optimizer(model, args, lr: float):
    """timm's ``create_optimizer_v2`` as timm's train.py calls it: ``--layer-decay`` (the model's
    ``group_matcher`` sets the layers) and ``--opt-kwargs`` merged after ``--opt-betas``."""
    extra = dict(args.opt_kwargs or {})
    for key, option in _OPT_OWN_OPTIONS.items():
        if key in extra:
            raise ConfigError(f'--opt-kwargs {key}=...: {key} has its own option, use {option}')
    if args.opt_betas and 'betas' in extra:
        raise ConfigError('--opt-kwargs betas=... and --opt-betas both set the betas: keep one')
    kwargs = {**({'betas': tuple(args.opt_betas)} if args.opt_betas else {}), **extra}
    try:
        return create_optimizer_v2(model, opt=args.opt, lr=lr, weight_decay=args.weight_decay,
                                   momentum=args.momentum, eps=args.opt_eps, layer_decay=args.layer_decay,
                                   **kwargs)
    except (TypeError, ValueError) as err:
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if unexpected and unexpected.group(1) in extra:
            key = unexpected.group(1)
            raise ConfigError(f"--opt-kwargs {key}={extra[key]!r}: optimizer '{args.opt}' has no argument "
                              f"'{key}' ({err})") from err
        if extra:
            given = ' '.join(f'{k}={v!r}' for k, v in extra.items())
            raise ConfigError(f"--opt-kwargs {given}: optimizer '{args.opt}' refused them: {err}") from err
        if isinstance(err, ValueError):   # e.g. an --opt that timm does not know
            raise ConfigError(f'--opt {args.opt}: {err}') from err
        raise


# options that may change between a run and its resumption; any other difference is another run
RESUMABLE_CHANGES = {'resume', 'epochs', 'output', 'experiment', 'config', 'data_dir', 'workers', 'pin_mem',
                     'device', 'log_interval', 'image_grid_interval', 'validation_batch_size',
                     'checkpoint_hist', 'val_interval', 'torchcompile', 'torchcompile_mode', 'compile_mixer',
                     'channels_last', 'grad_checkpointing', 'recovery_interval', 'log_wandb', 'wandb_project',
                     'initial_checkpoint', 'pretrained',   # where a run's first weights came from
                     'dataset_download'}


def check_same_run(saved: dict, args, path: Path) -> None:
    """Refuse to resume a checkpoint of a differently configured run into this one."""
    current = vars(args)
    # older versions kept a class_map beside a --dataset, which ignored it
    may_change = RESUMABLE_CHANGES | ({'class_map'} if saved.get('dataset') else set())
    differing = sorted(k for k in saved if k not in may_change and k in current
                       and _comparable(saved[k]) != _comparable(current[k]))
    if differing:
        details = ', '.join(f'{k}: {saved[k]!r} -> {current[k]!r}' for k in differing[:6])
        raise ConfigError(f'{path} belongs to a run with other settings ({details}); give this run its own '
                          f'--experiment (or move that run folder away to start afresh in its place)')


def _comparable(value):
    return list(value) if isinstance(value, tuple) else value


def restore_training_state(path, args, model, optimizer, scheduler, scaler) -> dict:
    """Load a checkpoint of this run into the training objects; ``{}`` when there is none.
    The EMA and the random state are restored by the caller, once they exist."""
    if path is None:
        return {}
    state = load_checkpoint(path)
    saved_args = state.get('args', {})
    check_same_run(saved_args, args, path)
    model.load_state_dict(state['state_dict'])
    try:
        optimizer.load_state_dict(state['optimizer'])
    except ValueError as err:   # e.g. a model whose weight-decay exemptions changed (PVT's did)
        raise CheckpointError(f'{path}: its optimizer state does not fit the parameter groups this code builds '
                              f'({err}); resume it with the commit that wrote it (run_info.yaml: '
                              f'git_commit)') from err
    if saved_args.get('epochs', args.epochs) == args.epochs:
        scheduler.load_state_dict(state['scheduler'])
    else:   # timm's way: the schedule built for the new length, moved to where the run stands
        print(f"--epochs {saved_args['epochs']} -> {args.epochs}: the lr schedule is stretched to "
              f'{args.epochs} epochs from here on', flush=True)
    if scaler is not None and state.get('scaler'):
        scaler.load_state_dict(state['scaler'])
    return state


# ---- per-rank state (random streams, an interrupted epoch's running sums), so a resumed run continues -----
def bn_statistics(model) -> dict:
    """BatchNorm running statistics by name (the buffers --dist-bn shares), on the CPU."""
    return {name: buf.detach().cpu() for name, buf in model.named_buffers()
            if 'running_mean' in name or 'running_var' in name}


def rank_state(mixer: Mixer, partial_means: Optional[dict] = None, ema=None) -> dict:
    """``ema``: its BatchNorm statistics are this rank's own within an epoch (DDP syncs the model's, not
    the EMA's), so a mid-epoch save keeps each rank's."""
    state = {'torch': torch.get_rng_state(), 'python': list(random.getstate()[1]),
             'python_gauss_next': random.getstate()[2], 'mixer': mixer.state_dict(),
             'partial_means': partial_means}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    ema_bn = bn_statistics(ema.module) if ema is not None else None
    if ema_bn:
        state['ema_bn'] = ema_bn
    return state


def gather_rank_states(mixer: Mixer, dist_info: DistInfo, partial_means: Optional[dict] = None, ema=None) -> list:
    state = rank_state(mixer, partial_means, ema)
    if not dist_info.distributed:
        return [state]
    states = [None] * dist_info.world_size
    dist.all_gather_object(states, state)
    return states


def own_rank_state(states: Optional[list], dist_info: DistInfo) -> Optional[dict]:
    """This rank's entry of a checkpoint's per-rank states; None (with a note) when the world size changed."""
    if states is None:
        return None
    if len(states) != dist_info.world_size:
        if dist_info.is_primary:
            print(f'checkpoint has random state for {len(states)} ranks, this run has {dist_info.world_size}: '
                  f'random streams restart from the seed', flush=True)
        return None
    return states[dist_info.rank]


def restore_rank_state(state: dict, mixer: Mixer, dist_info: DistInfo, ema=None) -> None:
    torch.set_rng_state(state['torch'])
    random.setstate((3, tuple(state['python']), state['python_gauss_next']))
    mixer.load_state_dict(state['mixer'])
    if 'cuda' in state and dist_info.device.type == 'cuda':
        torch.cuda.set_rng_state(state['cuda'])
    if ema is not None and state.get('ema_bn'):
        buffers = dict(ema.module.named_buffers())
        for name, value in state['ema_bn'].items():
            buffers[name].copy_(value)


def open_run_folder(run_dir: Path, args, dist_info: DistInfo, lock: RunLock) -> Optional[Path]:
    """Rank 0 locks the run folder and picks the checkpoint to resume from; every rank gets the pick."""
    path = None
    if dist_info.is_primary:
        note = lock.acquire()
        path, notes = choose_resume_checkpoint(args, run_dir)
        if args.resume in (None, '', 'none') and any(run_dir.glob('*.pth.tar')):
            raise ConfigError(f'--resume none, but {run_dir} holds the checkpoints of an earlier run: give this '
                              f'run its own --experiment (or delete them to start this one afresh)')
        if path and rolls_back(args, run_dir):
            # set the later epochs aside before the long start-up (a preemption during it would otherwise
            # let the requeued --resume auto go on from them), once the checkpoint is this run's (options
            # resolved later, such as num_classes, are checked after the data is read)
            known = argparse.Namespace(**{k: v for k, v in vars(args).items() if v is not None})
            check_same_run(load_checkpoint(path, mmap=True).get('args', {}), known, path)
            notes += set_aside_later_states(run_dir, path)
        for line in ([note] if note else []) + notes:
            print(f'note: {line}', flush=True)
    return broadcast_path(path)


def check_image_geometry(args, image_size: int, token_size: int, stride: Optional[int] = None) -> Optional[str]:
    """Sizes that would make the attention labels or MaskMix silently wrong, refused before training; a note
    where the model alone would not see every pixel."""
    if args.mix_method in NEEDS_ATTENTION and image_size % token_size:
        raise ConfigError(f'image size {image_size} px is not a multiple of the {token_size}-px tokens the '
                          f'attention labels are read on: choose --img-size {image_size // token_size * token_size} '
                          f'or {(image_size // token_size + 1) * token_size}')
    if args.mix_method in ('maskmix', 'mixpro') and math.ceil(image_size / args.mask_cell) < 2:
        raise ConfigError(f'--mask-cell {args.mask_cell} covers the whole {image_size}-px image, so MaskMix '
                          f'would never mix: use a cell of at most {image_size // 2} px (a multiple of '
                          f'{token_size})')
    if image_size % token_size and token_size == stride:   # (a hierarchical model may pad instead)
        return (f'image size {image_size} px is not a multiple of the model\'s {token_size}-px patches: the '
                f'last {image_size % token_size} px of the right and bottom edges are not seen')
    return None


def training_state(args, epoch, model, optimizer, scheduler, scaler, ema, rank_states, resume_at,
                   num_classes, class_to_idx, evals=None) -> dict:
    """What a checkpoint holds; restore_training_state() reads it back."""
    return {
        'epoch': epoch, 'resume_at': list(resume_at), 'arch': args.model, 'num_classes': num_classes,
        'class_to_idx': class_to_idx, 'args': vars(args), 'state_dict': model.state_dict(),
        'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
        'scaler': scaler.state_dict() if scaler else None,
        'state_dict_ema': ema.module.state_dict() if ema is not None else None,
        'metric': ranking_metric(evals, args), 'eval_metrics': evals, 'rng_states': rank_states,
    }


def load_datasets(args, dist_info: DistInfo):
    """(train set, val set, class index): val is labelled by train's class index."""
    download_first = args.dataset_download and dist_info.distributed   # one download per node, not per rank
    if download_first and dist_info.local_rank != 0:
        barrier()
    train_set = build_dataset(args, args.train_split, is_training=True)
    class_to_idx = class_index_of(train_set)
    val_set = build_dataset(args, args.val_split, is_training=False, class_to_idx=class_to_idx)
    if download_first and dist_info.local_rank == 0:
        barrier()
    return train_set, val_set, class_to_idx


def mixed_precision(args, device: torch.device, primary: bool):
    """(autocast context, GradScaler or None): float16 needs the scaler, bfloat16 does not."""
    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    amp = torch.autocast(device.type, dtype=amp_dtype) if args.amp else nullcontext()
    scaler = torch.amp.GradScaler(device.type) if args.amp and amp_dtype == torch.float16 else None
    if scaler is not None and device.type == 'cpu' and primary:
        print('note: float16 autocast on the CPU is many times slower than float32; --amp-dtype bfloat16 '
              'or --no-amp for CPU runs', flush=True)
    return amp, scaler


def build_loaders(args, train_set, val_set, data_config: dict, dist_info: DistInfo):
    """(train loader, val loader); a train split smaller than one batch per process is refused."""
    loader = train_loader(train_set, data_config, args, dist_info)
    if len(loader) == 0:
        split = f'{args.dataset} ({args.train_split})' if args.dataset else Path(args.data_dir) / args.train_split
        raise ConfigError(f'{split} has {dataset_size(train_set)} images, fewer than '
                          f'one batch of {args.batch_size} per process: lower --batch-size')
    val_loader = eval_loader(val_set, data_config, args.validation_batch_size or args.batch_size,
                             args.workers, dist_info, args.pin_mem)
    return loader, val_loader


def start_position(state: dict, args, train_set, dist_info: DistInfo):
    """(epoch, step) to train from: where the checkpoint stopped, or the start of that epoch where the
    saved step cannot be found again (another number of processes, a stream dataset)."""
    if not state:
        return 0, 0
    start_epoch, start_step = resume_position(state)
    if start_step and len(state.get('rng_states') or []) != dist_info.world_size:
        if dist_info.is_primary:   # the saved position is in another partition of the data: redo that epoch whole
            print(f'note: the run stopped mid-epoch with another number of processes; epoch {start_epoch} '
                  f'restarts from its first step', flush=True)
        start_step = 0
    if start_step and is_stream(train_set):
        if dist_info.is_primary:   # timm's wds reader has no position to return to: the epoch is read again
            print(f'note: --dataset {args.dataset} is a stream, which cannot skip to the step the run stopped '
                  f'at ({start_step}); epoch {start_epoch} restarts from its first step, from the weights '
                  f'saved then', flush=True)
        start_step = 0
    return start_epoch, start_step


def wrap_for_training(model, args, dist_info: DistInfo):
    """(module to train, module to evaluate): compiled before the DDP wrap, as timm does; the compiled
    module also evaluates."""
    train_model = eval_model = model
    if args.torchcompile:
        if getattr(args, 'grad_checkpointing', False):
            # the probe's hook runs inside a checkpointed block; torch.compile would break the graph on its
            # write to the probe, which the recompute must skip anyway (the engine switches the probe off
            # before the backward): tell dynamo not to replay forward side effects there
            torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
        mode = getattr(args, 'torchcompile_mode', None)
        try:
            train_model = eval_model = torch.compile(model, backend=args.torchcompile, mode=mode)
        except RuntimeError as err:   # an unknown backend or mode
            raise ConfigError(f'--torchcompile {args.torchcompile}'
                              + (f' --torchcompile-mode {mode}' if mode else '') + f': {err}') from err
    if dist_info.distributed:
        device = dist_info.device
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == 'cuda' else None)
    return train_model, eval_model


def wandb_settings(args) -> dict:
    """``wandb.init`` settings: the run named after its folder, its options as the W&B config."""
    return {'project': args.wandb_project or DEFAULT_WANDB_PROJECT, 'name': args.experiment,
            'config': {k: v for k, v in vars(args).items() if k != 'config'}}


def epoch_line(epoch: int, train_metrics: dict, evals: dict, run_eta: float) -> str:
    if evals:
        ema_note = f", EMA top-1 {evals['eval_ema']['top1']:.2f}" if 'eval_ema' in evals else ''
        scores = f"top-1 {evals['eval']['top1']:.2f}, top-5 {evals['eval']['top5']:.2f}{ema_note}"
    else:
        scores = 'not evaluated (--val-interval)'
    return (f"epoch {epoch}: train loss {train_metrics['loss']:.4f}, {scores}, "
            f"{train_metrics['img_per_s']:.0f} img/s, run eta {format_eta(run_eta)}")


# the evaluation numbers an epoch logs and saves, per evaluated weights (raw, EMA)
LOGGED_METRICS = ('loss', 'top1', 'top5')


def ranking_metric(evals: dict, args) -> Optional[float]:
    """The --eval-metric value of an epoch's evaluations; None where the epoch was not evaluated."""
    if not evals:
        return None
    ema, name = args.eval_metric.startswith('ema_'), args.eval_metric.removeprefix('ema_')
    return evals['eval_ema' if ema else 'eval'][name]


def check_num_classes(args, train_set) -> None:
    """A --num-classes below the data's labels would fail in the first batch's targets (more is fine, as
    in timm: unused outputs)."""
    labels = class_index_of(train_set)
    needed = max(labels.values()) + 1 if labels else 0
    if args.num_classes and needed > args.num_classes:
        raise ConfigError(f'--num-classes {args.num_classes}: the training data has labels up to {needed - 1} '
                          f'({len(labels)} classes), so the model needs at least {needed} outputs')


def evaluates_after(epoch: int, args, num_epochs: int) -> bool:
    """Every --val-interval epochs, counted from the run's start, and after the last epoch."""
    return (epoch + 1) % args.val_interval == 0 or epoch + 1 >= num_epochs


def _count(dataset) -> str:
    size = dataset_size(dataset)
    return '?' if size is None else str(size)


def run(args) -> dict:
    """Train as ``args`` says; returns the final evaluation metrics (``stopped_by``: the signal that
    stopped the run early, after it saved where it was)."""
    dist_info = init_distributed(args.device)
    device, primary = dist_info.device, dist_info.is_primary
    run_dir = Path(args.output) / args.experiment
    lock, stop, logger = RunLock(run_dir), None, None
    loader = val_loader = None
    failed = False
    try:
        checkpoint_path = open_run_folder(run_dir, args, dist_info, lock)
        train_set, val_set, class_to_idx = load_datasets(args, dist_info)
        check_num_classes(args, train_set)
        num_classes = args.num_classes = args.num_classes or num_classes_of(train_set)
        torch.manual_seed(args.seed)   # the same initial weights on every rank, before DDP syncs them
        model = use_sync_bn(build_model(args, num_classes), args, dist_info)
        torch.manual_seed(args.seed + dist_info.rank)   # from here on each rank draws its own randomness
        random.seed(args.seed + dist_info.rank)
        data_config = resolve_data_config(vars(args), model=model, verbose=primary)
        try:
            probe = AttentionProbe(model) if args.mix_method in NEEDS_ATTENTION else None
        except ValueError as err:
            raise ConfigError(f'mix_method {args.mix_method}: {err}') from err
        token_size = probe.token_size if probe else label_token_size(model)
        geometry_note = check_image_geometry(args, data_config['input_size'][-1], token_size, patch_stride(model))
        if geometry_note and primary:
            print(f'note: {geometry_note}', flush=True)
        mixer = build_mixer(args, num_classes, token_size, dist_info.rank)
        # (the default is in the config.yaml of runs of earlier versions, which stored it)
        if args.wandb_project not in (None, DEFAULT_WANDB_PROJECT) and not args.log_wandb and primary:
            print(f'note: --wandb-project {args.wandb_project} logs nothing without --log-wandb', flush=True)
        if args.compile_mixer and primary and (not mixer.uses_maskmix or
                                               (device.type == 'cpu' and args.mix_method == 'maskmix')):
            print(f"note: --compile-mixer compiles nothing for {args.mix_method} on {device.type}: it compiles "
                  f"MaskMix's composition off the CPU and the PAL label of mixpro", flush=True)
        model.to(device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)

        lr = resolve_lr(args, dist_info.world_size)
        if lr < args.min_lr and args.sched in ('cosine', 'tanh', 'poly') and primary:   # they would climb to it
            print(f'note: lr {lr:.3e} is below --min-lr {args.min_lr:.3e}: after warmup the schedule would raise '
                  f'the lr towards min_lr; set --min-lr lower (or --lr / --lr-base higher)', flush=True)
        optimizer = build_optimizer(model, args, lr)
        amp, scaler = mixed_precision(args, device, primary)
        loader, val_loader = build_loaders(args, train_set, val_set, data_config, dist_info)
        per_epoch = updates_per_epoch(len(loader), args.grad_accum_steps)
        lower_is_better = args.eval_metric.endswith('loss')   # --eval-metric: a loss ranks lowest first
        # the engine calls step_update() after every optimizer update and step(epoch) at each epoch's end:
        # a per-update schedule (--sched-on-updates) moves on the first, a per-epoch one on the second
        try:
            scheduler, num_epochs = create_scheduler_v2(
                optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
                decay_rate=args.decay_rate, cooldown_epochs=args.cooldown_epochs, min_lr=args.min_lr,
                warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs,
                step_on_epochs=not args.sched_on_updates, updates_per_epoch=per_epoch,
                plateau_mode='min' if lower_is_better else 'max')
        except ValueError as err:   # e.g. wsd / rsqrt: --decay-epochs is the decay phase, longer than the run
            raise ConfigError(f'--sched {args.sched}: {err} (--decay-epochs, --epochs, --warmup-epochs)') from err

        state = restore_training_state(checkpoint_path, args, model, optimizer, scheduler, scaler)
        if state.get('class_to_idx') and state['class_to_idx'] != class_to_idx:
            raise ConfigError(f'{checkpoint_path} was trained with other classes than {args.data_dir} has (same '
                              f'count, other folders or order): its labels would be permuted')
        if not state:   # a new run may start from given weights (in place, before the EMA copies the model)
            load_initial_weights(model, args, primary)
        start_epoch, start_step = start_position(state, args, train_set, dist_info)
        num_updates = start_epoch * per_epoch + start_step // args.grad_accum_steps
        if state and state['args'].get('epochs') != args.epochs:   # a schedule built anew: move it to where
            scheduler.step(start_epoch)                             # the run stands, as timm's resume does
            scheduler.step_update(num_updates=num_updates)
        if state and start_epoch >= num_epochs:
            if primary:
                print(f'{run_dir}: the run already finished its {start_epoch} epochs; nothing to train '
                      f'(--epochs N with N > {start_epoch} trains it longer)', flush=True)
                if state.get('eval_metrics') is None:   # cut short by a smaller --epochs after a skipped evaluation
                    print(f'note: its last epoch ({start_epoch - 1}) was not evaluated (--val-interval): '
                          f'validate.py --checkpoint {checkpoint_path} measures it', flush=True)
            return {'epoch': start_epoch - 1, **(state.get('eval_metrics') or {})}
        if state and primary:
            print(f'resumed from {checkpoint_path} at epoch {start_epoch}'
                  + (f' step {start_step}' if start_step else ''), flush=True)

        ema = None
        if args.model_ema:   # after the probe (its deep copy gets an inert hook) and the resumed weights
            ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
            if state.get('state_dict_ema'):
                ema.module.load_state_dict(state['state_dict_ema'])

        train_model, eval_model = wrap_for_training(model, args, dist_info)

        keeper = None
        if primary:
            save_run_info(run_dir, args, dist_info.world_size, checkpoint_path)
            logger = RunLogger(run_dir, start_epoch, wandb=wandb_settings(args) if args.log_wandb else None)
            # another folder's checkpoint ranks that folder's files: this folder's best-k starts afresh
            own_folder = in_folder(checkpoint_path, run_dir)
            keeper = CheckpointKeeper(run_dir, args.checkpoint_hist,
                                      state.get('checkpoint_ranking', []) if own_folder else [],
                                      args.eval_metric, lower_is_better=lower_is_better)
            for note in keeper.tidy(prune=args.resume == 'auto' or own_folder):
                print(f'note: {note}', flush=True)
            print(f'{args.model} / {args.mix_method}: {num_classes} classes, {_count(train_set)} train and '
                  f'{_count(val_set)} val images, lr {lr:.3e}, world size {dist_info.world_size}, '
                  f'epochs {start_epoch}..{num_epochs - 1}, run folder {run_dir}', flush=True)
        resumed_rank = own_rank_state(state.get('rng_states'), dist_info) or {}
        if resumed_rank:
            restore_rank_state(resumed_rank, mixer, dist_info, ema)
        stop = StopRequest(dist_info.distributed)
        stop.install()

        def checkpoint(epoch, resume_at, evals=None, partial_means=None):   # every rank: the gather is collective
            rank_states = gather_rank_states(mixer, dist_info, partial_means, ema)
            return training_state(args, epoch, model, optimizer, scheduler, scaler, ema, rank_states, resume_at,
                                  num_classes, class_to_idx, evals) if primary else None

        def recovery_save(epoch, steps_done, partial_means):   # every rank, at the same step
            saved = checkpoint(epoch, (epoch, steps_done), partial_means=partial_means)
            if primary:
                keeper.save_interrupted(saved)

        # the mixer's targets are dense and already smoothed: timm's BCE takes dense targets as given
        loss_fn = BinaryCrossEntropy(smoothing=0.0) if args.bce_loss else SoftTargetCrossEntropy()
        result = {}
        run_start = time.time()
        for epoch in range(start_epoch, num_epochs):
            first_step = start_step if epoch == start_epoch else 0
            set_loader_epoch(loader, epoch, first_step)
            if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
                mixer.mixup_enabled = False
            grid_epoch = primary and args.image_grid_interval and epoch % args.image_grid_interval == 0
            train_metrics, num_updates = train_one_epoch(
                epoch, train_model, loader, optimizer, loss_fn, mixer, probe, device=device, amp=amp,
                scaler=scaler, ema=ema, scheduler=scheduler, num_updates=num_updates, args=args,
                world_size=dist_info.world_size, is_primary=primary, keep_samples=grid_epoch,
                start_step=first_step, partial_means=resumed_rank.get('partial_means') if first_step else None,
                stop=stop, recovery=partial(recovery_save, epoch) if args.recovery_interval else None)
            if train_metrics['steps_done'] < train_metrics['steps']:    # asked to stop: save where we are
                saved = checkpoint(epoch, (epoch, train_metrics['steps_done']),
                                   partial_means=train_metrics['partial_means'])
                if primary:
                    path = keeper.save_interrupted(saved)
                    print(f"{stop.name}: stopped at epoch {epoch} step {train_metrics['steps_done']}/"
                          f"{train_metrics['steps']} and saved {path}; the same command with --resume auto "
                          f'continues from there', flush=True)
                barrier()
                return {'epoch': epoch, 'stopped_by': stop.signum}
            # every epoch, evaluated or not, so that each epoch-end checkpoint resumes every rank alike
            share_bn_statistics([model] + ([ema.module] if ema is not None else []), args, dist_info)
            evals = {}
            if evaluates_after(epoch, args, num_epochs):
                evals['eval'] = evaluate(eval_model, val_loader, device, amp)
                if evals['eval']['unreadable'] and primary:
                    print(f"note: {evals['eval']['unreadable']} validation image(s) could not be read and are left "
                          f"out of the evaluation (the warnings above name them)", flush=True)
                if ema is not None:
                    evals['eval_ema'] = evaluate(ema.module, val_loader, device, amp)
            metric = ranking_metric(evals, args)
            lr_now = current_lr(optimizer)   # the lr this epoch trained with
            scheduler.step(epoch + 1, metric)   # a plateau schedule moves on evaluated epochs only
            logged = {k: {m: v[m] for m in LOGGED_METRICS} for k, v in evals.items()}
            saved = checkpoint(epoch, (epoch + 1, 0), evals=logged or None)
            if primary:
                unmeasured = {k: dict.fromkeys(LOGGED_METRICS)   # the same summary.csv columns
                              for k in ['eval'] + (['eval_ema'] if ema is not None else [])}
                logger.log_epoch(epoch, train_metrics, logged or unmeasured, lr_now)
                if train_metrics['samples'] is not None:
                    logger.log_images(epoch, train_metrics['samples'], data_config['mean'], data_config['std'],
                                      class_names={i: name for name, i in class_to_idx.items()})
                keeper.save(saved, epoch, metric)
                run_eta = (time.time() - run_start) / (epoch + 1 - start_epoch) * (num_epochs - epoch - 1)
                print(epoch_line(epoch, train_metrics, evals, run_eta), flush=True)
            barrier()
            result = {'epoch': epoch, **evals}
            if epoch + 1 < num_epochs and stop.requested():
                if primary:
                    print(f'{stop.name}: stopped after epoch {epoch}, saved in {run_dir / LAST}; the same command '
                          f'with --resume auto continues from there', flush=True)
                return {**result, 'stopped_by': stop.signum}
        if primary and keeper.ranking:
            digits = 4 if lower_is_better else 2
            print(f'best {args.eval_metric} {keeper.ranking[0][0]:.{digits}f} at epoch {keeper.ranking[0][1]}',
                  flush=True)
        return result
    except BaseException:
        failed = True
        raise
    finally:
        stop_workers(loader, val_loader)   # also after an exception: exit would wait on them forever
        if stop is not None:
            stop.uninstall()
        if logger is not None:
            logger.close(failed)
        if primary:
            lock.release()
        cleanup()
