"""The openai backend's Batch API path and its rate limiter, against the local server (tests/openai_server.py)."""

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from openai_server import FakeOpenAI
from pipeline.models.base import Completion, Failure, GenParams, Message, ModelRequest
from pipeline.models.openai_backend import Options, create
from pipeline.models.openai_batch import MemoryStore, batches_in_flight

ROOT = Path(__file__).resolve().parent.parent


def reqs(n, **params):
    p = GenParams(max_tokens=5, seed=7, **params)
    return [ModelRequest(messages=[Message(role="user", content=f"q{i}")], params=p) for i in range(n)]


def backend(url, **kw):
    return create(Options(model="fake", base_url=url, timeout=5.0, backoff_base=0.01, **{"max_attempts": 3, **kw}))


def collect(b, requests, store=None):
    got = {}
    b.generate(requests, lambda group: [got.__setitem__(x[0], x[1]) for x in group] and True, store)
    return [got.get(i) for i in range(len(requests))]


def test_batch_answers_equal_direct_answers_and_every_request_went_through_a_batch():
    requests = reqs(25)
    with FakeOpenAI() as srv:
        direct = collect(backend(srv.url), requests)
        n_direct = len(srv.log)
        store = MemoryStore()
        batched = collect(backend(srv.url, batch=True, batch_poll_s=0.05, batch_max_requests=10), requests, store)
        assert [r.texts for r in batched] == [r.texts for r in direct]
        assert [r.usage for r in batched] == [r.usage for r in direct]
        assert len(srv.log) == n_direct == 25  # no direct request during the batched run
        assert srv.batches_created == 3 and len(srv.batch_items) == 25  # chunks of at most 10
        assert sorted(json.dumps(b, sort_keys=True) for b in srv.batch_items) == sorted(
            json.dumps(b, sort_keys=True) for b in srv.log)  # the same bodies
        assert store.items() == []  # collected batches leave nothing behind
    assert backend("http://x/v1", batch=True).cost_factor == 0.5
    assert backend("http://x/v1", batch=True, batch_discount=0.4).cost_factor == 0.4
    assert backend("http://x/v1").cost_factor == 1.0


def test_error_file_items_follow_the_failure_rules_and_expired_items_go_into_a_later_batch():
    def fault(body, seen):
        k = int(body["messages"][0]["content"][1:])
        if k % 5 == 0:
            return "400"  # permanent: terminal
        if k % 5 == 1 and seen == 0:
            return "500"  # transient: answered by a later batch
        return None

    with FakeOpenAI(batch_fault_fn=fault, expire_batches=1) as srv:
        results = collect(backend(srv.url, batch=True, batch_poll_s=0.05), reqs(20))
        for k, r in enumerate(results):
            if k % 5 == 0:
                assert isinstance(r, Failure) and r.permanent and r.kind == "http_400"
                assert "max_tokens is too large" in r.error
            else:
                assert isinstance(r, Completion), (k, r)
        # batch 1 expired with every other item unanswered; those and the 500s went into later batches
        assert srv.batches_created >= 2
        counts = {}
        for b in srv.batch_items:
            counts[b["messages"][0]["content"]] = counts.get(b["messages"][0]["content"], 0) + 1
        assert all(counts[f"q{k}"] == 1 for k in range(0, 20, 5))  # permanent ones never sent again


def test_transient_items_fail_after_max_attempts_as_transient():
    with FakeOpenAI(batch_fault_fn=lambda body, seen: "500") as srv:
        [r] = collect(backend(srv.url, batch=True, batch_poll_s=0.02, max_attempts=2), reqs(1))
        assert isinstance(r, Failure) and not r.permanent and r.kind == "http_500"
        assert srv.batches_created == 2


def test_the_budget_worst_case_cuts_a_batch():
    with FakeOpenAI() as srv:
        b = backend(srv.url, batch=True, batch_poll_s=0.02)
        b.fits = lambda prompt, completion: completion <= 5 * 4  # room for four requests at max_tokens 5
        results = collect(b, reqs(10))
        assert sum(r is not None for r in results) == 4 and len(srv.batch_items) == 4


