"""What a run writes besides checkpoints: summary.csv (timm's format), TensorBoard, console, and with
``--log-wandb`` the same scalars and pictures on Weights & Biases."""
import csv
import datetime
import io
import logging
import sys
import uuid
from pathlib import Path
from typing import Optional

from timm.utils import update_summary

from .checkpoint import atomic_write_text
from .config import ConfigError, first_line, require_wandb
from .pictures import snapshot_sheet, to_tensor

WANDB_ID_FILE = 'wandb_id.txt'
_logger = logging.getLogger(__name__)


class _ConsoleHandler(logging.StreamHandler):
    """Writes each message to the ``sys.stdout`` of the moment (a redirect or pytest's capture made after
    the setup still gets it); StreamHandler flushes after every record."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value):
        pass


class _PrimaryOnly(logging.Filter):
    """Other ranks print warnings and errors only: notes and progress once per run, not once per GPU."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or record.levelno >= logging.WARNING


def setup_logging(rank: int = 0) -> None:
    """The console output of mixpro's modules: one line per message, as written, from rank 0 (timm's
    scripts call ``setup_default_logging`` the same way). Calling it again only updates the rank."""
    package = logging.getLogger('mixpro')
    handler = next((h for h in package.handlers if isinstance(h, _ConsoleHandler)), None)
    if handler is None:
        handler = _ConsoleHandler()
        handler.setFormatter(logging.Formatter('%(message)s'))
        package.addHandler(handler)
        package.setLevel(logging.INFO)
        package.propagate = False   # a root handler (timm's setup) would print every line twice
    handler.filters = [_PrimaryOnly(rank)]


def truncate_summary(path: Path, start_epoch: int) -> None:
    """Drop summary.csv's rows of epochs that will be trained again after a resume, and a last row a kill cut
    off mid-write (no newline at its end: the next append would run on from it)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    cut = bool(lines) and not lines[-1].endswith('\n')
    rows = list(csv.DictReader(lines[:-1] if cut else lines))
    kept = [r for r in rows if r.get('epoch', '').isdigit() and int(r['epoch']) < start_epoch]
    if len(kept) == len(rows) and not cut:
        return
    text = io.StringIO(newline='')
    if kept:
        writer = csv.DictWriter(text, fieldnames=list(kept[0]))
        writer.writeheader()
        writer.writerows(kept)
    atomic_write_text(path, text.getvalue())   # rewritten whole, then renamed: never torn


def complete_summary(run_dir: Path, start_epoch: int, summary: dict) -> None:
    """summary.csv up to the epoch before ``start_epoch``, the last row written from the checkpoint's own copy
    (``summary``) where a crash came between the checkpoint and the row."""
    path = Path(run_dir) / 'summary.csv'
    truncate_summary(path, start_epoch)
    rows = csv.DictReader(path.read_text().splitlines()) if path.exists() else []
    if any(row.get('epoch') == str(start_epoch - 1) for row in rows):
        return
    update_summary(start_epoch - 1, {'loss': summary['loss']}, _summary_columns(summary['evals']), str(path),
                   lr=summary['lr'])


def _summary_columns(evals: dict) -> dict:
    """``{'eval': {'top1': ..}, 'eval_ema': {..}}`` -> summary.csv's columns (top1, ema_top1, ...)."""
    flat = {}
    for prefix, metrics in evals.items():
        tag = prefix[len('eval'):].lstrip('_')
        flat.update({(f'{tag}_{k}' if tag else k): v for k, v in metrics.items()})
    return flat


