"""Exact resume: kills at random points, then a re-run gives byte-identical outputs and re-sends nothing."""

import json
import os
import random
import signal
import sqlite3
import tempfile
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def config(tmp_path: Path, run_dir: Path, count_file: Path, delay=0.0, fail_every=0, rounds=12, batch=3,
           suffix="!", budget: str = "") -> Path:
    seeds = Path(tempfile.gettempdir()) / f"seedtune-test-seeds-{os.getpid()}.jsonl"  # one file for the session
    if not seeds.exists():
        seeds.write_text("".join(json.dumps({"instruction": f"Seed instruction number {i} about topic {i * 7}.",
                                             "instances": [{"input": "", "output": "ok"}]}) + "\n"
                                 for i in range(10)))
    cfg = tmp_path / f"c-{run_dir.name}.yaml"
    cfg.write_text(f"""
name: resume
run_dir: {run_dir}
seed: 7
models:
  m:
    backend: test
    delay_s: {delay}
    count_file: {count_file}
    fail_every: {fail_every}
    price: {{input_per_million: 1000, output_per_million: 2000}}
{budget}
stages:
  seeds:
    path: {seeds}
  ask:
    model: m
    rounds: {rounds}
    batch_size: {batch}
  upper:
    suffix: "{suffix}"
""")
    return cfg


