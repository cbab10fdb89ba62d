"""What a checkpoint holds and how a run resumes from one.

``TrainState`` is the one place that writes and reads a checkpoint's contents. ``choose_resume_checkpoint``
picks the file ``--resume`` means; ``CheckpointKeeper`` (checkpoint.py) owns the file names.
"""
import datetime
import logging
import random
import shutil
from pathlib import Path
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import yaml

from .checkpoint import INTERRUPTED, LAST, CheckpointError, load_checkpoint, resume_position
from .config import ConfigError
from .distributed import DistInfo
from .run_folder import RunError

_logger = logging.getLogger(__name__)

# options that may change between a run and its resumption; any other difference is another run
RESUMABLE_CHANGES = {'resume', 'epochs', 'output', 'experiment', 'config', 'data_dir', 'workers', 'pin_mem',
                     'data_backend',   # the same augmentation, computed elsewhere
                     'device', 'log_interval', 'image_grid_interval', 'validation_batch_size',
                     'checkpoint_hist', 'val_interval', 'torchcompile', 'torchcompile_mode', 'compile_mixer',
                     'channels_last', 'grad_checkpointing', 'recovery_interval', 'log_wandb', 'wandb_project',
                     'wandb_tags', 'amp', 'amp_dtype',   # precision: a GPU run may go on on the CPU and back
                     'initial_checkpoint', 'pretrained',   # where a run's first weights came from
                     'dataset_download'}


_FIRST_NAMED = ('model', 'model_kwargs', 'mix_method', 'num_classes', 'img_size')   # what tells runs apart


def check_same_run(saved: dict, options: dict, path: Path, own_folder: bool = True) -> None:
    """Refuse to resume a checkpoint of a differently configured run into this one (``options``: this run's,
    those not known yet left out; ``own_folder``: the checkpoint lies in this run's folder)."""
    # a class_map beside a --dataset was never used: runs that stored one resume alike
    may_change = RESUMABLE_CHANGES | ({'class_map'} if saved.get('dataset') else set())
    differing = sorted((k for k in saved if k not in may_change and k in options
                        and _comparable(saved[k]) != _comparable(options[k])),
                       key=lambda k: (k not in _FIRST_NAMED, _FIRST_NAMED.index(k) if k in _FIRST_NAMED else 0, k))
    if differing:
        details = ', '.join(f'{k}: {saved[k]!r} -> {options[k]!r}' for k in differing[:8])
        more = f' and {len(differing) - 8} more' if len(differing) > 8 else ''
        advice = ('give this run its own --experiment (or move that run folder away to start afresh in its place)'
                  if own_folder else f'to train these settings from its weights, use --initial-checkpoint {path} '
                  f'instead of --resume')
        raise ConfigError(f'{path} belongs to a run with other settings ({details}{more}); {advice}')


def _comparable(value):
    return list(value) if isinstance(value, tuple) else value


