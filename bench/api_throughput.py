"""Throughput of the openai backend against a local OpenAI-compatible server with a fixed latency.

Prints requests/s at max_concurrency 1, 8 and 64 and the ratio to the ideal (concurrency / latency), with every
answer committed to a real journal (sqlite, WAL) through the journaled client, as the runner does, and the
memory growth of fresh processes running 500, 2,000 and 8,000 requests (flat per request = the backend holds no
per-request state up front; what grows is the caller's own request and result lists). Then a batch-mode line
(the same requests through the Batch API: files, batches, polling; cost at the batch discount) and a rate-limited
line (a server announcing R requests a window in x-ratelimit-* headers and answering 429 beyond: the 429s counted).
    python bench/api_throughput.py [--latency 0.2] [--requests 2000]
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from pipeline.models import Budget, Price  # noqa: E402
from pipeline.models.base import GenParams, Message, ModelRequest  # noqa: E402
from pipeline.models.openai_backend import Options, aiohttp_transport, create  # noqa: E402
from pipeline.run.client import JournaledClient  # noqa: E402
from pipeline.run.journal import Journal  # noqa: E402
from pipeline.stages.context import StageStats  # noqa: E402


def build(n: int, tag: str) -> list[ModelRequest]:
    return [ModelRequest(messages=[Message(role="user", content=f"{tag} request {i}")],
                         params=GenParams(max_tokens=16)) for i in range(n)]


def run(url: str, n: int, concurrency: int, tag: str, reqs: list[ModelRequest] | None = None,
        **options) -> tuple[float, int, StageStats]:
    backend = create(Options(model="fake", base_url=url, max_concurrency=concurrency, timeout=30, **options))
    reqs = reqs if reqs is not None else build(n, tag)
    stats = StageStats()
    with tempfile.TemporaryDirectory() as tmp:
        journal = Journal(Path(tmp) / "journal.sqlite")
        client = JournaledClient("m", backend, journal, "bench", stats, PRICE, Budget(), show_progress=False)
        t = time.perf_counter()
        results = client.generate(reqs)
        elapsed = time.perf_counter() - t
        ok = sum(r.status == "ok" for r in results)
        journal.close()
    return elapsed, ok, stats


PRICE = Price(input_per_million=0.15, output_per_million=0.6)


def serve(*args: str) -> tuple[subprocess.Popen, str]:
    """The test server in its own process, as a real one would be (in-process it would share the GIL)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "openai_server.py"), "--port", str(port), *args],
                            stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()
    return proc, f"http://127.0.0.1:{port}/v1"


def stats(url: str) -> dict:
    import urllib.request

    return json.loads(urllib.request.urlopen(url + "/stats").read())


def batch_and_rate_limited(latency: float, n: int) -> None:
    proc, url = serve("--latency", str(latency), "--batch-delay", "2")
    try:
        _, _, direct = run(url, n, 64, "batchcmp")
        elapsed, ok, batched = run(url, n, 64, "batchcmp2", batch=True, batch_poll_s=0.5)
        s = stats(url)
        print(f"batch mode: {n} requests in {elapsed:.1f} s through {s['batches_created']} batch(es) "
              f"({s['batch_items']} items, {s['requests'] - n} direct requests); {ok} ok; cost ${batched.cost_usd:.6f} "
              f"vs ${direct.cost_usd:.6f} direct (x{batched.cost_usd / direct.cost_usd:.2f})")
    finally:
        proc.terminate()
        proc.wait()
    limit, window, m = 200, 2.0, 1000
    proc, url = serve("--latency", str(latency), "--rate-limit", str(limit), "--window", str(window))
    try:
        elapsed, ok, _ = run(url, m, 64, "limited", max_attempts=10, backoff_base=0.05)
        s = stats(url)
        print(f"rate-limited: server announces {limit} requests per {window:g} s ({limit / window:.0f}/s); {m} requests "
              f"at max_concurrency 64 in {elapsed:.1f} s = {m / elapsed:.1f} req/s; {s['limited']} answered 429 "
              f"({100 * s['limited'] / s['requests']:.1f}% of {s['requests']} sent); {ok} ok")
    finally:
        proc.terminate()
        proc.wait()