class RunLogger:
    """Primary-rank logging of one run folder."""

    def __init__(self, run_dir: Path, start_epoch: int = 0, wandb: Optional[dict] = None):
        """``wandb``: ``wandb.init`` settings (project, name, config, ...) to mirror the run there."""
        from torch.utils.tensorboard import SummaryWriter   # import here: only rank 0 needs it
        self.run_dir = Path(run_dir)
        self.summary = self.run_dir / 'summary.csv'
        self.wandb = WandbMirror(self.run_dir, **wandb) if wandb is not None else None
        truncate_summary(self.summary, start_epoch)
        # purge_step: TensorBoard hides what earlier event files logged for the epochs trained again
        self.writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=start_epoch or None)

    def log_epoch(self, epoch: int, train: dict, evals: dict, lr: float) -> None:
        """``evals`` maps a prefix (``eval``, ``eval_ema``) to ``{'loss', 'top1', 'top5'}``; values of None
        (an epoch not evaluated) leave their summary.csv cells empty and plot nothing."""
        scalars = {'train/loss': train['loss'], 'train/lr': lr, 'train/epoch_time_s': train['epoch_time_s'],
                   'train/img_per_s': train['img_per_s']}
        for key in ('data_wait_s', 'compute_s', 'peak_memory_gb'):   # where the loop measured them
            if train.get(key) is not None:
                scalars[f'train/{key}'] = train[key]
        for key in ('lam_area', 'lam_attn', 'alpha'):
            if train.get(key) is not None:
                scalars[f'mix/{key}'] = train[key]
        for prefix, metrics in evals.items():
            scalars.update({f'{prefix}/{name}': value for name, value in metrics.items() if value is not None})
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, epoch)
        self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(epoch, scalars)
        update_summary(epoch, {'loss': train['loss']}, _summary_columns(evals), str(self.summary), lr=lr)

    def log_images(self, epoch: int, snapshot: dict, mean, std, class_names=None) -> None:
        """The first mixed images of the epoch with their labels, λ and class attention (mix_snapshot)."""
        sheet = snapshot_sheet(snapshot, mean, std, class_names)
        self.writer.add_image('mix/samples', to_tensor(sheet), epoch)
        if self.wandb is not None:
            self.wandb.log_image(epoch, 'mix/samples', sheet)

    def close(self, failed: bool = False) -> None:
        """``failed``: the run ends with an exception (W&B then marks it failed, not finished)."""
        self.writer.close()
        if self.wandb is not None:
            self.wandb.close(failed)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, _exc, _tb) -> None:
        self.close(failed=exc_type is not None)


class WandbMirror:
    """The epoch scalars and mix pictures on Weights & Biases (``--log-wandb``; the package is optional).

    One W&B run per run folder: its id is kept in ``wandb_id.txt``, so a resumed or requeued run goes on
    logging into the same W&B run. Points are plotted against ``epoch`` (a metric, not W&B's step, which
    must only grow): an epoch trained again after a crash adds a second point at that epoch, nothing is
    refused. Offline clusters: ``WANDB_MODE=offline``, then ``wandb sync`` the run folder's ``wandb/``."""

    def __init__(self, run_dir: Path, **settings):
        require_wandb()
        import wandb
        self._wandb = wandb
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else ''
        if not run_id:
            run_id = uuid.uuid4().hex[:12]
            atomic_write_text(id_file, run_id + '\n')
        try:
            self.run = wandb.init(id=run_id, resume='allow', dir=str(run_dir), **settings)
        except Exception as err:   # not logged in, no network, ...: stop before training, not inside it
            reason = first_line(err)
            raise ConfigError(f'--log-wandb: W&B did not start: {reason} (wandb login, or WANDB_MODE=offline '
                              f'and wandb sync later)') from err
        self.run.define_metric('epoch')
        for prefix in ('train', 'mix', 'eval', 'eval_ema'):   # W&B globs need a prefix
            self.run.define_metric(f'{prefix}/*', step_metric='epoch')

    def log(self, epoch: int, scalars: dict) -> None:
        self.run.log({'epoch': epoch, **scalars})

    def log_image(self, epoch: int, tag: str, picture) -> None:
        self.run.log({'epoch': epoch, tag: self._wandb.Image(picture)})

    def close(self, failed: bool = False) -> None:
        try:
            self.run.finish(exit_code=1 if failed else 0)
        except Exception as err:   # W&B's own trouble must not hide the run's error or keep its lock
            _logger.info(f'note: W&B did not close cleanly: {err}')


def format_eta(seconds: Optional[float]) -> str:
    return str(datetime.timedelta(seconds=int(seconds or 0)))
