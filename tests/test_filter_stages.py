"""Every rule drops one record and keeps a near-miss; the filter drops exactly the defective records."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.records import Instance, Task
from pipeline.text.rules import (InstanceRules, InstructionRules, check_instance, check_instruction,
                                 conflicting_inputs, normalize_empty_input)

ROOT = Path(__file__).resolve().parent.parent

INSTRUCTION_CASES = [  # rule, dropped, near-miss kept
    ("too_short", "Sing a song.", "Sing a short song."),
    ("too_long", " ".join(["word"] * 151), " ".join(["word"] * 150)),
    ("blacklist", "Describe the image in detail.", "Describe the imagery of the poem."),
    ("blacklist", "Tell me how to go to the station.", "Tell me how to get to the station."),
    ("write_a_program", "Write a program to sort numbers.", "Write a poem about sorting numbers."),
    ("leading_punctuation", "- Give three tips for sleep.", "Give three tips for sleep - quickly."),
    ("non_ascii_start", "¿Give three tips for sleep?", "Give three tips for sleep, ¿ok?"),
]


@pytest.mark.parametrize("rule,bad,good", INSTRUCTION_CASES)
def test_instruction_rules(rule, bad, good):
    hit = check_instruction(bad, InstructionRules())
    assert hit is not None and hit.rule == rule
    assert check_instruction(good, InstructionRules()) is None


INSTANCE_CASES = [
    ("empty_output", Instance(input="x", output=" "), Instance(input="x", output="0")),
    ("placeholder_output", Instance(output="N/A"), Instance(output="N/A means not applicable.")),
    ("input_equals_output", Instance(input="hello there", output="hello there"), Instance(input="hello there", output="Hello there.")),
    ("trailing_colon", Instance(input="Items:", output="ok"), Instance(input="Items: milk", output="ok")),
    ("url_input", Instance(input="www.example.com/page", output="A page."), Instance(input="example dot com", output="A page.")),
    ("attachment_input", Instance(input="See the attached file for details.", output="ok"), Instance(input="See the details below.", output="ok")),
    ("merged_item", Instance(output="Paris.\n2. Instruction: Name a river."), Instance(output="Paris. The instruction was clear.")),
    ("output_too_long", Instance(output="the " * 801), Instance(output="the " * 800)),
    ("not_english", Instance(input="", output="Это очень длинный ответ на русском языке без английских слов вообще."),
     Instance(output="This is a long answer in English with the usual small words in it.")),
]


@pytest.mark.parametrize("rule,bad,good", INSTANCE_CASES, ids=[c[0] for c in INSTANCE_CASES])
def test_instance_rules(rule, bad, good):
    hit = check_instance("Answer the question.", bad, InstanceRules())
    assert hit is not None and hit.rule == rule
    assert check_instance("Answer the question.", good, InstanceRules()) is None


def test_classification_label_rule():
    rules = InstanceRules()
    labels = {"positive", "negative"}
    assert check_instance("Rate it.", Instance(input="x", output="Maybe"), rules, True, labels).rule == "unknown_label"
    assert check_instance("Rate it.", Instance(input="x", output="Positive"), rules, True, labels) is None


def test_empty_input_markers_and_conflicts():
    for marker in ["<noinput>", "No input", "N/A", "none", "<no input>", "(none)", "Noinput."]:
        assert normalize_empty_input(marker) == ""
    assert normalize_empty_input("None of the above") == "None of the above"
    t = Task(id="t", instruction="x", instances=[Instance(input="a", output="1"), Instance(input="a", output="2")])
    assert conflicting_inputs(t) == "a"
    t2 = Task(id="t", instruction="x", instances=[Instance(input="a", output="1"), Instance(input="a", output="1")])
    assert conflicting_inputs(t2) is None


def test_filter_drops_exactly_the_defective_records(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: clean\nrun_dir: {tmp_path / 'run'}\nstages:\n  seeds: {{path: {ROOT / 'data/defects_sample.jsonl'}}}\n"
                   "  filter: {rules: self_instruct}\n  dedup: {}\n")
    r = subprocess.run([sys.executable, "-m", "pipeline", "run", str(cfg), "--no-progress"], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    kept = [json.loads(line) for line in (run / "filter" / "records.jsonl").read_text().splitlines()]
    assert sorted(t["id"] for t in kept) == ["ok_1", "ok_2", "ok_noinput_1", "ok_noinput_2", "ok_noinput_3"]
    assert all(t["instances"][0]["input"] == "" for t in kept if t["id"].startswith("ok_noinput"))
    rejected = [json.loads(line) for line in (run / "filter" / "rejected.jsonl").read_text().splitlines()]
    task_ids = {r["record"].get("id") or r["record"].get("task_id") for r in rejected}
    seeds = [json.loads(line)["id"] for line in (ROOT / "data/defects_sample.jsonl").read_text().splitlines()]
    assert task_ids == {s for s in seeds if s.startswith("bad_")}
    manifest = json.loads((run / "manifest.json").read_text())["stages"]["filter"]
    assert sum(manifest["rejected"].values()) == manifest["rejected_total"] == len(rejected)
    assert manifest["rejected"]["conflicting_instances"] == 1 and manifest["rejected"]["url_input"] == 1
