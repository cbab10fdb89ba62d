"""One training epoch and one evaluation pass: mix -> forward -> relabel -> step."""
import math
import time
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F
from timm.utils import dispatch_clip_grad

from .distributed import all_reduce_min, all_reduce_sum
from .logger import format_eta
from .pictures import mix_snapshot
from .skipped import UNREADABLE


def unwrap_model(model):
    """The plain module inside DDP and torch.compile wrappers."""
    model = getattr(model, '_orig_mod', model)
    model = getattr(model, 'module', model)
    return getattr(model, '_orig_mod', model)


def optimizer_step(loss, optimizer, scaler=None, clip_grad=None, clip_mode='norm', parameters=None,
                   update=True) -> None:
    """scale -> backward -> (on update) unscale -> clip -> step -> scaler update -> zero_grad.

    Clipping sees true gradient values: with fp16 the scaler unscales them first.
    """
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()
    if not update:
        return
    if clip_grad is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        dispatch_clip_grad(parameters, clip_grad, mode=clip_mode)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def current_lr(optimizer) -> float:
    """The run's lr: the largest over parameter groups (with --layer-decay the first group is the stem,
    whose lr is scaled down the most)."""
    return max(group['lr'] for group in optimizer.param_groups)


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite: the run stops before it writes such weights."""


class _Means:
    """Running sums kept on the device, read back only when printed (no per-step host sync)."""

    def __init__(self, device, state: Optional[dict] = None):
        self.device = device
        state = state or {}   # the sums of the steps an interrupted epoch trained before it was saved
        self.sums = {k: torch.tensor(v, device=device) for k, v in state.get('sums', {}).items()}
        self.counts = dict(state.get('counts', {}))

    def add(self, name, value):
        if name not in self.sums:
            self.sums[name] = torch.zeros((), device=self.device)
            self.counts[name] = 0
        self.sums[name] += value.detach().float()
        self.counts[name] += 1

    def mean(self, name) -> Optional[float]:
        return float(self.sums[name]) / self.counts[name] if self.counts.get(name) else None

    def mean_over_ranks(self, name) -> Optional[float]:
        """The mean over every rank's steps (collective: call it on all ranks)."""
        if not self.counts.get(name):
            return None
        total = all_reduce_sum(torch.stack([self.sums[name].double(),
                                            torch.tensor(float(self.counts[name]), device=self.device,
                                                         dtype=torch.float64)]))
        return float(total[0] / total[1])

    def state_dict(self) -> dict:
        return {'sums': {k: float(v) for k, v in self.sums.items()}, 'counts': dict(self.counts)}


class _NonFiniteWatch:
    """Remembers, on the device, the first step whose loss was not finite; ``check()`` reads it back
    (once per log interval and at the end: no sync per step) and agrees on it over all ranks."""

    NONE = 2 ** 62

    def __init__(self, device):
        self.first = torch.full((), self.NONE, dtype=torch.int64, device=device)

    def add(self, step: int, loss) -> None:
        bad = ~torch.isfinite(loss.detach())
        self.first = torch.where(bad & (self.first == self.NONE), step, self.first)

    def check(self, epoch: int, steps: int, lr: float) -> None:
        first = int(all_reduce_min(self.first.clone()))
        if first != self.NONE:
            raise NonFiniteLoss(f'the training loss is not finite (NaN or inf) at epoch {epoch} step '
                                f'{first + 1}/{steps} (lr {lr:.3e}): stopped without saving these weights. Resuming with the '
                                f'same settings repeats it exactly; start a new run (its own --experiment) with a '
                                f'lower --lr or a --clip-grad, from the last good weights with --initial-checkpoint')


