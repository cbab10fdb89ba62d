#!/usr/bin/env bash
# Quickstart on the built-in digits dataset, CPU-friendly (a few minutes on 2 cores):
# prepares the data, trains the baseline, TransMix and MixPro recipes, prints a comparison table.
#   bash scripts/quickstart.sh [extra train.py options, e.g. --epochs 3]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
.venv/bin/python scripts/prepare_digits.py --out data/digits
for recipe in baseline transmix mixpro; do
  echo "== quickstart_${recipe}"
  .venv/bin/python train.py --config "configs/quickstart_${recipe}.yaml" --resume none "$@"
done
.venv/bin/python scripts/compare_runs.py output/quickstart_baseline output/quickstart_transmix output/quickstart_mixpro
