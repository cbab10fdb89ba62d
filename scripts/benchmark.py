#!/usr/bin/env python
"""Speed of the mixing core, the train step and the input pipeline on whatever device is present;
prints tables and writes JSON.

    python scripts/benchmark.py [--device cuda] [--amp] [--compile] [--json out.json]
    python scripts/benchmark.py --sections pipeline --recipe configs/deit_s_mixpro.yaml --data-dir /data/imagenet \
        --workers-list 4 8 --data-backend pillow tensor
    python scripts/benchmark.py --sections zoo --zoo configs/*_mixpro.yaml --zoo-batch-size 128

(a) mixer time per batch for every method against timm ``Mixup`` (CutMix and Mixup modes) and the
    memory floor, and the tensor operations (kernels) one call launches;
(b) model forward time with and without the attention probe;
(c) an "official-style" forward with fused attention switched off in every block, against ours;
(d) the full train step (mix, forward, relabel, loss, backward, AdamW step) per method (plain,
    mixup_cutmix, transmix, maskmix, mixpro), fused vs official-style unfused attention, eager vs
    ``torch.compile`` (--compile): ms/step, img/s, peak memory, ratios;
(e) with --recipe and --data-dir: the recipe's train loader alone (img/s per data backend and worker count:
    the whole loader, its workers alone, the device stage alone) against the recipe's train step alone, and
    the verdict input-bound / compute-bound per backend (scripts/make_jpegs.py writes ImageNet-like JPEGs);
(f) with --zoo: each recipe's own model and train step, eager against torch.compile (ms/step, warm-up
    seconds, steps until compiling pays back, peak memory): whether compiling pays across the zoo.
All ratios come from one run on one device, candidates interleaved. Goals (figures, not tests):
MaskMix <= 1.0x timm CutMix; probe overhead <= 0.5 % of the forward.
"""
import argparse
import copy
import json
import shlex
import statistics
import sys
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.layers import Attention
from timm.loss import SoftTargetCrossEntropy
from timm.models.cait import ClassAttn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mixpro import AttentionProbe, Mixer  # noqa: E402
from mixpro.probe import cls_attention, key_projection  # noqa: E402
from mixpro.tensor_data import DeviceAugmentLoader  # noqa: E402

MODELS = ('deit_small_patch16_224', 'cait_xxs36_224', 'xcit_small_12_p16_224')
STEP_METHODS = ('plain', 'mixup_cutmix', 'transmix', 'maskmix', 'mixpro')
NEEDS_ATTENTION = ('transmix', 'mixpro')
# aten operations that only make a view: no kernel runs for them
VIEW_OPS = {'view', '_unsafe_view', 'unsqueeze', 'squeeze', 'expand', 'slice', 'select', 'transpose', 't',
            'permute', 'detach', 'alias', 'as_strided', '_reshape_alias', 'split_with_sizes', 'split',
            'empty', 'empty_like', 'empty_strided'}


