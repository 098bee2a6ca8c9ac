"""The openai backend against a real HTTP server on 127.0.0.1 with injected faults."""

import email.utils
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from openai_server import FakeOpenAI, openai_server  # noqa: F401 - the fixture
from pipeline.models.base import BackendUnavailable, Completion, Failure, GenParams, Message, ModelRequest
from pipeline.models.openai_backend import Options, backoff_delay, create, retry_after_seconds

ROOT = Path(__file__).resolve().parent.parent


def backend(url, **kw):
    return create(Options(model="fake", base_url=url, timeout=kw.pop("timeout", 1.0), backoff_base=0.01,
                          **{"max_attempts": 4, **kw}))


def reqs(n, chat=True, **params):
    p = GenParams(max_tokens=5, **params)
    return [ModelRequest(messages=[Message(role="user", content=f"q{i}")], params=p, tag=str(i))
            if chat else ModelRequest(prompt=f"q{i}", params=p) for i in range(n)]


def collect(b, requests, sent=None):
    """Run ``requests``; the results in order (``sent``, a dict, gets the form each was sent in)."""
    got = {}

    def sink(group):
        for item in group:
            got[item[0]] = item[1]
            if sent is not None:
                sent[item[0]] = item[2] if len(item) > 2 else requests[item[0]]
        return True

    b.generate(requests, sink)
    assert sorted(got) == list(range(len(requests)))
    return [got[i] for i in range(len(requests))]


@pytest.mark.parametrize("api", ["chat", "completions"])
@pytest.mark.parametrize("fault", ["429", "500", "503", "malformed", "drop", "slow", "empty"])
def test_fault_is_retried_then_succeeds(fault, api):
    with FakeOpenAI(faults=[fault], slow_s=1.5, retry_after=0.05) as srv:
        [res] = collect(backend(srv.url, max_concurrency=1, api=api), reqs(1, chat=api == "chat"))
        assert isinstance(res, Completion) and res.texts[0].startswith("Answer ")
        assert len(srv.log) == 2 and srv.log[0] == srv.log[1]


@pytest.mark.parametrize("fault,kind", [("429", "http_429"), ("500", "http_500"), ("503", "http_503"),
                                        ("malformed", "malformed"), ("drop", "connection"), ("slow", "timeout"),
                                        ("empty", "malformed")])
@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
def test_persistent_fault_becomes_failure_never_success(fault, kind, transport, monkeypatch):
    if transport == "httpx":  # the SDK's default transport, used where aiohttp is not installed
        monkeypatch.setattr("pipeline.models.openai_backend.aiohttp_transport", lambda: None)
    with FakeOpenAI(faults=[fault] * 3, slow_s=1.5, retry_after=0.01) as srv:
        [res] = collect(backend(srv.url, max_attempts=3), reqs(1))
        assert isinstance(res, Failure) and res.kind == kind and res.attempts == 3 and res.error
        assert len(srv.log) == 3


def test_aiohttp_transport_is_used_where_installed_and_skipped_where_not(monkeypatch):
    import openai

    from pipeline.models.openai_backend import aiohttp_transport

    import asyncio

    transport = aiohttp_transport()
    assert transport is not None  # openai[aiohttp] is a dependency
    asyncio.run(transport.aclose())

    def missing(**_):
        raise RuntimeError("To use the aiohttp client you must have installed the package with the `aiohttp` extra")

    monkeypatch.setattr(openai, "DefaultAioHttpClient", missing)
    assert aiohttp_transport() is None


def test_faults_under_concurrency_each_request_retried_once():
    """Every request's first attempt fails (a different fault each); all end as successes, each sent twice."""
    cycle = ["429", "500", "503", "malformed", "drop", "empty"]
    fault_fn = lambda body, seen: cycle[int(body["messages"][0]["content"][1:]) % len(cycle)] if seen == 0 else None  # noqa: E731
    with FakeOpenAI(fault_fn=fault_fn, latency=0.01, retry_after=0.01) as srv:
        results = collect(backend(srv.url, max_concurrency=8), reqs(30))
        assert all(isinstance(r, Completion) for r in results)
        assert sorted(srv.counts().values()) == [2] * 30


def test_retry_after_is_honoured():
    with FakeOpenAI(faults=["429"], retry_after=0.5) as srv:
        collect(backend(srv.url), reqs(1))
        assert srv.times[1] - srv.times[0] >= 0.45


