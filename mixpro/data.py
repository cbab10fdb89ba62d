"""Datasets and loaders from timm's parts: the ImageFolder layout ``<data_dir>/{train,val}/<class>/*``, or a
timm dataset name (``--dataset torch/cifar100``, ``hfds/<name>``, ``wds/<name>``) read under ``--data-dir``.

Both splits use one class index, train's (or ``--class-map``'s), so a class missing from val, an empty
folder or a stray file can never shift the labels of the other split.

Training order and augmentation are a pure function of (seed, rank, epoch, position in the epoch): each
sample's augmentation is seeded on its own, so a resumed run, even one resumed in the middle of an
epoch and with data-loading workers, sees exactly the images an uninterrupted run sees.

WebDataset shards (``wds/``) are a stream, read by timm's ``ReaderWds``: shards are dealt to processes and
their loader workers, an epoch has a known number of steps (``num_samples`` from ``_info.json``), a run
stopped mid-epoch redoes that epoch from its first step, and evaluation deals whole shards to the ranks so
that every image is counted exactly once.
"""
import atexit
import dataclasses
import importlib.util
import logging
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.util  # noqa: F401  (its exit hook, registered before ours)
import os
import random
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from timm.data import create_dataset, create_transform
from timm.data.auto_augment import RandAugment
from torchvision import transforms
from timm.data.distributed_sampler import RepeatAugSampler
from timm.data.readers.img_extensions import get_img_extensions
from timm.data.loader import PrefetchLoader, fast_collate
from timm.data.readers.class_map import load_class_map
from timm.utils.misc import natural_key

from .config import ConfigError, first_line
from .distributed import DistInfo
from .skipped import measured, name_skipped_files
from .tensor_augment import RandAugmentParams, unsupported_reason
from .tensor_data import DeviceAugmentLoader, TensorEvalTransform, TensorTrainTransform, read_as_tensors, tensor_collate

_IMAGE_EXTENSIONS = get_img_extensions(as_set=True)

_logger = logging.getLogger(__name__)


def _split_root(data_dir: str, split: str) -> Path:
    root = Path(data_dir) / split
    if not root.is_dir():
        raise FileNotFoundError(f'{root} does not exist: --data-dir must hold {split}/<class>/<images> '
                                f'(run scripts/prepare_digits.py for the built-in dataset)')
    return root


def _has_image(folder: str) -> bool:
    with os.scandir(folder) as entries:   # d_type, no stat per file: cheap on a 1.3M-image train split
        return any(e.is_file() and os.path.splitext(e.name)[1].lower() in _IMAGE_EXTENSIONS for e in entries)


def _class_folders(root: Path) -> List[str]:
    """Class folders of a split, checked: none empty; images lying directly in the split are no class."""
    with os.scandir(root) as entries:
        entries = list(entries)
    folders = sorted((e.name for e in entries if e.is_dir() and not e.name.startswith('.')), key=natural_key)
    empty = [name for name in folders if not _has_image(os.path.join(root, name))]
    if empty:
        listed = ', '.join(str(root / name) for name in empty[:5]) + (' …' if len(empty) > 5 else '')
        raise ConfigError(f'class folder {listed} holds no images (images must lie directly inside '
                          f'{root}/<class>/): fill or remove it')
    stray = sum(1 for e in entries if e.is_file() and os.path.splitext(e.name)[1].lower() in _IMAGE_EXTENSIONS)
    if stray:
        _logger.info(f'note: {stray} image(s) directly in {root} belong to no class folder and are not used')
    return folders


def _read_class_map(class_map: str, data_dir: str, root: Path, folders: List[str]) -> Dict[str, int]:
    """timm's class-map file (.txt: one class folder name per line, line number = label)."""
    try:
        mapping = load_class_map(class_map, str(Path(data_dir)))
    except (AssertionError, OSError, ValueError) as err:
        raise ConfigError(f'--class-map {class_map} cannot be read: {err}') from err
    missing = [name for name in mapping if name not in folders]
    if missing:
        raise ConfigError(f'--class-map {class_map} names {len(missing)} class(es) with no folder in {root}, '
                          f'e.g. {missing[0]!r}')
    unused = [name for name in folders if name not in mapping]
    if unused:
        _logger.info(f'note: {len(unused)} class folder(s) of {root} are not in --class-map and are not used, '
                     f'e.g. {unused[0]!r}')
    return dict(mapping)