def test_batch_ids_are_journaled_before_polling_and_a_killed_run_resumes_the_same_batch(tmp_path):
    """SIGKILL while polling; the next run polls the same batch (the server counts batches created)."""
    db = tmp_path / "store.sqlite"
    out = tmp_path / "reported.jsonl"
    script = textwrap.dedent(f"""
        import json, sqlite3, sys
        sys.path.insert(0, {str(ROOT)!r})
        from pipeline.models.base import GenParams, Message, ModelRequest
        from pipeline.models.openai_backend import Options, create

        class Store:  # the journal's store: each call committed at once
            def __init__(self, path):
                self.c = sqlite3.connect(path, isolation_level=None)
                self.c.execute("CREATE TABLE IF NOT EXISTS s (k TEXT PRIMARY KEY, v TEXT)")
            def get(self, k):
                r = self.c.execute("SELECT v FROM s WHERE k=?", (k,)).fetchone()
                return r[0] if r else None
            def put(self, k, v): self.c.execute("INSERT OR REPLACE INTO s VALUES (?,?)", (k, v))
            def delete(self, k): self.c.execute("DELETE FROM s WHERE k=?", (k,))
            def items(self, prefix=""):
                return self.c.execute("SELECT k, v FROM s WHERE k LIKE ? ORDER BY k", (prefix + "%",)).fetchall()

        b = create(Options(model="fake", base_url=sys.argv[1], batch=True, batch_poll_s=0.1))
        reqs = [ModelRequest(messages=[Message(role="user", content=f"q{{i}}")], params=GenParams(max_tokens=5))
                for i in range(12)]
        def sink(group):
            with open({str(out)!r}, "a") as f:
                for item in group:
                    f.write(json.dumps({{"i": item[0], "status": item[1].status}}) + "\\n")
            return True
        b.generate(reqs, sink, Store({str(db)!r}))
    """)
    with FakeOpenAI(batch_delay=3.0) as srv:
        p = subprocess.Popen([sys.executable, "-c", script, srv.url])
        deadline = time.monotonic() + 60
        while srv.batches_created == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # polling now
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert srv.batches_created == 1 and not out.exists()
        rows = sqlite3.connect(str(db)).execute("SELECT k, v FROM s").fetchall()
        assert [k for k, _ in rows] == ["batch:batch_1"] and len(json.loads(rows[0][1])["keys"]) == 12
        assert batches_in_flight(rows) and batches_in_flight(rows)[0].startswith("batch_1: 12 requests, submitted ")
        subprocess.run([sys.executable, "-c", script, srv.url], check=True, timeout=120)
        assert srv.batches_created == 1  # the same batch, polled again; never submitted twice
        reported = [json.loads(x) for x in out.read_text().splitlines()]
        assert sorted(r["i"] for r in reported) == list(range(12)) and {r["status"] for r in reported} == {"ok"}
        assert sqlite3.connect(str(db)).execute("SELECT COUNT(*) FROM s").fetchone()[0] == 0


def test_a_file_uploaded_before_a_kill_is_matched_to_its_batch():
    """Killed between creating the batch and journaling its id: the next run finds it by its input file."""
    with FakeOpenAI() as srv:
        store = MemoryStore()
        b = backend(srv.url, batch=True, batch_poll_s=0.02)
        original = b.sync_client

        def killed_after_create():
            client = original()
            create_batch = client.batches.create

            def create_then_die(**kw):
                create_batch(**kw)
                raise KeyboardInterrupt

            client.batches.create = create_then_die
            return client

        b.sync_client = killed_after_create
        with pytest.raises(KeyboardInterrupt):
            collect(b, reqs(3), store)
        assert srv.batches_created == 1 and [k for k, _ in store.items()][0].startswith("pending:")
        results = collect(backend(srv.url, batch=True, batch_poll_s=0.02), reqs(3), store)
        assert all(isinstance(r, Completion) for r in results) and srv.batches_created == 1


@pytest.mark.parametrize("follow", [True, False])
def test_announced_rate_limit_is_not_hit(follow):
    """A server announcing R requests per window: at most 2% of requests get a 429 (counted by the server)."""
    with FakeOpenAI(rate_limit=(20, 1.0), latency=0.01) as srv:
        b = backend(srv.url, max_concurrency=64, max_attempts=10)
        if not follow:  # the same run, blind to the headers: the test would see the 429s
            b.limiter.follow_headers, b.limiter.known = False, True
        results = collect(b, reqs(80))
        assert all(isinstance(r, Completion) for r in results)
        sent = len(srv.log)
        if follow:
            assert srv.limited <= 0.02 * sent, (srv.limited, sent)
        else:
            assert srv.limited > 0.02 * sent