class _KernelCount(TorchDispatchMode):
    """Counts the aten operations a call runs that do work on the device (views and allocations left out):
    on a GPU every one is at least one kernel launch, which is what a small batch's time is made of."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split('.')[0]
        if name not in VIEW_OPS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def kernel_count(fn) -> int:
    with _KernelCount() as counter:
        fn()
    return sum(counter.ops.values())


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
    if device.type == 'cpu':   # the accelerators' composition (one gather), timed on the CPU too
        one_gather = Mixer('maskmix', **ours_kw)
        one_gather.cpu_in_place = False
        candidates['ours maskmix (one gather)'] = one_gather
    compiled = compiled_mixers(args.mixer_compile_backend, x, y, logits, attention, ours_kw)
    candidates.update(compiled)
    steps = {}
    for name, mixer in candidates.items():
        def step(mixer=mixer):
            mixed, target = mixer(x, y)   # in place, like timm: the values drift, the cost does not
            if isinstance(mixer, Mixer):
                mixer.relabel(logits, attention if mixer.needs_attention else None)
        steps[name] = step
    other, out = torch.randn_like(x), torch.empty_like(x)
    steps['memory floor (read 2 images, write 1)'] = lambda: torch.add(x, other, out=out)
    # interleave the candidates so drift in machine load hits all of them alike
    per_round = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            per_round[name].append(median_ms(step, device, args.repeats))
    rows = {name: statistics.median(times) for name, times in per_round.items()}
    timm_cutmix = rows['timm Mixup (cutmix mode)']
    rows['ratio maskmix / timm cutmix'] = rows['ours maskmix'] / timm_cutmix
    if 'ours maskmix (one gather)' in rows:
        rows['ratio maskmix (one gather) / timm cutmix'] = rows['ours maskmix (one gather)'] / timm_cutmix
    rows['ratio maskmix+PAL+relabel / timm cutmix'] = rows['ours maskmix+PAL (+relabel)'] / timm_cutmix
    if compiled:
        rows['ratio maskmix (compiled) / timm cutmix'] = rows['ours maskmix (compiled)'] / timm_cutmix
        rows['ratio maskmix+PAL+relabel (compiled) / timm cutmix'] = \
            rows['ours maskmix+PAL (compiled, +relabel)'] / timm_cutmix
    rows['ratio cutmix / timm cutmix'] = rows['ours cutmix'] / timm_cutmix
    rows['ratio mixup / timm mixup'] = rows['ours mixup'] / rows['timm Mixup (mixup mode)']
    rows['ratio memory floor / timm cutmix'] = rows['memory floor (read 2 images, write 1)'] / timm_cutmix
    # kernels per call of the accelerator path (the CPU path copies cell by cell and launches more)
    maskmix, pal = Mixer('maskmix', **ours_kw), Mixer('mixpro', maskmix_prob=1.0, **ours_kw)
    maskmix.cpu_in_place = pal.cpu_in_place = False
    timm_cutmix_mixer = candidates['timm Mixup (cutmix mode)']
    maskmix(x, y), pal(x, y)   # the first call builds the cached constants
    calls = {'timm Mixup (cutmix mode)': lambda: timm_cutmix_mixer(x, y),
             'ours maskmix': lambda: maskmix(x, y),
             'ours maskmix+PAL (+relabel)': lambda: (pal(x, y), pal.relabel(logits, attention))}
    ops = {name: kernel_count(call) for name, call in calls.items()}
    if device.type == 'cuda':   # what the GPU really launched, compiled mixers included
        calls.update({name: steps[name] for name in compiled})
        ops.update({f'{name}: GPU work items launched': cuda_work_items(call) for name, call in calls.items()})
    return rows, ops


def compiled_mixers(backend, x, y, logits, attention, ours_kw) -> dict:
    """MaskMix and MaskMix + PAL with ``--compile-mixer`` (compiled here, on a first call): none when
    ``backend`` is empty or the compiler is not usable (e.g. no C++ compiler for inductor on the CPU)."""
    if not backend:
        return {}
    mixers = {'ours maskmix (compiled)': Mixer('maskmix', compile_backend=backend, **ours_kw),
              'ours maskmix+PAL (compiled, +relabel)': Mixer('mixpro', maskmix_prob=1.0, compile_backend=backend,
                                                             **ours_kw)}
    try:
        for mixer in mixers.values():
            mixer.cpu_in_place = False   # the accelerators' composition (the CPU's in-place copy is never compiled)
            mixer(x.clone(), y)
            mixer.relabel(logits, attention if mixer.needs_attention else None)
    except Exception as err:   # the compiler's own errors are many kinds
        print(f'note: --mixer-compile-backend {backend} failed here, compiled mixers not timed: '
              f'{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ""}', flush=True)
        return {}
    return mixers


def cuda_work_items(fn) -> int:
    """The kernels, copies and fills one call puts on the GPU, from the profiler (annotations left out)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA
               and not getattr(event, 'is_user_annotation', False))


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

        def forward(model=model):
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
        def probe_alone(probe=probe):
            return cls_attention(probe.layer, captured['x'], captured['out'], probe.num_prefix_tokens)
        probe_only = median_ms(probe_alone, device, 50)
        rows[name] = {
            'forward ms': plain, 'forward + probe ms': probed,
            'probe overhead % (end to end)': 100 * (probed - plain) / plain,
            'probe alone ms': probe_only, 'probe overhead % (probe alone / forward)': 100 * probe_only / plain,
            'official-style (unfused) ms': unfused, 'unfused / ours (fused + probe)': unfused / probed,
            'probe kernels': kernel_count(probe_alone),
        }
        del model, probe
    return rows


def parse_kwargs(items):
    """``key=value`` strings -> dict, values read as Python literals where they are one."""
    import ast
    out = {}
    for item in items or []:
        key, value = item.split('=', 1)
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


