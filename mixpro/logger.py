"""What a run writes besides checkpoints: summary.csv (timm's format), TensorBoard, console."""
import csv
import io
from pathlib import Path
from typing import Optional

from timm.utils import update_summary

from .checkpoint import atomic_write_text
from .pictures import snapshot_sheet, to_tensor


class RunLogger:
    """Primary-rank logging of one run folder."""

    def __init__(self, run_dir: Path, start_epoch: int = 0):
        from torch.utils.tensorboard import SummaryWriter   # import here: only rank 0 needs it
        self.run_dir = Path(run_dir)
        self.summary = self.run_dir / 'summary.csv'
        self._truncate_summary(start_epoch)
        # purge_step: TensorBoard hides what earlier event files logged for the epochs trained again
        self.writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=start_epoch or None)

    def _truncate_summary(self, start_epoch: int) -> None:
        """Drop rows of epochs that will be trained again after a resume."""
        if not self.summary.exists():
            return
        with self.summary.open() as f:
            rows = list(csv.DictReader(f))
        kept = [r for r in rows if int(r['epoch']) < start_epoch]
        if len(kept) == len(rows):
            return
        text = io.StringIO(newline='')
        if kept:
            writer = csv.DictWriter(text, fieldnames=list(kept[0]))
            writer.writeheader()
            writer.writerows(kept)
        atomic_write_text(self.summary, text.getvalue())   # rewritten whole, then renamed: never torn

    def log_epoch(self, epoch: int, train: dict, evals: dict, lr: float) -> None:
        """``evals`` maps a prefix (``eval``, ``eval_ema``) to ``{'loss', 'top1', 'top5'}``."""
        w = self.writer
        w.add_scalar('train/loss', train['loss'], epoch)
        w.add_scalar('train/lr', lr, epoch)
        w.add_scalar('train/epoch_time_s', train['epoch_time_s'], epoch)
        w.add_scalar('train/img_per_s', train['img_per_s'], epoch)
        for key in ('data_wait_s', 'compute_s', 'peak_memory_gb'):   # where the loop measured them
            if train.get(key) is not None:
                w.add_scalar(f'train/{key}', train[key], epoch)
        for key in ('lam_area', 'lam_attn', 'alpha'):
            if train.get(key) is not None:
                w.add_scalar(f'mix/{key}', train[key], epoch)
        for prefix, metrics in evals.items():
            for name, value in metrics.items():
                w.add_scalar(f'{prefix}/{name}', value, epoch)
        w.flush()
        flat = {}
        for prefix, metrics in evals.items():
            tag = prefix[len('eval'):].lstrip('_')
            flat.update({(f'{tag}_{k}' if tag else k): v for k, v in metrics.items()})
        update_summary(epoch, {'loss': train['loss']}, flat, str(self.summary), lr=lr)

    def log_images(self, epoch: int, snapshot: dict, mean, std, class_names=None) -> None:
        """The first mixed images of the epoch with their labels, λ and class attention (mix_snapshot)."""
        self.writer.add_image('mix/samples', to_tensor(snapshot_sheet(snapshot, mean, std, class_names)), epoch)

    def close(self) -> None:
        self.writer.close()


def format_eta(seconds: Optional[float]) -> str:
    seconds = int(seconds or 0)
    return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'