class TrainState:
    """Everything a run continues from: model, optimizer, schedule, loss scaler, EMA, every rank's random
    streams (the mixer's too), the position in the epoch, and the class index."""

    def __init__(self, args, model, optimizer, scheduler, mixer, dist_info: DistInfo, *, scaler=None, ema=None,
                 num_classes: int, class_to_idx: dict):
        self.args, self.model, self.optimizer, self.scheduler, self.mixer = args, model, optimizer, scheduler, mixer
        self.dist_info, self.scaler, self.ema = dist_info, scaler, ema
        self.num_classes, self.class_to_idx = num_classes, class_to_idx

    def state_dict(self, epoch: int, resume_at: Tuple[int, int], evals: Optional[dict] = None,
                   metric: Optional[float] = None, partial_means: Optional[dict] = None,
                   summary: Optional[dict] = None) -> Optional[dict]:
        """The checkpoint, on rank 0 (None elsewhere). Collective: every rank's random state is gathered.
        ``summary``: the epoch's summary.csv numbers (train loss, lr), written after the checkpoint: a
        resume writes the row where a crash came between the two."""
        rank_states = self._gather_rank_states(partial_means)
        if not self.dist_info.is_primary:
            return None
        ema = self.ema
        return {
            'epoch': epoch, 'resume_at': list(resume_at), 'arch': self.args.model, 'num_classes': self.num_classes,
            'class_to_idx': self.class_to_idx, 'args': vars(self.args), 'state_dict': self.model.state_dict(),
            'optimizer': self.optimizer.state_dict(), 'scheduler': self.scheduler.state_dict(),
            'scaler': self.scaler.state_dict() if self.scaler else None,
            'state_dict_ema': ema.module.state_dict() if ema is not None else None,
            'metric': metric, 'eval_metrics': evals, 'rng_states': rank_states, 'summary': summary,
        }

    def load_state_dict(self, state: dict, path: Path, updates_per_epoch: int, stream: bool = False) -> dict:
        """Continue from checkpoint ``state`` (read from ``path``); returns where: ``epoch``, ``step``,
        ``num_updates``, and this rank's ``partial_means`` of an epoch stopped mid-way. ``stream``: the
        training data is read as a stream (wds/), which cannot skip to a step."""
        args = self.args
        self.model.load_state_dict(state['state_dict'])
        try:
            self.optimizer.load_state_dict(state['optimizer'])
        except ValueError as err:   # e.g. a model whose weight-decay exemptions changed
            raise CheckpointError(f'{path}: its optimizer state does not fit the parameter groups this code '
                                  f'builds ({err}); resume it with the commit that wrote it (run_info.yaml: '
                                  f'git_commit)') from err
        if self.scaler is not None and state.get('scaler'):
            self.scaler.load_state_dict(state['scaler'])
        if self.ema is not None and state.get('state_dict_ema'):
            self.ema.module.load_state_dict(state['state_dict_ema'])
        epoch, step = self._start_position(state, stream)
        num_updates = epoch * updates_per_epoch + step // args.grad_accum_steps
        saved = state['args']
        if _precision(saved) != _precision(vars(args)):
            _logger.info(f'note: this run trained in {_precision(saved)} and goes on in {_precision(vars(args))} '
                         f'(--amp, --amp-dtype)')
        saved_epochs = saved.get('epochs', args.epochs)
        if saved_epochs == args.epochs:
            self.scheduler.load_state_dict(state['scheduler'])
        else:   # timm's way: the schedule built for the new length, moved to where the run stands
            _logger.info(f'--epochs {saved_epochs} -> {args.epochs}: the lr schedule is stretched to '
                         f'{args.epochs} epochs from here on')
            self.scheduler.step(epoch)
            self.scheduler.step_update(num_updates=num_updates)
        rank_state = self._own_rank_state(state.get('rng_states')) or {}
        if rank_state:
            self._restore_rank_state(rank_state)
        return {'epoch': epoch, 'step': step, 'num_updates': num_updates,
                'partial_means': rank_state.get('partial_means') if step else None}

    def _start_position(self, state: dict, stream: bool) -> Tuple[int, int]:
        """(epoch, step) to train from: where the checkpoint stopped, or the start of that epoch where the
        saved step cannot be found again (another number of processes, a stream dataset)."""
        epoch, step = resume_position(state)
        if step and len(state.get('rng_states') or []) != self.dist_info.world_size:
            # the saved position is in another partition of the data: redo that epoch whole
            _logger.info(f'note: the run stopped mid-epoch with another number of processes; epoch {epoch} '
                         f'restarts from its first step')
            step = 0
        if step and stream:
            # timm's wds reader has no position to return to: the epoch is read again
            _logger.info(f'note: --dataset {self.args.dataset} is a stream, which cannot skip to the step the run '
                         f'stopped at ({step}); epoch {epoch} restarts from its first step, from the weights '
                         f'saved then')
            step = 0
        return epoch, step

    # ---- per-rank state: random streams, an interrupted epoch's running sums, the EMA's BatchNorm statistics
    def _rank_state(self, partial_means: Optional[dict]) -> dict:
        python = random.getstate()
        state = {'torch': torch.get_rng_state(), 'python': list(python[1]), 'python_gauss_next': python[2],
                 'mixer': self.mixer.state_dict(), 'partial_means': partial_means}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state['cuda'] = torch.cuda.get_rng_state()
        # within an epoch the EMA's BatchNorm statistics are each rank's own (DDP syncs the model's only)
        ema_bn = bn_statistics(self.ema.module) if self.ema is not None else None
        if ema_bn:
            state['ema_bn'] = ema_bn
        return state

    def _gather_rank_states(self, partial_means: Optional[dict]) -> list:
        state = self._rank_state(partial_means)
        if not self.dist_info.distributed:
            return [state]
        states = [None] * self.dist_info.world_size
        dist.all_gather_object(states, state)
        return states

    def _own_rank_state(self, states: Optional[list]) -> Optional[dict]:
        """This rank's entry of the saved per-rank states; None (with a note) when the world size changed."""
        if states is None:
            return None
        if len(states) != self.dist_info.world_size:
            _logger.info(f'checkpoint has random state for {len(states)} ranks, this run has '
                         f'{self.dist_info.world_size}: random streams restart from the seed')
            return None
        return states[self.dist_info.rank]

    def _restore_rank_state(self, state: dict) -> None:
        torch.set_rng_state(state['torch'])
        random.setstate((3, tuple(state['python']), state['python_gauss_next']))
        self.mixer.load_state_dict(state['mixer'])
        if 'cuda' in state and self.dist_info.device.type == 'cuda':
            torch.cuda.set_rng_state(state['cuda'])
        if self.ema is not None and state.get('ema_bn'):
            buffers = dict(self.ema.module.named_buffers())
            for name, value in state['ema_bn'].items():
                buffers[name].copy_(value)


