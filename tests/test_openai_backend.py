"""The openai backend against a real HTTP server on 127.0.0.1 with injected faults."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from openai_server import FakeOpenAI
from pipeline.models.base import BackendUnavailable, Completion, Failure, GenParams, Message, ModelRequest
from pipeline.models.openai_backend import Options, create

ROOT = Path(__file__).resolve().parent.parent


def backend(url, **kw):
    return create(Options(model="fake", base_url=url, timeout=kw.pop("timeout", 1.0), backoff_base=0.01,
                          **{"max_attempts": 4, **kw}))


def reqs(n, chat=True):
    return [ModelRequest(messages=[Message(role="user", content=f"q{i}")], params=GenParams(max_tokens=5), tag=str(i))
            if chat else ModelRequest(prompt=f"q{i}", params=GenParams(max_tokens=5)) for i in range(n)]


def collect(b, requests):
    got = {}
    b.generate(requests, lambda group: got.update(group) or True)
    return [got[i] for i in range(len(requests))]


@pytest.mark.parametrize("fault", ["429", "500", "503", "malformed", "drop", "slow", "empty"])
def test_fault_is_retried_then_succeeds(fault):
    with FakeOpenAI(faults=[fault], slow_s=1.5, retry_after=0.05) as srv:
        [res] = collect(backend(srv.url, max_concurrency=1), reqs(1))
        assert isinstance(res, Completion) and res.texts[0].startswith("Answer ")
        assert len(srv.log) == 2


@pytest.mark.parametrize("fault,kind", [("429", "http_429"), ("500", "http_500"), ("503", "http_503"),
                                        ("malformed", "malformed"), ("drop", "connection"), ("slow", "timeout"),
                                        ("empty", "malformed")])
def test_persistent_fault_becomes_failure_never_success(fault, kind):
    with FakeOpenAI(faults=[fault] * 3, slow_s=1.5, retry_after=0.01) as srv:
        [res] = collect(backend(srv.url, max_attempts=3), reqs(1))
        assert isinstance(res, Failure) and res.kind == kind and res.attempts == 3
        assert len(srv.log) == 3


def test_retry_after_is_honoured():
    with FakeOpenAI(faults=["429"], retry_after=0.5) as srv:
        collect(backend(srv.url), reqs(1))
        assert srv.times[1] - srv.times[0] >= 0.45


def test_client_error_is_not_retried():
    with FakeOpenAI(faults=["400"]) as srv:
        [res] = collect(backend(srv.url), reqs(1))
        assert isinstance(res, Failure) and res.kind == "http_400" and len(srv.log) == 1


def test_completions_api_and_parameters_pass_through():
    with FakeOpenAI() as srv:
        r = ModelRequest(prompt="Hello", params=GenParams(max_tokens=7, temperature=0.3, stop=["\n"], seed=5, n=2,
                                                          presence_penalty=1.5))
        [res] = collect(backend(srv.url, api="completions"), [r])
        assert len(res.texts) == 2 and res.usage.prompt_tokens == 10
        body = srv.log[0]
        assert body["prompt"] == "Hello" and body["max_tokens"] == 7 and body["stop"] == ["\n"]
        assert body["seed"] == 5 and body["n"] == 2 and body["presence_penalty"] == 1.5


def test_json_schema_becomes_response_format():
    with FakeOpenAI() as srv:
        r = ModelRequest(messages=[Message(role="user", content="list")],
                         params=GenParams(json_schema={"type": "array", "items": {"type": "string"}}))
        collect(backend(srv.url), [r])
        assert srv.log[0]["response_format"]["type"] == "json_schema"


def test_stop_launching_when_sink_says_so():
    with FakeOpenAI(latency=0.02) as srv:
        b = backend(srv.url, max_concurrency=2)
        seen = []
        b.generate(reqs(50), lambda g: seen.extend(g) or len(seen) < 5)
        assert 5 <= len(seen) <= 7 and len(srv.log) == len(seen)


def test_check_reports_unreachable_server_in_one_line():
    b = create(Options(model="m", base_url="http://127.0.0.1:9/v1", timeout=1.0))
    with pytest.raises(BackendUnavailable) as e:
        b.check()
    assert "model 'm' at http://127.0.0.1:9/v1" in str(e.value) and "\n" not in str(e.value)
    with FakeOpenAI() as srv:
        create(Options(model="m", base_url=srv.url)).check()


def test_key_never_in_identity_or_manifest(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-secret-123")
    with FakeOpenAI() as srv:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"""name: k
run_dir: {tmp_path / 'run'}
models:
  m: {{backend: openai, model: fake, base_url: {srv.url}, api_key_env: MY_KEY}}
stages:
  seeds: {{path: {ROOT / 'data/seed_tasks.jsonl'}, limit: 10}}
  generate: {{model: m, target: 3, max_requests: 4, batch_size: 2, instances_style: answer, classify: false}}
""")
        r = subprocess.run([sys.executable, "-m", "pipeline", "run", str(cfg), "--no-progress"], capture_output=True,
                           text=True, cwd=ROOT, timeout=120)
        assert r.returncode == 0, r.stderr
    for f in (tmp_path / "run").rglob("*"):
        if f.is_file():
            assert b"sk-secret-123" not in f.read_bytes(), f


def test_generation_killed_mid_stage_never_resends_committed(tmp_path):
    """The spine's resume test on the real HTTP path: the server counts every request it receives."""
    import signal
    import sqlite3
    import time

    with FakeOpenAI(latency=0.15, answer=lambda b: " Write a short poem about topic "
                    + json.dumps(b)[-40:].replace('"', "") + ".\n5. Explain x.") as srv:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"""name: k
run_dir: {tmp_path / 'run'}
models:
  m: {{backend: openai, api: completions, model: fake, base_url: {srv.url}, max_concurrency: 2}}
stages:
  seeds: {{path: {ROOT / 'data/seed_tasks.jsonl'}}}
  generate: {{model: m, target: 40, max_requests: 60, batch_size: 6, instances_style: answer, classify: false}}
""")
        db = tmp_path / "run" / "journal.sqlite"
        resent = []
        for k in range(3):
            committed = {x for (x,) in sqlite3.connect(str(db)).execute("SELECT request FROM results")} if db.exists() else set()
            start = len(srv.log)
            p = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(cfg), "--no-progress"], cwd=ROOT,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while len(srv.log) < start + 5 + 3 * k and p.poll() is None:
                time.sleep(0.01)
            p.send_signal(signal.SIGKILL)
            p.wait()
            sent_now = srv.log[start:]
            keys = {json.dumps({"prompt": b["prompt"], "seed": b.get("seed")}, sort_keys=True) for b in sent_now}
            old = {json.dumps({"prompt": json.loads(r)["prompt"], "seed": json.loads(r)["params"]["seed"]}, sort_keys=True)
                   for r in committed}
            resent += list(keys & old)
        r = subprocess.run([sys.executable, "-m", "pipeline", "run", str(cfg), "--no-progress"], capture_output=True,
                           text=True, cwd=ROOT, timeout=300)
        assert r.returncode == 0, r.stderr
        assert resent == []
