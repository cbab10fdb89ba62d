"""A whole training run: its life cycle, the builds, the resume, then epoch after epoch."""
import logging
import math
import random
import time
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Optional

import torch
from timm.data import resolve_data_config
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3, distribute_bn

from .build import (NEEDS_ATTENTION, attention_probe, create_mixer, create_model, create_optimizer, create_scheduler,
                    label_token_size, mixed_precision, model_options, resolve_lr, use_sync_bn, wrap_for_training)
from .checkpoint import LAST, CheckpointKeeper, load_checkpoint
from .config import DEFAULT_WANDB_PROJECT, ConfigError
from .data import (build_dataset, class_index_of, dataset_size, eval_loader, is_stream, num_classes_of,
                   set_loader_epoch, stop_workers, train_loader)
from .distributed import DistInfo, barrier, cleanup, init_distributed
from .engine import EpochMonitor, TrainStep, current_lr, evaluate, train_one_epoch, updates_per_epoch
from .finetune import load_initial_weights
from .logger import RunLogger, complete_summary, format_eta, setup_logging
from .probe import patch_size
from .run_folder import RunLock, StopRequest, broadcast_path, save_run_info, stop_when_orphaned
from .state import TrainState, check_same_run, in_folder, pick_checkpoint

_logger = logging.getLogger(__name__)

# the evaluation numbers an epoch logs and saves, per evaluated weights (raw, EMA)
LOGGED_METRICS = ('loss', 'top1', 'top5')


@contextmanager
def run_life(args):
    """The run's life cycle: the process group, console logging, the run folder's lock (rank 0, which
    also picks the checkpoint to resume from), and on the way out, however the run ends, all of it
    released. Yields ``(dist_info, run_dir, checkpoint path or None, ExitStack for the run's resources)``."""
    with ExitStack() as stack:
        dist_info = init_distributed(args.device)
        stack.callback(cleanup)
        setup_logging(dist_info.rank)
        stop_when_orphaned()
        run_dir = Path(args.output) / args.experiment
        path = None
        if dist_info.is_primary:
            lock = RunLock(run_dir)
            note = lock.acquire()
            stack.callback(lock.release)
            if note:
                _logger.info(f'note: {note}')
            path = pick_checkpoint(args, run_dir)
        yield dist_info, run_dir, broadcast_path(path), stack


