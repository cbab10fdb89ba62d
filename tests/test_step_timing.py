"""The train step's clock: time blocked in the loader (data wait) against the rest (compute)."""
import re
import time

import torch
from timm.loss import SoftTargetCrossEntropy

from mixpro import Mixer
from mixpro.engine import EpochMonitor, TrainStep, train_one_epoch


class SlowLoader:
    """Four batches, each ``delay`` seconds late, like a loader the model outruns."""

    def __init__(self, delay):
        self.delay = delay

    def __len__(self):
        return 4

    def __iter__(self):
        for _ in range(4):
            time.sleep(self.delay)
            yield torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))


class SlowModel(torch.nn.Module):
    """A linear classifier whose forward takes ``delay`` seconds: compute the loader does not see."""

    def __init__(self, delay):
        super().__init__()
        self.delay, self.fc = delay, torch.nn.Linear(3 * 8 * 8, 3)

    def forward(self, x):
        time.sleep(self.delay)
        return self.fc(x.flatten(1))


class NoSchedule:
    def step_update(self, num_updates):
        pass


def run_epoch(data_delay, compute_delay):
    model, device = SlowModel(compute_delay), torch.device('cpu')
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = TrainStep(model, optimizer, SoftTargetCrossEntropy(), Mixer('mixup_cutmix', num_classes=3, seed=0),
                     device=device, scheduler=NoSchedule())
    monitor = EpochMonitor(0, 4, optimizer, device=device, log_interval=2)
    return train_one_epoch(step, SlowLoader(data_delay), monitor)


def test_data_wait_and_compute_are_logged_and_returned(capsys):
    metrics = run_epoch(data_delay=0.05, compute_delay=0.0)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('epoch 0 [')]
    assert len(lines) == 2
    for line in lines:
        data, compute = map(float, re.search(r'data ([\d.]+) ms compute ([\d.]+) ms', line).groups())
        assert data >= 45 and compute >= 0, line             # an input-bound epoch says so
        assert ' GB' not in line                             # peak memory only on CUDA
    assert metrics['data_wait_s'] >= 4 * 0.045
    assert metrics['compute_s'] >= 0 and metrics['peak_memory_gb'] is None
    assert abs(metrics['data_wait_s'] + metrics['compute_s'] - metrics['epoch_time_s']) < 0.05


def test_a_compute_bound_epoch_shows_little_data_wait(capsys):
    metrics = run_epoch(data_delay=0.0, compute_delay=0.05)
    line = [line for line in capsys.readouterr().out.splitlines() if line.startswith('epoch 0 [')][-1]
    data, compute = map(float, re.search(r'data ([\d.]+) ms compute ([\d.]+) ms', line).groups())
    assert compute >= 45 and data < 25
    assert metrics['compute_s'] >= 4 * 0.045 and metrics['data_wait_s'] < 0.1
