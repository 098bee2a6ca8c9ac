"""Parsing against a corpus of realistic bad completions (tests/completions/*.yaml); each case states exactly
what must be kept and which items are dropped, by rule."""

from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from pipeline.text.parsing import (parse_alpaca, parse_answer, parse_input_first, parse_instruction_list,
                                   parse_json_items, parse_output_first, parse_yes_no)

CORPUS = Path(__file__).resolve().parent / "completions"


def cases(name: str) -> list:
    data = yaml.safe_load((CORPUS / name).read_text())
    return [pytest.param(c, id=c["name"]) for c in data]


@pytest.mark.parametrize("case", cases("instruction_lists.yaml"))
def test_instruction_lists(case):
    r = parse_instruction_list(case["completion"], case.get("truncated", False), case.get("first_line_only", False),
                               case.get("leading_item", True))
    assert r.items == case["keep"]
    assert [d.rule for d in r.dropped] == case["dropped"]


INSTANCE_PARSERS = {"input_first": parse_input_first, "output_first": parse_output_first,
                    "answer": lambda text, truncated: parse_answer(text, truncated)}


@pytest.mark.parametrize("case", cases("instances.yaml"))
def test_instances(case):
    r = INSTANCE_PARSERS[case["parser"]](case["completion"], case.get("truncated", False))
    assert [list(p) for p in r.items] == case["keep"]
    assert sorted(d.rule for d in r.dropped) == sorted(case["dropped"])


@pytest.mark.parametrize("case", cases("alpaca.yaml"))
def test_alpaca(case):
    r = parse_alpaca(case["completion"], case.get("truncated", False), chat=case.get("chat", False))
    assert [[i.instruction, i.input, i.output] for i in r.items] == case["keep"]
    assert sorted(d.rule for d in r.dropped) == sorted(case["dropped"])


@pytest.mark.parametrize("case", cases("json.yaml"))
def test_json_answers(case):
    r = parse_json_items(case["completion"], case.get("truncated", False),
                         tuple(case.get("required", ["instruction"])))
    if case.get("fallback"):
        assert r is None
        return
    assert [[i.instruction, i.input, i.output] for i in r.items] == case["keep"]
    assert sorted(d.rule for d in r.dropped) == sorted(case["dropped"])


def test_corpus_covers_the_listed_defects():
    names = " ".join(c["name"] for f in CORPUS.glob("*.yaml") for c in yaml.safe_load(f.read_text()))
    for topic in ("merged", "skipped and repeated numbers", "truncated", "markdown-wrapped JSON",
                  "trailing prose", "stop strings inside content", "empty-input markers", "case is never changed"):
        assert topic in names, topic


def test_ten_items_one_malformed_keeps_nine():
    items = [f"Write task number {i} about topic {i}." for i in range(10)]
    lines = [items[0]] + [f"{i + 10}. {t}" for i, t in enumerate(items[1:], 1)]
    lines[4] = "14. Input: this line is a stray header"
    r = parse_instruction_list(" " + "\n".join(lines), truncated=False)
    assert r.items == [t for i, t in enumerate(items) if i != 4]
    assert [d.rule for d in r.dropped] == ["malformed_item"]


def test_ten_alpaca_items_one_malformed_keeps_nine():
    blocks = [f"{i}. Instruction: Do task {i} now.\n{i}. Input:\n<noinput>\n{i}. Output:\nDone {i}."
              for i in range(4, 14)]
    blocks[3] = "7. Instruction: Missing its output.\n7. Input:\nx"
    text = "\n###\n".join(blocks).removeprefix("4. Instruction:")
    r = parse_alpaca(text, truncated=False)
    assert len(r.items) == 9 and [d.rule for d in r.dropped] == ["malformed_item"]


def test_ten_json_items_one_malformed_keeps_nine():
    import json
    items = [{"instruction": f"Do task {i} now.", "input": "", "output": f"Done {i}."} for i in range(10)]
    items[6] = {"instruction": ["not", "a", "string"], "output": "x"}
    r = parse_json_items(json.dumps(items), required=("instruction", "output"))
    assert len(r.items) == 9 and [d.rule for d in r.dropped] == ["malformed_item"]


@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40), max_size=8),
       st.booleans())
def test_list_parser_never_invents_or_loses_text(words, truncated):
    """Whatever the model writes, every kept item is text from the completion, never re-cased."""
    completion = " " + "\n".join(f"{i + 9}. {w}" if i else w for i, w in enumerate(words))
    r = parse_instruction_list(completion, truncated)
    flat = " ".join(completion.split())
    for item in r.items:
        assert item and item in flat


def test_yes_no():
    assert parse_yes_no(" Yes\n") is True and parse_yes_no("no.") is False and parse_yes_no("Maybe") is None
    assert parse_yes_no(" **Yes**") is True