def image_folder(data_dir: str, split: str, is_training: bool, class_to_idx: Optional[Dict[str, int]] = None,
                 class_map: str = '', select: bool = False):
    """An ImageFolder split. Labels: ``class_to_idx`` when given (val takes train's; a class folder it does
    not know is an error naming it, unless ``select``: then it reads only the folders ``class_to_idx``
    names), else ``class_map``, else the split's naturally sorted class folders (timm's order).
    ``dataset.reader.class_to_idx`` holds the index used."""
    root = _split_root(data_dir, split)
    folders = _class_folders(root)
    if class_to_idx is None:
        class_to_idx = (_read_class_map(class_map, data_dir, root, folders) if class_map
                        else {name: i for i, name in enumerate(folders)})
    else:
        unknown = [name for name in folders if name not in class_to_idx]
        if unknown and class_map:   # a class map may select a subset of the folders: the rest are unused
            _logger.info(f'note: {len(unknown)} class folder(s) of {root} are not in --class-map and are not used')
        elif unknown and not select:
            raise ConfigError(f'{root} has class folder(s) that the model\'s classes (its training classes, or '
                              f'--class-map) do not have: {", ".join(unknown[:5])}; every {split} class must be '
                              f'one of them')
    dataset = create_dataset('', root=str(Path(data_dir)), split=split, is_training=is_training,
                             class_map=dict(class_to_idx))
    if len(dataset) == 0:
        raise ConfigError(f'{root} holds no images')
    return name_skipped_files(dataset)


# timm dataset prefixes read as streams that this trainer does not take: resuming mid-epoch and exact DDP
# evaluation need either random access or, as wds/ gives, whole shards dealt out by this code
_STREAMING = ('tfds', 'hfids')
_PACKAGES = {'hfds': 'datasets', 'wds': 'webdataset'}   # prefix -> the package timm's reader imports
_WDS_INFO = ('_info.json', 'info.json')   # the files timm's ReaderWds reads the splits from


def named_dataset(name: str, data_dir: str, split: str, is_training: bool, download: bool = False,
                  class_to_idx: Optional[Dict[str, int]] = None, num_classes: Optional[int] = None,
                  batch_size: int = 1, seed: int = 42):
    """A timm dataset by name (``torch/cifar100``, ``hfds/<name>``, ``wds/<name>``, ...) under ``data_dir``.
    ``class_to_idx``, ``num_classes``, ``batch_size`` and ``seed`` matter to ``wds/`` only."""
    prefix = name.partition('/')[0].lower()
    if prefix in _STREAMING:
        raise ConfigError(f'--dataset {name}: streaming datasets ({", ".join(p + "/" for p in _STREAMING)}) are '
                          f'not supported (resuming mid-epoch and exact DDP evaluation need random access or '
                          f'whole shards); use an ImageFolder, a torch/ dataset, hfds/ or wds/')
    package = _PACKAGES.get(prefix)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"--dataset {name} needs the '{package}' package: pip install {package}")
    if prefix == 'wds':
        return webdataset(name, data_dir, split, is_training, class_to_idx, num_classes, batch_size, seed)
    if not download:   # Hugging Face readers would fetch what is not cached: nothing is downloaded unless asked
        os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
        os.environ.setdefault('HF_HUB_OFFLINE', '1')
    try:
        dataset = create_dataset(name, root=data_dir, split=split, is_training=is_training, download=download)
    except (AssertionError, RuntimeError, OSError, ValueError) as err:
        unknown = 'Unknown torchvision dataset' in str(err)   # no download can help: the name is wrong
        hint = '' if download or prefix != 'torch' or unknown else ' (--dataset-download fetches it into --data-dir)'
        raise ConfigError(f'--dataset {name} ({split}) under {data_dir}: {first_line(err)}{hint}') from err
    if len(dataset) == 0:
        raise ConfigError(f'--dataset {name} ({split}) under {data_dir} holds no images')
    return dataset


def _is_shard_pattern(split: str) -> bool:
    """timm's rule: a split naming tar files (``train-{0000..0009}.tar|N``) instead of an _info.json split."""
    return 'tar' in split or '..' in split


