"""Evaluate models: train.py checkpoints exactly as their run evaluated them, timm models with their
published or own weights, on whole datasets, class subsets (ImageNet-A/R), occluded images, or as
out-of-distribution detectors (ImageNet-O)."""
import logging
import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg_value
from timm.data.readers.class_map import load_class_map

from .checkpoint import load_checkpoint
from .config import ConfigError
from .data import build_dataset, eval_loader, image_folder, num_classes_of, stop_workers
from .distributed import cleanup, gather_cat, init_distributed
from .build import autocast, create_model
from .logger import setup_logging
from .engine import evaluate, max_softmax
from .finetune import family_filter, read_checkpoint_file, timm_pretrained_weights, weights_in
from .real_labels import RealLabelScorer, check_real_request, read_real_labels, real_label_sets
from .robustness import (OccludedBatches, SubsetLogits, dropped_count, imagenet_class_index, ood_measures,
                         read_class_subset, subset_outputs)


@dataclass
class LoadedModel:
    """A model to evaluate and what its evaluation depends on."""
    model: nn.Module
    source: str                              # the checkpoint file, or timm's pretrained weights
    options: dict                            # model / data options: a run's stored options, or validate's own
    class_to_idx: Optional[Dict[str, int]]   # class name -> output index, where known
    from_run: bool                           # a train.py checkpoint (its precision, dataset and data folder)

_logger = logging.getLogger(__name__)


def load_model_from_checkpoint(path, model_name=None, use_ema=False, img_size=None):
    """``(model, the run's options, class_to_idx)`` rebuilt from a checkpoint written by train.py
    (``class_to_idx`` is None for checkpoints that do not hold one)."""
    state = load_checkpoint(path)
    if not is_run_checkpoint(state):
        raise ValueError(f'checkpoint {path} was not written by train.py (no args / state_dict)')
    return _model_from_run_state(state, path, model_name, use_ema, img_size)


def is_run_checkpoint(state) -> bool:
    return isinstance(state, dict) and 'args' in state and 'state_dict' in state and 'num_classes' in state


def _model_from_run_state(state: dict, path, model_name, use_ema, img_size):
    options = dict(state['args'])
    if model_name and model_name != options['model']:
        options.update(model=model_name, model_kwargs={})   # the checkpoint's kwargs belong to its model
    if img_size is not None:   # before building: ViTs size their position embedding from it
        options['img_size'] = img_size
    weights = state['state_dict']
    if use_ema:
        weights = state.get('state_dict_ema')
        if weights is None:
            raise ValueError(f'checkpoint {path} holds no EMA weights (trained without --model-ema)')
    # grad_checkpointing is a training-memory setting: evaluation keeps no activations
    model = create_model(options['model'], state['num_classes'], model_kwargs=options.get('model_kwargs'),
                         img_size=options.get('img_size'))
    trained_size = state['args'].get('img_size')
    try:
        _load(model, weights, path, f"model {options['model']!r} ({state['num_classes']} classes)")
    except ValueError as err:
        if img_size is None or img_size == trained_size or options['model'] != state['args']['model']:
            raise   # not about the size
        trained = f'{trained_size} px' if trained_size else "the model's default size"
        raise ValueError(f'--img-size {img_size}: {path} was trained at {trained}, and its weights do not fit '
                         f'a {img_size} px model (a ViT\'s position embedding has one entry per patch); leave '
                         f'--img-size out, or fine-tune at {img_size} px with train.py --initial-checkpoint') from err
    return model, options, state.get('class_to_idx')


def _load(model: nn.Module, weights: dict, source, what: str) -> None:
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        detail = ' '.join(str(err).split())[:400]
        raise ValueError(f'checkpoint {source} does not fit {what}: {detail}') from err


def _head_classes(model_name: str, weights: dict) -> Optional[int]:
    """The class count of a state dict's classifier (under timm's head name for the model), if it has one."""
    heads = get_pretrained_cfg_value(model_name, 'classifier') or 'head'
    head = heads[0] if isinstance(heads, (tuple, list)) else heads
    bias = weights.get(f'{head}.bias')
    return None if bias is None else int(bias.shape[0])