def test_after_a_sliding_windows_reset_the_client_probes_instead_of_bursting():
    """A sliding window of 40 requests (a minute's limit, in 4 s here): ``reset`` is when the oldest request leaves
    it, so a reset frees one slot, not 40. 80 requests at up to 64 in flight: at most 2% get a 429."""
    with FakeOpenAI(rate_limit=(40, 4.0), rate_mode="sliding", latency=0.01) as srv:
        start = time.monotonic()
        results = collect(backend(srv.url, max_concurrency=64, max_attempts=10), reqs(80))
        took = time.monotonic() - start
        assert all(isinstance(r, Completion) for r in results)
        sent = len(srv.log)
        assert srv.limited <= 0.02 * sent, (srv.limited, sent)
        assert took < 20, took


def test_after_an_announced_reset_one_request_probes_before_the_rest():
    import asyncio

    from pipeline.models.ratelimit import RateLimiter

    def said(remaining, reset):
        return {"x-ratelimit-limit-requests": "2", "x-ratelimit-remaining-requests": str(remaining),
                "x-ratelimit-reset-requests": reset}

    async def go():
        lim = RateLimiter()
        lim.release(1, said(0, "0.1s"), probe=await lim.acquire(1))
        await asyncio.sleep(0.15)  # the announced reset passes
        probe = await asyncio.wait_for(lim.acquire(1), 1)
        second = asyncio.create_task(lim.acquire(1))
        await asyncio.sleep(0.3)
        waited = not second.done()  # nothing more goes before the probe's answer
        lim.release(1, said(1, "0.5s"), probe=probe)
        started = time.monotonic()
        assert await asyncio.wait_for(second, 2) is False
        # the own window (2 requests in the longest reset announced, 0.5 s) holds it until the first answer is 0.5 s old
        return probe, waited, time.monotonic() - started

    probe, waited, held = asyncio.run(go())
    assert probe is True and waited and 0.0 < held < 0.2


def test_a_429_with_retry_after_still_backs_off():
    """A server that limits without announcing anything: the client holds back for the Retry-After, then sends one
    request before the rest."""
    with FakeOpenAI(faults=["429"], retry_after=0.5, latency=0.01) as srv:
        results = collect(backend(srv.url, max_concurrency=8), reqs(6))
        assert all(isinstance(r, Completion) for r in results)
        first, then = srv.times[0], srv.times[1:]
        assert min(then) - first >= 0.5 - 0.01  # nothing was sent during the Retry-After
        assert len(srv.log) == 7


def test_client_side_rpm_cap():
    from pipeline.models.ratelimit import RateLimiter

    import asyncio

    async def go():
        lim = RateLimiter(rpm=3)
        for _ in range(3):
            await lim.acquire(1)
            lim.release(1, None)
        return lim.rpm.wait(1, time.monotonic())

    assert asyncio.run(go()) > 50  # a fourth request waits for the minute to pass


def test_parse_duration():
    from pipeline.models.ratelimit import parse_duration

    assert parse_duration("6m0s") == 360 and parse_duration("1.5s") == 1.5 and parse_duration("20ms") == 0.02
    assert parse_duration("2") == 2 and parse_duration("1h2m3s") == 3723 and parse_duration("soon") is None


# ---- through the CLI ----------------------------------------------------------------------------------------

WORDS = "river planet budget violin harbor recipe garden ladder census poetry saddle tunnel magnet orchid".split()


def varied(body):  # varied instructions, so that the ROUGE filter keeps most of them
    import random

    rng = random.Random(json.dumps(body, sort_keys=True))
    return " Describe the " + " and the ".join(rng.sample(WORDS, 4)) + ".\n5. Explain x."


def config(tmp_path, name, url, batch, extra=""):
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(f"""name: {name}
seed: 3
run_dir: {tmp_path / name}
models:
  m:
    backend: openai
    model: fake
    base_url: {url}
    max_concurrency: 4
    backoff_base: 0.01
    batch: {str(batch).lower()}
    batch_poll_s: 0.1
    price: {{input_per_million: 1000, output_per_million: 2000}}{extra}
stages:
  seeds: {{path: {ROOT / 'data/seed_tasks.jsonl'}, limit: 12}}
  generate: {{model: m, target: 10, max_requests: 12, batch_size: 4, instances_style: answer, classify: false}}
""")
    return cfg


