#!/usr/bin/env bash
# Run the test suite: creates .venv if missing, installs the requirements and the test-only packages
# (pytest; webdataset, optional for users: --dataset wds/...), runs pytest.
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt pytest webdataset
.venv/bin/python -m pytest -q "$@"
