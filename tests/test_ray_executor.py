"""``executor: ray`` through the CLI: the same records as the local executor for the same seed, a driver killed
(SIGKILL) three times at random points resumes sending only what was not committed, and no Ray process outlives
the run. Against the real HTTP test server (openai backend) and on a tiny local model (transformers, 2 workers)."""

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from openai_server import FakeOpenAI, canonical
from tinymodel import save_tiny_causal

pytest.importorskip("ray.data")

ROOT = Path(__file__).resolve().parent.parent
WORDS = "river planet budget violin harbor recipe garden ladder census poetry saddle tunnel magnet orchid".split()
SMALL = ["stages.generate.target=12", "stages.generate.max_requests=8", "stages.generate.batch_size=4"]


def answer(body):
    """A JSON list of tasks drawn from the request itself (so the same request gets the same answer)."""
    rng = random.Random(canonical(body))
    return json.dumps([{"instruction": "Describe the " + " and the ".join(rng.sample(WORDS, 4)) + ".",
                        "input": "", "output": "It is the " + rng.choice(WORDS) + "."} for _ in range(3)])


def ray_processes(tmpdir: str) -> list[int]:
    """Processes of the Ray instance whose files live under ``tmpdir`` (raylet, gcs_server, workers)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if tmpdir.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def wait_ray_gone(tmpdir: str) -> None:
    deadline = time.monotonic() + 120
    while ray_processes(tmpdir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_processes(tmpdir) == [], "Ray processes outlived the seedtune process"


def committed(db: Path) -> dict[str, str]:
    if not db.exists():
        return {}
    conn = sqlite3.connect(str(db))
    try:
        return dict(conn.execute("SELECT key, result FROM results"))
    except sqlite3.OperationalError:  # the driver is creating the journal right now
        return {}
    finally:
        conn.close()


def generate_outputs(run: Path) -> tuple[str, str]:
    gen = run / "generate"
    return (gen / "records.jsonl").read_text(), (gen / "raw_completions.jsonl").read_text()


class Driver:
    """Runs ``seedtune run`` with its own Ray temp dir, so that its Ray processes can be found."""

    def __init__(self, config: Path, run_dir: Path, sets: list[str], env: dict):
        self.rt = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
        self.cmd = [sys.executable, "-m", "pipeline", "run", str(config), "--no-progress",
                    "--set", f"run_dir={run_dir}"] + [a for s in sets for a in ("--set", s)]
        self.env = {**os.environ, **env, "RAY_TMPDIR": self.rt}
        self.db = run_dir / "journal.sqlite"

    def start(self) -> subprocess.Popen:
        self.log = tempfile.TemporaryFile()  # a file, not a pipe: nobody reads it while the driver runs
        return subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=self.log)

    def run(self) -> None:
        r = subprocess.run(self.cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        wait_ray_gone(self.rt)

    def kill_when(self, ready, total: int) -> None:
        """SIGKILL the driver once ``ready()``; it must have been mid-generation (fewer than ``total`` answers)."""
        p = self.start()
        while not ready() and p.poll() is None:
            time.sleep(0.05)
        if p.poll() is not None:  # it must be killed mid-run, not after it
            self.log.seek(0)
            raise AssertionError(self.log.read().decode()[-3000:])
        p.send_signal(signal.SIGKILL)
        p.wait()
        wait_ray_gone(self.rt)
        assert len(committed(self.db)) < total, "the run had finished generating before the kill"


def final_run_sends_only_uncommitted(driver: Driver, run_dir: Path) -> None:
    before = committed(driver.db)
    driver.run()
    gen = json.loads((run_dir / "manifest.json").read_text())["stages"]["generate"]
    after = committed(driver.db)
    assert {k: after[k] for k in before} == before  # committed answers never change
    assert gen["requests_cached"] == len(before) and gen["requests_sent"] == len(after) - len(before)


def test_openai_on_ray_matches_local_and_survives_three_kills(tmp_path):
    rng = random.Random(14)
    config = ROOT / "configs" / "openai.yaml"
    with FakeOpenAI(latency=0.05, answer=answer) as srv:
        env = {"OPENAI_BASE_URL": srv.url, "OPENAI_API_KEY": "test"}
        Driver(config, tmp_path / "local", SMALL, env).run()
        total = len(committed(tmp_path / "local" / "journal.sqlite"))

        ray_run = tmp_path / "ray"
        driver = Driver(config, ray_run, SMALL + ["models.teacher.executor=ray", "models.teacher.ray.workers=2",
                                                  "models.teacher.ray.batch_size=2"], env)
        in_flight = resent = 0
        answered: set[str] = set()
        for _ in range(3):
            start, before = len(srv.log), len(committed(driver.db))
            driver.kill_when(lambda: len(srv.log) >= start + rng.randint(1, 2), total)
            sent = {canonical(b) for b in srv.log[start:]}
            # In flight at the kill: received by the server (the workers included), never committed.
            in_flight += len(sent) - (len(committed(driver.db)) - before)
            resent += len(sent & answered)
            answered |= sent
        start = len(srv.log)
        final_run_sends_only_uncommitted(driver, ray_run)
        resent += len({canonical(b) for b in srv.log[start:]} & answered)
    assert generate_outputs(ray_run) == generate_outputs(tmp_path / "local")
    assert committed(driver.db) == committed(tmp_path / "local" / "journal.sqlite")
    assert resent <= in_flight


def test_transformers_on_two_ray_workers_matches_local_and_survives_three_kills(tmp_path):
    rng = random.Random(41)
    model = save_tiny_causal(tmp_path / "tiny")
    config = tmp_path / "tiny.yaml"
    config.write_text(f"""name: tiny-ray
seed: 3
models:
  m: {{backend: transformers, model: {model}, batch_size: 2}}
stages:
  seeds: {{path: {ROOT / 'data/seed_tasks.jsonl'}, limit: 20}}
  generate:
    model: m
    target: 200
    max_requests: 32
    batch_size: 16
    classify: false
    instances_style: answer
    bootstrap_params: {{temperature: 1.0, top_p: 1.0, max_tokens: 24}}
    instances_params: {{temperature: 1.0, max_tokens: 12}}
""")
    env = {"HF_HUB_OFFLINE": "1"}
    Driver(config, tmp_path / "local", [], env).run()
    ray_run = tmp_path / "ray"
    driver = Driver(config, ray_run, ["models.m.executor=ray", "models.m.ray.workers=2"], env)
    total = len(committed(tmp_path / "local" / "journal.sqlite"))
    # 32 bootstrap requests in rounds of 16 (each round a Ray dataset of its own, so few rounds keep the test short),
    # answered in chunks of 2 (the backend's batch): three kills after 1-3 answers each, plus the answers committed
    # between the poll and the kill, leave most of the run to the final resume on a busy machine too.
    for _ in range(3):
        start, more = len(committed(driver.db)), rng.randint(1, 3)  # kill after 1-3 answers of this run
        driver.kill_when(lambda: len(committed(driver.db)) >= start + more, total)
    final_run_sends_only_uncommitted(driver, ray_run)
    assert generate_outputs(ray_run) == generate_outputs(tmp_path / "local")
    assert committed(driver.db) == committed(tmp_path / "local" / "journal.sqlite")
