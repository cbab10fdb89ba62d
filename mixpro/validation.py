"""Evaluate a training checkpoint exactly as training evaluated it."""
import csv
import json
from argparse import Namespace
from contextlib import nullcontext
from pathlib import Path
from typing import Optional, Tuple

import torch
from timm.data import resolve_data_config

from .checkpoint import load_checkpoint
from .data import build_dataset, eval_loader, num_classes_of
from .distributed import cleanup, init_distributed
from .engine import evaluate
from .training import build_model   # the same model construction as training


def load_model_from_checkpoint(path, model_name=None, use_ema=False, img_size=None):
    """``(model, training_args, class_to_idx)`` rebuilt from a checkpoint written by train.py
    (``class_to_idx`` is None for checkpoints of versions that did not store it)."""
    state = load_checkpoint(path)
    if 'args' not in state or 'state_dict' not in state:
        raise ValueError(f'checkpoint {path} was not written by train.py (no args / state_dict)')
    train_args = Namespace(**state['args'])
    if model_name and model_name != train_args.model:
        train_args.model, train_args.model_kwargs = model_name, {}   # the checkpoint's kwargs belong to its model
    if img_size is not None:   # before building: ViTs size their position embedding from it
        train_args.img_size = img_size
    weights = state['state_dict']
    if use_ema:
        weights = state.get('state_dict_ema')
        if weights is None:
            raise ValueError(f'checkpoint {path} holds no EMA weights (trained without --model-ema)')
    model = build_model(train_args, state['num_classes'])
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        detail = ' '.join(str(err).split())[:400]
        raise ValueError(f'checkpoint {path} does not fit model {train_args.model!r} '
                         f'({state["num_classes"]} classes): {detail}') from err
    return model, train_args, state.get('class_to_idx')


def precision(args, train_args) -> Tuple[Optional[torch.dtype], str]:
    """The autocast dtype to evaluate with (None: fp32) and where it comes from: ``--amp`` /
    ``--amp-dtype`` when given, else the checkpoint's own training precision, as its run evaluated."""
    amp = train_args.amp if args.amp is None else args.amp
    name = args.amp_dtype or train_args.amp_dtype
    source = 'from the checkpoint' if args.amp is None and args.amp_dtype is None else 'as asked'
    if not amp:
        return None, f'float32 ({source})'
    return getattr(torch, name), f'{name} autocast ({source})'


def write_results(results: dict, path: Path) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f'--results-file {path}: cannot create its folder: {err}') from err
    if path.suffix == '.csv':
        with path.open('w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=list(results))
            writer.writeheader()
            writer.writerow(results)
    else:
        path.write_text(json.dumps(results, indent=2) + '\n')


def run(args) -> dict:
    dist_info = init_distributed(args.device)
    try:
        model, train_args, class_to_idx = load_model_from_checkpoint(args.checkpoint, args.model, args.use_ema, args.img_size)
        data_dir = args.data_dir or train_args.data_dir
        data_args = Namespace(data_dir=data_dir, dataset_download=args.dataset_download,
                              dataset=getattr(train_args, 'dataset', '') if args.dataset is None else args.dataset,
                              class_map=getattr(train_args, 'class_map', ''))
        dataset = build_dataset(data_args, args.split, is_training=False, class_to_idx=class_to_idx)
        classes = num_classes_of(dataset)
        if (data_args.dataset or not class_to_idx) and classes != train_args.num_classes:
            # the run's own class index labels an ImageFolder (a split missing some classes is fine);
            # other datasets, and checkpoints of older versions, must have the run's class count
            raise ValueError(f'checkpoint {args.checkpoint} was trained for {train_args.num_classes} classes '
                             f'but {data_args.dataset or Path(data_dir) / args.split} has {classes} classes')
        if args.crop_pct is not None:
            train_args.crop_pct = args.crop_pct
        data_config = resolve_data_config(vars(train_args), model=model)
        model.to(dist_info.device)
        loader = eval_loader(dataset, data_config, args.batch_size, args.workers, dist_info)
        amp_dtype, precision_note = precision(args, train_args)
        amp = torch.autocast(dist_info.device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
        if dist_info.is_primary:
            print(f'precision: {precision_note}', flush=True)
        metrics = evaluate(model, loader, dist_info.device, amp)
        results = {'checkpoint': str(args.checkpoint), 'model': train_args.model, 'ema': bool(args.use_ema),
                   'split': f'{data_args.dataset}:{args.split}' if data_args.dataset else str(Path(data_dir) / args.split),
                   'samples': metrics['count'],
                   'top1': metrics['top1'], 'top5': metrics['top5'], 'loss': metrics['loss'],
                   'precision': str(amp_dtype or torch.float32).replace('torch.', '')}
        if dist_info.is_primary:
            print(f"{results['model']}{' (EMA)' if args.use_ema else ''} on {results['split']}: "
                  f"top-1 {metrics['top1']:.3f}  top-5 {metrics['top5']:.3f}  loss {metrics['loss']:.4f}  "
                  f"({metrics['count']} images)", flush=True)
            if args.results_file:
                write_results(results, args.results_file)
        return results
    finally:
        cleanup()
