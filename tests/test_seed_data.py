"""The project's own data files.

* ``data/seed_tasks.jsonl`` — the seed set: >= 130 tasks, >= 20% classification, >= 50% with an input, no
  pair of instructions with ROUGE-L > 0.7, every instruction passing the instruction rules and every instance
  the instance rules; short instructions (a small model continues lists of them in the demo).
* ``data/eval_instructions.jsonl`` — held-out tasks for the evaluate stage: ROUGE-L <= 0.5 to every seed.
* ``data/alpaca_sample.json`` — 20 Alpaca-format records for the seeds loader.

All files are read through the ``seeds`` stage's loader, as the pipeline reads them.
"""

from __future__ import annotations

import itertools
import json
import statistics
from pathlib import Path

import pytest

from pipeline.records import Task
from pipeline.stages import seeds
from pipeline.text.rouge import rouge_l_f1, tokenize
from pipeline.text.rules import InstanceRules, InstructionRules, check_instance, check_instruction, task_labels

DATA = Path(__file__).resolve().parent.parent / "data"
SEEDS = DATA / "seed_tasks.jsonl"
HELDOUT = DATA / "eval_instructions.jsonl"
ALPACA = DATA / "alpaca_sample.json"

# A few tasks are about other languages on purpose (identify the language, translate), so no English check.
INSTANCE_RULES = InstanceRules(language_check=False, max_input_words=99, max_output_words=99)


def load(path: Path) -> list[Task]:
    return seeds.load_tasks(seeds.Options(path=str(path)))


@pytest.fixture(scope="module")
def seed_tasks() -> list[Task]:
    return load(SEEDS)


@pytest.fixture(scope="module")
def heldout_tasks() -> list[Task]:
    return load(HELDOUT)


def pairwise_max(texts: list[str]) -> tuple[float, str, str]:
    toks = [tokenize(t) for t in texts]
    return max((rouge_l_f1(toks[i], toks[j]), texts[i], texts[j])
               for i, j in itertools.combinations(range(len(texts)), 2))


def assert_task_quality(tasks: list[Task]) -> None:
    rules = InstructionRules()
    for t in tasks:
        hit = check_instruction(t.instruction, rules)
        assert hit is None, (t.id, hit)
        assert t.instances, t.id
        labels = task_labels(t)
        for inst in t.instances:
            hit = check_instance(t.instruction, inst, INSTANCE_RULES, t.is_classification, labels)
            assert hit is None, (t.id, hit)
            assert inst.output.strip() != inst.input.strip(), t.id
            assert not inst.output.rstrip().endswith(":") and not inst.input.rstrip().endswith(":"), t.id
        if t.is_classification:
            # a label from a small set, not an explanation
            assert all(len(i.output.split()) <= 3 for i in t.instances), t.id


# ---- seed set ------------------------------------------------------------------------------------------

def test_seed_file_format():
    recs = [json.loads(line) for line in SEEDS.read_text(encoding="utf-8").splitlines()]
    for n, rec in enumerate(recs):
        assert set(rec) == {"id", "name", "instruction", "instances", "is_classification"}, n
        assert rec["id"] == f"seed_task_{n}"
        assert isinstance(rec["is_classification"], bool)
        assert rec["name"].isidentifier() and rec["name"].islower(), rec["name"]
    assert len({r["name"] for r in recs}) == len(recs)


def test_seed_size_and_shares(seed_tasks):
    n = len(seed_tasks)
    assert n >= 130
    assert sum(bool(t.is_classification) for t in seed_tasks) / n >= 0.20
    assert sum(any(i.input.strip() for i in t.instances) for t in seed_tasks) / n >= 0.50
    assert len({t.id for t in seed_tasks}) == n
    assert len({" ".join(tokenize(t.instruction)) for t in seed_tasks}) == n


def test_seed_instructions_are_short(seed_tasks):
    words = [len(t.instruction.split()) for t in seed_tasks]
    assert max(words) <= 30
    assert 6 <= statistics.median(words) <= 15
    assert sum(6 <= w <= 25 for w in words) / len(words) >= 0.8


def test_seed_no_near_duplicate_pair(seed_tasks):
    worst, a, b = pairwise_max([t.instruction for t in seed_tasks])
    assert worst <= 0.7, (worst, a, b)


def test_seed_instructions_and_instances_pass_the_rules(seed_tasks):
    assert_task_quality(seed_tasks)


def test_project_rouge_agrees_with_rouge_score(seed_tasks, heldout_tasks):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    texts = [t.instruction for t in seed_tasks] + [t.instruction for t in heldout_tasks]
    pairs = list(itertools.combinations(texts, 2))[::7]  # a spread-out sample of ~2,600 pairs
    for a, b in pairs:
        assert rouge_l_f1(tokenize(a), tokenize(b)) == pytest.approx(
            scorer.score(a, b)["rougeL"].fmeasure, abs=1e-12), (a, b)


# ---- held-out instructions ----------------------------------------------------------------------------

def test_heldout_set_is_far_from_the_seeds(seed_tasks, heldout_tasks):
    assert len(heldout_tasks) >= 25
    assert {t.id for t in heldout_tasks}.isdisjoint({t.id for t in seed_tasks})
    seed_toks = [tokenize(t.instruction) for t in seed_tasks]
    for t in heldout_tasks:
        toks = tokenize(t.instruction)
        worst = max(rouge_l_f1(toks, s) for s in seed_toks)
        assert worst <= 0.5, (t.id, t.instruction, worst)


def test_heldout_set_quality(heldout_tasks):
    assert_task_quality(heldout_tasks)
    worst, a, b = pairwise_max([t.instruction for t in heldout_tasks])
    assert worst <= 0.7, (worst, a, b)
    n = len(heldout_tasks)
    assert sum(bool(t.is_classification) for t in heldout_tasks) / n >= 0.15
    assert sum(any(i.input.strip() for i in t.instances) for t in heldout_tasks) / n >= 0.4


# ---- Alpaca sample --------------------------------------------------------------------------------------

def test_alpaca_sample_loads_as_alpaca():
    raw = json.loads(ALPACA.read_text(encoding="utf-8"))
    assert isinstance(raw, list) and len(raw) == 20
    assert all(set(r) == {"instruction", "input", "output"} for r in raw)
    assert seeds.detect_format(ALPACA, ALPACA.read_text(encoding="utf-8")) == "alpaca"
    tasks = load(ALPACA)
    assert [t.instruction for t in tasks] == [r["instruction"] for r in raw]
    assert [(t.instances[0].input, t.instances[0].output) for t in tasks] == [(r["input"], r["output"]) for r in raw]
    assert all(len(t.instances) == 1 and t.is_classification is None for t in tasks)
    assert len({t.id for t in tasks}) == 20
    assert 0 < sum(r["input"] == "" for r in raw) < 20  # both kinds, empty input kept as ""
    assert_task_quality(tasks)


def test_alpaca_sample_limit():
    tasks = seeds.load_tasks(seeds.Options(path=str(ALPACA), limit=5))
    assert len(tasks) == 5
