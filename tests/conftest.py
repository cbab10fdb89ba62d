import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


def source_coded_batch(batch: int, size: int) -> torch.Tensor:
    """Images whose every pixel says which sample it belongs to: image b is the constant b + 1."""
    return (torch.arange(batch, dtype=torch.float32) + 1).view(batch, 1, 1, 1).expand(batch, 3, size, size).clone()
