"""``executor: ray`` through the CLI: the same records as the local executor for the same seed, a driver killed
(SIGKILL) three times at random points resumes sending only what was not committed, no Ray process outlives
the run, and a run starts each Ray worker once however many rounds and stages call the model (a judge stage
after generate on the same model). Against the real HTTP test server (openai backend) and on a tiny local model
(transformers, 2 workers)."""

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
import yaml

from openai_server import FakeOpenAI, canonical
from tinymodel import save_tiny_causal

pytest.importorskip("ray.data")

ROOT = Path(__file__).resolve().parent.parent
WORDS = "river planet budget violin harbor recipe garden ladder census poetry saddle tunnel magnet orchid".split()
SMALL = ["stages.generate.target=12", "stages.generate.max_requests=8", "stages.generate.batch_size=4"]


def answer(body):
    """A JSON list of tasks drawn from the request itself (so the same request gets the same answer); a judge's
    request gets a score."""
    rng = random.Random(canonical(body))
    if "Rate how good" in canonical(body):
        return json.dumps({"score": rng.randint(1, 5), "reason": "It is " + rng.choice(WORDS) + "."})
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


def generate_outputs(run: Path) -> tuple[str, ...]:
    gen = run / "generate"
    judged = [(run / "judge" / "records.jsonl").read_text()] if (run / "judge").exists() else []
    return (gen / "records.jsonl").read_text(), (gen / "raw_completions.jsonl").read_text(), *judged


def one_pool_per_run(run_dir: Path, model: str, workers: int, stages: tuple[str, ...]) -> None:
    """The last run started each worker once, though every stage here that sent requests made a call of its own."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    pool = manifest["models"][model]
    ran = {s: st for s, st in manifest["stages"].items() if st["state"] != "cached"}  # cached: an earlier run's
    sending = [s for s in stages if s in ran and ran[s]["requests_sent"]]
    assert sending, "the last run sent nothing"
    assert pool["ray_calls"] >= len(sending)
    assert pool["ray_actor_starts"] == workers, pool


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


def stage_of(db: Path) -> dict[str, str]:
    """The stage that committed each answer."""
    conn = sqlite3.connect(str(db))
    try:
        return dict(conn.execute("SELECT key, stage FROM results"))
    finally:
        conn.close()


def final_run_sends_only_uncommitted(driver: Driver, run_dir: Path) -> None:
    before, committed_by = committed(driver.db), stage_of(driver.db)
    driver.run()
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    # a stage a killed run completed is cached now (its numbers are that run's); the others ran in this one
    ran = [s for s in ("generate", "judge") if s in stages and stages[s]["state"] != "cached"]
    assert ran, "the final run computed no stage that calls the model"
    after = committed(driver.db)
    assert {k: after[k] for k in before} == before  # committed answers never change
    assert sum(stages[s]["requests_cached"] for s in ran) == sum(committed_by[k] in ran for k in before)
    assert sum(stages[s]["requests_sent"] for s in ran) == len(after) - len(before)


def test_openai_on_ray_matches_local_and_survives_three_kills(tmp_path):
    rng = random.Random(14)
    data = yaml.safe_load((ROOT / "configs" / "openai.yaml").read_text())
    stages = list(data["stages"].items())  # configs/openai.yaml with a judge on the same model after generate
    data["stages"] = dict(stages[:2] + [("judge", {"model": "teacher"})] + stages[2:])
    config = tmp_path / "openai.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
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
            start, before, more = len(srv.log), len(committed(driver.db)), rng.randint(1, 2)
            driver.kill_when(lambda: len(committed(driver.db)) >= before + more, total)  # after 1-2 answers
            sent = {canonical(b) for b in srv.log[start:]}
            # In flight at the kill: received by the server (the workers included), never committed.
            in_flight += len(sent) - (len(committed(driver.db)) - before)
            resent += len(sent & answered)
            answered |= sent
        start = len(srv.log)
        final_run_sends_only_uncommitted(driver, ray_run)
        resent += len({canonical(b) for b in srv.log[start:]} & answered)
    one_pool_per_run(ray_run, "teacher", 2, ("generate", "judge"))
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
    # 32 bootstrap requests in rounds of 16, answered in chunks of 2 (the backend's batch): three kills after 1-3
    # answers each, plus the answers committed between the poll and the kill, leave most of the run (the second
    # round and the instances, two calls at least on the same two workers) to the final resume.
    for _ in range(3):
        start, more = len(committed(driver.db)), rng.randint(1, 3)  # kill after 1-3 answers of this run
        driver.kill_when(lambda: len(committed(driver.db)) >= start + more, total)
    final_run_sends_only_uncommitted(driver, ray_run)
    one_pool_per_run(ray_run, "m", 2, ("generate",))
    assert json.loads((ray_run / "manifest.json").read_text())["models"]["m"]["ray_calls"] >= 2  # rounds, instances
    assert generate_outputs(ray_run) == generate_outputs(tmp_path / "local")
    assert committed(driver.db) == committed(tmp_path / "local" / "journal.sqlite")


def test_a_call_stopped_by_its_sink_leaves_the_same_workers_to_answer_the_next(tmp_path, monkeypatch):
    """In this process: a sink that says stop (the budget) ends the call after the chunks already running; the next
    call is answered by the same worker (started once), each answer as the local backend gives it. A second model
    on the same Ray instance keeps working when the first one (which started Ray) is closed; closing the last
    stops Ray."""
    import ray

    from pipeline.models import RayOptions, testing
    from pipeline.models.base import ModelRequest
    from pipeline.run.executors.ray import RayExecutor

    monkeypatch.setenv("RAY_TMPDIR", tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    options = testing.Options(delay_s=0.02)
    executor = RayExecutor("test", options, RayOptions(workers=1, batch_size=2), testing.create(options))
    other = RayExecutor("test", options, RayOptions(workers=1), testing.create(options))
    requests = [ModelRequest(prompt=f"Task {i}:", tag=f"t{i}") for i in range(40)]
    local: list[tuple] = []
    testing.create(options).generate(requests, lambda group: local.extend(group) or True)
    try:
        stopped: list[tuple] = []
        executor.generate(requests, lambda group: stopped.extend(group) or False)
        assert len(stopped) in (2, 4)  # the first chunk, and the next one if it had started: nothing queued runs
        answered: list[tuple] = []
        executor.generate(requests, lambda group: answered.extend(group) or True)
        assert sorted(answered, key=lambda t: t[0]) == local
        assert executor.stats() == {"executor": "ray", "ray_workers": 1, "ray_actor_starts": 1, "ray_calls": 2}
        other.generate(requests[:2], lambda group: True)
        executor.close()
        assert ray.is_initialized()
        again: list[tuple] = []
        other.generate(requests, lambda group: again.extend(group) or True)
        assert sorted(again, key=lambda t: t[0]) == local
        other.close()
        assert not ray.is_initialized()
    finally:
        executor.close()
        other.close()