def _precision(options: dict) -> str:
    return f"amp {options.get('amp_dtype')}" if options.get('amp') else 'float32'


def bn_statistics(model) -> dict:
    """BatchNorm running statistics by name (the buffers --dist-bn shares), on the CPU."""
    return {name: buf.detach().cpu() for name, buf in model.named_buffers()
            if 'running_mean' in name or 'running_var' in name}


# ---- which checkpoint a start resumes from ----
def choose_resume_checkpoint(resume: Optional[str], run_dir: Path) -> Tuple[Optional[Path], List[str]]:
    """The checkpoint ``--resume`` names, and notes: a path as given, or for ``auto`` the newest readable
    state in the run folder (a mid-epoch ``interrupted`` save, ``last``, else the newest ``checkpoint-N``),
    else the other folder's checkpoint an earlier start of this run began from (run_info.yaml)."""
    if resume in (None, '', 'none'):
        return None, []
    if resume != 'auto':
        return Path(resume), []
    notes, readable = [], []
    for path in (run_dir / INTERRUPTED, run_dir / LAST):
        if path.exists():
            try:
                readable.append((resume_position(load_checkpoint(path, mmap=True)), path))
            except CheckpointError as err:
                notes.append(f'{err}; skipped')
    if readable:
        return max(readable)[1], notes
    numbered = sorted(run_dir.glob('checkpoint-*.pth.tar'), key=lambda p: int(p.stem.split('-')[1].split('.')[0]),
                      reverse=True)
    for path in numbered:
        try:
            load_checkpoint(path, mmap=True)
        except CheckpointError as err:
            notes.append(f'{err}; skipped')
            continue
        notes.append(f'falling back to {path.name}, the newest readable checkpoint')
        return path, notes
    if notes:   # checkpoints exist but none loads: never start over on top of them
        raise RunError(f'--resume auto: no checkpoint in {run_dir} can be read ({"; ".join(notes)}); fix or move '
                       f'them, or start afresh in another folder (--experiment)')
    source = _outside_source(run_dir)
    if source:   # a start from another folder's checkpoint, stopped (requeued) before it saved here
        if not source.is_file():
            raise RunError(f'--resume auto: {run_dir} holds no checkpoint, and {source}, which an earlier start '
                           f'resumed from (run_info.yaml), is gone: give --resume PATH, or --resume none to '
                           f'start afresh')
        return source, [f'{run_dir} holds no checkpoint yet: continuing from {source}, which an earlier start '
                        f'resumed from (run_info.yaml)']
    return None, notes


