"""scripts/benchmark.py runs end to end (tiny sizes) and writes every figure it prints."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_image_folder

REPO = Path(__file__).resolve().parents[1]
METHODS = ('plain', 'mixup_cutmix', 'transmix', 'maskmix', 'mixpro')


@pytest.mark.slow
def test_benchmark_smoke(tmp_path):
    out = tmp_path / 'bench.json'
    data = make_image_folder(tmp_path / 'data', train_per_class=8)
    printed = subprocess.run(
        [sys.executable, str(REPO / 'scripts' / 'benchmark.py'), '--device', 'cpu', '--batch-size', '4',
         '--img-size', '64', '--model-batch-size', '1', '--repeats', '1', '--rounds', '1',
         '--models', 'deit_tiny_patch16_224', '--mixer-compile-backend', 'aot_eager',
         '--step-model', 'deit_tiny_patch16_224', '--step-model-kwargs', 'depth=1', 'embed_dim=32', 'num_heads=2',
         '--step-img-size', '32', '--step-mask-cell', '16', '--step-classes', '10', '--step-batch-size', '4',
         '--step-steps', '1', '--step-warmup', '1',
         '--recipe', str(REPO / 'configs' / 'quickstart_mixpro.yaml'), '--data-dir', str(data),
         '--recipe-args', '--batch-size 4 --img-size 16 --mask-cell 8', '--workers-list', '0',
         '--pipeline-batches', '2', '--json', str(out)],
        check=True, cwd=REPO, timeout=300, capture_output=True, text=True).stdout
    results = json.loads(out.read_text())

    mixers = results['mixers_ms']
    assert {'timm Mixup (cutmix mode)', 'ours maskmix', 'ours maskmix (one gather)', 'ratio maskmix / timm cutmix',
            'ratio maskmix+PAL+relabel / timm cutmix', 'memory floor (read 2 images, write 1)',
            'ours maskmix (compiled)', 'ratio maskmix+PAL+relabel (compiled) / timm cutmix'} <= set(mixers)
    assert all(v > 0 for v in mixers.values())
    kernels = results['mixer_kernels']
    assert 0 < kernels['ours maskmix'] < kernels['ours maskmix+PAL (+relabel)']
    row = results['models']['deit_tiny_patch16_224']
    assert row['forward ms'] > 0 and row['probe alone ms'] > 0 and row['official-style (unfused) ms'] > 0
    assert 0 < row['probe kernels'] <= 8

    step = results['train_step']
    assert set(step['rows']) == {f'{m} | {a} | eager' for m in METHODS for a in ('fused', 'unfused')}
    for name, figures in step['rows'].items():
        assert figures['ms/step'] > 0 and figures['img/s'] > 0, name
        assert figures['peak memory GB'] is None          # CUDA only
        assert f'| {name} | ' in printed
    ratios = step['ratios']
    assert {'mixpro / mixup_cutmix (fused, eager)', 'unfused / fused, mixpro (eager)', 'maskmix / plain (fused, eager)'} \
        <= set(ratios)
    assert all(v > 0 for v in ratios.values())

    pipeline = results['input_pipeline']
    assert set(pipeline['loader img/s by workers']) == {'0'} and pipeline['loader img/s by workers']['0'] > 0
    assert pipeline['step img/s'] > 0 and pipeline['batch_size'] == 4 and pipeline['method'] == 'mixpro'
    assert pipeline['verdict'] == ('input-bound' if pipeline['loader / step'] < 1 else 'compute-bound')
    assert f"| verdict | {pipeline['verdict']} |" in printed


@pytest.mark.slow
def test_benchmark_zoo_smoke(tmp_path):
    """(f) builds each recipe's own model and step and times it eager and compiled (dynamo's eager
    backend here: the tracing runs, inductor's code generation would take a minute on a CPU)."""
    out = tmp_path / 'zoo.json'
    recipes = [REPO / 'configs' / 'quickstart_mixpro.yaml', REPO / 'configs' / 'quickstart_baseline.yaml']
    printed = subprocess.run(
        [sys.executable, str(REPO / 'scripts' / 'benchmark.py'), '--device', 'cpu', '--sections', 'zoo',
         '--zoo', *map(str, recipes), '--zoo-args', '--img-size 16 --mask-cell 8', '--zoo-batch-size', '3',
         '--step-steps', '1', '--step-warmup', '1', '--rounds', '1', '--compile-backend', 'eager',
         '--json', str(out)],
        check=True, cwd=REPO, timeout=300, capture_output=True, text=True).stdout
    rows = json.loads(out.read_text())['zoo']
    assert set(rows) == {'quickstart_mixpro', 'quickstart_baseline'}
    assert rows['quickstart_mixpro']['method'] == 'mixpro' and rows['quickstart_baseline']['method'] == 'mixup_cutmix'
    for name, row in rows.items():
        assert row['model'] == 'deit_tiny_patch16_224' and row['batch'] == 3 and row['img_size'] == 16
        assert row['eager ms/step'] > 0 and row['compiled ms/step'] > 0 and row['compiled warm-up s'] > 0
        assert abs(row['eager / compiled'] - row['eager ms/step'] / row['compiled ms/step']) < 1e-9
        assert f"| {name} | deit_tiny_patch16_224 | {row['method']} | 3 | " in printed
    assert 'compiled is faster for' in printed


def test_warm_up_runs_both_probe_states_of_mixpro_before_timing():
    """A compiled model has a graph per probe state; MixPro switches it per step, so the warm-up goes on
    until both have run (else a compilation would land in the timed steps)."""
    import timm
    import torch
    sys.path.insert(0, str(REPO / 'scripts'))
    import benchmark
    from mixpro import AttentionProbe
    model = timm.create_model('deit_tiny_patch16_224', img_size=32, depth=1, embed_dim=32, num_heads=2,
                              num_classes=4)
    probe = AttentionProbe(model)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    for method, states in (('mixpro', {True, False}), ('mixup_cutmix', {False})):
        step = benchmark.TrainStep(model, probe, method, 4, x, y, benchmark.nullcontext(), 16, 16, seed=1)
        step.warm_up(optimizer, 1)
        assert step.probe_states == states, method
