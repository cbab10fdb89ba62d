"""Start a new run from given weights: ``--initial-checkpoint PATH`` or ``--pretrained`` (timm's meaning).

Unlike ``--resume``, only the weights are taken; optimizer, schedule and epoch start afresh. The weights
are fitted to the model this run builds: a head whose class count differs keeps its fresh init, position
embeddings are resized to this image size, anything else that does not fit is skipped by name, and one
line says what happened. Weights that hardly fit at all (another architecture) are an error, never a
silent random init.
"""
import logging
import argparse
import math
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import safetensors.torch
import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models import clean_state_dict

from .checkpoint import CheckpointError, load_checkpoint
from .config import ConfigError

MIN_LOADED_FRACTION = 0.5   # fewer of the model's tensors than this loaded: the file is not for this model

_logger = logging.getLogger(__name__)


def read_checkpoint_file(path, option: str = '--initial-checkpoint'):
    """Whatever a weight file holds: a ``.safetensors`` file's tensors, or the object a ``.pth`` holds."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{option} {path} does not exist')
    if path.suffix == '.safetensors':
        try:
            return safetensors.torch.load_file(path, device='cpu')
        except Exception as err:   # safetensors has its own error type for a damaged file
            raise CheckpointError(f'{option} {path} cannot be read: {err}') from err
    with torch.serialization.safe_globals([argparse.Namespace]):   # timm's train.py saves args as one
        return load_checkpoint(path)


def weights_in(state, path, option: str = '--initial-checkpoint') -> Dict[str, torch.Tensor]:
    """The plain weights in what a file held: a train.py / timm training checkpoint (not its EMA), a state
    dict (also under 'model' or 'state_dict', as DeiT and timm save them)."""
    for key in ('state_dict', 'model'):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    weights = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
    if not weights:
        raise ConfigError(f'{option} {path} holds no weights (no tensors, nor a state_dict or '
                          f'model entry with tensors)')
    return clean_state_dict(weights)   # DDP's 'module.' and torch.compile's '_orig_mod.' prefixes


def read_weights(path, option: str = '--initial-checkpoint') -> Dict[str, torch.Tensor]:
    """The plain weights of a weight file (see ``weights_in``), ``.safetensors`` included."""
    return weights_in(read_checkpoint_file(path, option), path, option)


def timm_pretrained_weights(model_name: str,
                            file_option: str = '--initial-checkpoint') -> Tuple[Dict[str, torch.Tensor], str]:
    """timm's published weights for ``model_name`` and their name. timm builds its default architecture
    (its image size and class count), so its own loader and conversions apply; fit_weights() then adapts
    them to this run's model like any other file."""
    hub_id = getattr(timm.models.get_pretrained_cfg(model_name), 'hf_hub_id', None) if \
        timm.models.is_model(model_name) else None
    offline = os.environ.get('HF_HUB_OFFLINE', '').upper() in ('1', 'ON', 'YES', 'TRUE')   # as huggingface_hub
    if hub_id and not offline and not _in_hub_cache(hub_id):
        _logger.info(f"note: --pretrained: fetching timm's weights for {model_name} from the Hugging Face Hub; "
                     f'without network this waits for its retries (HF_HUB_OFFLINE=1 fails at once)')
    try:
        source = timm.create_model(model_name, pretrained=True)
    except (OSError, RuntimeError, ValueError) as err:   # no network / not in the cache (HF hub, URL:
        reason = ' '.join(str(err).split())[:200] or type(err).__name__   # OSError), or no weights exist
        raise ConfigError(f"--pretrained: could not get timm's pretrained weights for {model_name} ({reason}); "
                          f'download a weight file where there is network and start from it with '
                          f'{file_option} PATH') from err
    cfg = source.pretrained_cfg
    name = f"timm's pretrained {cfg.get('architecture', model_name)}" + (f".{cfg['tag']}" if cfg.get('tag') else '')
    return source.state_dict(), name


def _in_hub_cache(hub_id: str) -> bool:
    """Whether the Hugging Face Hub weights ``hub_id`` are in the local cache already."""
    try:
        from huggingface_hub import try_to_load_from_cache
        return any(isinstance(try_to_load_from_cache(hub_id, name), str)
                   for name in ('model.safetensors', 'pytorch_model.bin'))
    except Exception:   # no huggingface_hub, or an id it refuses: timm's own error follows
        return False


def family_filter(model):
    """The model family's timm ``checkpoint_filter_fn`` (converts official formats, resizes patch and
    position embeddings, Swin's relative-position tables), if its module has one."""
    return getattr(sys.modules.get(type(model).__module__), 'checkpoint_filter_fn', None)


def _token_grid(model, name: str, target: torch.Tensor) -> Optional[Tuple[int, Tuple[int, int]]]:
    """``(prefix tokens, grid)`` of a [1, tokens, dim] position embedding sized by the image, else None.
    The prefix (class / distillation tokens) is what the model's own table holds beyond its grid: CaiT,
    say, adds its class token after the position embedding."""
    owner = model.get_submodule(name.rpartition('.')[0])
    grid = getattr(owner, 'grid_size', None) or getattr(getattr(owner, 'patch_embed', None), 'grid_size', None)
    if target.ndim != 3 or grid is None:
        return None
    prefix = target.shape[1] - grid[0] * grid[1]
    return (prefix, tuple(grid)) if prefix >= 0 else None