def _outside_source(run_dir: Path) -> Optional[Path]:
    """The other folder's checkpoint the newest start of this run resumed from, as run_info.yaml records it
    (None where that start began afresh or resumed from this folder)."""
    try:
        info = yaml.safe_load((run_dir / 'run_info.yaml').read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(info, dict):
        return None
    source = (info.get('resumes') or [info])[-1].get('from')   # the newest start's record
    return Path(source) if source and not in_folder(Path(source), run_dir) else None


def in_folder(path: Optional[Path], run_dir: Path) -> bool:
    """Whether checkpoint ``path`` lies in the run folder (its best-k ranking names this folder's files)."""
    return path is not None and Path(path).resolve().parent == Path(run_dir).resolve()


def rolls_back(resume: Optional[str], run_dir: Path) -> bool:
    """Whether ``--resume`` names a checkpoint of this run folder itself (a step back in its own history,
    e.g. to before a divergence), rather than ``auto`` or a file of another folder."""
    return resume not in (None, '', 'none', 'auto') and in_folder(Path(resume), run_dir)


def set_aside_later_states(run_dir: Path, resumed: Path) -> List[str]:
    """Move the run folder's checkpoints of epochs after ``resumed`` into ``abandoned-<time>/``: left in
    place, ``last`` would send the next ``--resume auto`` back to the abandoned epochs and ``model_best``
    would name one of them until the new history beat it. Returns a note naming what moved."""
    position = resume_position(load_checkpoint(resumed, mmap=True))
    later = []
    for path in sorted(Path(run_dir).glob('*.pth.tar')):
        try:
            if resume_position(load_checkpoint(path, mmap=True)) > position:
                later.append(path)
        except CheckpointError:
            continue   # unreadable: tidy() and the resume choice deal with it
    if not later:
        return []
    aside = Path(run_dir) / f"abandoned-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"
    aside.mkdir()
    for path in later:
        path.rename(aside / path.name)
    summary = Path(run_dir) / 'summary.csv'
    if summary.exists():   # its rows of the abandoned epochs are cut when the run goes on
        shutil.copy2(summary, aside / summary.name)
    return [f'resuming from {resumed.name}: moved the later checkpoints {", ".join(p.name for p in later)} '
            f'to {aside.name}/ with a copy of summary.csv (nothing deleted)']


def pick_checkpoint(args, run_dir: Path) -> Optional[Path]:
    """Rank 0's choice of the checkpoint to resume from (the run folder is locked). A step back in the run's
    own history sets the later epochs aside now, before the long start-up, so a preemption during it cannot
    send the requeued ``--resume auto`` back to them."""
    path, notes = choose_resume_checkpoint(args.resume, run_dir)
    if args.resume in (None, '', 'none') and any(run_dir.glob('*.pth.tar')):
        raise ConfigError(f'--resume none, but {run_dir} holds the checkpoints of an earlier run: give this '
                          f'run its own --experiment (or delete them to start this one afresh)')
    if path and rolls_back(args.resume, run_dir):
        # only once the checkpoint is this run's (options resolved later, such as num_classes, are checked
        # after the data is read)
        known = {k: v for k, v in vars(args).items() if v is not None}
        check_same_run(load_checkpoint(path, mmap=True).get('args', {}), known, path, own_folder=True)
        notes += set_aside_later_states(run_dir, path)
    for line in notes:
        _logger.info(f'note: {line}')
    return path
