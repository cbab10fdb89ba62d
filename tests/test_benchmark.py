"""scripts/benchmark.py runs end to end (tiny sizes) and writes every figure it prints."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_smoke(tmp_path):
    out = tmp_path / 'bench.json'
    subprocess.run([sys.executable, str(REPO / 'scripts' / 'benchmark.py'), '--device', 'cpu', '--batch-size', '4',
                    '--img-size', '64', '--model-batch-size', '1', '--repeats', '1', '--rounds', '1',
                    '--models', 'deit_tiny_patch16_224', '--json', str(out)], check=True, cwd=REPO, timeout=300)
    results = json.loads(out.read_text())
    mixers = results['mixers_ms']
    assert {'timm Mixup (cutmix mode)', 'ours maskmix', 'ratio maskmix / timm cutmix'} <= set(mixers)
    assert all(v > 0 for v in mixers.values())
    row = results['models']['deit_tiny_patch16_224']
    assert row['forward ms'] > 0 and row['probe alone ms'] > 0 and row['official-style (unfused) ms'] > 0