class _LoaderClock:
    """Host time spent blocked in the loader's ``next()`` (data wait); the rest of the epoch's wall time is
    compute. No device sync is added: on CUDA the host runs ahead of the device until something waits on it,
    so the split of one step is not exact, but the log interval ends in a sync (the non-finite-loss check
    reads a device value), so totals over log intervals and over the epoch are honest: time the host waited
    for data while the device had nothing queued is data wait, time it waited for the device is compute."""

    def __init__(self):
        self.data = 0.0

    def timed(self, loader):
        iterator = iter(loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.data += time.perf_counter() - start
            yield batch


def train_one_epoch(epoch, model, loader, optimizer, loss_fn, mixer, probe, *, device, amp, scaler,
                    ema, scheduler, num_updates, args, world_size=1, is_primary=True, keep_samples=False,
                    start_step=0, partial_means=None, stop=None, recovery=None):
    """Train for one epoch, from ``start_step`` when an interrupted epoch is resumed; returns
    ``(metrics, num_updates)``. With a ``stop`` request it ends early after an optimizer step:
    ``metrics['steps_done']`` is then below ``metrics['steps']``. ``recovery(steps_done, partial_means)``,
    where given, saves a resumable state after an optimizer step every ``args.recovery_interval`` steps
    (never after a non-finite loss: the check runs first, on every rank).

    The step log line shows the mean data wait and compute per step since the previous log line (and the
    peak memory of the epoch so far on CUDA); ``metrics`` has this rank's epoch totals ``data_wait_s``
    (host time blocked in the loader) and ``compute_s`` (the rest of the epoch), and ``peak_memory_gb``
    (CUDA max_memory_allocated over the epoch, 1e9 bytes; None elsewhere)."""
    model.train()
    accum = args.grad_accum_steps
    steps = start_step + len(loader)
    means, samples = _Means(device, partial_means), None
    watch = _NonFiniteWatch(device)
    start = time.time()
    images_seen = 0
    steps_done = steps
    clock, on_cuda = _LoaderClock(), torch.device(device).type == 'cuda'
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    last_log = time.perf_counter()
    data_at_log, step_at_log = 0.0, start_step
    recovered_at = start_step
    for i, (x, y) in enumerate(clock.timed(loader), start=start_step):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x, target = mixer(x, y)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        update = (i + 1) % accum == 0 or i + 1 == steps
        group = accum if i < steps - steps % accum else steps % accum   # the last group may be short
        no_sync = hasattr(model, 'no_sync') and not update    # DDP: all-reduce only on the update
        if probe is not None:
            probe.enabled = mixer.needs_attention
        with model.no_sync() if no_sync else nullcontext():
            with amp:
                logits = model(x)
                if probe is not None:   # read once: the backward's recompute (--grad-checkpointing) skips it
                    probe.enabled = False
                target = mixer.relabel(logits, probe.attention if mixer.needs_attention else None)
                loss = loss_fn(logits, target)
            if keep_samples and samples is None:   # before the probe lets go of the attention
                samples = mix_snapshot(x, mixer.last, probe.attention if probe is not None else None)
            optimizer_step(loss / group, optimizer, scaler, args.clip_grad, args.clip_mode,
                           model.parameters(), update=update)
        if probe is not None:
            probe.enabled, probe.attention = False, None
        if update:
            num_updates += 1
            if ema is not None:
                ema.update(unwrap_model(model), step=num_updates)
            scheduler.step_update(num_updates=num_updates)

        images_seen += x.shape[0]
        means.add('loss', loss)
        watch.add(i, loss)
        step = mixer.last
        if step.lam_attn is not None:
            means.add('lam_area', step.lam_area.mean())
            means.add('lam_attn', step.lam_attn.mean())
            if step.alpha is not None:
                means.add('alpha', step.alpha.mean())
        logging_step = args.log_interval and ((i + 1) % args.log_interval == 0 or i + 1 == steps)
        if logging_step:
            watch.check(epoch, steps, current_lr(optimizer))
        if is_primary and logging_step:
            now = time.time()
            rate = images_seen * world_size / max(now - start, 1e-9)
            eta = (now - start) / (i + 1 - start_step) * (steps - i - 1)
            now_pc, interval_steps = time.perf_counter(), i + 1 - step_at_log
            data_ms = 1e3 * (clock.data - data_at_log) / interval_steps
            compute_ms = 1e3 * (now_pc - last_log) / interval_steps - data_ms
            last_log, data_at_log, step_at_log = now_pc, clock.data, i + 1
            memory = f' mem {torch.cuda.max_memory_allocated(device) / 1e9:.1f} GB' if on_cuda else ''
            print(f'epoch {epoch} [{i + 1:>4d}/{steps} ({100 * (i + 1) / steps:3.0f}%)] '
                  f'loss {means.mean("loss"):.4f} lr {current_lr(optimizer):.3e} '
                  f'{rate:.0f} img/s data {data_ms:.1f} ms compute {compute_ms:.1f} ms{memory} '
                  f'eta {format_eta(eta)}', flush=True)
        if recovery is not None and update and i + 1 < steps and i + 1 - recovered_at >= args.recovery_interval:
            watch.check(epoch, steps, current_lr(optimizer))
            recovery(i + 1, means.state_dict())
            recovered_at = i + 1
        if update and stop is not None and i + 1 < steps and stop.requested():
            steps_done = i + 1
            break
    watch.check(epoch, steps, current_lr(optimizer))
    elapsed = time.time() - start
    metrics = {'loss': means.mean_over_ranks('loss'), 'epoch_time_s': elapsed, 'steps': steps, 'steps_done': steps_done,
               'partial_means': means.state_dict() if steps_done < steps else None,
               'img_per_s': images_seen * world_size / max(elapsed, 1e-9),
               'lam_area': means.mean('lam_area'), 'lam_attn': means.mean('lam_attn'),
               'alpha': means.mean('alpha'), 'samples': samples,
               'data_wait_s': clock.data, 'compute_s': max(elapsed - clock.data, 0.0),
               'peak_memory_gb': torch.cuda.max_memory_allocated(device) / 1e9 if on_cuda else None}
    return metrics, num_updates


@torch.no_grad()
def evaluate(model, loader, device, amp=nullcontext()) -> dict:
    """Top-1, top-5 and cross-entropy over the whole loader, summed over all ranks. Images labelled
    ``UNREADABLE`` (a neighbour stood in for them) are left out and counted as ``unreadable``."""
    model.eval()
    # loss sum, top-1 hits, top-5 hits, images measured
    totals = torch.zeros(4, device=device, dtype=torch.float64)
    count = 0                                                        # counted on the host: no copy per batch
    for x, y in loader:
        count += y.numel()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with amp:
            logits = model(x)
        logits = logits.float()
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices.eq(y.view(-1, 1))       # never true for UNREADABLE (-1)
        loss = F.cross_entropy(logits, y, reduction='sum', ignore_index=UNREADABLE)
        totals += torch.stack([loss.double(), hits[:, 0].sum().double(), hits.any(1).sum().double(),
                               (y != UNREADABLE).sum().double()])
    totals = torch.cat([totals, torch.tensor([float(count)], dtype=torch.float64, device=device)])
    loss, top1, top5, measured, count = all_reduce_sum(totals).tolist()
    scale = max(measured, 1.0)
    return {'loss': loss / scale, 'top1': 100.0 * top1 / scale, 'top5': 100.0 * top5 / scale,
            'count': int(measured), 'unreadable': int(count - measured)}


@torch.no_grad()
def max_softmax(model, loader, device, amp=nullcontext()) -> torch.Tensor:
    """Each image's largest softmax probability (its confidence), this rank's images in loader order, on the CPU."""
    model.eval()
    confidence = []
    for x, y in loader:
        with amp:
            logits = model(x.to(device, non_blocking=True))
        measured = (y != UNREADABLE).cpu()                            # a neighbour's image is not this one's score
        confidence.append(logits.float().softmax(1).amax(1).cpu()[measured])
    return torch.cat(confidence) if confidence else torch.zeros(0)


def updates_per_epoch(steps: int, accum: int) -> int:
    return math.ceil(steps / accum)
