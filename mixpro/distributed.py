"""torch.distributed from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); no --local_rank."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device('cpu')

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_primary(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = None) -> DistInfo:
    """Join the process group torchrun set up (NCCL on GPU, gloo on CPU), or run alone. Not timm's
    ``init_distributed_device``: that one writes its results into the options, which a checkpoint stores."""
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    rank, local_rank = int(os.environ.get('RANK', 0)), int(os.environ.get('LOCAL_RANK', 0))
    if device.type == 'cuda':
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return DistInfo(rank, world_size, local_rank, device)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` (1-d, any length per rank), concatenated in rank order on every rank (CPU)."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor.cpu()
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, tensor.cpu())
    return torch.cat(parts)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