def run(args) -> dict:
    """Train as ``args`` says; returns the final evaluation metrics (``stopped_by``: the signal that
    stopped the run early, after it saved where it was)."""
    with run_life(args) as (dist_info, run_dir, checkpoint_path, stack):
        device, primary = dist_info.device, dist_info.is_primary
        train_set, val_set, class_to_idx = load_datasets(args, dist_info)
        num_classes = args.num_classes = args.num_classes or num_classes_of(train_set)
        torch.manual_seed(args.seed)   # the same initial weights on every rank, before DDP syncs them
        model = create_model(args.model, num_classes, **model_options(args))
        if args.sync_bn:
            model = use_sync_bn(model, dist_info.distributed)
        torch.manual_seed(args.seed + dist_info.rank)   # from here on each rank draws its own randomness
        random.seed(args.seed + dist_info.rank)
        data_config = resolve_data_config(vars(args), model=model, verbose=primary)
        probe = attention_probe(model, args.mix_method)
        token_size = probe.token_size if probe else label_token_size(model)
        check_image_geometry(args, data_config['input_size'][-1], token_size, patch_size(model))
        mixer = create_mixer(args.mix_method, num_classes, token_size, seed=args.seed + dist_info.rank,
                             **mixing_options(args))
        model.to(device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)

        amp, scaler = mixed_precision(device, args.amp, args.amp_dtype)
        loader, val_loader = build_loaders(args, train_set, val_set, data_config, dist_info)
        stack.callback(stop_workers, loader, val_loader)   # also after an error: exit would wait on them forever
        per_epoch = updates_per_epoch(len(loader), args.grad_accum_steps)
        lower_is_better = args.eval_metric.endswith('loss')   # --eval-metric: a loss ranks lowest first
        lr, optimizer, scheduler, num_epochs = build_optimization(args, model, dist_info.world_size, per_epoch,
                                                                  lower_is_better)

        checkpoint = read_run_checkpoint(checkpoint_path, args, class_to_idx, run_dir)
        if not checkpoint:   # a new run may start from given weights (in place, before the EMA copies them)
            load_initial_weights(model, args)
        # after the probe (its deep copy gets an inert hook) and the initial weights
        ema = None
        if args.model_ema:
            ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
        state = TrainState(args, model, optimizer, scheduler, mixer, dist_info, scaler=scaler, ema=ema,
                           num_classes=num_classes, class_to_idx=class_to_idx)
        position = {'epoch': 0, 'step': 0, 'num_updates': 0, 'partial_means': None}
        if checkpoint:
            position = state.load_state_dict(checkpoint, checkpoint_path, per_epoch, stream=is_stream(train_set))
            if primary and checkpoint.get('summary') and in_folder(checkpoint_path, run_dir):
                complete_summary(run_dir, position['epoch'], checkpoint['summary'])   # a crash between the two
            if position['epoch'] >= num_epochs:
                return finished_run(position['epoch'], checkpoint, checkpoint_path, run_dir)
            _logger.info(f"resumed from {checkpoint_path} at epoch {position['epoch']}"
                         + (f" step {position['step']}" if position['step'] else ''))
        train_model, eval_model = wrap_for_training(
            model, device=device, distributed=dist_info.distributed, torchcompile=args.torchcompile,
            torchcompile_mode=args.torchcompile_mode, grad_checkpointing=args.grad_checkpointing)

        logger = keeper = None
        if primary:
            save_run_info(run_dir, args, dist_info.world_size, checkpoint_path)
            logger = stack.enter_context(RunLogger(run_dir, position['epoch'], wandb=wandb_settings(args)))
            keeper = checkpoint_keeper(run_dir, args, checkpoint, checkpoint_path, lower_is_better)
            _logger.info(f'{args.model} / {args.mix_method}: {num_classes} classes, {_count(train_set)} train and '
                         f'{_count(val_set)} val images, lr {lr:.3e}, world size {dist_info.world_size}, '
                         f"epochs {position['epoch']}..{num_epochs - 1}, run folder {run_dir}")
        stop = stack.enter_context(StopRequest(dist_info.distributed))

        # the mixer's targets are dense and already smoothed: timm's BCE takes dense targets as given
        loss_fn = BinaryCrossEntropy(smoothing=0.0) if args.bce_loss else SoftTargetCrossEntropy()
        step = TrainStep(train_model, optimizer, loss_fn, mixer, probe, device=device, amp=amp, scaler=scaler,
                         ema=ema, scheduler=scheduler, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                         channels_last=args.channels_last, num_updates=position['num_updates'])

        def save_interrupted(epoch, steps_done, partial_means):   # every rank: the state is gathered
            saved = state.state_dict(epoch, (epoch, steps_done), partial_means=partial_means)
            return keeper.save_interrupted(saved) if primary else None

        result, start_epoch, run_start = {}, position['epoch'], time.time()
        for epoch in range(start_epoch, num_epochs):
            first_step = position['step'] if epoch == start_epoch else 0
            set_loader_epoch(loader, epoch, first_step)
            if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
                mixer.mixup_enabled = False
            monitor = EpochMonitor(
                epoch, first_step + len(loader), optimizer, device=device, start_step=first_step,
                world_size=dist_info.world_size, log_interval=args.log_interval, stop=stop,
                partial_means=position['partial_means'] if first_step else None,
                recovery=partial(save_interrupted, epoch) if args.recovery_interval else None,
                recovery_interval=args.recovery_interval)
            grid_epoch = bool(primary and args.image_grid_interval and epoch % args.image_grid_interval == 0)
            train_metrics = train_one_epoch(step, loader, monitor, args.grad_accum_steps, keep_snapshot=grid_epoch)
            if train_metrics['steps_done'] < train_metrics['steps']:    # asked to stop: save where we are
                path = save_interrupted(epoch, train_metrics['steps_done'], train_metrics['partial_means'])
                _logger.info(f"{stop.name}: stopped at epoch {epoch} step {train_metrics['steps_done']}/"
                             f"{train_metrics['steps']} and saved {path}; --resume auto continues from there")
                barrier()
                return {'epoch': epoch, 'stopped_by': stop.signum}
            # every epoch, evaluated or not, so that each epoch-end checkpoint resumes every rank alike
            share_bn_statistics([model] + ([ema.module] if ema is not None else []), args, dist_info)
            evals = evaluate_epoch(eval_model, ema, val_loader, device, amp) if evaluates_after(
                epoch, args, num_epochs) else {}
            metric = ranking_metric(evals, args)
            lr_now = current_lr(optimizer)   # the lr this epoch trained with
            scheduler.step(epoch + 1, metric)   # a plateau schedule moves on evaluated epochs only
            columns = summary_columns(evals, ema is not None)
            saved = state.state_dict(epoch, (epoch + 1, 0), evals=columns if evals else None, metric=metric,
                                     summary={'loss': train_metrics['loss'], 'lr': lr_now, 'evals': columns})
            if primary:
                keeper.save(saved, epoch, metric)   # before the summary row, so the table is never ahead of it
                log_epoch(logger, epoch, train_metrics, columns, lr_now, data_config, class_to_idx)
                run_eta = (time.time() - run_start) / (epoch + 1 - start_epoch) * (num_epochs - epoch - 1)
                _logger.info(epoch_line(epoch, train_metrics, evals, run_eta))
            barrier()
            result = {'epoch': epoch, **evals}
            if epoch + 1 < num_epochs and stop.requested():
                _logger.info(f'{stop.name}: stopped after epoch {epoch}, saved in {run_dir / LAST}; '
                             f'--resume auto continues from there')
                return {**result, 'stopped_by': stop.signum}
        if primary and keeper.ranking:
            digits = 4 if lower_is_better else 2
            _logger.info(f'best {args.eval_metric} {keeper.ranking[0][0]:.{digits}f} at epoch {keeper.ranking[0][1]}')
        return result


