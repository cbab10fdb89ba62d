#!/usr/bin/env python
"""Draw what the mixer does to validation images, with a trained model's class attention.

    python scripts/show_mix.py --checkpoint output/quickstart/quickstart_mixpro_s42/model_best.pth.tar \\
        --data-dir data/digits \\
        --output mix.png [--pairs 4] [--seed 0]

One row per pair of validation images A and B: A, B, the MaskMix image (cells of B pasted into A, with the
run's cell size), which share of every token comes from A (white = all of A), the model's class attention
on the MaskMix image, the CutMix image and the class attention on it. The caption writes out both labels,
λ_area (A's share of the pixels), λ_attn (A's share of the class attention), PAL's α and the resulting
label weights, and the model's prediction. Masks come from the run's own mixer settings (mask cell,
MaskMix α, CutMix α) and --seed; the model runs in eval mode (training computes λ_attn in train mode,
with its dropout and drop-path). Models without a class attention the probe reads (e.g. a ResNet, or Swin
without its class-attention head) get the pictures and λ_area only.
"""
import argparse
import sys
from pathlib import Path

from PIL import Image
import torch
from timm.data import create_transform, resolve_data_config
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mixpro.checkpoint import CheckpointError  # noqa: E402
from mixpro.config import ConfigError  # noqa: E402
from mixpro.data import ToRGB, build_dataset  # noqa: E402
from mixpro.masks import token_membership  # noqa: E402
from mixpro.mixer import Mixer  # noqa: E402
from mixpro.pictures import attention_tile, compose, grey_tile, tile, to_unit  # noqa: E402
from mixpro.probe import AttentionProbe  # noqa: E402
from mixpro.targets import attention_lambda, mix_target, pal_lambda, transmix_lambda  # noqa: E402
from mixpro.build import label_token_size  # noqa: E402
from mixpro.validation import load_model_from_checkpoint  # noqa: E402

COLUMNS = ['image A', 'image B', 'MaskMix', 'tokens from A', 'attention', 'CutMix', 'attention']


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--checkpoint', required=True, help='a train.py checkpoint')
    parser.add_argument('--data-dir', default=None, help="ImageFolder root (default: the run's)")
    parser.add_argument('--split', default=None, help="default: the run's val split")
    parser.add_argument('--output', required=True, help='the picture (.png)')
    parser.add_argument('--pairs', type=int, default=4, help='rows: pairs of validation images')
    parser.add_argument('--seed', type=int, default=0, help='seeds the masks and boxes')
    parser.add_argument('--use-ema', action='store_true', help="the run's EMA weights")
    parser.add_argument('--size', type=int, default=160, help='pixels per picture')
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.size < 16:
        parser.error('--pairs must be >= 1 and --size >= 16')
    if Path(args.output).suffix.lower() not in Image.registered_extensions() or Path(args.output).is_dir():
        parser.error(f'--output {args.output}: name a picture file (.png, .jpg)')
    return args


def validation_pairs(run: dict, class_to_idx, model, args):
    """``(A, B, labels A, labels B, data config)``: 2 × pairs eval-transformed images spread over the split
    (an ImageFolder lists its classes in order, so spread images are mostly of different classes)."""
    args.split = args.split or run.get('val_split', 'val')
    dataset = build_dataset(args.data_dir or run['data_dir'], args.split, is_training=False,
                            dataset=run.get('dataset', ''), class_map=run.get('class_map', ''),
                            class_to_idx=class_to_idx)
    if len(dataset) < 2 * args.pairs:
        raise ConfigError(f'{args.split} holds {len(dataset)} images: too few for --pairs {args.pairs}')
    config = resolve_data_config(run, model=model)
    dataset.transform = transforms.Compose([ToRGB(), create_transform(
        config['input_size'], is_training=False, interpolation=config['interpolation'], mean=config['mean'],
        std=config['std'], crop_pct=config['crop_pct'])])
    picks = torch.linspace(0, len(dataset) - 1, 2 * args.pairs).round().long().tolist()
    images, labels = zip(*(dataset[i] for i in picks))   # A_i from the first half of the split, B_i the second
    x, y = torch.stack(images), torch.tensor(labels)
    n = args.pairs
    return x[:n], x[n:], y[:n], y[n:], config