class TrainStep:
    """One training step as mixpro/engine.py runs it (mix -> forward -> relabel -> loss -> backward ->
    AdamW step), on a fixed batch; ``plain`` is the unmixed step with a label-smoothed cross-entropy.
    ``compile_backend``: the mixer's (``--compile-mixer``), for a step whose model is compiled too."""

    def __init__(self, model, probe, method, num_classes, x, y, amp, mask_cell, token_size, seed=0,
                 compile_backend=None):
        self.model, self.probe, self.method, self.x, self.y, self.amp = model, probe, method, x, y, amp
        self.mixer = None if method == 'plain' else Mixer(method, num_classes=num_classes, mask_cell=mask_cell,
                                                          token_size=token_size, seed=seed,
                                                          compile_backend=compile_backend)
        self.loss_fn = SoftTargetCrossEntropy()
        self.probe_states = set()   # the probe states seen: a compiled model has one graph for each

    def warm_up(self, optimizer, steps, limit=64):
        """``steps`` steps, then more (up to ``limit``) until every probe state the method uses has run,
        so that no compilation falls into the timed steps (TransMix and MixPro switch the probe per step)."""
        wanted = {True, False} if self.probe is not None and self.method in NEEDS_ATTENTION else {False}
        for done in range(limit):
            if done >= steps and wanted <= self.probe_states:
                return
            self(optimizer)

    def __call__(self, optimizer):
        x, y, mixer, probe = self.x, self.y, self.mixer, self.probe
        if mixer is not None:
            x, target = mixer(x, y)
        if probe is not None:
            probe.enabled = mixer is not None and mixer.needs_attention
        self.probe_states.add(probe is not None and probe.enabled)
        with self.amp:
            logits = self.model(x)
            if probe is not None:   # as engine.py: read once, not again in a recomputing backward
                probe.enabled = False
            if mixer is None:
                loss = F.cross_entropy(logits, y, label_smoothing=0.1)
            else:
                target = mixer.relabel(logits, probe.attention if mixer.needs_attention else None)
                loss = self.loss_fn(logits, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if probe is not None:
            probe.enabled, probe.attention = False, None


def build_step_models(args, device, attention_modes):
    """One model per attention mode (fused, unfused), each with the probe attached before compiling."""
    kwargs = dict(parse_kwargs(args.step_model_kwargs), num_classes=args.step_classes, img_size=args.step_img_size)
    built = {}
    for mode in attention_modes:
        torch.manual_seed(0)
        model = timm.create_model(args.step_model, **kwargs).to(device).train()
        probe = AttentionProbe(model)
        set_fused_attention(model, mode == 'fused')
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        built[mode] = (model, probe, optimizer)
    return built


def time_steps(step, optimizer, device, steps):
    """ms per step over ``steps`` steps (the mean: MixPro and TransMix alternate kinds of steps)."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(optimizer)
    sync(device)
    return (time.perf_counter() - start) * 1e3 / steps


def time_interleaved(configs, args, device):
    """Median ms per step of each ``(step, optimizer)`` in ``configs`` over ``args.rounds`` rounds, the
    configurations interleaved so that drift in machine load hits all of them alike; and the peak memory
    (GB) of each on CUDA."""
    per_round = {key: [] for key in configs}
    peak = {}
    for _ in range(args.rounds):
        for key, (step, optimizer) in configs.items():
            if device.type == 'cuda':
                torch.cuda.reset_peak_memory_stats(device)
            per_round[key].append(time_steps(step, optimizer, device, args.step_steps))
            if device.type == 'cuda':
                peak[key] = max(peak.get(key, 0.0), torch.cuda.max_memory_allocated(device) / 1e9)
    return {key: statistics.median(times) for key, times in per_round.items()}, peak


def bench_train_step(args, device):
    """(d): per method x attention (fused / official-style unfused) x mode (eager / compiled)."""
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.amp else nullcontext()
    batch, size = args.step_batch_size, args.step_img_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    y = torch.randint(0, args.step_classes, (batch,), generator=gen).to(device)
    attention_modes = ('fused', 'unfused')
    modes = ('eager', 'compiled') if args.compile else ('eager',)
    models = build_step_models(args, device, attention_modes)
    configs = {}
    for attention in attention_modes:
        model, probe, optimizer = models[attention]
        runners = {'eager': model}
        if args.compile:
            runners['compiled'] = torch.compile(model, backend=args.compile_backend, mode=args.compile_mode)
        for mode in modes:
            for method in args.step_methods:
                mixer_backend = args.compile_backend if mode == 'compiled' else None   # the whole step compiled
                step = TrainStep(runners[mode], probe, method, args.step_classes, x, y, amp, args.step_mask_cell,
                                 probe.token_size, compile_backend=mixer_backend)
                configs[(method, attention, mode)] = (step, optimizer)
    for (method, attention, mode), (step, optimizer) in configs.items():   # warm up (compiles every graph)
        step.warm_up(optimizer, args.step_warmup)
    medians, peak = time_interleaved(configs, args, device)
    rows = {}
    for key, ms in medians.items():
        rows[' | '.join(key)] = {'ms/step': ms, 'img/s': batch * 1e3 / ms, 'peak memory GB': peak.get(key)}
    ratios = {}
    for attention in attention_modes:
        for mode in modes:
            def ms(method):
                return rows[f'{method} | {attention} | {mode}']['ms/step']
            for method in args.step_methods:
                if method != 'plain' and 'plain' in args.step_methods:
                    ratios[f'{method} / plain ({attention}, {mode})'] = ms(method) / ms('plain')
            if {'mixpro', 'mixup_cutmix'} <= set(args.step_methods):
                ratios[f'mixpro / mixup_cutmix ({attention}, {mode})'] = ms('mixpro') / ms('mixup_cutmix')
    for method in args.step_methods:
        for mode in modes:
            ratios[f'unfused / fused, {method} ({mode})'] = (rows[f'{method} | unfused | {mode}']['ms/step']
                                                            / rows[f'{method} | fused | {mode}']['ms/step'])
        if args.compile:
            for attention in attention_modes:
                ratios[f'eager / compiled, {method} ({attention})'] = (rows[f'{method} | {attention} | eager']['ms/step']
                                                                      / rows[f'{method} | {attention} | compiled']['ms/step'])
    return {'config': {'model': args.step_model, 'model_kwargs': parse_kwargs(args.step_model_kwargs), 'batch': batch,
                       'img_size': size, 'amp': bool(args.amp), 'steps_per_round': args.step_steps,
                       'rounds': args.rounds, 'compile_backend': args.compile_backend if args.compile else None,
                       'compile_mode': args.compile_mode if args.compile else None},
            'rows': rows, 'ratios': ratios}


def bench_input_pipeline(args, device):
    """(e): the recipe's train loader per data backend and worker count, against the recipe's train step
    alone. Interleaved: for each of ``--rounds`` rounds, for each worker count, for each backend, the whole
    loader (device stage included), then its DataLoader alone (the workers' side); once per round and
    backend the device stage alone, on a cached batch. Medians over rounds. Returns
    ``(records, summaries)``: one record per (backend, workers), one summary (with the verdict) per backend."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from timm.data import resolve_data_config
    from mixpro.build import create_model, model_options
    from mixpro.data import build_dataset, class_index_of, num_classes_of, train_loader
    from mixpro.distributed import DistInfo
    from mixpro.logger import setup_logging

    setup_logging()   # mixpro's notes (a recipe's backend on the CPU, an option the tensor path cannot train)
    dist_info = DistInfo(device=device)
    recipes, datasets = {}, {}
    for asked in args.data_backend or [None]:   # None: the recipe's own backend, as train.py resolves it here
        recipe = parse_recipe(args.recipe, device, f"--data-dir {shlex.quote(args.data_dir)} {args.recipe_args or ''}"
                              + (f' --data-backend {asked}' if asked else ''))   # last: it wins over --recipe-args
        if recipe.data_backend in recipes:
            raise SystemExit(f'--data-backend: {recipe.data_backend} is named twice; name each backend once')
        recipes[recipe.data_backend] = recipe
        # a dataset per backend: the tensor backend makes its reader hand over decoded tensors
        datasets[recipe.data_backend] = build_dataset(
            recipe.data_dir, recipe.train_split, is_training=True, dataset=recipe.dataset, class_map=recipe.class_map,
            num_classes=recipe.num_classes, batch_size=recipe.batch_size, seed=recipe.seed)
    first = next(iter(recipes.values()))
    class_index_of(datasets[first.data_backend])
    num_classes = first.num_classes or num_classes_of(datasets[first.data_backend])
    model = create_model(first.model, num_classes, **model_options(first))
    data_config = resolve_data_config(vars(first), model=model)
    recipe_workers = first.workers
    workers_list = args.workers_list if args.workers_list is not None else [recipe_workers]

    loaders = {}   # (backend, workers) -> the train loader as train.py builds it (its workers start per timing)
    for backend, recipe in recipes.items():
        for workers in workers_list:
            recipe.workers = workers
            loader = train_loader(datasets[backend], data_config, recipe, dist_info)
            if backend == 'tensor' and not isinstance(loader, DeviceAugmentLoader):
                raise SystemExit(f'--data-backend tensor: {args.recipe} with {args.recipe_args!r} trains with pillow '
                                 f'(the note above names the option the tensor path cannot train): change that '
                                 f'option in --recipe-args, or time pillow only')
            if len(loader) < 2:
                raise SystemExit(f'--recipe: {len(datasets[backend])} images give {len(loader)} batches of '
                                 f'{recipe.batch_size}; the loader timing needs at least two (more images, or a '
                                 f'smaller --batch-size in --recipe-args)')
            loaders[(backend, workers)] = loader
    # one batch per backend as its workers hand it over, kept on the device for timing the device stage alone
    cached = {backend: first_batch(loaders[(backend, workers_list[0])], device) for backend in recipes}
    batches = min(args.pipeline_batches, *(len(loader) - 1 for loader in loaders.values()))

    loader_rates = {key: [] for key in loaders}
    worker_rates = {key: [] for key in loaders}
    device_ms = {backend: [] for backend in recipes}
    for _ in range(args.rounds):
        for workers in workers_list:
            for backend in recipes:
                loader = loaders[(backend, workers)]
                loader_rates[(backend, workers)].append(loader_rate(loader, batches, device))
                worker_rates[(backend, workers)].append(loader_rate(getattr(loader, 'loader', loader), batches, device))
        for backend in recipes:
            ms = device_stage_ms(loaders[(backend, workers_list[0])], cached[backend], device, args.repeats)
            if ms is not None:
                device_ms[backend].append(ms)

    # the step alone, on a fixed batch of the recipe's shape, method and precision (the same for every backend)
    steps = recipe_steps(first, model, num_classes, data_config['input_size'][-1], device,
                         {'step': args.compile_backend if args.compile else None}, args.compile_mode)
    step, optimizer = steps['step']
    step.warm_up(optimizer, args.step_warmup)
    step_ms = statistics.median(time_steps(step, optimizer, device, args.step_steps) for _ in range(args.rounds))
    step_rate = first.batch_size * 1e3 / step_ms

    records, summaries = [], {}
    for backend, recipe in recipes.items():
        stage_ms = statistics.median(device_ms[backend]) if device_ms[backend] else None
        rates = {}
        for workers in workers_list:
            rates[str(workers)] = statistics.median(loader_rates[(backend, workers)])
            records.append({'data_backend': backend, 'workers': workers, 'batch_size': recipe.batch_size,
                            'loader_img_per_s': rates[str(workers)],
                            'worker_img_per_s': statistics.median(worker_rates[(backend, workers)]),
                            'device_ms_per_batch': stage_ms})
        # the verdict for the recipe's own worker count where it was timed, else for the best one timed
        best_workers, best_rate = max(rates.items(), key=lambda kv: kv[1])
        loader_rate_used = rates.get(str(recipe_workers), best_rate)
        summaries[backend] = {
            'recipe': args.recipe, 'data_backend': backend, 'batch_size': recipe.batch_size,
            'img_size': data_config['input_size'][-1], 'method': recipe.mix_method, 'recipe workers': recipe_workers,
            'loader img/s by workers': rates, 'best loader img/s': best_rate, 'best workers': int(best_workers),
            'step img/s' + (' (compiled)' if args.compile else ''): step_rate, 'step ms': step_ms,
            'loader / step': loader_rate_used / step_rate,
            'device ms/batch': stage_ms,
            # on a GPU the device stage shares the device with the step: this much is added to each step
            'device stage / step': None if stage_ms is None else stage_ms / step_ms,
            'verdict': 'input-bound' if loader_rate_used < step_rate else 'compute-bound'}
    return records, summaries


def first_batch(loader, device):
    """The first batch of ``loader``'s DataLoader (no device stage), images and targets moved to ``device``
    (RandAugment parameters stay on the CPU, where ``DeviceAugmentLoader`` leaves them)."""
    from mixpro.data import set_loader_epoch, stop_workers
    raw = getattr(loader, 'loader', loader)
    set_loader_epoch(loader, 0)
    iterator = iter(raw)
    try:
        images, targets, *params = next(iterator)
    finally:
        del iterator
        stop_workers(raw)   # persistent workers would go on filling their queue, taking CPU from the timings
    return (images.to(device), targets.to(device), *params)


def loader_rate(loader, batches, device) -> float:
    """img/s through ``loader`` over ``batches`` batches after the first (workers started, the first batches
    in flight: steady state from there); its workers are stopped afterwards, so that they take no CPU from
    the next timing."""
    from mixpro.data import set_loader_epoch, stop_workers
    set_loader_epoch(loader, 0)   # the same images every time: every candidate reads the same (cached) files
    iterator = iter(loader)
    try:
        next(iterator)
        sync(device)
        start, images = time.perf_counter(), 0
        for _ in range(batches):
            batch = next(iterator)
            images += batch[0].shape[0]
        sync(device)   # the device stage's work queued on a GPU is part of the loader's time
        return images / (time.perf_counter() - start)
    finally:
        del iterator
        stop_workers(loader)


def device_stage_ms(loader, batch, device, repeats):
    """ms per batch of ``loader``'s device stage alone (``DeviceAugmentLoader``), run on ``batch`` by the
    loader's own code: RandAugment from the batch's parameters (tensor backend), normalisation and random
    erasing. None when there is none: Pillow on the CPU normalises and erases in the workers' transform."""
    if not isinstance(loader, DeviceAugmentLoader):
        return None
    stage = copy.copy(loader)   # the same mean, std and erasing, fed one cached batch
    stage.loader = [batch]
    return median_ms(lambda: next(iter(stage)), device, repeats, warmup=1)


def parse_recipe(path, device, extra_args=''):
    """A recipe's options as train.py reads them (no data folder needed to build its model and step)."""
    from mixpro.config import parse_train_args
    return parse_train_args(['--config', str(path), '--device', device.type, '--output', '/tmp',
                             *shlex.split(extra_args or '')])


def recipe_steps(recipe, model, num_classes, size, device, backends, compile_mode=None):
    """The recipe's train step on a fixed batch of its shape, method and precision, once per entry of
    ``backends`` (name -> torch.compile backend, or None for eager; ``compile_mode`` its mode):
    {name: (step, optimizer)}. All share ``model``, its probe (attached before compiling, as train.py does)
    and one optimizer, so that one model's weights and optimizer state are in memory."""
    from mixpro.build import (NEEDS_ATTENTION as RECIPE_NEEDS_ATTENTION, label_token_size, mixed_precision,
                              wrap_for_training)
    model.to(device).train()
    probe = AttentionProbe(model) if recipe.mix_method in RECIPE_NEEDS_ATTENTION else None
    x = torch.randn(recipe.batch_size, 3, size, size, device=device)
    y = torch.randint(0, num_classes, (recipe.batch_size,), device=device)
    amp, _ = mixed_precision(device, recipe.amp, recipe.amp_dtype)   # the step is timed without a GradScaler
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    steps = {}
    for name, backend in backends.items():
        runner, _ = wrap_for_training(model, device=device, torchcompile=backend,   # compiled as train.py compiles
                                      torchcompile_mode=compile_mode if backend else None,
                                      grad_checkpointing=recipe.grad_checkpointing)
        steps[name] = (TrainStep(runner, probe, recipe.mix_method, num_classes, x, y, amp, recipe.mask_cell,
                                 probe.token_size if probe else label_token_size(model), compile_backend=backend),
                       optimizer)
    return steps


def bench_zoo(args, device):
    """(f): each recipe's own model and train step (its method, batch, size, precision), eager against
    ``torch.compile``: ms/step, seconds to compile, peak memory, the speed-up."""
    from timm.data import resolve_data_config
    from mixpro.build import create_model, model_options
    rows = {}
    for path in args.zoo:
        recipe = parse_recipe(path, device, args.zoo_args)
        if args.zoo_batch_size:
            recipe.batch_size = min(recipe.batch_size, args.zoo_batch_size)
        num_classes = recipe.num_classes or 1000
        row = {'model': recipe.model, 'method': recipe.mix_method, 'batch': recipe.batch_size}
        torch.manual_seed(0)
        model = create_model(recipe.model, num_classes, **model_options(recipe))
        size = resolve_data_config(vars(recipe), model=model)['input_size'][-1]
        steps = recipe_steps(recipe, model, num_classes, size, device,
                             {'eager': None, 'compiled': args.compile_backend}, args.compile_mode)
        for mode, (step, optimizer) in steps.items():
            sync(device)
            start = time.perf_counter()
            step.warm_up(optimizer, args.step_warmup)   # compiles every graph the method's steps need
            sync(device)
            row[f'{mode} warm-up s'] = time.perf_counter() - start
        row['img_size'] = size
        medians, peak = time_interleaved(steps, args, device)
        for mode in steps:
            row[f'{mode} ms/step'] = medians[mode]
            row[f'{mode} peak memory GB'] = peak.get(mode)
        row['eager / compiled'] = row['eager ms/step'] / row['compiled ms/step']
        # steps until the compile time is paid back by the faster steps
        saved = row['eager ms/step'] - row['compiled ms/step']
        extra = (row['compiled warm-up s'] - row['eager warm-up s']) * 1e3
        row['steps to pay back compiling'] = extra / saved if saved > 0 else None
        rows[Path(path).stem] = row
        del steps, step, optimizer, model
        torch._dynamo.reset()
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    return rows


def backend_ratios(records) -> dict:
    """tensor / pillow per worker count, for the whole loader and for the workers alone (where both ran)."""
    by_key = {(r['data_backend'], r['workers']): r for r in records}
    ratios = {}
    for (backend, workers), tensor in by_key.items():
        pillow = by_key.get(('pillow', workers))
        if backend == 'tensor' and pillow is not None:
            ratios[f'tensor / pillow, whole loader, workers {workers}'] = \
                tensor['loader_img_per_s'] / pillow['loader_img_per_s']
            ratios[f'tensor / pillow, workers alone, workers {workers}'] = \
                tensor['worker_img_per_s'] / pillow['worker_img_per_s']
    return ratios


def print_pipeline(args, env, records, summaries, ratios):
    for backend, summary in summaries.items():
        print_table(f"(e) input pipeline, {args.recipe}, --data-backend {backend}, {env['device']}",
                    {k: v for k, v in summary.items() if k != 'loader img/s by workers'}, '{:.2f}')
    print(f"\n(e) img/s per backend and workers (median of {args.rounds} rounds; whole loader = workers + device stage)")
    print('| data backend | workers | batch | whole loader img/s | workers alone img/s | device ms/batch |\n'
          '|---|---|---|---|---|---|')
    for r in records:
        device_ms = 'n/a (in the workers)' if r['device_ms_per_batch'] is None else f"{r['device_ms_per_batch']:.1f}"
        print(f"| {r['data_backend']} | {r['workers']} | {r['batch_size']} | {r['loader_img_per_s']:.1f} | "
              f"{r['worker_img_per_s']:.1f} | {device_ms} |")
    if ratios:
        print_table('(e) tensor / pillow (same run)', ratios, '{:.2f}')


def print_table(title, rows, value_format='{:.3f}'):
    print(f'\n{title}')
    print('| | value |\n|---|---|')
    for name, value in rows.items():
        print(f'| {name} | ' + (value_format.format(value) if isinstance(value, float) else str(value)) + ' |')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--sections', nargs='+', default=None, choices=('mixers', 'models', 'step', 'pipeline', 'zoo'),
                        help='default: mixers models step, and pipeline when --recipe is given')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (a shared CPU: 1 is steadier)')
    parser.add_argument('--batch-size', type=int, default=128, help='mixer batch size')
    parser.add_argument('--model-batch-size', type=int, default=None, help='forward batch (default 128 on GPU, 16 on CPU)')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--repeats', type=int, default=10)
    parser.add_argument('--rounds', type=int, default=3, help='interleaved rounds of every candidate')
    parser.add_argument('--amp', action='store_true', help='bfloat16 autocast for the model forwards and steps')
    parser.add_argument('--mixer-compile-backend', default='inductor',
                        help="(a) also time --compile-mixer with this backend ('' = not)")
    parser.add_argument('--models', nargs='+', default=list(MODELS))
    parser.add_argument('--skip-models', action='store_true', help='same as leaving models out of --sections')
    g = parser.add_argument_group('(d) train step')
    g.add_argument('--step-model', default='deit_small_patch16_224')
    g.add_argument('--step-model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                   help='e.g. depth=2 embed_dim=96 num_heads=3 for a quick CPU run')
    g.add_argument('--step-batch-size', type=int, default=None, help='default 256 on GPU, 16 on CPU')
    g.add_argument('--step-img-size', type=int, default=224)
    g.add_argument('--step-mask-cell', type=int, default=64)
    g.add_argument('--step-classes', type=int, default=1000)
    g.add_argument('--step-methods', nargs='+', default=list(STEP_METHODS), choices=STEP_METHODS)
    g.add_argument('--step-steps', type=int, default=None, help='steps per timed block (default 20 on GPU, 4 on CPU)')
    g.add_argument('--step-warmup', type=int, default=4, help='untimed steps per configuration (compiles)')
    g.add_argument('--compile', action='store_true', help='also time the steps under torch.compile')
    g.add_argument('--compile-backend', default='inductor')
    g.add_argument('--compile-mode', default=None,
                   help='torch.compile mode of the compiled model in (d) and (f), e.g. reduce-overhead, max-autotune')
    g = parser.add_argument_group('(e) input pipeline')
    g.add_argument('--recipe', help='a training recipe (configs/*.yaml)')
    g.add_argument('--data-dir', help="the recipe's data folder")
    g.add_argument('--recipe-args', default='', help='more train.py options for the recipe, one string')
    g.add_argument('--workers-list', type=int, nargs='+', default=None,
                   help="loader worker counts to time (default: the recipe's)")
    g.add_argument('--pipeline-batches', type=int, default=20, help='batches timed per worker count and backend')
    g.add_argument('--data-backend', nargs='+', default=None, choices=('pillow', 'tensor'),
                   help="data backends to time, interleaved (default: the recipe's, which is pillow on a CPU)")
    g = parser.add_argument_group('(f) compile across the model zoo')
    g.add_argument('--zoo', nargs='+', default=[], metavar='RECIPE',
                   help='recipes (configs/*.yaml) whose model and train step to time eager and compiled')
    g.add_argument('--zoo-batch-size', type=int, default=None, help="cap on each recipe's per-GPU batch")
    g.add_argument('--zoo-args', default='', help='more train.py options for every zoo recipe, one string')
    parser.add_argument('--json', default='benchmark.json')
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model_batch_size is None:
        args.model_batch_size = 128 if device.type == 'cuda' else 16
    if args.step_batch_size is None:
        args.step_batch_size = 256 if device.type == 'cuda' else 16
    if args.step_steps is None:
        args.step_steps = 20 if device.type == 'cuda' else 4
    sections = args.sections or (['mixers', 'models', 'step'] + (['pipeline'] if args.recipe else [])
                                 + (['zoo'] if args.zoo else []))
    if args.skip_models and 'models' in sections:
        sections.remove('models')
    if 'pipeline' in sections and not (args.recipe and args.data_dir):
        parser.error('the pipeline section needs --recipe and --data-dir')
    if 'zoo' in sections and not args.zoo:
        parser.error('the zoo section needs --zoo RECIPE [RECIPE ...]')
    torch.backends.cudnn.benchmark = True

    env = {'device': torch.cuda.get_device_name(device) if device.type == 'cuda' else f'cpu x{torch.get_num_threads()}',
           'torch': torch.__version__, 'timm': timm.__version__, **vars(args)}
    results = {'env': env}
    if 'mixers' in sections:
        results['mixers_ms'], results['mixer_kernels'] = bench_mixers(args, device)
        print_table(f"(a) mixer ms per batch, B={args.batch_size}, {args.img_size}px, {env['device']}", results['mixers_ms'])
        print_table('(a) tensor operations (kernels) per call, accelerator path', results['mixer_kernels'], '{}')
    if 'models' in sections:
        results['models'] = bench_models(args, device)
        print(f"\n(b, c) forward, B={args.model_batch_size}, train mode{', bf16' if args.amp else ''}")
        cols = ['forward ms', 'forward + probe ms', 'probe overhead % (end to end)', 'probe alone ms',
                'probe overhead % (probe alone / forward)', 'official-style (unfused) ms',
                'unfused / ours (fused + probe)', 'probe kernels']
        print('| model | ' + ' | '.join(cols) + ' |')
        print('|---' * (len(cols) + 1) + '|')
        for name, row in results['models'].items():
            print(f'| {name} | ' + ' | '.join(f'{row[c]:.2f}' for c in cols) + ' |')
    if 'step' in sections:
        results['train_step'] = bench_train_step(args, device)
        cfg = results['train_step']['config']
        print(f"\n(d) train step, {cfg['model']} {cfg['model_kwargs'] or ''} B={cfg['batch']}, {cfg['img_size']}px"
              f"{', bf16' if cfg['amp'] else ''}, {env['device']}")
        print('| method | attention | mode | ms/step | img/s | peak memory GB |\n|---|---|---|---|---|---|')
        for name, row in results['train_step']['rows'].items():
            peak = 'n/a' if row['peak memory GB'] is None else f"{row['peak memory GB']:.2f}"
            print(f"| {name} | {row['ms/step']:.2f} | {row['img/s']:.1f} | {peak} |")
        print_table('(d) ratios (same run)', results['train_step']['ratios'])
    if 'pipeline' in sections:
        results['pipeline'], summaries = bench_input_pipeline(args, device)
        results['input_pipeline'] = next(iter(summaries.values()))   # the first backend's, as before backends
        results['input_pipeline_by_backend'] = summaries
        results['pipeline_ratios'] = backend_ratios(results['pipeline'])
        print_pipeline(args, env, results['pipeline'], summaries, results['pipeline_ratios'])
    if 'zoo' in sections:
        results['zoo'] = bench_zoo(args, device)
        print(f"\n(f) eager vs torch.compile ({args.compile_backend}) per recipe, {env['device']}")
        cols = ['eager ms/step', 'compiled ms/step', 'eager / compiled', 'compiled warm-up s',
                'steps to pay back compiling', 'eager peak memory GB', 'compiled peak memory GB']
        print('| recipe | model | method | batch | ' + ' | '.join(cols) + ' |\n' + '|---' * (len(cols) + 4) + '|')
        for name, row in results['zoo'].items():
            cells = ['n/a' if row[c] is None else f'{row[c]:.2f}' for c in cols]
            print(f"| {name} | {row['model']} | {row['method']} | {row['batch']} | " + ' | '.join(cells) + ' |')
        faster = sum(row['eager / compiled'] > 1 for row in results['zoo'].values())
        print(f"compiled is faster for {faster} of {len(results['zoo'])} recipes")
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f'\nwrote {args.json}')


if __name__ == '__main__':
    main()