# ---- the builds run() calls, each a few lines ----
def load_datasets(args, dist_info: DistInfo):
    """(train set, val set, class index): val is labelled by train's class index."""
    download_first = args.dataset_download and dist_info.distributed   # one download per node, not per rank
    if download_first and dist_info.local_rank != 0:
        barrier()
    options = dict(dataset=args.dataset, class_map=args.class_map, download=args.dataset_download,
                   num_classes=args.num_classes, batch_size=args.batch_size, seed=args.seed)
    train_set = build_dataset(args.data_dir, args.train_split, is_training=True, **options)
    class_to_idx = class_index_of(train_set)
    val_set = build_dataset(args.data_dir, args.val_split, is_training=False, class_to_idx=class_to_idx, **options)
    if download_first and dist_info.local_rank == 0:
        barrier()
    check_num_classes(args.num_classes, class_to_idx)
    return train_set, val_set, class_to_idx


def check_num_classes(num_classes: Optional[int], class_to_idx: dict) -> None:
    """A --num-classes below the data's labels would fail in the first batch's targets (more is fine, as
    in timm: unused outputs)."""
    needed = max(class_to_idx.values()) + 1 if class_to_idx else 0
    if num_classes and needed > num_classes:
        raise ConfigError(f'--num-classes {num_classes}: the training data has labels up to {needed - 1} '
                          f'({len(class_to_idx)} classes), so the model needs at least {needed} outputs')


def mixing_options(args) -> dict:
    """The recipe's mixing options, as ``create_mixer`` names them."""
    names = ('mixup', 'cutmix', 'mixup_prob', 'mixup_switch_prob', 'smoothing', 'maskmix_prob', 'maskmix_alpha',
             'mask_cell', 'maskmix_lam', 'membership', 'pal_smoothing', 'pal_detach_alpha', 'compile_mixer')
    return {name: getattr(args, name) for name in names}


