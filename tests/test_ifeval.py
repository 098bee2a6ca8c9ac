"""IFEval in the evaluation: the checkers' own verdicts on answers written for the test, the four accuracies
and their units, the bootstrap interval of a known change, and a tiny model evaluated before and after with the
IFEval rows in the card's table. The prompts here are written for the test in IFEval's layout."""

import json
from pathlib import Path

import pytest

pytest.importorskip("if_verifiable")

from pipeline.errors import UserError  # noqa: E402
from pipeline.training import evaluation as ev  # noqa: E402
from pipeline.training import ifeval  # noqa: E402
from pipeline.training.report import render_results_table  # noqa: E402
from tinymodel import tiny_causal_lm, tiny_tokenizer  # noqa: E402

PROMPTS = [
    {"key": 1, "prompt": "Describe a river without using any commas.", "instruction_id_list": ["punctuation:no_comma"],
     "kwargs": [{}]},
    {"key": 2, "prompt": "Name three fruits in fewer than 20 words, all in lowercase letters.",
     "instruction_id_list": ["length_constraints:number_words", "change_case:english_lowercase"],
     "kwargs": [{"relation": "less than", "num_words": 20}, {}]},
    {"key": 3, "prompt": "Explain rain in at most 2 sentences and end with the phrase 'Any other questions?'.",
     "instruction_id_list": ["length_constraints:number_sentences", "startend:end_checker"],
     "kwargs": [{"relation": "less than", "num_sentences": 3}, {"end_phrase": "Any other questions?"}]},
    {"key": 4, "prompt": "Give your whole answer as JSON.", "instruction_id_list": ["detectable_format:json_format"],
     "kwargs": [{}]},
]
ANSWERS = {  # key -> (answer, what the checkers must say per instruction, strict)
    1: ("A river runs from the hills to the sea and carries water and stones.", [True]),
    2: ("Apple, banana and pear are three Fruits.", [True, False]),
    3: ("Rain is water that falls from clouds. Any other questions?", [True, True]),
    4: ("Here it is: {\"a\": 1}", [False]),
}


def write(path: Path, prompts=PROMPTS) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts), encoding="utf-8")
    return path


def test_verdicts_are_the_checkers_own_on_fixed_answers():
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    for p in PROMPTS:
        answer, expected = ANSWERS[p["key"]]
        v = ifeval.check(p, answer)
        assert v["strict"] == expected, (p["key"], v)
        assert v["prompt_strict"] is all(expected)
        for iid, kw, got in zip(p["instruction_id_list"], p["kwargs"], v["strict"]):
            checker = INSTRUCTION_DICT[iid](iid)  # the package's function, called directly
            checker.build_description(**kw)
            assert bool(checker.check_following(answer)) is got


def test_loose_accepts_what_strict_refuses_around_the_answer():
    """Loose judging also tries the answer without its first line (a preamble the original forgives)."""
    p = PROMPTS[0]
    v = ifeval.check(p, "Sure, here you go:\nA river runs to the sea and carries stones.")
    assert v["strict"] == [False] and v["loose"] == [True] and v["prompt_loose"] and not v["prompt_strict"]


def test_the_four_accuracies_and_their_units():
    verdicts = [ifeval.check(p, ANSWERS[p["key"]][0]) for p in PROMPTS]
    values, units = ifeval.scores(verdicts)
    assert values["ifeval_prompt_strict"] == pytest.approx(2 / 4)  # prompts 1 and 3
    assert values["ifeval_instruction_strict"] == pytest.approx(4 / 6)
    assert units["ifeval_prompt_strict"] == [1.0, 0.0, 1.0, 0.0]
    assert units["ifeval_instruction_strict"] == [[1.0, 1.0], [1.0, 2.0], [2.0, 2.0], [0.0, 1.0]]


def test_the_interval_covers_a_known_change_and_excludes_zero():
    """Constructed answer sets: 60 prompts, 15 followed before and 45 after (a change of +0.5)."""
    before = [1.0] * 15 + [0.0] * 45
    after = [1.0] * 15 + [1.0] * 30 + [0.0] * 15
    c = ev.metric_change("mean", before, after, seed=0)
    assert c["delta"] == pytest.approx(0.5) and c["low"] < 0.5 < c["high"] and c["low"] > 0 and c["measurable"]
    # instruction level: (followed, instructions) per prompt, resampled by prompt
    b = [[1.0, 2.0]] * 30
    a = [[2.0, 2.0]] * 30
    c = ev.metric_change("ratio", b, a, seed=0)
    assert c["delta"] == pytest.approx(0.5) and c["low"] <= 0.5 <= c["high"]
    same = ev.metric_change("mean", before, list(before), seed=0)
    assert not same["measurable"]


def test_a_bad_prompt_file_is_one_line_naming_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(PROMPTS[0]) + "\n" + json.dumps({"key": 9, "prompt": "x"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:2: an IFEval prompt needs prompt, instruction_id_list, kwargs "
                                        r"\(missing: instruction_id_list, kwargs\)"):
        ifeval.load_prompts(path, None, 0)


def test_a_tiny_model_is_evaluated_on_a_subset_and_the_table_shows_it(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_causal_lm(tok, seed=0)
    text = tmp_path / "general.txt"
    text.write_text("The sun warms the oceans and water rises into the air. " * 4, encoding="utf-8")
    o = ev.EvalOptions(max_new_tokens=4, batch_size=4, general_text=str(text), ifeval=str(write(tmp_path / "p.jsonl")),
                       ifeval_max_prompts=3, ifeval_max_new_tokens=8)
    before = ev.evaluate_model(model, tok, [], [], "none", o, "base")
    after = ev.evaluate_model(model, tok, [], [], "none", o, "tuned")
    assert before["ifeval_prompts"] == 3 and before["ifeval_subset_of"] == 4
    for key in ifeval.METRICS:
        assert 0.0 <= before[key] <= 1.0 and before[key] == after[key]  # greedy: the same model, the same answers
    assert len(before["ifeval_samples"]) == 3 and "ifeval_samples" not in ev.summary(before)
    change = ev.compare(before, after)
    assert change["ifeval_prompt_strict"]["n"] == 3 and change["ifeval_prompt_strict"]["delta"] == 0
    table = render_results_table(before, after, change)
    assert "| IFEval prompt-level accuracy, strict |" in table
    assert "IFEval: 3 prompts (a seeded subset of 4, not the full benchmark)" in table
    plain = render_results_table({k: v for k, v in before.items() if not k.startswith("ifeval")},
                                 {k: v for k, v in after.items() if not k.startswith("ifeval")})
    assert "IFEval" not in plain


def test_an_empty_answer_follows_no_instruction():
    v = ifeval.check(PROMPTS[1], "")
    assert v["strict"] == v["loose"] == [False, False] and not v["prompt_strict"] and not v["prompt_loose"]
