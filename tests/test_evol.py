"""Evol-Instruct (generate mode: evol) through the CLI against the local OpenAI-compatible server: every round
journaled, the elimination step, lineages, and a re-run that sends nothing."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from openai_server import FakeOpenAI
from pipeline.stages.generation import evol

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ROOT / "data" / "seed_tasks.jsonl"
WORDS = "river planet budget violin harbor recipe garden ladder census poetry saddle tunnel magnet orchid".split()


def evolve(task: str, prompt: str) -> str:
    h = hashlib.sha256(prompt.encode()).digest()
    kind = h[0] % 10
    if kind == 0:
        return "I'm sorry, but I can't help with that."
    if kind == 1:
        return task  # no change
    if kind == 2:
        return f"New task: {task} The new task must also rhyme."  # copies the prompt's words
    if kind == 3:
        return "Do it."
    return f'"{task} Mention the {WORDS[h[1] % len(WORDS)]} and the {WORDS[h[2] % len(WORDS)]} in {h[3] % 9 + 2} steps."'


def answer(body: dict) -> str:
    content = body["messages"][0]["content"]
    if "Below is one task." in content:
        task = content.split("\nTask:\n", 1)[1].split("\n", 1)[0]
        return evolve(task, content)
    return "A careful answer with several sentences of content."


def test_elimination_rules():
    parent = "Explain how rain forms."
    assert evol.eliminated(parent, "I'm sorry, I cannot do that.", 3)[0] == "evol_refusal"
    assert evol.eliminated(parent, "explain how RAIN forms", 3)[0] == "evol_no_change"
    assert evol.eliminated(parent, "Rewrite the original task so that it rhymes.", 3)[0] == "evol_copied_prompt"
    assert evol.eliminated(parent, "Rain?", 3)[0] == "evol_too_short"
    assert evol.eliminated(parent, "Explain how rain forms over mountains, in three steps.", 3) is None
    assert evol.clean('New task: "Explain the tides."') == "Explain the tides."


def test_evol_through_the_cli(tmp_path):
    with FakeOpenAI(answer=answer) as srv:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"""name: e
run_dir: {tmp_path / 'run'}
models:
  m: {{backend: openai, model: fake, base_url: {srv.url}, max_concurrency: 4}}
stages:
  seeds: {{path: {SEEDS}, limit: 20}}
  generate: {{model: m, mode: evol, evol_rounds: 3, target: 1000, instances_style: answer, classify: false}}
""")
        cmd = [sys.executable, "-m", "pipeline", "run", str(cfg), "--no-progress"]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert r.returncode == 0, r.stderr
        out = tmp_path / "run" / "generate"
        raw = [json.loads(x) for x in (out / "raw_completions.jsonl").read_text().splitlines()]
        rounds = [x["tag"].split(":")[1] for x in raw if x["step"] == "evol"]
        assert [rounds.count(str(k)) for k in (1, 2, 3)] == [20, 20, 20]  # every lineage, every round
        kept = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
        rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
        rules = {x["rule"] for x in rejected}
        assert {"evol_refusal", "evol_no_change", "evol_copied_prompt", "evol_too_short"} <= rules
        assert kept and all(t["instances"] and t["provenance"]["extra"]["evol_operation"] in evol.DEPTH + (evol.BREADTH,)
                            for t in kept)
        # a later round evolves what an earlier one produced: its parent is an evolved instruction
        seeds = {json.loads(x)["instruction"] for x in SEEDS.read_text().splitlines()[:20]}
        later = [t for t in kept if t["provenance"]["extra"]["evol_round"] > 1]
        assert later and any(t["provenance"]["extra"]["evol_parent"] not in seeds for t in later)
        for t in kept:
            assert t["instruction"].startswith(t["provenance"]["extra"]["evol_parent"])
            assert not evol.PROMPT_WORDS.search(t["instruction"])
        sent = len(srv.log)
        # a changed option re-runs the stage: every round comes back from the journal, nothing is sent again
        cfg.write_text(cfg.read_text().replace("target: 1000", "target: 999"))
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert r.returncode == 0, r.stderr
        assert len(srv.log) == sent
        again = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
        assert [t["instruction"] for t in again] == [t["instruction"] for t in kept]