def webdataset(name: str, data_dir: str, split: str, is_training: bool,
               class_to_idx: Optional[Dict[str, int]] = None, num_classes: Optional[int] = None,
               batch_size: int = 1, seed: int = 42):
    """WebDataset shards through timm's ``ReaderWds``: ``<data_dir>/_info.json`` lists each split's shards,
    ``num_samples`` and ``shard_lengths`` (or ``split`` is a shard pattern, ``train-{0000..0009}.tar|N``).
    Labels are the samples' ``.cls`` integers; ``class_to_idx`` is the one given (val: train's, validate:
    the checkpoint's), else ``classes`` (names in label order) or ``num_classes`` from the _info file, else
    ``num_classes`` (``--num-classes``). ``dataset.num_images`` is the split's declared size (None: unknown)."""
    from timm.data.readers import reader_wds
    if reader_wds.wds is None:   # installed, but timm's reader could not import what it needs from it
        raise ConfigError(f'--dataset {name}: timm cannot use the installed webdataset package '
                          f'(pip install -U webdataset)')
    where = f'--dataset {name} ({split}) under {data_dir}'
    local = '://' not in data_dir and not data_dir.startswith('pipe:')
    if local and not os.path.isdir(data_dir):
        raise ConfigError(f'{where}: {data_dir} is not a folder (--data-dir: the folder of the shards and _info.json)')
    if local and not _is_shard_pattern(split) and not any(os.path.isfile(os.path.join(data_dir, f)) for f in _WDS_INFO):
        raise ConfigError(f"{where}: no _info.json in {data_dir} to say which shards make split '{split}' (see "
                          f"README, Your own data), or give the split as a shard pattern 'train-{{0000..0009}}.tar|N'")
    try:
        dataset = create_dataset(name, root=data_dir, split=split, is_training=is_training,
                                 batch_size=batch_size, seed=seed)
    except KeyError as err:   # timm reads a split's name, num_samples, filenames and shard_lengths unchecked
        raise ConfigError(f"{where}: split '{split}' of the _info file has no {err} (timm's ReaderWds needs name, "
                          f'num_samples, filenames and shard_lengths)') from err
    except (AssertionError, RuntimeError, OSError, ValueError, TypeError) as err:
        reason = first_line(err)
        if 'num_samples not specified' in reason:
            reason = ('the number of training samples is unknown, so an epoch has no length: give num_samples in '
                      "the _info file's split, or end the shard pattern with |N")
        elif 'not found in info' in reason:
            reason += ': name another split (--train-split / --val-split, validate.py --split)'
        raise ConfigError(f'{where}: {reason}') from err
    reader = dataset.reader
    shards = [os.path.join(data_dir, f) for f in reader.split_info.filenames]
    if not shards:
        raise ConfigError(f'{where}: the split lists no shards')
    missing = [f for f in shards if local and not os.path.isfile(f)]
    if missing:
        raise ConfigError(f'{where}: {len(missing)} of its {len(shards)} shards are missing, e.g. {missing[0]}')
    reader.class_to_idx = _wds_class_index(where, reader.info, class_to_idx, num_classes)
    dataset.num_images = reader.num_samples or None
    return dataset


def _wds_class_index(where: str, info: dict, class_to_idx, num_classes) -> Dict[str, int]:
    """The class index of a wds/ split (its labels are the samples' .cls integers; see webdataset())."""
    names, count = info.get('classes'), info.get('num_classes')
    declared = None
    if names is not None:
        if not isinstance(names, list) or (count is not None and count != len(names)):
            raise ConfigError(f"{where}: the _info file's classes must be a list of names in label order"
                              + (f' ({len(names)} names, num_classes {count})' if isinstance(names, list) else ''))
        declared = {str(n): i for i, n in enumerate(names)}
    elif count is not None:
        declared = {str(i): i for i in range(int(count))}
    if class_to_idx is not None:
        if declared is not None and declared != dict(class_to_idx):
            raise ConfigError(f'{where}: its classes differ from the ones the model was trained with '
                              f'({len(declared)} vs {len(class_to_idx)}, or other names / order): its labels '
                              f'would mean other classes')
        return dict(class_to_idx)
    if declared is not None:
        return declared
    if num_classes:
        return {str(i): i for i in range(num_classes)}
    raise ConfigError(f"{where}: the number of classes is unknown: put num_classes (or classes, the names in "
                      f"label order) in the _info file, or give --num-classes")


