"""Alpaca mode at Alpaca's scale: 175 seed tasks to 52,000 kept instructions against the test server.

The test server (tests/openai_server.py, in its own process) answers each Alpaca request after a fixed latency
with a JSON list of 20 tasks written from a vocabulary of the seed tasks' words, drawn from a hash of the request
(the same request always gets the same answer). The driver is the seedtune CLI in its own process, running a
``seeds`` and a ``generate`` stage (``mode: alpaca``, chat with JSON output, ``max_concurrency`` 256, rounds of
the model's capacity) until ``target`` instructions pass the online filters (rules and the ROUGE-L pool).

1. A full run: wall time, the generate stage's requests/s against the ideal (concurrency / latency), the time
   the driver spent in the journal (its sqlite reads and commits, timed by wrapping the Journal's methods in
   the driver process) as a share of the stage's wall time, and the driver's peak RSS.
2. A run SIGKILLed once the server has answered half the first run's requests, then run again: how many
   requests the re-run sent against those the journal held no answer for, how many request bodies the server
   saw twice (at most those in flight at the kill), and whether the kept instructions equal the full run's.

    python bench/alpaca_scale.py [--target 52000] [--latency 0.05] [--concurrency 256]
        [--seeds ../shared/data/self_instruct_seed_tasks.jsonl]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SEEDS = ROOT.parent / "shared" / "data" / "self_instruct_seed_tasks.jsonl"
VERBS = ["Write", "Explain", "Describe", "List", "Suggest", "Compare", "Summarize", "Rewrite", "Classify",
         "Outline", "Create", "Give", "Name", "Find", "Plan", "Recommend", "Translate", "Identify"]


# ---- the server: Alpaca answers from the seeds' words ---------------------------------------------------------

def vocabulary(seeds: Path) -> list[str]:
    words: set[str] = set()
    for line in seeds.read_text(encoding="utf-8").splitlines():
        task = json.loads(line)
        text = " ".join([task.get("instruction", "")] + [i.get("output", "") for i in task.get("instances", [])])
        words.update(w for w in re.findall(r"[a-z]{4,12}", text.lower()))
    return sorted(words)


def alpaca_answer(vocab: list[str]):
    def answer(body: dict) -> str:
        digest = hashlib.sha256(json.dumps(body.get("messages"), sort_keys=True).encode()).digest()
        rng = random.Random(digest)
        items = []
        for _ in range(20):
            instruction = f"{rng.choice(VERBS)} {' '.join(rng.choices(vocab, k=rng.randint(7, 12)))}."
            inp = "" if rng.random() < 0.6 else " ".join(rng.choices(vocab, k=rng.randint(4, 10))) + "."
            output = " ".join(rng.choices(vocab, k=rng.randint(10, 30))).capitalize() + "."
            items.append({"instruction": instruction, "input": inp, "output": output})
        return json.dumps(items)

    return answer


def serve(port: int, latency: float, seeds: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from openai_server import FakeOpenAI

    srv = FakeOpenAI(latency=latency, port=port, answer=alpaca_answer(vocabulary(seeds)))
    print(f"serving on {srv.url}", flush=True)
    try:
        srv.httpd.serve_forever()
    finally:
        srv.httpd.server_close()


def stats(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url + "/stats").read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the driver ---------------------------------------------------------------------------------------------

def driver(config: str, timing_file: str) -> int:
    """The seedtune CLI in this process, with the time spent in the journal's methods added up."""
    sys.path.insert(0, str(ROOT))
    from pipeline.cli import main
    from pipeline.run.journal import Journal

    spent = {"journal_s": 0.0, "calls": 0}

    def timed(fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent["journal_s"] += time.perf_counter() - t
                spent["calls"] += 1
        return wrapper

    for name in ("commit", "get_many", "failures_of", "open_failures", "state_get", "state_put", "state_delete",
                 "state_items"):
        setattr(Journal, name, timed(getattr(Journal, name)))
    code = main(["run", config, "--no-progress"])
    Path(timing_file).write_text(json.dumps(spent))
    return code


def write_config(folder: Path, url: str, seeds: Path, target: int, concurrency: int,
                 vllm: str | None = None, max_requests: int | None = None) -> Path:
    """The test server's config, or with ``vllm`` (a model folder) the same stages on an offline vLLM engine."""
    import yaml

    model = {"backend": "openai", "model": "fake", "base_url": url, "api_key_env": "BENCH_NO_KEY",
             "max_concurrency": concurrency, "timeout": 120}
    generate = {"model": "m", "mode": "alpaca", "alpaca_style": "chat", "json_mode": True, "target": target,
                "max_requests": max_requests or 4 * target // 10 + 1000}
    if vllm:
        model = {"backend": "vllm", "model": vllm, "dtype": "bfloat16", "gpu_memory_utilization": 0.8,
                 "max_model_len": 4096}
        generate.update(alpaca_style="completion", json_mode=False, alpaca_params={"temperature": 1.0,
                                                                                  "max_tokens": 1536})
    cfg = {"name": "alpaca-scale", "seed": 0, "run_dir": str(folder / "run"), "models": {"m": model},
           "stages": {"seeds": {"path": str(seeds)}, "generate": generate}}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def run_driver(config: Path, timing: Path, kill_at: int | None = None, url: str | None = None) -> dict:
    """Run the driver process; with ``kill_at``, SIGKILL it once the server has answered that many requests."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--driver", str(config), str(timing)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = False
    if kill_at is not None:
        while proc.poll() is None:
            if stats(url)["requests"] >= kill_at:
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.05)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read()
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if not killed and code != 0:
        raise SystemExit(f"the driver failed ({code}):\n{err[-3000:]}")
    return {"wall_s": wall, "rss_mb": usage.ru_maxrss / 1024, "killed": killed}


def answered(run: Path) -> int:
    with sqlite3.connect(run / "journal.sqlite") as conn:
        return conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]


def kept(run: Path) -> str:
    return hashlib.sha256((run / "generate" / "records.jsonl").read_bytes()).hexdigest()


def on_vllm(args: argparse.Namespace) -> None:
    """The Alpaca-scale case on a real engine: the model's own answers, parsed and filtered as any run's."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = write_config(folder, "", args.seeds, args.target, args.concurrency, args.vllm, args.max_requests)
        full = run_driver(config, folder / "timing.json")
        manifest = json.loads((folder / "run" / "manifest.json").read_text())
        gen = manifest["stages"]["generate"]
        timing = json.loads((folder / "timing.json").read_text())
        sent = gen["requests_sent"]
        print(f"Alpaca mode on vLLM ({args.vllm}), {args.seeds.name} -> {gen['rows_out']:,} kept instructions "
              f"(target {args.target:,}) from {sent:,} requests")
        print(f"  wall {full['wall_s']:.1f} s (generate {gen['elapsed_s']:.1f} s): {sent / gen['elapsed_s']:,.1f} "
              f"req/s, {gen['completion_tokens'] / gen['elapsed_s']:,.0f} output tokens/s; journal "
              f"{timing['journal_s']:.2f} s = {100 * timing['journal_s'] / gen['elapsed_s']:.1f}% of the stage's "
              f"wall time; driver peak RSS {full['rss_mb']:,.0f} MB (the engine's GPU memory not counted)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", type=int, default=52_000)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--seeds", type=Path, default=DEFAULT_SEEDS)
    ap.add_argument("--vllm", metavar="MODEL_DIR", help="run the generate stage on this model through offline vLLM "
                    "(a GPU) instead of the test server: wall, requests/s, output tokens/s, the journal's share")
    ap.add_argument("--max-requests", type=int, help="at most this many requests (default: the target's 40%%)")
    ap.add_argument("--serve", nargs=2, metavar=("PORT", "LATENCY"), help=argparse.SUPPRESS)
    ap.add_argument("--driver", nargs=2, metavar=("CONFIG", "TIMING"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve(int(args.serve[0]), float(args.serve[1]), args.seeds)
    if args.driver:
        raise SystemExit(driver(*args.driver))

    if not args.seeds.exists():
        print(f"{args.seeds} not found: using this project's own seed tasks")
        args.seeds = ROOT / "data" / "seed_tasks.jsonl"
    if args.vllm:
        return on_vllm(args)
    os.environ["BENCH_NO_KEY"] = "x"
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"

    def start_server() -> subprocess.Popen:
        """The test server on ``port`` (the same URL each time: it is part of the model's identity)."""
        proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port), str(args.latency),
                                 "--seeds", str(args.seeds)], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()
        return proc

    def stop_server(proc: subprocess.Popen) -> None:
        proc.terminate()
        proc.wait()

    with tempfile.TemporaryDirectory() as tmp:
        full_dir, kill_dir = Path(tmp) / "full", Path(tmp) / "kill"
        full_dir.mkdir()
        kill_dir.mkdir()
        # 1. the full run
        server = start_server()
        try:
            config = write_config(full_dir, url, args.seeds, args.target, args.concurrency)
            full = run_driver(config, full_dir / "timing.json")
            sent = stats(url)["requests"]
        finally:
            stop_server(server)
        manifest = json.loads((full_dir / "run" / "manifest.json").read_text())
        gen = manifest["stages"]["generate"]
        timing = json.loads((full_dir / "timing.json").read_text())
        ideal = args.concurrency / args.latency
        rate = sent / gen["elapsed_s"]
        print(f"Alpaca mode, {args.seeds.name} ({manifest['stages']['seeds']['rows_out']} seeds) -> "
              f"{gen['rows_out']:,} kept instructions (target {args.target:,}); test server at "
              f"{1000 * args.latency:.0f} ms, max_concurrency {args.concurrency}")
        print(f"  wall {full['wall_s']:.1f} s (generate {gen['elapsed_s']:.1f} s); {sent:,} requests = "
              f"{rate:,.0f} req/s, {rate / ideal:.2f}x the ideal {ideal:,.0f} req/s")
        print(f"  journal: {timing['journal_s']:.2f} s in {timing['calls']:,} calls = "
              f"{100 * timing['journal_s'] / gen['elapsed_s']:.1f}% of the generate stage's wall time")
        print(f"  driver peak RSS {full['rss_mb']:,.0f} MB")
        # 2. killed at half the requests, then run again against a fresh server (its counts are the re-run's)
        config = write_config(kill_dir, url, args.seeds, args.target, args.concurrency)
        server = start_server()
        try:
            run_driver(config, kill_dir / "timing.json", kill_at=sent // 2, url=url)
            at_kill = stats(url)["requests"]
        finally:
            stop_server(server)
        held = answered(kill_dir / "run")
        server = start_server()
        try:
            run_driver(config, kill_dir / "timing.json")
            again = stats(url)
        finally:
            stop_server(server)
        same = kept(kill_dir / "run") == kept(full_dir / "run")
        print(f"  SIGKILL after {at_kill:,} requests had reached the server, {held:,} answers committed to the "
              f"journal; the re-run sent {again['distinct']:,} distinct requests for the {sent - held:,} without an "
              f"answer ({again['requests'] - again['distinct']:,} transport retries); kept instructions identical "
              f"to the full run's: {same}")


if __name__ == "__main__":
    main()
