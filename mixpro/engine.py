"""The train step, the epoch loop around it, and evaluation."""
import itertools
import logging
import math
import time
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F
from timm.utils import dispatch_clip_grad, unwrap_model

from .distributed import all_reduce_min, all_reduce_sum
from .logger import format_eta
from .pictures import mix_snapshot
from .skipped import UNREADABLE

_logger = logging.getLogger(__name__)


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
            # a resume with the same settings would repeat it exactly: the advice is a new run
            raise NonFiniteLoss(f'the training loss is not finite (NaN or inf) at epoch {epoch} step {first + 1}/'
                                f'{steps} (lr {lr:.3e}), nothing saved: start a new --experiment from the last good '
                                f'weights (--initial-checkpoint) with a lower --lr or a --clip-grad')


class TrainStep:
    """One training step: mix -> forward (the probe reads the class attention where a label needs it) ->
    relabel -> loss -> backward, and on an update: optimizer step, EMA, per-update schedule."""

    def __init__(self, model, optimizer, loss_fn, mixer, probe=None, *, device, amp=nullcontext(), scaler=None,
                 ema=None, scheduler=None, clip_grad=None, clip_mode='norm', channels_last=False, num_updates=0):
        self.model, self.optimizer, self.loss_fn, self.mixer, self.probe = model, optimizer, loss_fn, mixer, probe
        self.device, self.amp, self.scaler, self.ema, self.scheduler = device, amp, scaler, ema, scheduler
        self.clip_grad, self.clip_mode, self.channels_last = clip_grad, clip_mode, channels_last
        self.num_updates = num_updates
        self.snapshot = None   # the first mixed batch of an epoch that asks for it (the mix/samples picture)

    def __call__(self, x, y, update: bool = True, group: int = 1, keep_snapshot: bool = False):
        """``group``: the number of steps whose gradients this update sums (gradient accumulation)."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        x, target = self.mixer(x, y)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        probe, needs_attention = self.probe, self.mixer.needs_attention
        no_sync = hasattr(self.model, 'no_sync') and not update    # DDP: all-reduce only on the update
        with self.model.no_sync() if no_sync else nullcontext():
            with self.amp:
                if probe is not None:
                    probe.enabled = needs_attention
                logits = self.model(x)
                if probe is not None:   # read once: the backward's recompute (--grad-checkpointing) skips it
                    probe.enabled = False
                attention = probe.attention if needs_attention else None
                loss = self.loss_fn(logits, self.mixer.relabel(logits, attention))
            if keep_snapshot:
                self.snapshot = mix_snapshot(x, self.mixer.last, probe.attention if probe is not None else None)
            optimizer_step(loss / group, self.optimizer, self.scaler, self.clip_grad, self.clip_mode,
                           self.model.parameters(), update=update)
        if probe is not None:
            probe.attention = None   # the batch's attention is not kept past its step
        if update:
            self.num_updates += 1
            if self.ema is not None:
                self.ema.update(unwrap_model(self.model), step=self.num_updates)
            self.scheduler.step_update(num_updates=self.num_updates)
        return loss


class EpochMonitor:
    """What the epoch loop does around its steps (as DeiT's ``MetricLogger.log_every``): host time blocked
    in the loader (data wait), running means, a log line every ``log_interval`` steps, the non-finite loss
    check, recovery saves every ``recovery_interval`` steps, and a ``stop`` request, obeyed after an
    optimizer update.

    Data wait and compute: no device sync is added. On CUDA the host runs ahead of the device until
    something waits on it, so one step's split is not exact, but every log interval ends in a sync (the
    non-finite check reads a device value), so totals over log intervals and over the epoch are honest.
    A device stage in the loader (``--data-backend tensor``) counts as data for the host time it takes to
    launch, and as compute for its device time: its own cost is the benchmark's ``device_ms_per_batch``."""

    def __init__(self, epoch: int, steps: int, optimizer, *, device, start_step: int = 0, world_size: int = 1,
                 log_interval: int = 0, stop=None, recovery=None, recovery_interval: int = 0,
                 partial_means: Optional[dict] = None):
        """``steps``: the epoch's steps, those trained before a resume included; ``recovery(steps_done,
        partial_means)`` saves a resumable state (never after a non-finite loss: the check runs first)."""
        self.epoch, self.steps, self.optimizer, self.device = epoch, steps, optimizer, device
        self.start_step, self.world_size, self.log_interval = start_step, world_size, log_interval
        self.stop, self.recovery, self.recovery_interval = stop, recovery, recovery_interval
        self.means, self.watch = _Means(device, partial_means), _NonFiniteWatch(device)
        self.on_cuda = torch.device(device).type == 'cuda'
        self.steps_done, self.images, self.data_wait = steps, 0, 0.0
        self._update = False

    def log_every(self, loader):
        """``(step index, batch)`` for each step; the loop body calls ``record`` after its step."""
        if self.on_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start = time.time()
        self._log_at = (time.perf_counter(), 0.0, self.start_step)   # time, data wait, step of the last line
        recovered_at = self.start_step
        iterator = iter(loader)
        for i in itertools.count(self.start_step):
            waited = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                break
            self.data_wait += time.perf_counter() - waited
            yield i, batch
            last = i + 1 == self.steps
            if self.log_interval and ((i + 1) % self.log_interval == 0 or last):
                self.watch.check(self.epoch, self.steps, current_lr(self.optimizer))
                self._log_line(i)
            if not (self._update and not last):
                continue
            if self.recovery is not None and i + 1 - recovered_at >= self.recovery_interval:
                self.watch.check(self.epoch, self.steps, current_lr(self.optimizer))
                self.recovery(i + 1, self.means.state_dict())
                recovered_at = i + 1
            if self.stop is not None and self.stop.requested():
                self.steps_done = i + 1
                break
        self.watch.check(self.epoch, self.steps, current_lr(self.optimizer))

    def record(self, i: int, loss, images: int, mix_step, update: bool) -> None:
        self._update = update
        self.images += images
        self.means.add('loss', loss)
        self.watch.add(i, loss)
        if mix_step.lam_attn is not None:
            self.means.add('lam_area', mix_step.lam_area.mean())
            self.means.add('lam_attn', mix_step.lam_attn.mean())
            if mix_step.alpha is not None:
                self.means.add('alpha', mix_step.alpha.mean())

    def _log_line(self, i: int) -> None:
        now, now_pc = time.time(), time.perf_counter()
        last_time, last_wait, last_step = self._log_at
        rate = self.images * self.world_size / max(now - self.start, 1e-9)
        eta = (now - self.start) / (i + 1 - self.start_step) * (self.steps - i - 1)
        data_ms = 1e3 * (self.data_wait - last_wait) / (i + 1 - last_step)
        compute_ms = 1e3 * (now_pc - last_time) / (i + 1 - last_step) - data_ms
        self._log_at = (now_pc, self.data_wait, i + 1)
        memory = f' mem {torch.cuda.max_memory_allocated(self.device) / 1e9:.1f} GB' if self.on_cuda else ''
        _logger.info(f'epoch {self.epoch} [{i + 1:>4d}/{self.steps} ({100 * (i + 1) / self.steps:3.0f}%)] '
                     f'loss {self.means.mean("loss"):.4f} lr {current_lr(self.optimizer):.3e} '
                     f'{rate:.0f} img/s data {data_ms:.1f} ms compute {compute_ms:.1f} ms{memory} '
                     f'eta {format_eta(eta)}')

    def metrics(self) -> dict:
        """This epoch's numbers: the loss over all ranks (collective), this rank's ``data_wait_s`` and
        ``compute_s`` (the rest of the epoch), ``peak_memory_gb`` (CUDA max_memory_allocated, 1e9 bytes;
        None elsewhere), and ``steps_done`` below ``steps`` where a stop request ended the epoch early."""
        elapsed = time.time() - self.start
        means, interrupted = self.means, self.steps_done < self.steps
        return {'loss': means.mean_over_ranks('loss'), 'epoch_time_s': elapsed, 'steps': self.steps,
                'steps_done': self.steps_done, 'partial_means': means.state_dict() if interrupted else None,
                'img_per_s': self.images * self.world_size / max(elapsed, 1e-9),
                'lam_area': means.mean('lam_area'), 'lam_attn': means.mean('lam_attn'), 'alpha': means.mean('alpha'),
                'data_wait_s': self.data_wait, 'compute_s': max(elapsed - self.data_wait, 0.0),
                'peak_memory_gb': torch.cuda.max_memory_allocated(self.device) / 1e9 if self.on_cuda else None}


def train_one_epoch(step: TrainStep, loader, monitor: EpochMonitor, grad_accum_steps: int = 1,
                    keep_snapshot: bool = False) -> dict:
    """Train the steps ``loader`` gives (the rest of an epoch, after a resume); ``monitor.metrics()`` plus
    ``samples``: the first mixed batch where ``keep_snapshot`` asks for it."""
    step.model.train()
    step.snapshot = None
    steps, accum = monitor.steps, grad_accum_steps
    for i, (x, y) in monitor.log_every(loader):
        update = (i + 1) % accum == 0 or i + 1 == steps
        group = accum if i < steps - steps % accum else steps % accum   # the last group may be short
        loss = step(x, y, update, group, keep_snapshot=keep_snapshot and step.snapshot is None)
        monitor.record(i, loss, x.shape[0], step.mixer.last, update)
    return {**monitor.metrics(), 'samples': step.snapshot}


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