def build_dataset(data_dir: str, split: str, is_training: bool, *, dataset: str = '', class_map: str = '',
                  download: bool = False, class_to_idx: Optional[Dict[str, int]] = None,
                  num_classes: Optional[int] = None, batch_size: int = 1, seed: int = 42):
    """``dataset`` (a timm dataset name) when given, else the ImageFolder under ``data_dir`` (val with
    train's class index); ``num_classes``, ``batch_size`` and ``seed`` are for wds/ streams."""
    if dataset:
        if class_map:   # timm's other readers label by their own classes
            how = ("by the samples' .cls integers (class names: _info.json's classes)"
                   if dataset.lower().startswith('wds/') else 'by its own classes')
            raise ConfigError(f'--class-map names ImageFolder class folders; --dataset {dataset} is '
                              f'labelled {how}')
        return named_dataset(dataset, data_dir, split, is_training, download, class_to_idx=class_to_idx,
                             num_classes=num_classes, batch_size=batch_size, seed=seed)
    return image_folder(data_dir, split, is_training, class_to_idx, class_map)


def is_stream(dataset) -> bool:
    """Read in order as a stream (wds/): no random access, no skipping to a batch."""
    return isinstance(dataset, torch.utils.data.IterableDataset)


def dataset_size(dataset) -> Optional[int]:
    """Number of images of a split; for a stream its declared size (None: not declared)."""
    return getattr(dataset, 'num_images', None) if is_stream(dataset) else len(dataset)


def class_index_of(dataset) -> Dict[str, int]:
    """``{class name: label}`` of an ImageFolder, a torchvision or a Hugging Face dataset."""
    reader = getattr(dataset, 'reader', None)
    mapping = getattr(reader, 'class_to_idx', None) or getattr(dataset, 'class_to_idx', None)
    if mapping:
        return dict(mapping)
    return {str(name): i for i, name in enumerate(getattr(dataset, 'classes', []))}


def num_classes_of(dataset) -> int:
    return len(class_index_of(dataset))


class ToRGB:
    """torchvision datasets hand over their own image mode (FashionMNIST: 'L'); timm's transforms and the
    models expect RGB, as timm's ImageFolder reader gives."""

    def __call__(self, img):
        return img.convert('RGB')


def _with_rgb(dataset, transform):
    return transform if hasattr(dataset, 'reader') else transforms.Compose([ToRGB(), transform])


class ShardSampler(torch.utils.data.Sampler):
    """Every ``world_size``-th index from ``rank``: each sample on exactly one rank, no padding, so
    metrics summed over ranks count every validation image exactly once."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = range(rank, length, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class EpochSampler(torch.utils.data.Sampler):
    """This rank's ``(index, augmentation seed)`` pairs for one epoch, from ``set_epoch(epoch, start_batch)``.

    The order comes from ``order`` (timm's / torch's distributed samplers, seeded by the epoch); the seeds
    from (seed, rank, epoch). ``start_batch`` skips the batches a preempted run already trained on,
    without loading them."""

    def __init__(self, order, batch_size: int, seed: int, rank: int):
        self.order, self.batch_size, self.seed, self.rank = order, batch_size, seed, rank
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.skip = epoch, start_batch * self.batch_size
        self.order.set_epoch(epoch)

    def __iter__(self):
        indices = list(self.order)
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_009 + self.rank)
        seeds = torch.randint(2 ** 62, (len(indices),), generator=generator).tolist()
        return iter(list(zip(indices, seeds))[self.skip:])

    def __len__(self):
        return max(len(self.order) - self.skip, 0)


class SeededSamples(torch.utils.data.Dataset):
    """Reads ``(index, seed)`` keys: the sample's augmentation draws from python, numpy and torch
    generators seeded with ``seed``; the caller's random state is left as it was."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        with _seeded(seed):
            return self.dataset[index]


@contextmanager
def _seeded(seed: int):
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


