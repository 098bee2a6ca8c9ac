"""Throughput of the openai backend against a local OpenAI-compatible server with a fixed latency.

Prints requests/s at max_concurrency 1, 8 and 64 and the ratio to the ideal (concurrency / latency), with every
answer committed to a real journal (sqlite, WAL) as the runner does, and the process's peak memory growth for
1,000 vs 2,000 requests (flat = the backend does not hold per-request state up front).
    python bench/api_throughput.py [--latency 0.2] [--requests 2000]
"""

from __future__ import annotations

import argparse
import resource
import socket
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from pipeline.models import Budget, Price  # noqa: E402
from pipeline.models.base import GenParams, Message, ModelRequest  # noqa: E402
from pipeline.models.openai_backend import Options, create  # noqa: E402
from pipeline.run.client import JournaledClient  # noqa: E402
from pipeline.run.journal import Journal  # noqa: E402
from pipeline.stages.context import StageStats  # noqa: E402


def run(url: str, n: int, concurrency: int, tag: str) -> tuple[float, int]:
    backend = create(Options(model="fake", base_url=url, max_concurrency=concurrency, timeout=30))
    with tempfile.TemporaryDirectory() as tmp:
        journal = Journal(Path(tmp) / "journal.sqlite")
        client = JournaledClient("m", backend, journal, "bench", StageStats(), Price(), Budget(), show_progress=False)
        reqs = [ModelRequest(messages=[Message(role="user", content=f"{tag} request {i}")],
                             params=GenParams(max_tokens=16)) for i in range(n)]
        t = time.perf_counter()
        results = client.generate(reqs)
        elapsed = time.perf_counter() - t
        ok = sum(r.status == "ok" for r in results)
        journal.close()
    return elapsed, ok


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--requests", type=int, default=2000)
    args = ap.parse_args()
    # The server runs in its own process, as a real one would (in-process it would share the GIL).
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "openai_server.py"), "--port", str(port),
                             "--latency", str(args.latency)], stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()
    srv = types.SimpleNamespace(url=f"http://127.0.0.1:{port}/v1")
    try:
        print(f"server latency {args.latency * 1000:.0f} ms (separate process), answers committed to a sqlite journal")
        for c in (1, 8, 64):
            n = min(args.requests, 100) if c == 1 else args.requests  # 2,000 x 0.2 s one at a time is 400 s
            elapsed, ok = run(srv.url, n, c, f"c{c}")
            rate = n / elapsed
            ideal = c / args.latency
            print(f"max_concurrency {c:>3}: {n:>5} requests in {elapsed:6.1f} s = {rate:7.1f} req/s; "
                  f"ideal {ideal:6.1f} req/s; ratio {rate / ideal:.3f}; {ok} ok")
        rss0 = peak_rss_mb()
        run(srv.url, 1000, 64, "m1")
        rss1 = peak_rss_mb()
        run(srv.url, 4000, 64, "m2")
        rss2 = peak_rss_mb()
        print(f"peak RSS: {rss0:.0f} MB before; +{rss1 - rss0:.1f} MB after 1,000 requests; "
              f"+{rss2 - rss1:.1f} MB more after 4,000 requests")
    finally:
        proc.terminate()
        proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