def run(cfg: Path, *extra, timeout=120):
    return subprocess.run([sys.executable, str(TESTS / "run_pipeline.py"), "run", str(cfg), "--no-progress", *extra],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def start(cfg: Path):
    return subprocess.Popen([sys.executable, str(TESTS / "run_pipeline.py"), "run", str(cfg), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def outputs(run_dir: Path) -> dict[str, bytes]:
    return {f"{s}/{f}": (run_dir / s / f).read_bytes() for s in ("seeds", "ask", "upper")
            for f in ("records.jsonl",) if (run_dir / s / f).exists()}


def sent(count_file: Path) -> list[str]:
    return count_file.read_text().split() if count_file.exists() else []


def interrupted_runs(tmp_path, sig, kills, reference, cfg=None, final_code=0):
    run_dir = tmp_path / f"run-{sig}"
    count = tmp_path / f"count-{sig}.txt"
    # slow enough to be killed mid-stage on a busy machine
    cfg = cfg if cfg is not None else config(tmp_path, run_dir, count, delay=0.15)
    rng = random.Random(int(sig))
    killed = 0
    resent_committed = []
    for _ in range(kills * 3):
        committed_before = committed(run_dir)
        first_new = len(sent(count))
        # Kill at a random point: after 1-5 more requests have reached the model, plus a random delay
        # that lands before, during or after the answer's commit.
        target = len(sent(count)) + rng.randint(1, 5)
        p = start(cfg)
        deadline = time.time() + 60
        while len(sent(count)) < target and p.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.2))  # before, during or after the answer is committed
        if p.poll() is not None:
            break
        p.send_signal(sig)
        out, err = p.communicate(timeout=60)
        killed += 1
        if sig == signal.SIGINT:
            assert p.returncode == 130, err
            assert "run the same command again to continue" in err, err
        resent_committed += [k for k in sent(count)[first_new:] if k in committed_before]
        if killed >= kills:
            break
    assert killed >= kills
    committed_before, first_new = committed(run_dir), len(sent(count))
    final = run(cfg)
    assert final.returncode == final_code, final.stderr
    resent_committed += [k for k in sent(count)[first_new:] if k in committed_before]
    assert resent_committed == [], "a committed request was sent again"
    assert outputs(run_dir) == reference
    return sent(count)


def committed(run_dir: Path) -> set[str]:
    db = run_dir / "journal.sqlite"
    if not db.exists():
        return set()
    con = sqlite3.connect(str(db))
    try:
        return {k for (k,) in con.execute("SELECT key FROM results")}
    finally:
        con.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    count = tmp / "count.txt"
    r = run(config(tmp, tmp / "run", count))
    assert r.returncode == 0, r.stderr
    return outputs(tmp / "run"), sent(count)


def test_sigkill_five_times_then_identical(tmp_path, reference):
    ref_out, ref_keys = reference
    keys = interrupted_runs(tmp_path, signal.SIGKILL, 5, ref_out)
    # Only requests whose answer was lost with the killed process were sent again.
    assert set(keys) == set(ref_keys) and len(keys) - len(set(keys)) <= 5


def test_sigint_then_identical(tmp_path, reference):
    ref_out, ref_keys = reference
    keys = interrupted_runs(tmp_path, signal.SIGINT, 5, ref_out)
    assert set(keys) == set(ref_keys) and len(keys) - len(set(keys)) <= 5


def test_rerun_is_cached_and_sends_nothing(tmp_path):
    count = tmp_path / "count.txt"
    cfg = config(tmp_path, tmp_path / "run", count)
    assert run(cfg).returncode == 0
    n = len(sent(count))
    r = run(cfg)
    assert r.returncode == 0
    assert len(sent(count)) == n
    assert [ln.split()[1] for ln in r.stdout.splitlines()[2:5]] == ["cached", "cached", "cached"]


def test_option_change_recomputes_downstream_only_and_change_back_restores(tmp_path):
    count = tmp_path / "count.txt"
    run_dir = tmp_path / "run"
    assert run(config(tmp_path, run_dir, count)).returncode == 0
    first = outputs(run_dir)
    n = len(sent(count))
    # Change the last stage's option: only it recomputes.
    r = run(config(tmp_path, run_dir, count, suffix="?"))
    states = {ln.split()[0]: ln.split()[1] for ln in r.stdout.splitlines()[2:5]}
    assert states == {"seeds": "cached", "ask": "cached", "upper": "complete"}
    assert outputs(run_dir)["upper/records.jsonl"] != first["upper/records.jsonl"]
    # Change the model stage's option: it and its downstream recompute; answered requests are not re-sent.
    r = run(config(tmp_path, run_dir, count, suffix="?", rounds=13))
    states = {ln.split()[0]: ln.split()[1] for ln in r.stdout.splitlines()[2:5]}
    assert states == {"seeds": "cached", "ask": "complete", "upper": "complete"}
    assert len(sent(count)) == n + 3
    # Change both back: earlier outputs are restored, nothing recomputed or sent.
    r = run(config(tmp_path, run_dir, count))
    states = {ln.split()[0]: ln.split()[1] for ln in r.stdout.splitlines()[2:5]}
    assert states == {"seeds": "cached", "ask": "restored", "upper": "restored"}
    assert outputs(run_dir) == first
    assert len(sent(count)) == n + 3


def test_failures_recorded_and_retried(tmp_path):
    count = tmp_path / "count.txt"
    run_dir = tmp_path / "run"
    cfg = config(tmp_path, run_dir, count, fail_every=4)
    r = run(cfg)
    assert r.returncode == 4, r.stderr  # completed, with failed requests: said in the exit code and one line
    assert "transient: a re-run retries them" in r.stderr
    manifest = json.loads((run_dir / "manifest.json").read_text())
    ask = manifest["stages"]["ask"]
    assert ask["state"] == "complete_with_failures" and ask["failures"] > 0
    assert ask["failure_samples"][0]["kind"] == "injected"
    assert "failed request (injected" in r.stdout
    # No failure was stored as a result: the records hold only successful answers.
    recs = (run_dir / "ask" / "records.jsonl").read_text().splitlines()
    assert len(recs) == 36 - ask["failures"]
    # The next run retries them (the injected failures are deterministic, so they fail again and are re-sent).
    before = len(sent(count))
    r = run(cfg)
    assert r.returncode == 4
    assert json.loads((run_dir / "manifest.json").read_text())["stages"]["ask"]["requests_sent"] > 0
    assert len(sent(count)) > before


def test_budget_stop_then_raise_and_complete(tmp_path):
    count = tmp_path / "count.txt"
    run_dir = tmp_path / "run"
    budget = "    budget: {max_cost_usd: 0.2}"
    r = run(config(tmp_path, run_dir, count, budget=budget))
    assert r.returncode == 3, r.stderr
    assert "reached its budget" in r.stderr and "raise the budget" in r.stderr
    n = len(sent(count))
    assert 0 < n < 36
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["ask"]["state"] == "budget_stopped"
    r = run(config(tmp_path, run_dir, count, budget="    budget: {max_cost_usd: 100}"))
    assert r.returncode == 0, r.stderr
    keys = sent(count)
    assert len(keys) == len(set(keys)) == 36
    ref = tmp_path / "ref"
    assert run(config(tmp_path, ref, tmp_path / "c2.txt")).returncode == 0
    assert outputs(run_dir) == outputs(ref)


def test_fresh_discards_state(tmp_path):
    count = tmp_path / "count.txt"
    cfg = config(tmp_path, tmp_path / "run", count, rounds=2)
    assert run(cfg).returncode == 0
    assert run(cfg, "--fresh").returncode == 0
    assert len(sent(count)) == 12  # 6 requests, sent again after --fresh


def test_until_and_from(tmp_path):
    count = tmp_path / "count.txt"
    run_dir = tmp_path / "run"
    cfg = config(tmp_path, run_dir, count, rounds=2)
    r = run(cfg, "--until", "ask")
    assert r.returncode == 0 and not (run_dir / "upper").exists() and (run_dir / "ask").exists()
    r = run(cfg, "--from", "ask")
    states = {ln.split()[0]: ln.split()[1] for ln in r.stdout.splitlines()[2:5]}
    assert states == {"seeds": "cached", "ask": "complete", "upper": "complete"}
    assert len(sent(count)) == 6  # recomputed from the journal
    r = run(cfg, "--from", "nope")
    assert r.returncode == 2 and "--from nope: no such stage" in r.stderr


def test_validate_prints_plan_and_status_shows_stages(tmp_path):
    count = tmp_path / "count.txt"
    run_dir = tmp_path / "run"
    cfg = config(tmp_path, run_dir, count, rounds=2)
    v = subprocess.run([sys.executable, str(TESTS / "run_pipeline.py"), "validate", str(cfg)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert v.returncode == 0, v.stderr
    assert "model m (test): reachable" in v.stdout
    assert [ln.split()[-1] for ln in v.stdout.splitlines() if ln.startswith("  ") and ln.split()[0] in
            ("seeds", "ask", "upper")] == ["run", "run", "run"]
    assert run(cfg).returncode == 0
    v = subprocess.run([sys.executable, str(TESTS / "run_pipeline.py"), "validate", str(cfg), "--set",
                        "stages.upper.suffix=?"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    plan = {ln.split()[0]: ln.split()[-1] for ln in v.stdout.splitlines() if ln.startswith("  ")
            and ln.split()[0] in ("seeds", "ask", "upper")}
    assert plan == {"seeds": "cached", "ask": "cached", "upper": "run"}
    s = subprocess.run([sys.executable, "-m", "pipeline", "status", str(run_dir)], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert s.returncode == 0
    rows = {ln.split()[0]: ln.split() for ln in s.stdout.splitlines()[1:] if ln.split()}
    assert rows["ask"][1] == "complete" and rows["ask"][4] == "0" and rows["ask"][5] == "6/0"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["packages"]["torch"] and manifest["config_hash"]
    assert manifest["stages"]["ask"]["cost_usd"] > 0