def _ignore_stop_signals(_worker_id: int) -> None:
    """Data-loading workers ignore the stop signals (a cluster sends them to every process of the job):
    the training process decides when to stop and ends its workers itself; a worker killed by one would
    crash the run instead. So that a worker does not outlive a training process killed outright (SIGKILL,
    a crash), it exits when that process is gone (torch's own watchdog watches the forkserver instead)."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    trainer = multiprocessing.parent_process()
    if trainer is not None:
        threading.Thread(target=_exit_after, args=(trainer,), daemon=True).start()


def _exit_after(process) -> None:
    process.join()
    os._exit(0)


def stop_workers(*loaders) -> None:
    """End the persistent worker processes of these loaders (None is skipped) now. The workers ignore the
    stop signals, so they must be ended by their loader: after an exception the traceback keeps the loaders
    alive, and the interpreter's exit (multiprocessing sends its daemon children SIGTERM, then joins them)
    would wait for them forever, holding the job's GPUs until its time limit."""
    for loader in loaders:
        loader = getattr(loader, 'loader', loader)          # timm's PrefetchLoader wraps the DataLoader
        iterator = getattr(loader, '_iterator', None)        # where torch keeps persistent workers (private)
        if iterator is not None and hasattr(iterator, '_shutdown_workers'):
            iterator._shutdown_workers()
            loader._iterator = None


def _worker_options(workers: int, pin_memory: bool, device) -> dict:
    """DataLoader worker settings shared by both loaders. Workers are started once (persistent) from a
    forkserver: forking the training process, which runs threads (TensorBoard's writer, the loaders'
    feeders, gloo), can deadlock the child (seen with CPython 3.11 under torchrun). Worker seeds come from
    a private generator: starting workers must not draw from the training process's random stream."""
    options = dict(num_workers=workers, pin_memory=pin_memory and device.type == 'cuda',
                   worker_init_fn=_ignore_stop_signals, generator=torch.Generator())
    if workers > 0:
        _start_forkserver()
        options.update(persistent_workers=True, multiprocessing_context=_FORKSERVER)
    return options


def _data_loader(dataset, workers: int, pin_memory: bool, device, **options) -> torch.utils.data.DataLoader:
    """A DataLoader with this module's worker settings."""
    return torch.utils.data.DataLoader(dataset, **options, **_worker_options(workers, pin_memory, device))


def _kill_workers_at_exit() -> None:
    """The workers ignore SIGTERM and SIGINT, so the interpreter's exit, which sends its daemon children
    SIGTERM and joins them, would wait forever on workers still running then (a script holding a loader or
    its iterator, a run stopped by Ctrl-C, a worker stuck on a file system). atexit runs the hooks
    registered last first, and multiprocessing registered its own when it was first imported."""
    for child in multiprocessing.active_children():
        if isinstance(child, _FORKSERVER.Process):   # only the loaders' workers start from the forkserver
            child.kill()
            child.join(timeout=5)


_FORKSERVER = multiprocessing.get_context('forkserver')
atexit.register(_kill_workers_at_exit)
_FORKSERVER.set_forkserver_preload(['mixpro.data'])   # torch and timm imported once, in the server
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)   # StopRequest.SIGNALS (a Ctrl-C reaches all)


def _start_forkserver() -> None:
    """Start the forkserver with the stop signals ignored (the setting survives its exec): a cluster
    signals every process of the job, and a dead forkserver takes every loader's workers with it."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _STOP_SIGNALS}
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train_loader(dataset, data_config: dict, args, dist_info: DistInfo):
    """timm's training transforms, random erasing and repeated-aug / distributed order, with the
    resumable ``EpochSampler``. ``--data-backend pillow``: timm's Pillow transforms in the workers (on CUDA
    ``DeviceAugmentLoader`` normalises and erases on the device, as timm's prefetcher does); ``tensor``: the
    workers decode, crop and flip uint8 tensors and draw RandAugment's parameters, the device augments."""
    aug_repeats = args.aug_repeats
    if aug_repeats and not dist_info.distributed:
        # timm's repeated-augmentation sampler spreads the copies over ranks: it needs DDP
        _logger.info(f'note: --aug-repeats {aug_repeats} needs more than one process (torchrun); training without it')
        aug_repeats = 0
    if aug_repeats and is_stream(dataset):
        _logger.info(f'note: --aug-repeats {aug_repeats} needs random access to the images; --dataset '
                     f'{args.dataset} is a stream: training without it')
        aug_repeats = 0
    prefetch = dist_info.device.type == 'cuda'
    transform = create_transform(
        data_config['input_size'], is_training=True, scale=args.scale, ratio=args.ratio, hflip=args.hflip,
        vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa,
        interpolation=args.train_interpolation, mean=data_config['mean'], std=data_config['std'],
        re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, use_prefetcher=prefetch)
    if args.data_backend == 'tensor':
        aug_params, why = _tensor_aug_params(args, transform)
        if why:
            _logger.info(f'note: --data-backend tensor cannot train with {why}; training with pillow')
            args.data_backend = 'pillow'   # what the run trains with, as config.yaml records it
    tensor = args.data_backend == 'tensor'
    if tensor:
        read_as_tensors(dataset)
        dataset.transform = TensorTrainTransform(
            data_config['input_size'], scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip,
            interpolation=args.train_interpolation, aug_params=aug_params)
        collate = tensor_collate
    else:
        dataset.transform = _with_rgb(dataset, transform)
        collate = fast_collate if prefetch else None
    if is_stream(dataset):
        loader = _stream_train_loader(dataset, args, dist_info, collate)
    else:
        loader = _indexed_train_loader(dataset, args, dist_info, collate, aug_repeats)
    if tensor or prefetch:   # not timm's PrefetchLoader: its erasing one batch ahead would move the RNG
        return DeviceAugmentLoader(loader, data_config['mean'], data_config['std'], dist_info.device,   # state a
                                   re_prob=args.reprob, re_mode=args.remode, re_count=args.recount)    # save keeps
    return loader


