"""The generation stage against deterministic and scripted models, through the real runner."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.stages.generate import Options, check
from pipeline.text.templates import render

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"


def run_config(tmp_path, body, name="g"):
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(f"name: {name}\nrun_dir: {tmp_path / name}\nseed: 3\n" + body)
    r = subprocess.run([sys.executable, "-m", "pipeline", "run", str(cfg), "--no-progress"], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    return tmp_path / name


BODY = f"""models:
  m: {{backend: test, count_file: COUNT}}
stages:
  seeds: {{path: {ROOT / 'data/seed_tasks.jsonl'}}}
  generate: {{model: m, target: 25, batch_size: 4}}
"""


def requests(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "generate" / "raw_completions.jsonl").read_text().splitlines()]


def test_self_instruct_prompts_and_instances(tmp_path):
    run_dir = run_config(tmp_path, BODY.replace("COUNT", str(tmp_path / "count")))
    journal = __import__("sqlite3").connect(str(run_dir / "journal.sqlite"))
    prompts = [json.loads(r)["prompt"] for (r,) in journal.execute("SELECT request FROM results")]
    seeds = {json.loads(line)["instruction"] for line in (ROOT / "data/seed_tasks.jsonl").read_text().splitlines()}
    boots = [p for p in prompts if p.rstrip().endswith(".") and re.search(r"\n9\.$", p)]
    assert boots, "bootstrap prompts end on the next list number"
    kept = [json.loads(line) for line in (run_dir / "generate" / "records.jsonl").read_text().splitlines()]
    machine = {t["instruction"] for t in kept}
    mixed = 0
    for p in boots:
        items = re.findall(r"^\d+\. (.*)$", p, re.M)
        assert len(items) == 8
        n_seed = sum(i in seeds for i in items)
        assert n_seed in (6, 8)
        mixed += n_seed == 6
    assert mixed > 0  # once the pool has two machine instructions: 6 seeds + 2 machine instructions
    # Classification tasks get output-first instance prompts, others input-first.
    for t in kept:
        tpl = t["provenance"]["extra"]["instances_template"]
        assert tpl.endswith("output_first.j2" if t["is_classification"] else "input_first.j2")
        assert t["instances"] and t["provenance"]["request_key"]
        assert t["meta"]["rouge_score"] <= 0.7
    assert len(kept) <= 25 and any(t["is_classification"] for t in kept)


def test_same_seed_same_dataset(tmp_path):
    a = run_config(tmp_path, BODY.replace("COUNT", str(tmp_path / "c1")), "a")
    b = run_config(tmp_path, BODY.replace("COUNT", str(tmp_path / "c2")), "b")
    assert (a / "generate" / "records.jsonl").read_bytes() == (b / "generate" / "records.jsonl").read_bytes()


def test_alpaca_mode_end_to_end(tmp_path):
    body = BODY.replace("COUNT", str(tmp_path / "c")).replace("target: 25, batch_size: 4",
                                                               "target: 6, batch_size: 2, mode: alpaca, max_requests: 6")
    run_dir = run_config(tmp_path, body)
    prompts = [json.loads(r)["prompt"] for (r,) in __import__("sqlite3").connect(str(run_dir / "journal.sqlite"))
               .execute("SELECT request FROM results")]
    assert all(p.endswith("###\n4. Instruction:") for p in prompts)
    assert all(p.count("Instruction:") == 4 for p in prompts)  # three seed examples, then the next number


@pytest.mark.parametrize("template", sorted(p.name for p in (ROOT / "prompts/self_instruct").glob("*.j2")) +
                         ["alpaca/" + p.name for p in sorted((ROOT / "prompts/alpaca").glob("*.j2"))])
def test_golden_renders(template):
    name = template if "/" in template else f"self_instruct/{template}"
    sample = dict(instructions=["Name the capital of the given country.", "Is the review positive or negative?"],
                  num_new=5, num_tasks=5, instruction="Sort the numbers.", input="3, 1, 2",
                  examples=[{"instruction": "Add the numbers.", "is_classification": False, "input": "2, 3",
                             "output": "5", "instances": [{"input": "2, 3", "output": "5"}]},
                            {"instruction": "Is the review positive or negative?", "is_classification": True,
                             "input": "Great.", "output": "Positive", "instances": [{"input": "Great.", "output": "Positive"}]}])
    text = render(name, **sample)
    golden = GOLDEN / (name.replace("/", "__") + ".txt")
    if not golden.exists():  # first run writes the golden file; review it, then it is checked forever
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    assert text == golden.read_text()


def test_check_renders_all_templates():
    check(Options(model="m"))
    check(Options(model="m", mode="alpaca", alpaca_style="chat"))
    check(Options(model="m", bootstrap_style="chat", instances_style="answer"))


def test_generate_killed_five_times_resumes_exactly(tmp_path):
    import random
    import signal
    import sqlite3
    import time

    def cfg(name, count):
        body = BODY.replace("COUNT", str(count)).replace("{backend: test,", "{backend: test, delay_s: 0.1,")
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"name: {name}\nrun_dir: {tmp_path / name}\nseed: 3\n" + body)
        return path

    def sent(count):
        return count.read_text().split() if count.exists() else []

    ref = run_config(tmp_path, BODY.replace("COUNT", str(tmp_path / "ref-count")), "ref")
    count = tmp_path / "count"
    path = cfg("killed", count)
    rng = random.Random(11)
    resent = []
    for _ in range(5):
        db = tmp_path / "killed" / "journal.sqlite"
        committed = {k for (k,) in sqlite3.connect(str(db)).execute("SELECT key FROM results")} if db.exists() else set()
        start, target = len(sent(count)), len(sent(count)) + rng.randint(2, 8)
        p = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(path), "--no-progress"], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while len(sent(count)) < target and p.poll() is None:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.12))
        assert p.poll() is None, "the stage finished before it could be killed"
        p.send_signal(signal.SIGKILL)
        p.wait()
        resent += [k for k in sent(count)[start:] if k in committed]
    db = tmp_path / "killed" / "journal.sqlite"
    committed = {k for (k,) in sqlite3.connect(str(db)).execute("SELECT key FROM results")}
    start = len(sent(count))
    r = subprocess.run([sys.executable, "-m", "pipeline", "run", str(path), "--no-progress"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    resent += [k for k in sent(count)[start:] if k in committed]
    assert resent == []
    for f in ("records.jsonl", "rejected.jsonl", "raw_completions.jsonl"):
        assert (tmp_path / "killed" / "generate" / f).read_bytes() == (ref / "generate" / f).read_bytes()


def test_self_instruct_175_config_against_server_from_env(tmp_path, shared_seeds):
    """configs/self-instruct-175.yaml runs against an OpenAI-compatible server named by the environment."""
    import os

    from openai_server import FakeOpenAI

    from pipeline.models import testing
    from pipeline.models.base import GenParams, ModelRequest

    def answer(body):  # the deterministic test model's answers, served over HTTP
        req = ModelRequest(prompt=body["prompt"], params=GenParams(seed=body.get("seed")))
        return testing.answer(req, testing.Options())

    with FakeOpenAI(answer=answer) as srv:
        env = {**os.environ, "OPENAI_BASE_URL": srv.url, "OPENAI_API_KEY": "test-key", "SEEDTUNE_MODEL": "base"}
        r = subprocess.run([sys.executable, "-m", "pipeline", "run", "configs/self-instruct-175.yaml", "--no-progress",
                            "--set", f"run_dir={tmp_path / 'run'}", "--set", f"stages.seeds.path={shared_seeds}",
                            "--set", "stages.generate.target=12", "--set", "stages.generate.batch_size=4",
                            "--set", "stages.generate.max_requests=40"],
                           capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
        assert r.returncode == 0, r.stderr
        assert all(b["model"] == "base" and "prompt" in b for b in srv.log)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["seeds"]["metrics"]["tasks"] == 175
    assert manifest["stages"]["export"]["rows_out"] > 0
    assert "test-key" not in (tmp_path / "run" / "manifest.json").read_text()