def keep_masks(method: str, a: torch.Tensor, b: torch.Tensor, y: torch.Tensor, run: dict, token_size, seed):
    """The keep mask (True: pixel of A) the run's mixer draws for ``method``, one per pair."""
    options = dict(num_classes=int(y.max()) + 1, token_size=token_size, seed=seed, mask_cell=run['mask_cell'],
                   maskmix_alpha=run['maskmix_alpha'], cutmix_alpha=run['cutmix'] or 1.0)
    if method == 'maskmix':
        mixer = Mixer('maskmix', **options)
    else:   # TransMix's mixer with the switch at CutMix: a CutMix box on every batch
        mixer = Mixer('transmix', switch_prob=1.0, **options)
    pairs = a.shape[0]
    batch = torch.cat([a, b] * 4)   # masks for 8 × pairs images: enough that `pairs` of them mix
    mixer(batch.clone(), torch.cat([y] * 8))
    keep = mixer.last.keep.expand(batch.shape[0], *mixer.last.keep.shape[1:])
    mixing = keep.flatten(1).any(1) & ~keep.flatten(1).all(1)   # not a sample the permutation paired with itself
    return keep[mixing][:pairs] if int(mixing.sum()) >= pairs else keep[:pairs]


def main(argv=None):
    args = parse_args(argv)
    try:
        model, run, class_to_idx = load_model_from_checkpoint(args.checkpoint, use_ema=args.use_ema)
        names = {i: name for name, i in (class_to_idx or {}).items()}
        a, b, ya, yb, config = validation_pairs(run, class_to_idx, model, args)
    except (ConfigError, ValueError, FileNotFoundError, CheckpointError) as err:
        sys.exit(f'error: {err}')
    try:
        probe = AttentionProbe(model)
        token_size = probe.token_size
    except ValueError:   # no class attention to read (no class token, or an unsupported family)
        probe, token_size = None, label_token_size(model)
    model.eval()
    num_classes = run['num_classes']
    rows, captions = [], []
    mixes = {}
    for method in ('maskmix', 'cutmix'):
        keep = keep_masks(method, a, b, ya, run, token_size, args.seed)
        mixed = torch.where(keep, a, b)
        if probe is not None:
            probe.enabled = True
        with torch.no_grad():
            logits = model(mixed)
        attention = probe.attention if probe is not None else None
        lam_area = keep.float().mean((1, 2, 3))
        lam_attn = alpha = lam = None
        if attention is not None:
            lam_attn = attention_lambda(token_membership(keep, token_size, run['membership']), attention)
            if method == 'maskmix':
                area_target = mix_target(ya, yb, lam_area, num_classes, run['smoothing'])
                lam, alpha = pal_lambda(logits, area_target, lam_area, lam_attn)
            else:
                lam = transmix_lambda(lam_area, lam_attn)
        mixes[method] = dict(keep=keep, images=mixed, attention=attention, lam_area=lam_area, lam_attn=lam_attn,
                             alpha=alpha, lam=lam, predicted=logits.argmax(1))
    unit = {key: to_unit(t, config['mean'], config['std']) for key, t in
            (('a', a), ('b', b), ('maskmix', mixes['maskmix']['images']), ('cutmix', mixes['cutmix']['images']))}
    grid_side = a.shape[-1] // token_size
    for i in range(args.pairs):
        m, c = mixes['maskmix'], mixes['cutmix']
        tokens = token_membership(m['keep'][i:i + 1], token_size, run['membership']).view(grid_side, -1)
        rows.append([tile(unit['a'][i], args.size), tile(unit['b'][i], args.size), tile(unit['maskmix'][i], args.size),
                     grey_tile(tokens, args.size),
                     attention_tile(unit['maskmix'][i], m['attention'][i], args.size) if m['attention'] is not None else None,
                     tile(unit['cutmix'][i], args.size),
                     attention_tile(unit['cutmix'][i], c['attention'][i], args.size) if c['attention'] is not None else None])
        label_a, label_b = names.get(int(ya[i]), str(int(ya[i]))), names.get(int(yb[i]), str(int(yb[i])))
        lines = [f'A: {label_a}    B: {label_b}']
        for title, mix, rule in (('MaskMix', m, 'PAL'), ('CutMix', c, 'TransMix')):
            text = f"{title}: lam_area {float(mix['lam_area'][i]):.2f}"
            if mix['lam_attn'] is not None:
                text += f"  lam_attn {float(mix['lam_attn'][i]):.2f}"
                if mix['alpha'] is not None:
                    text += f"  alpha {float(mix['alpha'][i]):.2f}"
                text += (f"  ->  {rule} label {float(mix['lam'][i]):.2f} '{label_a}' + "   # quoted: digit names
                         f"{1 - float(mix['lam'][i]):.2f} '{label_b}'")
            text += f"  (predicted {names.get(int(mix['predicted'][i]), int(mix['predicted'][i]))})"
            lines.append(text)
        captions.append(lines)
    sheet = compose(rows, captions, args.size, titles=COLUMNS)
    try:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        sheet.save(args.output)
    except OSError as err:
        sys.exit(f'error: --output {args.output} cannot be written: {err}')
    dataset = run.get('dataset', '')
    source = f'{dataset}:{args.split}' if dataset else Path(args.data_dir or run['data_dir']) / args.split
    print(f'wrote {args.output}: {args.pairs} pairs of {source}')
    return sheet


if __name__ == '__main__':
    main()
