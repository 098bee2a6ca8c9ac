"""The project's own seed set: >= 120 tasks, >= 20% classification, >= 50% with an input, no pair of
instructions with ROUGE-L > 0.7, and every instruction passing the project's instruction rules."""

import itertools
import json
from pathlib import Path

from pipeline.text.rouge import rouge_l_f1, tokenize
from pipeline.text.rules import InstanceRules, InstructionRules, check_instance, check_instruction
from pipeline.records import Task

SEEDS = Path(__file__).resolve().parent.parent / "data" / "seed_tasks.jsonl"


def tasks() -> list[Task]:
    return [Task.model_validate(json.loads(line)) for line in SEEDS.read_text().splitlines() if line.strip()]


def test_size_and_shares():
    ts = tasks()
    assert len(ts) >= 120
    assert sum(bool(t.is_classification) for t in ts) / len(ts) >= 0.20
    assert sum(any(i.input for i in t.instances) for t in ts) / len(ts) >= 0.50
    assert len({t.id for t in ts}) == len(ts)


def test_no_near_duplicate_pair():
    toks = [tokenize(t.instruction) for t in tasks()]
    worst = max(rouge_l_f1(a, b) for a, b in itertools.combinations(toks, 2))
    assert worst <= 0.7, worst


def test_instructions_and_instances_pass_the_rules():
    rules = InstructionRules()
    inst_rules = InstanceRules(language_check=False)  # a few seeds are about other languages on purpose
    for t in tasks():
        assert check_instruction(t.instruction, rules) is None, t.id
        assert t.instances, t.id
        for inst in t.instances:
            assert check_instance(t.instruction, inst, inst_rules) is None, t.id
