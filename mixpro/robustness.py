"""Robustness evaluation: class subsets (ImageNet-A, ImageNet-R), out-of-distribution detection (ImageNet-O)
and patch occlusion.

Occlusion follows TransMix's robustness study (Chen et al., CVPR 2022, §4), which takes the protocol of
Naseer et al., "Intriguing Properties of Vision Transformers" (NeurIPS 2021): the evaluated image is cut
into 16×16-pixel patches and a fraction of them is dropped. A dropped patch becomes black (pixel value 0
before normalisation), as in Naseer et al.'s code. Two departures, both so that numbers repeat: the patches
are drawn per image (their code draws one set per batch), from a generator seeded by (seed, dataset index),
so the result does not depend on batch size, worker count or the number of ranks; and the count dropped is
``floor(ratio × patches)`` (theirs: ``k × 196 // 10`` for ratio k/10: the same numbers on 224-px images).
"""
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from timm.data import ImageNetInfo

from .config import ConfigError

SUBSET_DIR = Path(__file__).with_name('class_subsets')
NAMED_SUBSETS = {'imagenet-a': SUBSET_DIR / 'imagenet_a.txt', 'imagenet-r': SUBSET_DIR / 'imagenet_r.txt'}


def read_class_subset(name_or_file: str) -> List[str]:
    """The class names of ``imagenet-a`` / ``imagenet-r`` (WordNet ids), or of a text file with one class
    name per line (``#`` starts a comment)."""
    path = NAMED_SUBSETS.get(name_or_file.lower(), Path(name_or_file))
    if not path.is_file():
        raise ConfigError(f'--class-subset {name_or_file}: neither {" nor ".join(NAMED_SUBSETS)} nor a file')
    names = [line.split('#')[0].strip() for line in path.read_text().splitlines()]
    names = [name for name in names if name]
    if not names or len(set(names)) != len(names):
        raise ConfigError(f'--class-subset {path}: needs one class name per line, each once')
    return names


def imagenet_class_index() -> Dict[str, int]:
    """WordNet id -> output index of a timm ImageNet-1k classifier (timm's own synset list)."""
    return {wnid: i for i, wnid in enumerate(ImageNetInfo('imagenet-1k').label_names())}


def subset_outputs(subset: Sequence[str], model_classes: Optional[Dict[str, int]], option: str,
                   flag: str = '--class-subset') -> List[int]:
    """The model output index of every class of ``subset``, in the subset's order."""
    if not model_classes:
        raise ConfigError(f'{flag} {option} needs the names of the model\'s classes: train.py checkpoints '
                          f'store them, timm ImageNet-1k models have them; otherwise give --class-map FILE')
    missing = [name for name in subset if name not in model_classes]
    if missing:
        raise ConfigError(f'{flag} {option}: {len(missing)} of its {len(subset)} classes are not classes '
                          f'of the model, e.g. {", ".join(missing[:3])}')
    return [model_classes[name] for name in subset]


class SubsetLogits(nn.Module):
    """The model's logits of the subset's classes only, so top-k and loss range over the subset."""

    def __init__(self, model: nn.Module, outputs: Sequence[int]):
        super().__init__()
        self.model = model
        self.register_buffer('outputs', torch.tensor(list(outputs), dtype=torch.long), persistent=False)

    def forward(self, x):
        return self.model(x).index_select(1, self.outputs)


def ood_measures(in_confidence: torch.Tensor, ood_confidence: torch.Tensor) -> Dict[str, float]:
    """Out-of-distribution detection by confidence, as Hendrycks et al. score ImageNet-O ("Natural Adversarial
    Examples", CVPR 2021, and their code): anomaly score = -confidence, out-of-distribution images are the
    positives; AUPR is scikit-learn's average precision, AUROC its ROC area, both in %."""
    from sklearn.metrics import average_precision_score, roc_auc_score
    if not len(in_confidence) or not len(ood_confidence):
        raise ValueError(f'out-of-distribution detection needs images of both kinds, got '
                         f'{len(in_confidence)} in-distribution and {len(ood_confidence)} out-of-distribution')
    scores = -torch.cat([in_confidence, ood_confidence]).double().numpy()
    positive = [0] * len(in_confidence) + [1] * len(ood_confidence)
    return {'aupr': 100.0 * average_precision_score(positive, scores), 'auroc': 100.0 * roc_auc_score(positive, scores),
            'in_images': len(in_confidence), 'ood_images': len(ood_confidence)}


def dropped_count(ratio: float, patches: int) -> int:
    return math.floor(ratio * patches + 1e-9)   # the epsilon: 0.3 × 200 must give 60, not 59


def occlusion_mask(index: int, grid: tuple, ratio: float, seed: int) -> torch.Tensor:
    """``[rows, cols]`` bool, True on the patches dropped from dataset image ``index``."""
    patches = grid[0] * grid[1]
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    mask = torch.zeros(patches, dtype=torch.bool)
    mask[torch.randperm(patches, generator=generator)[:dropped_count(ratio, patches)]] = True
    return mask.view(grid)


def check_occlusion_options(ratios, patch: int) -> None:
    """``--occlusion`` ratios and ``--occlusion-patch`` that can be applied to any image."""
    for ratio in ratios:
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(f'--occlusion {ratio:g}: a ratio must be in [0, 1]')
    if patch < 1:
        raise ConfigError(f'--occlusion-patch {patch}: must be a positive number of pixels')


class OccludedBatches:
    """Iterates an eval loader, dropping a fraction ``ratio`` of the ``patch``-pixel patches of every
    (normalised) image: dropped pixels get the value black has after normalisation. Needs the loader's
    sampler to list dataset indices, as the eval loader's does; ``ratio`` 0 passes batches unchanged."""

    def __init__(self, loader, ratio: float, mean, std, patch: int = 16, seed: int = 0):
        check_occlusion_options([ratio], patch)
        self.loader, self.ratio, self.patch, self.seed = loader, ratio, patch, seed
        self.black = -torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) / torch.tensor(std).view(-1, 1, 1)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        if self.ratio == 0:
            yield from self.loader
            return
        if isinstance(getattr(self.loader, 'dataset', None), torch.utils.data.IterableDataset):
            raise ConfigError('--occlusion seeds patches by dataset index: it needs indexed data, not a stream (wds/)')
        indices = list(self.loader.sampler)
        start = 0
        for x, y in self.loader:
            batch_indices = indices[start:start + len(y)]
            start += len(y)
            yield self.occlude(x, batch_indices), y

    def occlude(self, x: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
        height, width = x.shape[-2:]
        if height % self.patch or width % self.patch:
            raise ConfigError(f'--occlusion: the {height}x{width} input is not a whole number of '
                              f'{self.patch}-px patches (set --occlusion-patch or --img-size)')
        grid = (height // self.patch, width // self.patch)
        masks = torch.stack([occlusion_mask(i, grid, self.ratio, self.seed) for i in indices])
        pixels = masks.repeat_interleave(self.patch, 1).repeat_interleave(self.patch, 2).unsqueeze(1)
        black = self.black.to(x.device, x.dtype)
        return torch.where(pixels.to(x.device), black, x)
