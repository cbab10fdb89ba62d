#!/usr/bin/env python
"""Speed of the mixing core on whatever device is present; prints a table and writes JSON.

    python scripts/benchmark.py [--device cuda] [--batch-size 128] [--model-batch-size 64] [--json out.json]

(a) mixer time per batch for every method against timm ``Mixup`` (CutMix and Mixup modes);
(b) model forward time with and without the attention probe;
(c) an "official-style" forward with fused attention switched off in every block, against ours.
All ratios come from one run on one device. Goals (figures, not tests): MaskMix <= 1.0x timm
CutMix; probe overhead <= 0.5 % of the forward.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
from timm.data import Mixup
from timm.layers import Attention
from timm.models.cait import ClassAttn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mixpro import AttentionProbe, Mixer  # noqa: E402
from mixpro.probe import cls_attention, key_projection  # noqa: E402

MODELS = ('deit_small_patch16_224', 'cait_xxs36_224', 'xcit_small_12_p16_224')


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def median_ms(fn, device, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench_mixers(args, device):
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    grid = args.img_size // 16
    attention = torch.rand(args.batch_size, grid * grid, device=device)
    logits = torch.randn(args.batch_size, 1000, device=device)
    timm_kw = dict(label_smoothing=0.1, num_classes=1000)
    ours_kw = dict(num_classes=1000, seed=0)
    candidates = {
        'timm Mixup (mixup mode)': Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, **timm_kw),
        'timm Mixup (cutmix mode)': Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, **timm_kw),
        'ours mixup': Mixer('mixup_cutmix', cutmix_alpha=0.0, **ours_kw),
        'ours cutmix': Mixer('mixup_cutmix', mixup_alpha=0.0, **ours_kw),
        'ours maskmix': Mixer('maskmix', **ours_kw),
        'ours mixup_cutmix': Mixer('mixup_cutmix', **ours_kw),
        'ours transmix (+relabel)': Mixer('transmix', **ours_kw),
        'ours mixpro (+relabel)': Mixer('mixpro', **ours_kw),
        'ours maskmix+PAL (+relabel)': Mixer('mixpro', maskmix_prob=1.0, **ours_kw),
    }
    steps = {}
    for name, mixer in candidates.items():
        def step(mixer=mixer):
            mixed, target = mixer(x, y)   # in place, like timm: the values drift, the cost does not
            if isinstance(mixer, Mixer):
                mixer.relabel(logits, attention if mixer.needs_attention else None)
        steps[name] = step
    # interleave the candidates so drift in machine load hits all of them alike
    per_round = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            per_round[name].append(median_ms(step, device, args.repeats))
    rows = {name: statistics.median(times) for name, times in per_round.items()}
    rows['ratio maskmix / timm cutmix'] = rows['ours maskmix'] / rows['timm Mixup (cutmix mode)']
    rows['ratio cutmix / timm cutmix'] = rows['ours cutmix'] / rows['timm Mixup (cutmix mode)']
    rows['ratio mixup / timm mixup'] = rows['ours mixup'] / rows['timm Mixup (mixup mode)']
    return rows


def set_fused_attention(model, fused):
    for module in model.modules():
        if isinstance(module, (Attention, ClassAttn)) or hasattr(module, 'fused_attn'):
            module.fused_attn = fused


def bench_models(args, device):
    rows = {}
    x = torch.randn(args.model_batch_size, 3, args.img_size, args.img_size, device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)
    for name in args.models:
        model = timm.create_model(name, img_size=args.img_size).to(device).train()
        probe = AttentionProbe(model)

        def forward():
            with amp:
                model(x)
        # interleave the variants so drift in machine load hits all of them alike
        plain, probed, unfused = [], [], []
        for _ in range(args.rounds):
            probe.enabled = False
            plain.append(median_ms(forward, device, args.repeats, warmup=1))
            probe.enabled = True
            probed.append(median_ms(forward, device, args.repeats, warmup=1))
            probe.enabled = False
            set_fused_attention(model, False)
            unfused.append(median_ms(forward, device, args.repeats, warmup=1))
            set_fused_attention(model, True)
        plain, probed, unfused = map(statistics.median, (plain, probed, unfused))
        # the probe's own work, timed alone on the captured layer input: the end-to-end difference
        # above is within run-to-run noise on a busy CPU
        captured = {}
        handle = key_projection(probe.layer).register_forward_hook(
            lambda m, a, out: captured.update(x=a[0].detach(), out=out.detach()))
        with torch.no_grad(), amp:
            model(x)
        handle.remove()
        probe_only = median_ms(lambda: cls_attention(probe.layer, captured['x'], captured['out'],
                                                     probe.num_prefix_tokens), device, 50)
        rows[name] = {
            'forward ms': plain, 'forward + probe ms': probed,
            'probe overhead % (end to end)': 100 * (probed - plain) / plain,
            'probe alone ms': probe_only, 'probe overhead % (probe alone / forward)': 100 * probe_only / plain,
            'official-style (unfused) ms': unfused, 'unfused / ours (fused + probe)': unfused / probed,
        }
        del model, probe
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--batch-size', type=int, default=128, help='mixer batch size')
    parser.add_argument('--model-batch-size', type=int, default=None, help='forward batch (default 128 on GPU, 16 on CPU)')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--repeats', type=int, default=10)
    parser.add_argument('--rounds', type=int, default=3, help='interleaved rounds of every candidate')
    parser.add_argument('--amp', action='store_true', help='bfloat16 autocast for the model forwards')
    parser.add_argument('--models', nargs='+', default=list(MODELS))
    parser.add_argument('--skip-models', action='store_true')
    parser.add_argument('--json', default='benchmark.json')
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.model_batch_size is None:
        args.model_batch_size = 128 if device.type == 'cuda' else 16
    torch.backends.cudnn.benchmark = True

    env = {'device': torch.cuda.get_device_name(device) if device.type == 'cuda' else f'cpu x{torch.get_num_threads()}',
           'torch': torch.__version__, 'timm': timm.__version__, **vars(args)}
    results = {'env': env, 'mixers_ms': bench_mixers(args, device)}
    print(f"\n(a) mixer time per batch, B={args.batch_size}, {args.img_size}px, {env['device']}")
    print('| mixer | ms / batch |\n|---|---|')
    for name, value in results['mixers_ms'].items():
        print(f'| {name} | {value:.3f} |')
    if not args.skip_models:
        results['models'] = bench_models(args, device)
        print(f"\n(b, c) forward, B={args.model_batch_size}, train mode{', bf16' if args.amp else ''}")
        cols = ['forward ms', 'forward + probe ms', 'probe overhead % (end to end)', 'probe alone ms',
                'probe overhead % (probe alone / forward)', 'official-style (unfused) ms',
                'unfused / ours (fused + probe)']
        print('| model | ' + ' | '.join(cols) + ' |')
        print('|---' * (len(cols) + 1) + '|')
        for name, row in results['models'].items():
            print(f'| {name} | ' + ' | '.join(f'{row[c]:.2f}' for c in cols) + ' |')
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f'\nwrote {args.json}')


if __name__ == '__main__':
    main()
