"""The judge stage: its answer parser, and through the CLI against the local OpenAI-compatible server (JSON
answers and plain-text answers), re-runs, and a SIGKILL mid-stage."""

import hashlib
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from openai_server import FakeOpenAI
from pipeline.stages import judge

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ROOT / "data" / "seed_tasks.jsonl"
CLI = [sys.executable, "-m", "pipeline", "run"]


@pytest.mark.parametrize("text,expected", [
    ('{"score": 4, "reason": "Clear and correct."}', (4, "Clear and correct.")),
    ('{"items": {"score": 2, "reason": "Vague."}}', (2, "Vague.")),  # structured output's wrapper
    ('Sure! ```json\n{"Rating": "5", "explanation": "Great"}\n```', (5, "Great")),
    ("Score: 3\nReason: the output misses one item.", (3, "the output misses one item.")),
    ("I would give this a 4/5 because the answer is right but terse.", (4, None)),
    ("4 out of 5. Solid.", (4, None)),
    ("2 - the input does not match the instruction", (2, "the input does not match the instruction")),
    ("Rating is 1. Broken output.", (1, None)),
])
def test_parse_judgement(text, expected):
    got = judge.parse_judgement(text, 5)
    assert got is not None and got[0] == expected[0]
    if expected[1] is not None:
        assert got[1] == expected[1]


@pytest.mark.parametrize("text", ["", "A fine example.", '{"score": 9, "reason": "x"}', "Score: 7", "3/10",
                                  '{"score": true}', '{"reason": "no score"}', "Score: 3.5"])
def test_unparseable_judgements(text):
    assert judge.parse_judgement(text, 5) is None


def judged(srv) -> list[dict]:
    """The judge's requests among those the server received (json_mode: true also sends a probe when the
    model is checked)."""
    return [b for b in srv.log if "### Instruction\n" in b["messages"][0]["content"]]


def instruction_of(body: dict) -> str:
    content = body["messages"][0]["content"]
    return content.split("### Instruction\n", 1)[1].split("\n", 1)[0]


def score_of(instruction: str) -> int:
    return hashlib.sha256(instruction.encode()).digest()[0] % 5 + 1


def answer(body: dict) -> str:
    """A judge whose score is a hash of the instruction: JSON when asked for it, text otherwise; a few
    answers carry no score at all."""
    if "### Instruction\n" not in body["messages"][0]["content"]:  # the check's probe
        return '["red", "blue"]'
    ins = instruction_of(body)
    if ins.startswith("Translate"):
        return "I cannot rate this."
    s = score_of(ins)
    if "response_format" in body:
        return json.dumps({"items": {"score": s, "reason": f"reason for {ins[:20]}"}})
    return f"Score: {s}\nReason: reason for {ins[:20]}"


def config(tmp_path: Path, url: str, json_mode: bool, limit: int = 30, extra: str = "") -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""name: j
run_dir: {tmp_path / 'run'}
models:
  m: {{backend: openai, model: fake, base_url: {url}, max_concurrency: 2, json_mode: {str(json_mode).lower()}{extra}}}
stages:
  seeds: {{path: {SEEDS}, limit: {limit}}}
  judge: {{model: m, min_score: 3}}
  template: {{}}
  export: {{validation_fraction: 0.2}}