def test_retry_after_parsing_and_backoff():
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < retry_after_seconds({"retry-after": date}) <= 31
    assert retry_after_seconds({"retry-after": "soon"}) is None and retry_after_seconds({}) is None
    delays = [backoff_delay(a, 1.0, 8.0, None) for a in range(1, 7)]
    assert 0.5 <= delays[0] <= 1.5 and 4 <= delays[5] <= 12  # doubling, capped, jittered
    assert backoff_delay(1, 0.01, 1.0, 3.0) == 3.0  # Retry-After is a floor


def test_client_error_is_not_retried():
    with FakeOpenAI(faults=["400"]) as srv:
        [res] = collect(backend(srv.url), reqs(1))
        assert isinstance(res, Failure) and res.kind == "http_400" and len(srv.log) == 1


def test_completions_api_and_parameters_pass_through():
    with FakeOpenAI() as srv:
        r = ModelRequest(prompt="Hello", params=GenParams(max_tokens=7, temperature=0.3, stop=["\n"], seed=5, n=2,
                                                          presence_penalty=1.5, frequency_penalty=0.5, top_p=0.9))
        [res] = collect(backend(srv.url, api="completions"), [r])
        assert len(res.texts) == 2 and res.finish_reasons == ["stop", "stop"]
        assert res.usage.prompt_tokens > 0 and res.usage.completion_tokens == 2 * len(res.texts[0].split())
        body = srv.log[0]
        assert srv.paths[0].endswith("/v1/completions")
        assert body["prompt"] == "Hello" and body["max_tokens"] == 7 and body["stop"] == ["\n"]
        assert body["seed"] == 5 and body["n"] == 2 and body["presence_penalty"] == 1.5
        assert body["frequency_penalty"] == 0.5 and body["top_p"] == 0.9 and body["temperature"] == 0.3


def test_more_stop_strings_than_the_api_takes_are_applied_locally():
    with FakeOpenAI(answer=lambda b: "one two three four") as srv:
        r = ModelRequest(prompt="x", params=GenParams(stop=["a1", "a2", "a3", "a4", " three"]))
        [res] = collect(backend(srv.url, api="completions"), [r])
        assert srv.log[0]["stop"] == ["a1", "a2", "a3", "a4"]
        assert res.texts == ["one two"] and res.finish_reasons == ["stop"]


def test_json_schema_becomes_response_format():
    with FakeOpenAI() as srv:
        r = ModelRequest(messages=[Message(role="user", content="list")],
                         params=GenParams(json_schema={"type": "array", "items": {"type": "string"}}))
        collect(backend(srv.url), [r])
        rf = srv.log[0]["response_format"]
        assert rf["type"] == "json_schema"
        assert rf["json_schema"]["schema"]["properties"]["items"] == {"type": "array", "items": {"type": "string"}}


SCHEMA = {"type": "array", "items": {"type": "string"}}


def schema_reqs(n):
    return [ModelRequest(messages=[Message(role="user", content=f"l{i}")], params=GenParams(json_schema=SCHEMA))
            for i in range(n)]


@pytest.mark.parametrize("status", [400, 500])  # llama.cpp's server answers a json_schema request with a 500
def test_json_mode_auto_falls_back_form_by_form_on_errors_that_name_response_format(status):
    """json_schema, then json_object with the schema (llama.cpp's form), then text; remembered for the run, and
    each answer reported with the request actually sent (the client journals it under that key)."""
    with FakeOpenAI(reject_formats={"json_schema"}, reject_status=status) as srv:
        sent = {}
        results = collect(backend(srv.url, max_concurrency=1, max_attempts=1), schema_reqs(3), sent)
        assert all(isinstance(r, Completion) for r in results)
        assert [(b.get("response_format") or {}).get("type") for b in srv.log] == [
            "json_schema", "json_object", "json_object", "json_object"]
        assert srv.log[1]["response_format"]["schema"]["properties"]["items"] == SCHEMA
        assert [s.params.output_format for s in sent.values()] == ["json_object"] * 3
    with FakeOpenAI(reject_formats=True, reject_status=status) as srv:  # auto ends at plain text
        sent = {}
        collect(backend(srv.url, max_concurrency=1, max_attempts=1), schema_reqs(2), sent)
        assert ["response_format" in b for b in srv.log] == [True, True, False, False]
        assert [s.params.output_format for s in sent.values()] == ["text", "text"]


