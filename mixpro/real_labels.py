"""ImageNet-ReaL accuracy (Beyer et al., "Are we done with ImageNet?", 2020, arXiv:2006.07159).

ReaL re-labels the 50,000 ImageNet val images: each image gets the set of classes raters accepted for it
(possibly none). A prediction is right if it is in the image's set; images with an empty set are left out
of the ReaL accuracy. The labels file is a JSON list, entry i for ``ILSVRC2012_val_<i + 1 as 8 digits>.JPEG``,
each a list of ImageNet-1k class indices (timm's sorted WordNet id order); timm ships a copy.

The evaluated images are found by file name, so the data must be an ImageFolder of ImageNet val images
(in any class folders). ``RealLabelScorer`` wraps the model: it sees every batch's logits and the batch's
dataset indices (from the eval loader's sampler), so under DDP each rank scores its own shard and the
counts summed over ranks hold every image once.
"""
import json
import re
from pathlib import Path
from typing import Dict, List, Optional

import timm.data
import torch
import torch.nn as nn

from .config import ConfigError
from .distributed import all_reduce_sum
from .robustness import imagenet_class_index
from .skipped import UNREADABLE

TIMM_REAL_LABELS = str(Path(timm.data.__file__).parent / '_info' / 'imagenet_real_labels.json')
NUM_CLASSES = 1000
_VAL_NAME = re.compile(r'ILSVRC2012_val_(\d{8})\.JPEG')


def read_real_labels(path: str) -> List[List[int]]:
    """The ReaL label sets of a labels file (``--real-labels FILE``), checked."""
    try:
        labels = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f'--real-labels {path}: cannot be read as JSON: {err}') from err
    if not isinstance(labels, list) or not labels:
        raise ConfigError(f'--real-labels {path}: needs a JSON list with one list of class indices per val image')
    for i, entry in enumerate(labels):
        if not isinstance(entry, list) or not all(
                isinstance(c, int) and not isinstance(c, bool) and 0 <= c < NUM_CLASSES for c in entry):
            raise ConfigError(f'--real-labels {path}: entry {i + 1} ({str(entry)[:40]}) is not a list of '
                              f'class indices 0…{NUM_CLASSES - 1}')
    return labels


def check_real_request(option: str, dataset_name: str, class_subset: Optional[str], model: nn.Module,
                       class_to_idx: Optional[Dict[str, int]]) -> None:
    """Refuse what ReaL cannot score, before any data is read: data other than an ImageFolder, a class
    subset, a model whose outputs are not the 1000 ImageNet-1k classes in timm's order."""
    if dataset_name:
        raise ConfigError(f'--real-labels {option}: needs an ImageFolder of ImageNet val images, not --dataset '
                          f"{dataset_name} (--dataset '' reads --data-dir as an ImageFolder)")
    if class_subset:
        raise ConfigError(f'--real-labels with --class-subset {class_subset}: ReaL scores all 1000 ImageNet-1k '
                          f'classes; evaluate without a class subset')
    outputs = getattr(model, 'num_classes', None)
    if outputs is None and class_to_idx:
        outputs = len(class_to_idx)
    if outputs != NUM_CLASSES:
        raise ConfigError(f'--real-labels {option}: needs a model whose outputs are the 1000 ImageNet-1k classes; '
                          f'this one has {outputs if outputs is not None else "an unknown number of"} outputs')
    if class_to_idx != imagenet_class_index():
        raise ConfigError(f"--real-labels {option}: the model's 1000 outputs are not the ImageNet-1k classes in "
                          f"timm's order (sorted WordNet ids); check --class-map or the checkpoint's class folders")


def real_label_sets(dataset, labels: List[List[int]], option: str) -> torch.Tensor:
    """``[images, width]`` long: row i holds the ReaL set of dataset image i, padded with -1 (an empty set
    is all -1). Every image must be an ImageNet val image the labels cover, and appear once."""
    names = dataset.filenames(basename=True) if hasattr(dataset, 'filenames') else None
    if names is None:
        raise ConfigError(f'--real-labels {option}: needs an ImageFolder of ImageNet val images')
    seen = {}
    sets = []
    for i, name in enumerate(names):
        match = _VAL_NAME.fullmatch(name)
        number = int(match.group(1)) if match else 0
        if not 1 <= number <= len(labels):
            where = dataset.filenames()[i]
            raise ConfigError(f'--real-labels {option}: {where} is not one of the {len(labels)} ImageNet val images '
                              f'it labels (ILSVRC2012_val_00000001.JPEG … ILSVRC2012_val_{len(labels):08d}.JPEG)')
        if number in seen:
            paths = dataset.filenames()
            raise ConfigError(f'--real-labels {option}: {name} is in the data twice ({paths[seen[number]]} and '
                              f'{paths[i]}); each val image must appear once')
        seen[number] = i
        sets.append(labels[number - 1])
    table = torch.full((len(sets), max(1, max(map(len, sets), default=0))), -1, dtype=torch.long)
    for i, classes in enumerate(sets):
        table[i, :len(classes)] = torch.tensor(classes, dtype=torch.long)
    return table


class RealLabelScorer(nn.Module):
    """The evaluated model, unchanged in what it returns, that also counts ReaL hits: iterate
    ``batches(loader_batches, sampler)`` (it tells the scorer which dataset images each batch holds), run
    the model on each batch, then ``counts()`` (collective under DDP) gives the totals over all ranks."""

    def __init__(self, model: nn.Module, sets: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer('sets', sets, persistent=False)
        self.totals = None
        self._batch = self._measured = None

    def batches(self, loader_batches, sampler):
        """The batches as they are; before each is handed out, notes its dataset indices."""
        device = self.sets.device
        self.totals = torch.zeros(3, dtype=torch.float64, device=device)   # ReaL top-1 hits, top-5 hits, scored
        indices = torch.tensor(list(sampler), dtype=torch.long, device=device)
        start = 0
        for x, y in loader_batches:
            self._batch = indices[start:start + len(y)]
            self._measured = (y != UNREADABLE).to(device)   # a neighbour's image stood in: not this image's score
            start += len(y)
            yield x, y
        self._batch = self._measured = None

    def forward(self, x):
        logits = self.model(x)
        if self._batch is None or len(self._batch) != logits.shape[0]:
            raise RuntimeError('RealLabelScorer: run the model on the batches of scorer.batches() only')
        sets = self.sets[self._batch]                                     # [B, width]
        top = logits.float().topk(min(5, logits.shape[1]), dim=1).indices  # [B, k], as evaluate() ranks them
        hits = (top.unsqueeze(2) == sets.unsqueeze(1)).any(2)             # [B, k]; padding (-1) never matches
        scored = (sets[:, 0] >= 0) & self._measured                       # a non-empty ReaL set, its own image
        self.totals += torch.stack([(hits[:, 0] & scored).sum(), (hits.any(1) & scored).sum(),
                                    scored.sum()]).double()
        self._batch = None
        return logits

    def counts(self) -> dict:
        """``real_top1`` / ``real_top5`` (percent of the scored images; None if none) and ``real_images``
        (images with a non-empty ReaL set), over all ranks."""
        top1, top5, scored = all_reduce_sum(self.totals.clone()).tolist()
        scored = int(scored)
        return {'real_top1': 100.0 * top1 / scored if scored else None,
                'real_top5': 100.0 * top5 / scored if scored else None, 'real_images': scored}
