"""Datasets and loaders from timm's parts, ImageFolder layout ``<data_dir>/{train,val}/<class>/*``."""
from pathlib import Path

import torch
from timm.data import create_dataset, create_loader, create_transform

from .distributed import DistInfo


class ShardSampler(torch.utils.data.Sampler):
    """Every ``world_size``-th index from ``rank``: each sample on exactly one rank, no padding, so
    metrics summed over ranks count every validation image exactly once."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = range(rank, length, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def image_folder(data_dir: str, split: str, is_training: bool):
    root = Path(data_dir) / split
    if not root.is_dir():
        raise FileNotFoundError(f'{root} does not exist: --data-dir must hold {split}/<class>/<images> '
                                f'(run scripts/prepare_digits.py for the built-in dataset)')
    dataset = create_dataset('', root=str(Path(data_dir)), split=split, is_training=is_training)
    if len(dataset) == 0:
        raise ValueError(f'{root} holds no images')
    return dataset


def num_classes_of(dataset) -> int:
    return len(dataset.reader.class_to_idx)


def train_loader(dataset, data_config: dict, args, dist_info: DistInfo):
    """timm's training loader: augmentation, random erasing, repeated-aug / distributed sampler."""
    aug_repeats = args.aug_repeats
    if aug_repeats and not dist_info.distributed:
        # timm's repeated-augmentation sampler spreads the copies over ranks: it needs DDP
        print(f'aug_repeats={aug_repeats} needs more than one process (torchrun); training without it',
              flush=True)
        aug_repeats = 0
    return create_loader(
        dataset, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=True,
        re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, scale=args.scale, ratio=args.ratio,
        hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa,
        num_aug_repeats=aug_repeats, interpolation=args.train_interpolation,
        mean=data_config['mean'], std=data_config['std'], num_workers=args.workers,
        distributed=dist_info.distributed, pin_memory=args.pin_mem, device=dist_info.device,
        use_prefetcher=dist_info.device.type == 'cuda', persistent_workers=args.workers > 0)


def eval_loader(dataset, data_config: dict, batch_size: int, workers: int, dist_info: DistInfo, pin_mem=False):
    """Deterministic eval loader; under DDP each rank reads a disjoint shard (see ShardSampler)."""
    dataset.transform = create_transform(
        data_config['input_size'], is_training=False, interpolation=data_config['interpolation'],
        mean=data_config['mean'], std=data_config['std'], crop_pct=data_config['crop_pct'])
    sampler = ShardSampler(len(dataset), dist_info.rank, dist_info.world_size)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                       num_workers=workers, pin_memory=pin_mem)