def test_json_mode_true_uses_the_best_structured_form_and_fails_in_one_line_without_one():
    from pipeline.errors import UserError

    with FakeOpenAI(reject_formats={"json_schema"}, reject_status=500) as srv:
        b = backend(srv.url, json_mode=True)
        b.check()  # the probe finds json_object
        assert srv.log[-1]["response_format"]["type"] == "json_object"
        collect(b, schema_reqs(2))
        assert [x["response_format"]["type"] for x in srv.log[-2:]] == ["json_object"] * 2
    with FakeOpenAI(reject_formats=True, reject_status=500) as srv:
        with pytest.raises(BackendUnavailable, match="accepts no structured output.*json_schema: HTTP 500: 1 validation"):
            backend(srv.url, json_mode=True).check()
        with pytest.raises(UserError, match="set json_mode: auto"):
            collect(backend(srv.url, json_mode=True), schema_reqs(1))
    with FakeOpenAI() as srv:  # json_mode: false never asks
        sent = {}
        collect(backend(srv.url, json_mode=False), schema_reqs(1), sent)
        assert "response_format" not in srv.log[0] and sent[0].params.output_format == "text"


def test_a_400_that_is_not_about_response_format_is_permanent_and_keeps_json_mode():
    """A context-length 400 to a request with response_format does not switch JSON mode off."""
    fail_first = {"n": 0}

    def fault_fn(body, seen):
        fail_first["n"] += 1
        return "400" if fail_first["n"] == 1 else None

    with FakeOpenAI(fault_fn=fault_fn) as srv:
        results = collect(backend(srv.url, max_concurrency=1), schema_reqs(2))
        assert isinstance(results[0], Failure) and results[0].permanent and results[0].kind == "http_400"
        assert results[0].attempts == 1 and "bad request" in results[0].error
        assert [b["response_format"]["type"] for b in srv.log] == ["json_schema", "json_schema"]


def test_alternatives_are_the_forms_the_client_looks_up():
    from pipeline.models.openai_backend import alternatives

    r = schema_reqs(1)[0]
    fmts = lambda **kw: [f.params.output_format for f in alternatives(Options(model="m", **kw), r)]  # noqa: E731
    assert fmts() == ["json_schema", "json_object", "text"]
    assert fmts(json_mode=True) == ["json_schema", "json_object"] and fmts(json_mode=False) == ["text"]
    assert alternatives(Options(model="m", api="completions"), r) == [r]
    plain = reqs(1)[0]
    assert alternatives(Options(model="m"), plain) == [plain]
    keys = {f.key({"m": 1}) for f in alternatives(Options(model="m"), r)}
    assert len(keys) == 3  # each form has its own journal key


@pytest.mark.parametrize("status,permanent", [(400, True), (401, True), (404, True), (422, True), (408, False),
                                              (409, False), (429, False), (500, False), (503, False)])
def test_failure_kinds_follow_the_status_and_keep_the_servers_whole_message(status, permanent):
    long_message = "1 validation error:\nmessages.0.content\n  the prompt is 9000 tokens, over the context of 8192"

    with FakeOpenAI() as srv:  # every request answered with the status and a message over several lines
        orig = srv.httpd.RequestHandlerClass._reply

        def reply(self, fault, body):
            return self._error(status, long_message)

        srv.httpd.RequestHandlerClass._reply = reply
        try:
            [res] = collect(backend(srv.url, max_attempts=2), reqs(1))
        finally:
            srv.httpd.RequestHandlerClass._reply = orig
        assert isinstance(res, Failure) and res.permanent is permanent and res.kind == f"http_{status}"
        assert res.attempts == (1 if permanent else 2) and len(srv.log) == res.attempts
        assert res.error == f"HTTP {status}: " + " ".join(long_message.split())


def test_null_content_is_a_permanent_failure():
    with FakeOpenAI(faults=["null"]) as srv:
        [res] = collect(backend(srv.url), reqs(1))
        assert isinstance(res, Failure) and res.permanent and res.kind == "null_content"
        assert "finish_reason length" in res.error and len(srv.log) == 1


