#!/usr/bin/env bash
# Installs what the test suite needs (CPU-only torch, the package with its test extras) and runs it.
# Usage: bash tests/run_tests.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[test]"
python3 -m ruff check megatron_focusft tools tests
exec python3 -m pytest -q -p no:cacheprovider tests "$@"