def load_timm_model(args, checkpoint: Optional[str], state=None) -> LoadedModel:
    """A timm model (``--model``) with timm's pretrained weights or the weights of a plain state dict
    (``state``: the checkpoint file's content, when already read)."""
    if not args.model:
        raise ConfigError(f'{checkpoint} is not a train.py checkpoint: name its architecture with --model NAME'
                          if checkpoint else 'nothing to evaluate: give --checkpoint FILE… or --model NAME --pretrained')
    if checkpoint:
        state = read_checkpoint_file(checkpoint, '--checkpoint') if state is None else state
        weights, source = weights_in(state, checkpoint, '--checkpoint'), str(checkpoint)
    elif args.pretrained:
        weights, source = timm_pretrained_weights(args.model, file_option='--checkpoint')
    else:
        raise ConfigError(f'--model {args.model} needs weights: --pretrained, or --checkpoint FILE')
    options = dict(model=args.model, model_kwargs=dict(args.model_kwargs or {}), img_size=args.img_size,
                   crop_pct=args.crop_pct, amp=False, amp_dtype='bfloat16')
    num_classes = args.num_classes or _head_classes(args.model, weights) or 1000
    model = create_model(args.model, num_classes, model_kwargs=args.model_kwargs, img_size=args.img_size)
    convert = family_filter(model)
    if convert is not None:   # official formats (DeiT, PVT, ...) and resized position embeddings
        weights = convert(weights, model)
    _load(model, weights, source, f'model {args.model!r} ({num_classes} classes)')
    return LoadedModel(model, source, options, _class_names(args.class_map, num_classes), from_run=False)


def _class_names(class_map: Optional[str], num_classes: int) -> Optional[Dict[str, int]]:
    """Names of a timm model's outputs: ``--class-map`` (timm format), else ImageNet-1k's WordNet ids."""
    if class_map:
        try:
            names = dict(load_class_map(class_map))
        except (AssertionError, OSError, ValueError) as err:
            raise ConfigError(f'--class-map {class_map} cannot be read: {err}') from err
        if len(names) > num_classes:
            raise ConfigError(f'--class-map {class_map} names {len(names)} classes but the model has '
                              f'{num_classes} outputs')
        return names
    return imagenet_class_index() if num_classes == 1000 else None


def load_model(args, checkpoint: Optional[str]) -> LoadedModel:
    """What ``--checkpoint`` (or ``--model --pretrained``) names, ready to evaluate."""
    state = read_checkpoint_file(checkpoint, '--checkpoint') if checkpoint else None
    if is_run_checkpoint(state):
        if args.pretrained:
            raise ConfigError(f'--pretrained with {checkpoint}: a train.py checkpoint carries its own weights')
        if args.model_kwargs:
            raise ConfigError(f'--model-kwargs with {checkpoint}: a train.py checkpoint rebuilds its own model '
                              f'(the option is for weights without a train.py run)')
        if args.num_classes and args.num_classes != state['num_classes']:
            raise ConfigError(f"--num-classes {args.num_classes} with {checkpoint}: a train.py checkpoint has its "
                              f"own class count ({state['num_classes']}; the option is for weights without a "
                              f"train.py run)")
        model, options, class_to_idx = _model_from_run_state(state, checkpoint, args.model, args.use_ema,
                                                             args.img_size)
        if args.class_map:
            class_to_idx = _class_names(args.class_map, state['num_classes'])
        return LoadedModel(model, str(checkpoint), options, class_to_idx, from_run=True)
    if args.use_ema:
        raise ConfigError('--use-ema needs a train.py checkpoint trained with --model-ema')
    return load_timm_model(args, checkpoint, state)


def precision(args, trained: dict, from_run: bool = True) -> Tuple[Optional[torch.dtype], str]:
    """The autocast dtype to evaluate with (None: fp32) and where it comes from: ``--amp`` /
    ``--amp-dtype`` when given, else the checkpoint's own training precision, as its run evaluated
    (``from_run`` False: weights without a run, fp32 by default)."""
    amp = (trained['amp'] or bool(args.amp_dtype)) if args.amp is None else args.amp   # a dtype asks for autocast
    name = args.amp_dtype or trained['amp_dtype']
    default = 'from the checkpoint' if from_run else 'the default for weights without a train.py run'
    source = default if args.amp is None and args.amp_dtype is None else 'as asked'
    if not amp:
        return None, f'float32 ({source})'
    return getattr(torch, name), f'{name} autocast ({source})'