def build_optimization(args, model, world_size: int, updates_per_epoch: int, lower_is_better: bool):
    """(lr, optimizer, scheduler, epochs with cooldown) from the options."""
    lr = resolve_lr(args.lr, lr_base=args.lr_base, lr_base_size=args.lr_base_size, lr_base_scale=args.lr_base_scale,
                    global_batch=args.batch_size * world_size * args.grad_accum_steps)
    if lr < args.min_lr and args.sched in ('cosine', 'tanh', 'poly'):   # they would climb to min_lr
        _logger.info(f'note: lr {lr:.3e} is below --min-lr {args.min_lr:.3e}: after warmup the schedule would '
                     f'raise the lr towards min_lr; set --min-lr lower (or --lr / --lr-base higher)')
    optimizer = create_optimizer(model, opt=args.opt, lr=lr, weight_decay=args.weight_decay, momentum=args.momentum,
                                 opt_eps=args.opt_eps, opt_betas=args.opt_betas, layer_decay=args.layer_decay,
                                 opt_kwargs=args.opt_kwargs)
    scheduler, epochs = create_scheduler(
        optimizer, sched=args.sched, epochs=args.epochs, updates_per_epoch=updates_per_epoch,
        on_updates=args.sched_on_updates, lower_is_better=lower_is_better,
        decay_epochs=args.decay_epochs, decay_milestones=args.decay_milestones, decay_rate=args.decay_rate,
        patience_epochs=args.patience_epochs, cooldown_epochs=args.cooldown_epochs, min_lr=args.min_lr,
        warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, warmup_prefix=args.warmup_prefix)
    return lr, optimizer, scheduler, epochs


def check_image_geometry(args, image_size: int, token_size: int, stride: Optional[int] = None) -> None:
    """Sizes that would make the attention labels or MaskMix silently wrong are refused before training;
    a note where the model alone would not see every pixel."""
    if args.mix_method in NEEDS_ATTENTION and image_size % token_size:
        raise ConfigError(f'image size {image_size} px is not a multiple of the {token_size}-px tokens the '
                          f'attention labels are read on: choose --img-size {image_size // token_size * token_size} '
                          f'or {(image_size // token_size + 1) * token_size}')
    if args.mix_method in ('maskmix', 'mixpro') and math.ceil(image_size / args.mask_cell) < 2:
        raise ConfigError(f'--mask-cell {args.mask_cell} covers the whole {image_size}-px image, so MaskMix '
                          f'would never mix: use a cell of at most {image_size // 2} px (a multiple of '
                          f'{token_size})')
    if image_size % token_size and token_size == stride:   # (a hierarchical model may pad instead)
        _logger.info(f"note: image size {image_size} px is not a multiple of the model's {token_size}-px patches: "
                     f'the last {image_size % token_size} px of the right and bottom edges are not seen')


def build_loaders(args, train_set, val_set, data_config: dict, dist_info: DistInfo):
    """(train loader, val loader); a train split smaller than one batch per process is refused."""
    loader = train_loader(train_set, data_config, args, dist_info)
    if len(loader) == 0:
        split = f'{args.dataset} ({args.train_split})' if args.dataset else Path(args.data_dir) / args.train_split
        stop_workers(loader)
        raise ConfigError(f'{split} has {dataset_size(train_set)} images, fewer than '
                          f'one batch of {args.batch_size} per process: lower --batch-size')
    val_loader = eval_loader(val_set, data_config, args.validation_batch_size or args.batch_size,
                             args.workers, dist_info, args.pin_mem,
                             data_backend='pillow' if args.dataset else args.data_backend)   # files of a folder
    return loader, val_loader


def read_run_checkpoint(path: Optional[Path], args, class_to_idx: dict, run_dir: Path) -> dict:
    """The checkpoint this run resumes from, checked to be this run's; ``{}`` for a new run."""
    if path is None:
        return {}
    checkpoint = load_checkpoint(path)
    check_same_run(checkpoint.get('args', {}), vars(args), path, own_folder=in_folder(path, run_dir))
    if checkpoint.get('class_to_idx') and checkpoint['class_to_idx'] != class_to_idx:
        raise ConfigError(f'{path} was trained with other classes than {args.data_dir} has (same '
                          f'count, other folders or order): its labels would be permuted')
    return checkpoint


def finished_run(epoch: int, checkpoint: dict, path: Path, run_dir: Path) -> dict:
    _logger.info(f'{run_dir}: the run already finished its {epoch} epochs; nothing to train '
                 f'(--epochs N with N > {epoch} trains it longer)')
    if checkpoint.get('eval_metrics') is None:   # cut short by a smaller --epochs after a skipped evaluation
        _logger.info(f'note: its last epoch ({epoch - 1}) was not evaluated (--val-interval): '
                     f'validate.py --checkpoint {path} measures it')
    return {'epoch': epoch - 1, **(checkpoint.get('eval_metrics') or {})}