def _rand_augment_of(transform):
    """timm's RandAugment inside its train transform (None without one): parsed and set up by timm itself."""
    return next((t for t in getattr(transform, 'transforms', []) if isinstance(t, RandAugment)), None)


def _tensor_aug_params(args, transform):
    """(the RandAugment parameter sampler for the tensor backend, None without --aa; why the tensor backend
    cannot train these options, None where it can)."""
    if args.dataset:
        return None, f'--dataset {args.dataset}: it reads ImageFolder files'
    if args.color_jitter and not (args.aa and '3a' not in args.aa):   # timm jitters colour without RandAugment
        return None, f'--color-jitter {args.color_jitter} (colour jitter runs on Pillow only)'
    if not args.aa:
        return None, None
    rand_augment = _rand_augment_of(transform)
    if rand_augment is None:   # AugMix, AutoAugment
        return None, f'--aa {args.aa}: {unsupported_reason(args.aa) or "not a RandAugment policy"}'
    try:
        return RandAugmentParams(rand_augment), None
    except ValueError as err:   # an op without a device version
        return None, f'--aa {args.aa}: {err}'


def _indexed_train_loader(dataset, args, dist_info: DistInfo, collate, aug_repeats: int):
    if aug_repeats:
        order = RepeatAugSampler(dataset, num_replicas=dist_info.world_size, rank=dist_info.rank,
                                 num_repeats=aug_repeats)
    else:
        order = torch.utils.data.distributed.DistributedSampler(
            dataset, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=True, seed=args.seed)
    sampler = EpochSampler(order, args.batch_size, args.seed, dist_info.rank)
    return _data_loader(SeededSamples(dataset), args.workers, args.pin_mem, dist_info.device,
                        batch_size=args.batch_size, sampler=sampler, drop_last=True, collate_fn=collate)