""")
    return cfg


def read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


@pytest.mark.parametrize("json_mode", [True, False])
def test_judge_through_the_cli_keeps_scores_and_rejects_below_min(tmp_path, json_mode):
    seeds = read(SEEDS)[:30]
    with FakeOpenAI(answer=answer) as srv:
        cfg = config(tmp_path, srv.url, json_mode)
        r = subprocess.run(CLI + [str(cfg), "--no-progress"], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert r.returncode == 0, r.stderr
        assert len(judged(srv)) == 30 and all(("response_format" in b) == json_mode for b in judged(srv))
        kept = read(tmp_path / "run" / "judge" / "records.jsonl")
        rejected = read(tmp_path / "run" / "judge" / "rejected.jsonl")
        unparseable = {s["id"] for s in seeds if s["instruction"].startswith("Translate")}
        expected_kept = {s["id"] for s in seeds if s["id"] not in unparseable and score_of(s["instruction"]) >= 3}
        assert {t["id"] for t in kept} == expected_kept and 0 < len(kept) < 30
        for t in kept:
            assert t["meta"]["judge_score"] == score_of(t["instruction"]) >= 3
            assert t["meta"]["judge_reason"] == f"reason for {t['instruction'][:20]}".strip()
            assert len(t["meta"]["judge_request_key"]) == 64
        below = [x for x in rejected if x["rule"] == "judge_below_min"]
        assert {x["record"]["id"] for x in below} == {s["id"] for s in seeds if s["id"] not in unparseable
                                                       and score_of(s["instruction"]) < 3}
        for x in below:
            assert x["record"]["meta"]["judge_score"] == score_of(x["record"]["instruction"]) < 3
            assert f"judge score {x['record']['meta']['judge_score']} < min_score 3" in x["reason"]
        assert {x["record"]["id"] for x in rejected if x["rule"] == "judge_unparseable"} == unparseable
        stage = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["judge"]
        dist = stage["metrics"]["judge_scores"]
        assert set(dist) == {"1", "2", "3", "4", "5"} and sum(dist.values()) == 30 - len(unparseable)
        assert all(dist[str(k)] == sum(score_of(s["instruction"]) == k for s in seeds if s["id"] not in unparseable)
                   for k in range(1, 6))
        # the dataset card shows the distribution and the judge's line in the funnel
        card = (tmp_path / "run" / "export" / "README.md").read_text()
        n = 30 - len(unparseable)
        assert f"{n} tasks scored by the judge model; those below 3 were dropped" in card
        for k in range(1, 6):
            assert f"| {k} | {dist[str(k)]} | {100 * dist[str(k)] / n:.1f}% |" in card
        assert f"| judge: judge_below_min | {len(below)} |" in card
        # a re-run is cached; a changed min_score re-runs the stage from the journal: no request either way
        r = subprocess.run(CLI + [str(cfg), "--no-progress"], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert r.returncode == 0, r.stderr
        cfg.write_text(cfg.read_text().replace("min_score: 3", "min_score: 4"))
        r = subprocess.run(CLI + [str(cfg), "--no-progress"], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert r.returncode == 0, r.stderr
        assert len(judged(srv)) == 30
        kept4 = read(tmp_path / "run" / "judge" / "records.jsonl")
        assert {t["id"] for t in kept4} == {i for i in expected_kept if score_of(next(
            s["instruction"] for s in seeds if s["id"] == i)) >= 4}


def test_failed_judge_requests_are_rejected_then_retried(tmp_path):
    failing = {"on": True}

    def fault_fn(body, seen):
        return "500" if failing["on"] and score_of(instruction_of(body)) == 5 else None

    with FakeOpenAI(answer=answer, fault_fn=fault_fn) as srv:
        cfg = config(tmp_path, srv.url, True, limit=20, extra=", max_attempts: 1")
        r = subprocess.run(CLI + [str(cfg), "--no-progress"], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert r.returncode in (0, 4), r.stderr
        failed = [x for x in read(tmp_path / "run" / "judge" / "rejected.jsonl") if x["rule"] == "judge_request_failed"]
        assert failed and all(score_of(x["record"]["instruction"]) == 5 for x in failed)
        assert all("http_500" in x["reason"] for x in failed)
        n_failed, sent = len(failed), len(judged(srv))
        failing["on"] = False
        r = subprocess.run(CLI + [str(cfg), "--no-progress"], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert r.returncode == 0, r.stderr
        assert len(judged(srv)) == sent + n_failed  # only the failed requests went out again
        kept = read(tmp_path / "run" / "judge" / "records.jsonl")
        assert sum(t["meta"]["judge_score"] == 5 for t in kept) == n_failed


def test_judge_killed_mid_stage_never_resends_an_answered_request(tmp_path):
    with FakeOpenAI(answer=answer, latency=0.1) as srv:
        cfg = config(tmp_path, srv.url, True, limit=60)
        db = tmp_path / "run" / "journal.sqlite"
        resent = []
        for k in range(2):
            committed = ({json.loads(x)["messages"][0]["content"] for (x,) in
                          sqlite3.connect(str(db)).execute("SELECT request FROM results")} if db.exists() else set())
            start = len(judged(srv))
            p = subprocess.Popen(CLI + [str(cfg), "--no-progress"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
            while len(judged(srv)) < start + 8 + 4 * k and p.poll() is None:
                time.sleep(0.01)
            p.send_signal(signal.SIGKILL)
            p.wait()
            resent += [b for b in judged(srv)[start:] if b["messages"][0]["content"] in committed]
            if k == 1:
                assert committed, "nothing was committed before the second kill"
        r = subprocess.run(CLI + [str(cfg), "--no-progress"], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert r.returncode == 0, r.stderr
        assert resent == []
        contents = [b["messages"][0]["content"] for b in judged(srv)]
        answered_twice = [c for c in set(contents) if contents.count(c) > 1]
        committed = {json.loads(x)["messages"][0]["content"] for (x,) in
                     sqlite3.connect(str(db)).execute("SELECT request FROM results")}
        assert len(committed) == 60 and len(answered_twice) <= 4  # at most the requests in flight at a kill
        assert len(read(tmp_path / "run" / "judge" / "records.jsonl")) + len(
            read(tmp_path / "run" / "judge" / "rejected.jsonl")) == 60