def seedtune(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def stage_files(run):
    return {f.name: f.read_bytes() for f in sorted((run / "generate").glob("*.jsonl"))}


def test_cli_batch_run_equals_direct_run_at_half_the_cost(tmp_path):
    with FakeOpenAI(answer=varied) as srv:
        r = seedtune("run", config(tmp_path, "direct", srv.url, False), "--no-progress")
        assert r.returncode == 0, r.stderr
        direct_requests = len(srv.log)
        r = seedtune("run", config(tmp_path, "batched", srv.url, True), "--no-progress")
        assert r.returncode == 0, r.stderr
        assert len(srv.log) == direct_requests  # the batched run sent no direct request
        assert len(srv.batch_items) == direct_requests and srv.batches_created >= 1
    direct, batched = stage_files(tmp_path / "direct"), stage_files(tmp_path / "batched")
    assert direct and direct == batched
    cost = [json.loads((tmp_path / n / "manifest.json").read_text())["stages"]["generate"]["cost_usd"]
            for n in ("direct", "batched")]
    assert cost[0] > 0 and cost[1] == pytest.approx(cost[0] / 2)


def test_cli_run_killed_while_polling_resumes_the_same_batches(tmp_path):
    with FakeOpenAI(answer=varied, batch_delay=2.0) as srv:
        cfg = config(tmp_path, "k", srv.url, True)
        p = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(cfg), "--no-progress"], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while srv.batches_created == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert srv.batches_created == 1
        rows = sqlite3.connect(str(tmp_path / "k" / "journal.sqlite")).execute(
            "SELECT key, value FROM state WHERE key LIKE 'batch:%'").fetchall()
        [line] = batches_in_flight(rows)  # journaled before the first poll
        assert line.startswith("batch_1: ")
        st = seedtune("status", tmp_path / "k")  # the user sees the batch waiting to be collected
        assert st.returncode == 0 and "batch in flight (" in st.stdout and "batch_1: " in st.stdout, st.stdout
        r = seedtune("run", cfg, "--no-progress")
        assert r.returncode == 0, r.stderr
        counts = {}
        for b in srv.batch_items:
            key = json.dumps(b, sort_keys=True)
            counts[key] = counts.get(key, 0) + 1
        assert set(counts.values()) == {1}  # no request answered twice
        resumed = [json.dumps(x["body"], sort_keys=True) for x in srv.batches["batch_1"]["_lines"]]
        assert resumed and all(counts[k] == 1 for k in resumed)  # the batch of the killed run was collected
        assert srv.batches["batch_1"]["status"] == "completed" and len(srv.log) == 0


def test_cli_error_file_items_are_retried_by_a_later_batch(tmp_path):
    def fault(body, seen):
        return "500" if seen == 0 and len(json.dumps(body)) % 3 == 0 else None

    with FakeOpenAI(answer=varied, batch_fault_fn=fault) as srv:
        r = seedtune("run", config(tmp_path, "e", srv.url, True), "--no-progress")
        assert r.returncode == 0, r.stderr
        counts = {}
        for b in srv.batch_items:
            key = json.dumps(b, sort_keys=True)
            counts[key] = counts.get(key, 0) + 1
        retried = [k for k, v in counts.items() if v == 2]
        assert retried and all(fault(json.loads(k), 0) for k in retried)
        assert all(v == 1 for k, v in counts.items() if not fault(json.loads(k), 0))


def test_the_journaled_client_never_submits_a_batch_whose_worst_case_crosses_the_budget(tmp_path):
    from pipeline.models import Budget, Price
    from pipeline.models.base import BudgetExceeded
    from pipeline.run.client import JournaledClient
    from pipeline.run.journal import Journal
    from pipeline.stages.context import StageStats

    # $1 per completion token at list price, $0.5 batched: each request's worst case (max_tokens 5) is $2.50.
    price = Price(input_per_million=0, output_per_million=1e6)
    with FakeOpenAI() as srv:
        journal = Journal(tmp_path / "journal.sqlite")
        client = JournaledClient("m", backend(srv.url, batch=True, batch_poll_s=0.02), journal, "s", StageStats(),
                                 price, Budget(max_cost_usd=10.0), show_progress=False)
        with pytest.raises(BudgetExceeded):
            client.generate(reqs(10))
        journal.close()
        assert len(srv.batch_items) == 4  # 4 x $2.50 fits in $10; a fifth would not
        assert 0 < client.spent_cost <= 10.0