def test_identity_covers_every_option_that_reaches_the_wire():
    from pipeline.models.openai_backend import identity

    base = identity(Options(model="m", base_url="http://u:pw@h/v1"))
    assert base["base_url"] == "http://h/v1" and "pw" not in json.dumps(base)
    for change in ({"extra_body": {"top_k": 5}}, {"guided": "guided_json"}, {"json_mode": True}, {"api": "completions"},
                   {"tokenizer": "x"}):
        assert identity(Options(model="m", base_url="http://h/v1", **change)) != base, change
    for same in ({"max_concurrency": 99}, {"timeout": 5}, {"rpm": 10}, {"batch": True}):
        assert identity(Options(model="m", base_url="http://u:pw@h/v1", **same)) == base, same


def test_missing_usage_is_counted_with_the_models_tokenizer(tmp_path):
    from tinymodel import tiny_tokenizer

    tok_dir = tmp_path / "tok"
    tiny_tokenizer().save_pretrained(tok_dir)
    with FakeOpenAI(usage=False, answer=lambda b: "hello world hello") as srv:
        [bare] = collect(backend(srv.url), reqs(1))
        assert bare.usage.prompt_tokens == 0 and bare.usage.completion_tokens == 0
        [counted] = collect(backend(srv.url, tokenizer=str(tok_dir)), reqs(1))
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tok_dir)
        assert counted.usage.completion_tokens == len(tok.encode("hello world hello", add_special_tokens=False)) > 0
        assert counted.usage.prompt_tokens > 0


def test_guided_decoding_and_extra_body_reach_the_server():
    schema = {"type": "array", "items": {"type": "string"}}
    req = ModelRequest(prompt="list", params=GenParams(json_schema=schema))
    with FakeOpenAI() as srv:
        collect(backend(srv.url, api="completions", guided="structured_outputs", extra_body={"top_k": 5}), [req])
        collect(backend(srv.url, api="completions", guided="guided_json"), [req])
        assert srv.log[0]["structured_outputs"] == {"json": schema} and srv.log[0]["top_k"] == 5
        assert srv.log[1]["guided_json"] == schema and "response_format" not in srv.log[1]


def test_concurrency_is_bounded_and_reached_with_a_bounded_worker_pool():
    import asyncio

    tasks_seen, threads = [], set()

    def sink(group):
        tasks_seen.append(len(asyncio.all_tasks()))
        threads.add(threading.get_ident())
        return True

    with FakeOpenAI(latency=0.02) as srv:
        backend(srv.url, max_concurrency=4).generate(reqs(120), sink)
        assert srv.max_in_flight == 4 and len(srv.log) == 120
    # Tasks stay bounded by the workers (+ the main one, + at most one helper task per connection that the HTTP
    # transport may hold), never one per request created up front (that would be >= 120).
    assert max(tasks_seen) <= 1 + 2 * 4
    assert threads == {threading.get_ident()}  # results are reported in the calling thread


def test_stop_launching_when_sink_says_so():
    with FakeOpenAI(latency=0.02) as srv:
        b = backend(srv.url, max_concurrency=2)
        seen = []
        b.generate(reqs(50), lambda g: seen.extend(g) or len(seen) < 5)
        # in-flight requests finish and are reported; nothing new is launched
        assert 5 <= len(seen) <= 6 and len(srv.log) == len(seen)
        assert all(isinstance(r, Completion) for _, r in seen)


def test_a_sink_error_stops_all_workers():
    with FakeOpenAI(latency=0.05) as srv:
        calls = []

        def sink(group):
            calls.append(group)
            raise RuntimeError("journal is broken")

        with pytest.raises(RuntimeError, match="journal is broken"):
            backend(srv.url, max_concurrency=4).generate(reqs(40), sink)
        sent = len(srv.log)
        time.sleep(0.2)
        assert len(calls) == 1 and sent <= 4 and len(srv.log) == sent


def test_keyboard_interrupt_cancels_in_flight_and_keeps_reported(tmp_path):
    """Ctrl-C mid-batch: the process stops promptly, in-flight requests are cancelled, reported ones stay."""
    out = tmp_path / "reported.jsonl"
    with FakeOpenAI(latency=0.2) as srv:
        script = textwrap.dedent(f"""
            import json, sys
            sys.path.insert(0, {str(ROOT)!r})
            from pipeline.models.base import Message, ModelRequest
            from pipeline.models.openai_backend import Options, create
            b = create(Options(model="fake", base_url={srv.url!r}, max_concurrency=4))
            reqs = [ModelRequest(messages=[Message(role="user", content=f"k{{i}}")]) for i in range(200)]
            def sink(group):
                with open({str(out)!r}, "a") as f:
                    for i, r in group:
                        f.write(json.dumps({{"i": i, "status": r.status}}) + "\\n")
                return True
            b.generate(reqs, sink)
        """)
        p = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while (not out.exists() or len(out.read_text().splitlines()) < 8) and time.monotonic() < deadline:
            time.sleep(0.02)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=20)
        assert p.returncode != 0 and "KeyboardInterrupt" in err
        assert "Task was destroyed" not in err and "Unclosed" not in err
        time.sleep(0.3)
        reported = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(reported) >= 8 and all(r["status"] == "ok" for r in reported)
        assert len(srv.log) < 200 and len(srv.log) <= len(reported) + 4


