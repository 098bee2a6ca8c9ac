"""Throughput of ``executor: ray`` against the local executor, on the openai backend and the test server.

Starts tests/openai_server.py (a separate process) with a fixed latency, then, each in a fresh driver process,
sends N requests through the journaled client (every answer committed to a real journal, as the runner does)
with the local executor and with Ray at 1 and 2 workers (a local Ray instance that the driver starts and stops).
Prints requests/s, the driver's peak memory (RSS; Ray's own processes are not counted), and Ray's overhead
beyond the local executor: the one-off start (the Ray instance and its workers, each building the backend), the
fixed cost of one more round (a 1-request call on the same client) and of one more stage (a 1-request call from
a new client on the same model, as the runner hands a later stage the model it keeps for the run), and the
extra wall time per request once those are taken off.
    python bench/ray_throughput.py [--latency 0.2] [--requests 2000] [--concurrency 32]
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


def driver(url: str, n: int, concurrency: int, executor: str, workers: int) -> dict:
    """One measurement, in this (fresh) process: a 1-request call that starts everything (Ray and its workers
    included), a 1-request call (one more round), a 1-request call from a new client (one more stage), then n
    requests."""
    sys.path.insert(0, str(ROOT))
    from pipeline.config import ModelSpec
    from pipeline.models import Budget, Price, RayOptions
    from pipeline.models.base import GenParams, Message, ModelRequest
    from pipeline.models.openai_backend import Options, create
    from pipeline.run.client import JournaledClient
    from pipeline.run.executors import executor_for
    from pipeline.run.journal import Journal
    from pipeline.stages.context import StageStats

    options = Options(model="fake", base_url=url, max_concurrency=concurrency, timeout=60)
    spec = ModelSpec("m", "openai", options, Price(), Budget(), executor, RayOptions(workers=workers))
    backend = executor_for(spec, create(options))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        journal = Journal(Path(tmp) / "journal.sqlite")
        client = JournaledClient("m", backend, journal, "bench", StageStats(), Price(), Budget(), show_progress=False)
        for name, count in (("init", 1), ("one", 1), ("stage", 1), ("many", n)):
            if name == "stage":  # the next stage: its own client, the same model
                client = JournaledClient("m", backend, journal, "bench2", StageStats(), Price(), Budget(),
                                         show_progress=False)
            reqs = [ModelRequest(messages=[Message(role="user", content=f"{name} {executor}{workers} {i}")],
                                 params=GenParams(max_tokens=16)) for i in range(count)]
            t = time.perf_counter()
            results = client.generate(reqs)
            out[name] = time.perf_counter() - t
            assert all(r.status == "ok" for r in results), [r for r in results if r.status != "ok"][:1]
        journal.close()
    out.update(backend.stats() if hasattr(backend, "stats") else {})
    backend.close()
    out["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32, help="the backend's max_concurrency (per worker on Ray)")
    ap.add_argument("--driver", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.driver:
        url, executor, workers, n = args.driver
        print(json.dumps(driver(url, int(n), args.concurrency, executor, int(workers))))
        return
    port = free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "openai_server.py"), "--port", str(port),
                               "--latency", str(args.latency)], stdout=subprocess.PIPE, text=True)
    try:
        server.stdout.readline()  # "serving on ..." once it listens
        url = f"http://127.0.0.1:{port}/v1"
        rows = []
        for executor, workers in (("local", 1), ("ray", 1), ("ray", 2)):
            r = subprocess.run([sys.executable, __file__, "--concurrency", str(args.concurrency), "--driver", url,
                                executor, str(workers), str(args.requests)], capture_output=True, text=True,
                               cwd=ROOT)
            if r.returncode:
                sys.exit(r.stderr[-2000:])
            rows.append((executor, workers, json.loads(r.stdout.strip().splitlines()[-1])))
    finally:
        server.terminate()
        server.wait()
    n, lat = args.requests, args.latency
    print(f"{n} requests, server latency {lat * 1000:.0f} ms, max_concurrency {args.concurrency} per backend "
          f"(ideal {args.concurrency / lat:.0f} req/s per worker)")
    print(f"{'executor':<10} {'req/s':>7} {'wall s':>7} {'start s':>8} {'round s':>8} {'stage s':>8} "
          f"{'actor starts':>13} {'driver peak RSS MiB':>20}")
    local = rows[0][2]
    for executor, workers, m in rows:
        label = executor if executor == "local" else f"ray x{workers}"
        print(f"{label:<10} {n / m['many']:>7.1f} {m['many']:>7.2f} {m['init']:>8.2f} {m['one']:>8.2f} "
              f"{m['stage']:>8.2f} {m.get('ray_actor_starts', '-'):>13} {m['rss_mib']:>20.0f}")
    for executor, workers, m in rows[1:]:
        # Beyond the local executor: a 1-request call costs one server latency on either.
        extra = ((m["many"] - m["one"]) - (local["many"] - local["one"])) / n
        print(f"ray x{workers}: start {m['init'] - local['init']:.1f} s once (Ray, {workers} workers); fixed cost per "
              f"round {m['one'] - local['one']:+.3f} s, per stage {m['stage'] - local['stage']:+.3f} s; "
              f"{extra * 1000:+.2f} ms per request; {m['ray_actor_starts']} actor starts in {m['ray_calls']} calls")
    r1, r2 = rows[1][2], rows[2][2]
    print(f"ray x2 / ray x1 throughput: {r1['many'] / r2['many']:.2f}x")


if __name__ == "__main__":
    main()
