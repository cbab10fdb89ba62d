#!/usr/bin/env bash
# The README "Benchmark" figures on one CUDA GPU, written to OUT (default benchmark-gpu/):
#
#   bash scripts/benchmark_gpu.sh [OUT] [core|zoo|pipeline|all] [DATA_DIR]
#
# core (about 6 min on an H100): the CUDA-only tests, then (a) mixers, (b, c) forward and probe, bf16;
#      (d) the DeiT-S train step per method, fused vs unfused, eager vs compiled, bf16, B=256.
# zoo  (about 1 min per recipe): (f) eager vs torch.compile for one MixPro recipe per family, B<=128.
# pipeline (not timed yet; a few minutes): (e) the DeiT-S MixPro recipe's train loader with both data backends,
#      interleaved, 1 to 14 workers: img/s of the whole loader and of its workers alone, the device stage's
#      ms per batch and its share of the step, the verdict per backend. On DATA_DIR (an ImageFolder, e.g.
#      ImageNet) when given, else on 2048 ImageNet-like JPEGs that scripts/make_jpegs.py writes to OUT/jpegs.
# Each part writes its JSON and log to OUT, so a part stopped by a time limit keeps what it finished.
set -euo pipefail
out=${1:-benchmark-gpu}
part=${2:-all}
data=${3:-}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: this script measures the GPU path")'

if [[ $part == core || $part == all ]]; then
    # a failing or missing test run is reported, and the figures are still measured
    python -m pytest -q -rs tests/test_probe.py tests/test_maskmix.py -k cuda 2>&1 | tee "$out/cuda_tests.log" || echo "CUDA tests FAILED"
    python scripts/benchmark.py --device cuda --amp --sections mixers models --json "$out/mixers_models.json" \
        2>&1 | tee "$out/mixers_models.log"
    python scripts/benchmark.py --device cuda --amp --compile --sections step --json "$out/train_step.json" \
        2>&1 | tee "$out/train_step.log"
fi
if [[ $part == zoo || $part == all ]]; then
    python scripts/benchmark.py --device cuda --sections zoo --zoo-batch-size 128 --json "$out/zoo.json" \
        --zoo configs/deit_s_mixpro.yaml configs/xcit_s_mixpro.yaml configs/cait_xxs_mixpro.yaml \
              configs/pvt_s_mixpro.yaml configs/ca_swin_t_mixpro.yaml 2>&1 | tee "$out/zoo.log"
fi
if [[ $part == pipeline || $part == all ]]; then
    if [[ -z $data ]]; then   # no data set needed: JPEGs of ImageNet's size and file size, made here
        data=$out/jpegs
        [[ -d $data/train ]] || python scripts/make_jpegs.py --out "$data" --images 2048 --classes 16
    fi
    python scripts/benchmark.py --device cuda --sections pipeline --recipe configs/deit_s_mixpro.yaml \
        --data-dir "$data" --data-backend pillow tensor --workers-list 1 4 8 14 --pipeline-batches 10 \
        --json "$out/pipeline.json" 2>&1 | tee "$out/pipeline.log"
fi