def write_results(rows: List[dict], path: Path) -> None:
    """One row as a JSON object (or a one-row CSV); several as a JSON list (or CSV rows)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f'--results-file {path}: cannot create its folder: {err}') from err
    if path.suffix == '.csv':
        with path.open('w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text(json.dumps(rows[0] if len(rows) == 1 else rows, indent=2) + '\n')


def _folder_names(root: Path) -> List[str]:
    """The class folders of a split (none when it is missing: build_dataset names the missing folder)."""
    return [e.name for e in root.iterdir() if e.is_dir() and not e.name.startswith('.')] if root.is_dir() else []


def _check_subset_folders(root: Path, subset: List[str], option: str) -> None:
    unknown = sorted(name for name in _folder_names(root) if name not in subset)
    if unknown:
        raise ConfigError(f'{root} has class folder(s) outside --class-subset {option}: {", ".join(unknown[:5])}')


def _numbered_classes(root: Path, class_to_idx, num_outputs: Optional[int] = None):
    """ImageNet-V2's layout names class folders by output index (0 … 999): label them by that number
    when the model's class names do not name them."""
    folders = _folder_names(root)
    if not folders or not all(name.isdigit() for name in folders) or \
            (class_to_idx and any(name in class_to_idx for name in folders)):
        return class_to_idx
    beyond = sorted((name for name in folders if num_outputs and int(name) >= num_outputs), key=int)
    if beyond:
        raise ConfigError(f'the class folders of {root} are numbers, read as output indices, but the model has '
                          f'{num_outputs} outputs: folder(s) {", ".join(beyond[:5])} name no output of it')
    _logger.info(f'note: the class folders of {root} are numbers: each labels the output of that index')
    return {name: int(name) for name in folders}


def _data_location(args, loaded: LoadedModel) -> Tuple[str, str]:
    """``(data_dir, split)``: the options', else a train.py checkpoint's own data folder and val split."""
    trained = loaded.options if loaded.from_run else {}
    data_dir = args.data_dir or trained.get('data_dir')
    if not data_dir:
        raise ConfigError('--data-dir is required for a model that is not a train.py checkpoint')
    split = args.split if args.split is not None else trained.get('val_split', 'val')   # the run's own val split
    return data_dir, split


def _data_config(args, loaded: LoadedModel) -> dict:
    """The eval transforms: the run's (or the timm model's), with ``--crop-pct`` / ``--interpolation`` where
    given."""
    if args.crop_pct is not None:
        loaded.options['crop_pct'] = args.crop_pct
    if getattr(args, 'interpolation', None):
        loaded.options['interpolation'] = args.interpolation
    return resolve_data_config(loaded.options, model=loaded.model)


def network(args, loaded: LoadedModel) -> nn.Module:
    """The loaded model, ``torch.compile``d where --torchcompile asks: the network only, since the wrappers
    around it (class subsets, ReaL, ImageNet-O) count on the host."""
    backend = getattr(args, 'torchcompile', None)
    return torch.compile(loaded.model, backend=backend) if backend else loaded.model


def build_eval_data(args, loaded: LoadedModel, dist_info):
    """``(loader, model to evaluate, data config, split label)`` for one loaded model: its dataset with the
    class index its outputs need, and the model restricted to ``--class-subset`` where one is given, or
    wrapped in a ``RealLabelScorer`` for ``--real-labels``."""
    trained = loaded.options if loaded.from_run else {}
    dataset_name = trained.get('dataset', '') if args.dataset is None else args.dataset
    data_dir, split_name = _data_location(args, loaded)
    # a run's --class-map labels its ImageFolder data only (a --dataset ignores one stored beside it)
    class_map = trained.get('class_map', '') if not dataset_name else ''
    model, class_to_idx = network(args, loaded), loaded.class_to_idx
    real_labels = getattr(args, 'real_labels', None)
    if real_labels:   # before reading any data: refuse what ReaL cannot score
        check_real_request(real_labels, dataset_name, args.class_subset, model, class_to_idx)
    if args.class_subset:
        if dataset_name:
            raise ConfigError(f'--class-subset works on ImageFolder data, not --dataset {dataset_name}')
        subset = read_class_subset(args.class_subset)
        outputs = subset_outputs(subset, class_to_idx, args.class_subset)
        _check_subset_folders(Path(data_dir) / split_name, subset, args.class_subset)
        model = SubsetLogits(model, outputs)
        class_to_idx = {name: i for i, name in enumerate(subset)}   # labels: positions in the subset
        class_map = ''
    elif not dataset_name:
        class_to_idx = _numbered_classes(Path(data_dir) / split_name, class_to_idx,
                                         getattr(loaded.model, 'num_classes', None))
    dataset = build_dataset(data_dir, split_name, is_training=False, dataset=dataset_name, class_map=class_map,
                            download=args.dataset_download, class_to_idx=class_to_idx)
    classes = num_classes_of(dataset)
    expected = trained.get('num_classes')
    if not args.class_subset and expected and (dataset_name or not class_to_idx) and classes != expected:
        # the run's own class index labels an ImageFolder (a split missing some classes is fine);
        # other datasets, and checkpoints without a class index, must have the run's class count
        raise ValueError(f'checkpoint {loaded.source} was trained for {expected} classes '
                         f'but {dataset_name or Path(data_dir) / split_name} has {classes} classes')
    if real_labels:   # the model, also counting ReaL hits of each image (by its file name)
        model = RealLabelScorer(model, real_label_sets(dataset, read_real_labels(real_labels), real_labels))
    data_config = _data_config(args, loaded)
    backend = 'pillow' if dataset_name else trained.get('data_backend', 'pillow')   # as the run evaluated
    loader = eval_loader(dataset, data_config, args.batch_size, args.workers, dist_info, data_backend=backend)
    split = f'{dataset_name}:{split_name}' if dataset_name else str(Path(data_dir) / split_name)
    return loader, model, data_config, split


