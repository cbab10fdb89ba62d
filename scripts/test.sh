#!/usr/bin/env bash
# Run the test suite: creates .venv if missing, installs the requirements, runs pytest.
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt pytest
.venv/bin/python -m pytest -q "$@"