def _resize_pos_embed(model, name: str, tensor: torch.Tensor, target: torch.Tensor) -> Optional[torch.Tensor]:
    """A square-grid position embedding resampled to the model's grid (timm's bicubic resampling)."""
    layout = _token_grid(model, name, target)
    if layout is None or tensor.ndim != 3 or tensor.shape[2] != target.shape[2]:
        return None
    prefix, grid = layout
    side = math.isqrt(max(tensor.shape[1] - prefix, 0))
    if side == 0 or side * side != tensor.shape[1] - prefix:
        return None
    return resample_abs_pos_embed(tensor, new_size=list(grid), old_size=[side, side], num_prefix_tokens=prefix)


def _describe_resize(model, name: str, before: torch.Size, after: torch.Tensor) -> str:
    layout = _token_grid(model, name, after)
    if layout and len(before) == 3:
        prefix, grid = layout
        side = math.isqrt(max(before[1] - prefix, 0))
        if side * side == before[1] - prefix:
            return f'{name} resized {side}x{side} -> {grid[0]}x{grid[1]}'
    return f'{name} resized {tuple(before)} -> {tuple(after.shape)}'


def _names(names: List[str], limit: int = 4) -> str:
    return ', '.join(names[:limit]) + (f' (+{len(names) - limit} more)' if len(names) > limit else '')


def fit_weights(weights: Dict[str, torch.Tensor], model) -> Tuple[Dict[str, torch.Tensor], dict]:
    """The tensors of ``weights`` that fit ``model`` (position embeddings resized), and a report:
    ``resized``, ``head`` (classifier tensors left at their fresh init), ``skipped`` (other shape
    mismatches), ``missing`` (model tensors the weights lack), ``unused`` (weights the model lacks)."""
    before = {k: v.shape for k, v in weights.items()}
    convert = family_filter(model)
    if convert is not None:
        try:
            weights = convert(dict(weights), model)
        except Exception:   # written for its family's own files: on a foreign one, the matching below reports
            pass
    own = model.state_dict()
    classifier = (getattr(model, 'pretrained_cfg', None) or {}).get('classifier') or ()
    head_prefixes = tuple(f'{c}.' for c in ((classifier,) if isinstance(classifier, str) else classifier))
    fitted, report = {}, {'resized': [], 'head': [], 'skipped': [], 'unused': []}
    for name, tensor in weights.items():
        if name not in own:
            report['unused'].append(name)
            continue
        target = own[name]
        if tensor.shape != target.shape and 'pos_embed' in name:
            tensor = _resize_pos_embed(model, name, tensor, target)
        if tensor is None or tensor.shape != target.shape:
            report['head' if name.startswith(head_prefixes) else 'skipped'].append(name)
            continue
        if name in before and before[name] != tensor.shape:
            report['resized'].append(_describe_resize(model, name, before[name], tensor))
        fitted[name] = tensor
    absent = [n for n in own if n not in weights]
    report['head'] += [n for n in absent if n.startswith(head_prefixes)]
    report['missing'] = [n for n in absent if not n.startswith(head_prefixes)]
    report['head_classes'] = (weights[report['head'][0]].shape[0] if report['head'] and report['head'][0] in weights
                              else None)
    return fitted, report


def summary_line(source: str, model, fitted: dict, report: dict) -> str:
    own = model.state_dict()
    parts = [f'initial weights from {source}: {len(fitted)} of {len(own)} tensors loaded']
    if report['resized']:
        parts.append(_names(report['resized'], limit=3))
    if report['head']:
        num_classes = getattr(model, 'num_classes', None)
        change = (f"{report['head_classes']} -> {num_classes} classes" if report['head_classes'] is not None
                  else 'the weights have no head')
        parts.append(f"{'/'.join(report['head'])} re-initialised ({change})")
    if report['skipped']:
        parts.append(f"{len(report['skipped'])} skipped (shape differs): {_names(report['skipped'])}")
    parts.append(f"{len(report['missing'])} missing" + (f": {_names(report['missing'])}" if report['missing'] else ''))
    if report['unused']:
        parts.append(f"{len(report['unused'])} unused: {_names(report['unused'])}")
    return ', '.join(parts)


def load_initial_weights(model, args) -> Optional[str]:
    """Copy ``--initial-checkpoint`` / ``--pretrained`` weights into ``model`` in place (its parameters
    stay the ones the optimizer holds); returns the summary line (printed on the primary rank), None
    when neither option is given. Call it for a new run only: a resumed run's checkpoint has the weights."""
    if args.pretrained and args.initial_checkpoint:
        raise ConfigError('--pretrained and --initial-checkpoint both give the initial weights: choose one')
    if args.initial_checkpoint:
        weights, source = read_weights(args.initial_checkpoint), str(args.initial_checkpoint)
    elif args.pretrained:
        weights, source = timm_pretrained_weights(args.model)
    else:
        return None
    fitted, report = fit_weights(weights, model)
    total = len(model.state_dict())
    if len(fitted) < MIN_LOADED_FRACTION * total:
        unfit = report['skipped'] + report['missing']
        raise ConfigError(f'{source} does not fit model {args.model}: only {len(fitted)} of the model\'s {total} '
                          f'tensors match (a checkpoint of another architecture or other model_kwargs?); '
                          f'not matched: {_names(unfit)}')
    model.load_state_dict(fitted, strict=False)
    line = summary_line(source, model, fitted, report)
    _logger.info(line)
    return line