def evaluate_loaded(args, loaded: LoadedModel, dist_info, ratios=(0.0,)) -> List[dict]:
    """One result row per occlusion ratio for an already loaded model, on the data ``args`` names."""
    loader, model, data_config, split = build_eval_data(args, loaded, dist_info)
    _check_occlusion(ratios, data_config['input_size'][-2:], args.occlusion_patch)
    model.to(dist_info.device)
    amp_dtype, precision_note = precision(args, loaded.options, loaded.from_run)
    amp = autocast(dist_info.device, amp_dtype)
    _logger.info(f'evaluating {loaded.source}, precision: {precision_note}')
    rows = []
    try:
        for ratio in ratios:
            batches = OccludedBatches(loader, ratio, data_config['mean'], data_config['std'],
                                      args.occlusion_patch, args.occlusion_seed)
            if isinstance(model, RealLabelScorer):
                batches = model.batches(batches, loader.sampler)
            metrics = evaluate(model, batches, dist_info.device, amp)
            row = {'checkpoint': loaded.source, 'model': loaded.options['model'], 'ema': bool(args.use_ema),
                   'split': split, 'class_subset': args.class_subset or '', 'occlusion': ratio,
                   'samples': metrics['count'], 'unreadable': metrics['unreadable'], 'top1': metrics['top1'],
                   'top5': metrics['top5'],
                   'loss': metrics['loss'], 'precision': str(amp_dtype or torch.float32).replace('torch.', ''),
                   'img_size': data_config['input_size'][-1], 'crop_pct': data_config['crop_pct'],
                   'interpolation': data_config['interpolation']}
            real = model.counts() if isinstance(model, RealLabelScorer) else None   # collective: every rank
            row.update(real or {})
            rows.append(row)
            occluded = f' occlusion {ratio:g}' if len(ratios) > 1 or ratio else ''
            subset = f' [{args.class_subset}]' if args.class_subset else ''
            _logger.info(f"{row['model']}{' (EMA)' if args.use_ema else ''} on {split}{subset}{occluded}: "
                         f"top-1 {metrics['top1']:.3f}  top-5 {metrics['top5']:.3f}  loss {metrics['loss']:.4f}  "
                         f"({metrics['count']} images{_unreadable_note(metrics)}){_real_summary(real)}")
    finally:
        stop_workers(loader)   # also after an exception: exit would wait on them forever
    return rows


def check_ood_inputs(args, loaded: LoadedModel, ood_folder: str, option: str = '--imagenet-o'):
    """What ``ood_detection`` reads, checked before anything is evaluated: ``(folder, its classes, their
    model outputs, (data_dir, split))``."""
    root = Path(ood_folder).resolve()
    if not root.is_dir():
        raise ConfigError(f'{option} {root} does not exist')
    classes = sorted(_folder_names(root))
    if not classes:
        raise ConfigError(f'{option} {root}: no class folders in it (<wnid>/<images> expected)')
    if args.dataset:
        raise ConfigError(f'{option} compares with ImageFolder validation images under --data-dir, not '
                          f'--dataset {args.dataset}')
    outputs = subset_outputs(classes, loaded.class_to_idx, str(root), flag=option)
    data_dir, split = _data_location(args, loaded)
    if not (Path(data_dir) / split).is_dir():
        raise ConfigError(f'{option} needs the ImageNet validation images of its classes: '
                          f'{Path(data_dir) / split} does not exist (--data-dir, --split)')
    missing = sorted(set(classes) - set(_folder_names(Path(data_dir) / split)))
    if missing:   # the in-distribution side must hold every class, or the score compares other things
        raise ConfigError(f'{option} {root}: {len(missing)} of its {len(classes)} classes have no folder in '
                          f'{Path(data_dir) / split}, e.g. {", ".join(missing[:3])}')
    return root, classes, outputs, (data_dir, split)


