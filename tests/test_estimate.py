"""`seedtune validate` prints the estimate: requests from the stage plan, tokens, cost with the batch discount, time."""

import os
import re
import subprocess
import sys
from pathlib import Path

from openai_server import FakeOpenAI

ROOT = Path(__file__).resolve().parent.parent


def validate(url, *sets):
    env = {**os.environ, "OPENAI_BASE_URL": url, "SEEDTUNE_MODEL": "fake"}
    args = [x for s in sets for x in ("--set", s)]
    r = subprocess.run([sys.executable, "-m", "pipeline", "validate", "configs/openai.yaml", *args], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    [line] = [x for x in r.stdout.splitlines() if x.startswith("  model teacher: at most")]
    return line


def test_validate_prints_the_estimate_per_model(tmp_path):
    from tinymodel import tiny_tokenizer

    with FakeOpenAI(latency=0.2) as srv:
        direct = validate(srv.url, "stages.generate.max_requests=40", "models.teacher.max_concurrency=4")
        n_probe = len(srv.log)
        batched = validate(srv.url, "stages.generate.max_requests=40", "models.teacher.batch=true")
        assert len(srv.log) == n_probe  # a batch model is not probed for latency
        tok = tmp_path / "tok"
        tiny_tokenizer().save_pretrained(tok)
        counted = validate(srv.url, "stages.generate.max_requests=40", f"models.teacher.tokenizer={tok}")
    assert "at most 40 requests (40 alpaca)" in direct
    assert "completion tokens at most 122,880 (every request at max_tokens)" in direct  # 40 x 3072
    assert "estimated at 4 characters a token" in direct and f"counted with the tokenizer {tok}" in counted
    cost = lambda line: float(re.search(r"cost at most \$([\d,.]+)", line).group(1).replace(",", ""))  # noqa: E731
    assert cost(batched) == round(cost(direct) / 2, 4) and "batch discount 0.5 applied" in batched
    probe = float(re.search(r"probe: ([\d.]+)s", direct).group(1))
    assert probe >= 0.2 and "at 4 in flight" in direct
    assert "within the batch window" in batched