def sdk_floor(url: str, n: int, concurrency: int) -> float:
    """Seconds for n bare ``AsyncOpenAI.post`` calls (same transport, no backend, no journal): the SDK's own ceiling."""
    import asyncio

    from openai import AsyncOpenAI

    async def main() -> None:
        client = AsyncOpenAI(base_url=url, api_key="x", max_retries=0, http_client=aiohttp_transport())
        todo = iter(range(n))

        async def worker() -> None:
            for i in todo:
                await client.post("/chat/completions", cast_to=dict, options={"security": {"bearer_auth": True}},
                                  body={"model": "fake", "max_tokens": 16,
                                        "messages": [{"role": "user", "content": f"sdk request {i}"}]})

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        await client.close()

    t = time.perf_counter()
    asyncio.run(main())
    return time.perf_counter() - t


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(url: str, n: int) -> None:
    """In a fresh process: RSS before and after building the requests, and the peak while running them at c=64."""
    run(url, 64, 64, "warm")  # imports and first-use allocations of the SDK, the transport and sqlite
    before = rss_mb()
    reqs = build(n, f"mem{n}")
    built = rss_mb()
    elapsed, ok, _ = run(url, n, 64, f"mem{n}", reqs)
    print(json.dumps({"n": n, "before": before, "built": built, "peak": peak_rss_mb(), "ok": ok, "elapsed": elapsed}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--only-new", action="store_true", help="only the batch-mode and rate-limited lines")
    ap.add_argument("--memory-child", nargs=2, metavar=("URL", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child[0], int(args.memory_child[1]))
    if args.only_new:
        return batch_and_rate_limited(args.latency, args.requests)
    proc, url = serve("--latency", str(args.latency))
    try:
        print(f"server latency {args.latency * 1000:.0f} ms (separate process); every answer committed to a sqlite "
              f"journal through the journaled client")
        for c in (1, 8, 64):
            n = min(args.requests, 100) if c == 1 else args.requests
            elapsed, ok, _ = run(url, n, c, f"c{c}")
            rate = n / elapsed
            ideal = c / args.latency
            note = f"  (only {n} requests at c=1: {args.requests} would take {args.requests * args.latency:.0f} s)" \
                if n < args.requests else ""
            print(f"max_concurrency {c:>3}: {n:>5} requests in {elapsed:6.1f} s = {rate:7.1f} req/s; "
                  f"ideal {ideal:6.1f} req/s; ratio {rate / ideal:.3f}; {ok} ok{note}")
        elapsed = sdk_floor(url, args.requests, 64)
        rate, ideal = args.requests / elapsed, 64 / args.latency
        print(f"for reference, the openai SDK alone (bare AsyncOpenAI.post calls, no backend, no journal) at 64: "
              f"{rate:.1f} req/s; ratio {rate / ideal:.3f}")
        print("memory (each in a fresh process, max_concurrency 64, after a warm-up batch): RSS growth for the caller's "
              "N requests, then peak growth while running them (results and journal rows included)")
        rows = []
        for n in (500, 2000, 8000):
            out = subprocess.run([sys.executable, __file__, "--memory-child", url, str(n)], capture_output=True,
                                 text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
        for r in rows:
            held, running = r["built"] - r["before"], r["peak"] - r["built"]
            print(f"  {r['n']:>5} requests: requests +{held:5.1f} MB; running +{running:5.1f} MB "
                  f"({running * 1024 / r['n']:4.1f} KB/request, the results the caller keeps); {r['ok']} ok")
    finally:
        proc.terminate()
        proc.wait()
    batch_and_rate_limited(args.latency, args.requests)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