def ood_detection(args, loaded: LoadedModel, dist_info, ood_folder: str, option: str = '--imagenet-o') -> dict:
    """ImageNet-O's out-of-distribution detection (Hendrycks et al., CVPR 2021, as their code scores it).

    ``ood_folder`` holds ``<wnid>/<images>``: images of no ImageNet-1k class, each filed under the class a
    classifier mistook it for. They are told apart from the ImageNet validation images of the same classes
    (``--data-dir`` / ``--split``, the other classes' folders unused) by the confidence over those classes'
    logits (the largest softmax probability); ``ood_measures`` turns the two sets of confidences into AUPR
    and AUROC (%). Under DDP each rank scores its shard and the scores are gathered."""
    root, classes, outputs, (data_dir, split) = check_ood_inputs(args, loaded, ood_folder, option)
    model = SubsetLogits(network(args, loaded), outputs).to(dist_info.device)
    index = {name: i for i, name in enumerate(classes)}
    datasets = {'in': image_folder(data_dir, split, False, index, select=True),
                'ood': image_folder(str(root.parent), root.name, False, index)}
    data_config = _data_config(args, loaded)
    amp_dtype, _ = precision(args, loaded.options)
    amp = autocast(dist_info.device, amp_dtype)
    confidence = {}
    backend = loaded.options.get('data_backend', 'pillow') if loaded.from_run else 'pillow'
    for name, dataset in datasets.items():
        loader = eval_loader(dataset, data_config, args.batch_size, args.workers, dist_info, data_backend=backend)
        try:
            confidence[name] = gather_cat(max_softmax(model, loader, dist_info.device, amp))
        finally:
            stop_workers(loader)
    measures = ood_measures(confidence['in'], confidence['ood'])
    _logger.info(f"{loaded.options['model']} {option} {root}: AUPR {measures['aupr']:.2f}  "
                 f"AUROC {measures['auroc']:.2f}  ({measures['ood_images']} out-of-distribution, "
                 f"{measures['in_images']} images of "
                 f"{Path(data_dir) / split} in its {len(classes)} classes)")
    return measures


def _check_occlusion(ratios, size, patch: int) -> None:
    """A ratio that drops no patch would report the clean numbers under an occlusion label."""
    patches = (size[0] // patch) * (size[1] // patch)
    for ratio in ratios:
        if ratio > 0 and dropped_count(ratio, patches) == 0:
            raise ConfigError(f'--occlusion {ratio:g} drops none of the {patches} patch(es) of a {size[0]}x{size[1]} '
                              f'image cut into --occlusion-patch {patch} px patches: use smaller patches')


def check_occlusion_for_all(args, ratios) -> None:
    """Each checkpoint's input size against the occlusion ratios, before the first evaluation: a ratio that
    drops nothing for the third model would otherwise stop the run after two were evaluated."""
    if not any(ratio > 0 for ratio in ratios):
        return
    for checkpoint in list(args.checkpoint or []) or [None]:
        loaded = load_model(args, checkpoint)
        try:
            _check_occlusion(ratios, _data_config(args, loaded)['input_size'][-2:], args.occlusion_patch)
        except ConfigError as err:
            raise ConfigError(f'{loaded.source}: {err}') from err


def _unreadable_note(metrics: dict) -> str:
    count = metrics['unreadable']
    return f'; {count} unreadable, left out: the warnings above name them' if count else ''


def _real_summary(real: Optional[dict]) -> str:
    if real is None:
        return ''
    if not real['real_images']:
        return '  ReaL: no image has ReaL labels'
    return (f"  ReaL top-1 {real['real_top1']:.3f}  top-5 {real['real_top5']:.3f}  "
            f"({real['real_images']} images with ReaL labels)")


def run(args) -> List[dict]:
    """Evaluate every ``--checkpoint`` (or ``--model --pretrained``) at every ``--occlusion`` ratio;
    returns one result row per pair."""
    dist_info = init_distributed(args.device)
    setup_logging(dist_info.rank)
    try:
        rows = []
        if len(args.checkpoint or []) > 1:
            check_occlusion_for_all(args, args.occlusion or [0.0])
        for checkpoint in list(args.checkpoint or []) or [None]:
            rows += evaluate_loaded(args, load_model(args, checkpoint), dist_info, args.occlusion or [0.0])
            if dist_info.is_primary and args.results_file:   # after each model: a later failure keeps these
                write_results(rows, args.results_file)
        return rows
    finally:
        cleanup()