def _stream_train_loader(dataset, args, dist_info: DistInfo, collate):
    """timm's ReaderWds deals the shards, reshuffled every epoch (``set_loader_epoch``), to the
    world_size x workers readers; each reader yields the same whole number of batches (repeating or cutting
    its shards: timm's ``with_epoch``), so every rank has ``len(loader)`` batches. A reader without a shard
    would yield nothing: there must be a shard per rank, and workers beyond that are not started."""
    reader = dataset.reader
    shards, world = len(reader.split_info.filenames), dist_info.world_size
    if shards < world:
        raise ConfigError(f'--dataset {args.dataset} ({args.train_split}) has {shards} shard(s) for {world} '
                          f'processes: each process reads whole shards, so write at least {world} of them')
    workers = min(args.workers, shards // world)
    if workers < args.workers:
        _logger.info(f'note: {shards} training shard(s) over {world} process(es) feed {workers} loader workers '
                     f'per process, not {args.workers} (each worker reads whole shards)')
    reader.dist_rank, reader.dist_num_replicas = dist_info.rank, world   # as this run's DistInfo says
    reader.batch_size = args.batch_size
    _prepare_stream(dataset, workers)
    return _data_loader(dataset, workers, args.pin_mem, dist_info.device, batch_size=args.batch_size,
                        drop_last=True, collate_fn=collate)


def set_loader_epoch(loader, epoch: int, start_batch: int = 0) -> None:
    """Prepare a training loader for ``epoch``, from batch ``start_batch`` (0 for a stream: see is_stream)."""
    if is_stream(loader.dataset):
        if start_batch:
            raise ValueError('a stream cannot skip to a batch: redo the epoch from its start')
        loader.dataset.set_epoch(epoch)
    else:
        loader.sampler.set_epoch(epoch, start_batch)


def eval_loader(dataset, data_config: dict, batch_size: int, workers: int, dist_info: DistInfo, pin_mem=False,
                prefetch: Optional[bool] = None, data_backend: str = 'pillow'):
    """Deterministic eval loader; under DDP each rank reads a disjoint shard (see ShardSampler). With
    ``prefetch`` (default: on CUDA, and always for the tensor backend) workers hand over uint8 images and
    timm's prefetcher normalises them on the device while the previous batch is evaluated, as in training.
    ``data_backend`` tensor: torch decodes, resizes and centre-crops the files of an ImageFolder."""
    tensor = data_backend == 'tensor'   # the callers ask for it for ImageFolder data only, as training does
    prefetch = tensor or (dist_info.device.type == 'cuda' if prefetch is None else prefetch)
    if tensor:
        read_as_tensors(dataset)
        dataset.transform = TensorEvalTransform(data_config['input_size'], data_config['crop_pct'],
                                                data_config['interpolation'])
    else:
        dataset.transform = _with_rgb(dataset, create_transform(
            data_config['input_size'], is_training=False, interpolation=data_config['interpolation'],
            mean=data_config['mean'], std=data_config['std'], crop_pct=data_config['crop_pct'],
            use_prefetcher=prefetch))
    sampler = None
    if is_stream(dataset):
        workers = _deal_eval_shards(dataset, workers, dist_info)
        if not dataset.reader.split_info.filenames:   # more ranks than shards: this one has nothing to read
            return torch.utils.data.DataLoader(_NoImages(), batch_size=batch_size)
    else:
        sampler = ShardSampler(len(dataset), dist_info.rank, dist_info.world_size)
    loader = _data_loader(measured(dataset), workers, pin_mem, dist_info.device, batch_size=batch_size,
                          sampler=sampler, collate_fn=fast_collate if prefetch else None)
    if prefetch:
        loader = PrefetchLoader(loader, mean=data_config['mean'], std=data_config['std'], device=dist_info.device)
    return loader


def _deal_eval_shards(dataset, workers: int, dist_info: DistInfo) -> int:
    """Exact evaluation of a wds/ split under DDP: rank r reads whole shards r, r + world_size, ... (and its
    workers split those again), each once, without timm's ``with_epoch`` (which, under DDP, evens the ranks
    out by repeating or dropping samples). Ranks may read different numbers of images (evaluate sums over
    ranks, with no collective per batch); a rank without a shard reads nothing. Returns the loader
    workers to start: no more than this rank's shards."""
    reader = dataset.reader
    full = getattr(dataset, 'full_split', None) or reader.split_info
    dataset.full_split = full
    rank, world = dist_info.rank, dist_info.world_size
    own = dataclasses.replace(full, filenames=tuple(full.filenames[rank::world]),
                              shard_lengths=tuple(full.shard_lengths[rank::world]))
    reader.split_info = own
    reader.num_samples = sum(own.shard_lengths) if own.shard_lengths else 0
    reader.dist_rank, reader.dist_num_replicas = 0, 1   # this rank's shards, read once, no rounding
    workers = min(workers, len(own.filenames))
    if own.filenames:
        _prepare_stream(dataset, workers)
    return workers


class _NoImages(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(())


def _prepare_stream(dataset, workers: int) -> None:
    """timm's ReaderWds, set up for ``workers`` loader workers started from the forkserver: its epoch
    counter (a multiprocessing Value that set_epoch writes and the workers read) is re-made in the
    forkserver's context (one made in the default fork context cannot be sent to such workers), and its
    pipeline is built on first use, from the settings made here."""
    reader = dataset.reader
    reader.epoch_count.shared_epoch = _FORKSERVER.Value('i', reader.epoch_count.value)
    reader.ds = None
    dataset.set_loader_cfg(num_workers=workers)