def checkpoint_keeper(run_dir: Path, args, checkpoint: dict, path: Optional[Path], lower_is_better: bool):
    """The best-k files of this folder; another folder's checkpoint ranks that folder's files, so the
    ranking starts afresh here."""
    own_folder = in_folder(path, run_dir)
    keeper = CheckpointKeeper(run_dir, args.checkpoint_hist,
                              checkpoint.get('checkpoint_ranking', []) if own_folder else [],
                              args.eval_metric, lower_is_better=lower_is_better)
    for note in keeper.tidy(prune=args.resume == 'auto' or own_folder):
        _logger.info(f'note: {note}')
    return keeper


def wandb_settings(args) -> Optional[dict]:
    """``wandb.init`` settings (``--log-wandb``): the run named after its folder, its options as the config."""
    if not args.log_wandb:
        return None
    return {'project': args.wandb_project or DEFAULT_WANDB_PROJECT, 'name': args.experiment, 'tags': args.wandb_tags,
            'config': {k: v for k, v in vars(args).items() if k != 'config'}}


# ---- the epoch loop's parts ----
def share_bn_statistics(models, args, dist_info: DistInfo) -> None:
    """Give every process the same BatchNorm running statistics (--dist-bn), so that the sharded evaluation
    scores one model, the one the checkpoint saves (rank 0's): each rank's last forward updated its own."""
    if dist_info.distributed and args.dist_bn != 'none':
        for model in models:
            distribute_bn(model, dist_info.world_size, reduce=args.dist_bn == 'reduce')


def evaluates_after(epoch: int, args, num_epochs: int) -> bool:
    """Every --val-interval epochs, counted from the run's start, and after the last epoch."""
    return (epoch + 1) % args.val_interval == 0 or epoch + 1 >= num_epochs


def evaluate_epoch(model, ema, val_loader, device, amp) -> dict:
    evals = {'eval': evaluate(model, val_loader, device, amp)}
    if evals['eval']['unreadable']:
        _logger.info(f"note: {evals['eval']['unreadable']} validation image(s) could not be read and are left "
                     f"out of the evaluation (the warnings above name them)")
    if ema is not None:
        evals['eval_ema'] = evaluate(ema.module, val_loader, device, amp)
    return evals


def ranking_metric(evals: dict, args) -> Optional[float]:
    """The --eval-metric value of an epoch's evaluations; None where the epoch was not evaluated."""
    if not evals:
        return None
    ema, name = args.eval_metric.startswith('ema_'), args.eval_metric.removeprefix('ema_')
    return evals['eval_ema' if ema else 'eval'][name]


def summary_columns(evals: dict, has_ema: bool) -> dict:
    """The evaluation numbers an epoch logs and saves; an epoch not evaluated gets empty cells in the same
    summary.csv columns."""
    if evals:
        return {k: {m: v[m] for m in LOGGED_METRICS} for k, v in evals.items()}
    return {k: dict.fromkeys(LOGGED_METRICS) for k in ['eval'] + (['eval_ema'] if has_ema else [])}


def log_epoch(logger, epoch, train_metrics, evals, lr, data_config, class_to_idx) -> None:
    """summary.csv, TensorBoard (and W&B), and the mix/samples picture of the epochs that keep one."""
    logger.log_epoch(epoch, train_metrics, evals, lr)
    if train_metrics['samples'] is not None:
        logger.log_images(epoch, train_metrics['samples'], data_config['mean'], data_config['std'],
                          class_names={i: name for name, i in class_to_idx.items()})


def epoch_line(epoch: int, train_metrics: dict, evals: dict, run_eta: float) -> str:
    if evals:
        ema_note = f", EMA top-1 {evals['eval_ema']['top1']:.2f}" if 'eval_ema' in evals else ''
        scores = f"top-1 {evals['eval']['top1']:.2f}, top-5 {evals['eval']['top5']:.2f}{ema_note}"
    else:
        scores = 'not evaluated (--val-interval)'
    return (f"epoch {epoch}: train loss {train_metrics['loss']:.4f}, {scores}, "
            f"{train_metrics['img_per_s']:.0f} img/s, run eta {format_eta(run_eta)}")


def _count(dataset) -> str:
    size = dataset_size(dataset)
    return '?' if size is None else str(size)