def test_check_reports_unreachable_server_in_one_line(openai_server):  # noqa: F811
    b = create(Options(model="m", base_url="http://127.0.0.1:9/v1", timeout=1.0))
    with pytest.raises(BackendUnavailable) as e:
        b.check()
    assert str(e.value) == "model 'm' at http://127.0.0.1:9/v1: connection refused"
    create(Options(model="fake", base_url=openai_server.url)).check()


def test_the_key_comes_from_the_named_environment_variable(monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-secret-123")
    with FakeOpenAI() as srv:
        collect(backend(srv.url, api_key_env="MY_KEY"), reqs(1))
        monkeypatch.delenv("MY_KEY")
        collect(backend(srv.url, api_key_env="MY_KEY"), reqs(1))  # a local server needs none
        assert srv.auth == ["Bearer sk-secret-123", "Bearer EMPTY"]


def test_identity_never_holds_the_key(monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-secret-123")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:1/v1")
    b = create(Options(model="m", api_key_env="MY_KEY"))
    ident = b.identity()
    assert {k: ident[k] for k in ("backend", "model", "base_url", "api")} == {
        "backend": "openai", "model": "m", "base_url": "http://127.0.0.1:1/v1", "api": "chat"}
    # Every option that reaches the wire is part of it; client-side knobs are not.
    assert {"extra_body", "guided", "json_mode"} <= set(ident) and "max_concurrency" not in ident
    assert "sk-secret" not in json.dumps(b.identity()) + repr(b.options)
    monkeypatch.delenv("OPENAI_BASE_URL")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(BackendUnavailable, match="OPENAI_API_KEY"):
        create(Options(model="m")).check()  # OpenAI itself without a key: one clear line


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


def test_budget_stop_through_the_journal_then_resume_sends_nothing_twice(tmp_path):
    """The journaled client stops the backend at the budget; a re-run with a larger one completes the batch."""
    from pipeline.models import Budget, Price
    from pipeline.models.base import BudgetExceeded
    from pipeline.run.client import JournaledClient
    from pipeline.run.journal import Journal
    from pipeline.stages.context import StageStats

    requests = reqs(40)
    with FakeOpenAI(latency=0.01) as srv:
        b = backend(srv.url, max_concurrency=4)
        price = Price(input_per_million=1e6, output_per_million=0)  # $1 per prompt token
        for limit in (30.0, None):
            journal = Journal(tmp_path / "journal.sqlite")
            client = JournaledClient("m", b, journal, "s", StageStats(), price, Budget(max_cost_usd=limit),
                                     show_progress=False)
            try:
                results = client.generate(requests)
            except BudgetExceeded:
                results = None
                stopped_at = len(srv.log)
                assert 0 < stopped_at < 40
            finally:
                journal.close()
        assert results is not None and all(isinstance(r, Completion) for r in results)
        assert len(srv.log) == 40 and set(srv.counts().values()) == {1}


def test_failed_requests_reach_rejected_manifest_and_status_then_a_rerun_completes(tmp_path):
    """Over HTTP, through the CLI: requests that keep failing (HTTP 500) are failures with their reason in
    rejected.jsonl, the manifest and `seedtune status`; once the server recovers, a re-run sends only those again."""
    import hashlib

    broken = {"on": True}

    def fault_fn(body, seen):  # about half of the answer requests fail while the server is "broken"
        text = json.dumps(body.get("messages") or body.get("prompt"), sort_keys=True)
        instance = "tasks that a helpful assistant" not in text  # not a bootstrap request
        return "500" if broken["on"] and instance and hashlib.sha256(text.encode()).digest()[0] % 2 == 0 else None

    words = "river planet budget violin harbor recipe garden ladder census poetry saddle tunnel magnet orchid".split()

    def answer(body):  # varied instructions, so that the ROUGE filter keeps most of them
        import random

        rng = random.Random(json.dumps(body, sort_keys=True))
        return " Describe the " + " and the ".join(rng.sample(words, 4)) + ".\n5. Explain x."

    with FakeOpenAI(fault_fn=fault_fn, answer=answer) as srv:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"""name: f
run_dir: {tmp_path / 'run'}
models:
  m: {{backend: openai, model: fake, base_url: {srv.url}, max_concurrency: 4, max_attempts: 2, backoff_base: 0.01}}
stages:
  seeds: {{path: {ROOT / 'data/seed_tasks.jsonl'}, limit: 12}}
  generate: {{model: m, target: 12, max_requests: 12, batch_size: 4, instances_style: answer, classify: false}}
""")
        cmd = [sys.executable, "-m", "pipeline", "run", str(cfg), "--no-progress"]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert r.returncode == 4, r.stderr  # completed with failures
        assert "transient: a re-run retries them" in r.stderr
        gen = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["generate"]
        assert gen["state"] == "complete_with_failures" and gen["open_failures"] > 0
        assert {f["kind"] for f in gen["failure_samples"]} == {"http_500"}
        rejected = [json.loads(x) for x in (tmp_path / "run" / "generate" / "rejected.jsonl").read_text().splitlines()]
        assert sum(x["rule"] == "instances_request_failed" for x in rejected) == gen["open_failures"]
        st = subprocess.run([sys.executable, "-m", "pipeline", "status", str(cfg)], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
        assert "failed request (http_500" in st.stdout, st.stdout
        # Each failing request went out max_attempts (2) times; every answered request once.
        counts = srv.counts()
        failed_bodies = {k for k in counts if fault_fn(json.loads(k), 0)}
        assert failed_bodies and all(counts[k] == 2 for k in failed_bodies)
        assert all(v == 1 for k, v in counts.items() if k not in failed_bodies)

        broken["on"] = False
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert r.returncode == 0, r.stderr
        gen = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["generate"]
        assert gen["state"] == "complete" and not gen.get("open_failures")
        after = srv.counts()
        assert all(after[k] == 3 for k in failed_bodies)  # sent once more, now answered
        assert all(after[k] == 1 for k in counts if k not in failed_bodies)  # no answered request paid twice


def _cli_config(tmp_path, url, model_extra=""):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""name: k
run_dir: {tmp_path / 'run'}
models:
  m: {{backend: openai, model: fake, base_url: {url}{model_extra}}}
stages:
  seeds: {{path: {ROOT / 'data/seed_tasks.jsonl'}, limit: 10}}
  generate: {{model: m, target: 3, max_requests: 4, batch_size: 2, instances_style: answer, classify: false}}
""")
    return cfg


def _seedtune(*args):
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args), "--no-progress"], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def test_cli_adding_extra_body_sends_requests_instead_of_serving_old_answers(tmp_path):
    with FakeOpenAI() as srv:
        cfg = _cli_config(tmp_path, srv.url)
        assert _seedtune("run", cfg).returncode in (0, 4)
        first = len(srv.log)
        assert first > 0
        r = _seedtune("run", cfg, "--set", "models.m.extra_body.top_k=5")
        assert r.returncode in (0, 4), r.stderr
        assert len(srv.log) > first and all(b.get("top_k") == 5 for b in srv.log[first:])


def test_cli_a_priced_model_without_usage_stops_in_one_line_or_counts_with_its_tokenizer(tmp_path):
    from tinymodel import tiny_tokenizer

    tok = tmp_path / "tok"
    tiny_tokenizer().save_pretrained(tok)
    price = ", price: {input_per_million: 1, output_per_million: 2}"
    with FakeOpenAI(usage=False) as srv:
        r = _seedtune("run", _cli_config(tmp_path, srv.url, price))
        assert r.returncode == 2 and "reported no token usage" in r.stderr and "Traceback" not in r.stderr
        r = _seedtune("run", _cli_config(tmp_path, srv.url, price + f", tokenizer: {tok}"))
        assert r.returncode in (0, 4), r.stderr
    gen = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["generate"]
    assert gen["prompt_tokens"] > 0 and gen["completion_tokens"] > 0 and gen["cost_usd"] > 0
