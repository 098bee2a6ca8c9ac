"""The judged win rate: verdict parsing, the score with its interval, and the ``evaluate`` stage through the CLI
with a judge behind a real HTTP server (journaled, resumable, both orders, reasons kept)."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import yaml

from openai_server import FakeOpenAI
from pipeline.training import winrate

# ---- verdicts ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, verdict", [
    ('{"reason": "B is complete", "winner": "B"}', "B"),
    ('```json\n{"winner": "tie", "reason": "both fine"}\n```', "tie"),
    ('Sure. {"verdict": "Answer A", "explanation": "shorter"}', "A"),
    ("Winner: A. It answers the question.", "A"),
    ("The better answer is B because it is correct.", "B"),
    ("After thinking it over: [[C]]", "tie"),
    ("[[A]]", "A"),
    ("B.\nIt is correct.", "B"),
    ("Tie: both answers are the same.", "tie"),
])
def test_verdicts_are_parsed(text, verdict):
    got = winrate.parse_verdict(text)
    assert got is not None and got[0] == verdict


@pytest.mark.parametrize("text", ["", "A good answer would name the capital.", '{"winner": "C+"}',
                                  "Both answers have merits and flaws.", '{"reason": "no verdict"}'])
def test_no_verdict_is_none(text):
    assert winrate.parse_verdict(text) is None


def test_reason_is_kept():
    assert winrate.parse_verdict('{"reason": "B lists three items", "winner": "B"}') == ("B", "B lists three items")


# ---- the score and its interval ----------------------------------------------------------------------------

def _judgements(per_instruction: list[tuple[str, str]]) -> list[dict]:
    """Judgements for instructions whose two orders named these winners (base_first, tuned_first)."""
    out = []
    for i, winners in enumerate(per_instruction):
        for order, winner in zip(winrate.ORDERS, winners):
            first = "base" if order == "base_first" else "tuned"
            verdict = "tie" if winner == "tie" else ("A" if winner == first else "B")
            out.append({"id": i, "order": order, "status": "ok", "verdict": verdict, "winner": winner,
                        "longer": "tuned"})
    return out


def test_win_rate_counts_a_tie_half_and_an_instruction_once_per_both_orders():
    rows = _judgements([("tuned", "tuned"), ("tuned", "tie"), ("base", "tuned"), ("base", "base")])
    s = winrate.summarize(rows, 4)
    assert s["win_rate"] == pytest.approx((1 + 0.75 + 0.5 + 0) / 4)
    assert (s["wins"], s["ties"], s["losses"], s["n"]) == (4, 1, 3, 4)
    assert s["orders_agree"] == pytest.approx(2 / 4)


def test_an_instruction_without_both_verdicts_is_left_out():
    rows = _judgements([("tuned", "tuned"), ("base", "base")])
    rows[3] = {**rows[3], "status": "failed", "verdict": None, "winner": None}
    s = winrate.summarize(rows, 2)
    assert s["n"] == 1 and s["win_rate"] == 1.0 and s["failed"] == 1 and s["low"] is None


def test_interval_covers_a_known_win_rate_and_tells_it_from_a_coin():
    # 80 instructions the tuned model wins in both orders, 20 it loses in both: 0.8, clearly above 0.5
    strong = winrate.summarize(_judgements([("tuned", "tuned")] * 80 + [("base", "base")] * 20), 100, seed=1)
    assert strong["win_rate"] == pytest.approx(0.8)
    assert strong["low"] < 0.8 < strong["high"] and strong["low"] > 0.5 and strong["measurable"]
    # half and half: the interval includes 0.5, so no measurable difference
    coin = winrate.summarize(_judgements([("tuned", "tuned"), ("base", "base")] * 10), 20, seed=1)
    assert coin["low"] < 0.5 < coin["high"] and not coin["measurable"]


def test_position_bias_is_measured_not_counted_as_a_win():
    # a judge that always names the first answer: each instruction is one win and one loss
    rows = _judgements([("base", "tuned")] * 6)
    s = winrate.summarize(rows, 6)
    assert s["win_rate"] == 0.5 and s["first_position_preferred"] == 1.0 and s["orders_agree"] == 0.0


# ---- the stage, through the CLI, with a judge on a real HTTP server -----------------------------------------

ANSWERS = re.compile(r"### Answer A\n(.*?)\n\n### Answer B\n(.*?)\n\nAnswer with one JSON", re.S)


def _pick(a: str, b: str) -> str:
    """The judge's taste, known to the test: the answer whose hash is smaller; equal answers tie."""
    if a == b:
        return "tie"
    return "A" if hashlib.sha1(a.encode()).hexdigest() < hashlib.sha1(b.encode()).hexdigest() else "B"


def _judge_answer(body: dict) -> str:
    a, b = ANSWERS.search(body["messages"][-1]["content"]).groups()
    a, b = ("" if x == "(empty)" else x for x in (a, b))
    return json.dumps({"reason": f"picked by hash of {len(a)} and {len(b)} characters", "winner": _pick(a, b)})


def _is_tuned_first(body: dict, generations: dict) -> bool:
    a = ANSWERS.search(body["messages"][-1]["content"]).group(1)
    return any(a == (g["tuned"] or "(empty)") for g in generations.values())


@pytest.fixture()
def eval_run(tmp_path):
    pytest.importorskip("torch")
    from tinymodel import save_tiny_causal

    talk = dict(tie_word_embeddings=False, initializer_range=0.5)  # answers that differ between the two models
    base = save_tiny_causal(tmp_path / "base", seed=0, **talk)
    tuned = save_tiny_causal(tmp_path / "tuned", seed=1, **talk)
    seeds = tmp_path / "seeds.jsonl"
    words = ["apple", "river", "stone", "cloud", "green", "seven", "north", "paper"]
    seeds.write_text("".join(json.dumps({"id": f"t{i}", "name": f"t{i}", "instruction": f"Repeat the word {w}.",
                                         "instances": [{"input": "", "output": w}], "is_classification": False})
                             + "\n" for i, w in enumerate(words)), encoding="utf-8")
    text = tmp_path / "general.txt"
    text.write_text("The sun warms the oceans and water rises into the air. " * 4, encoding="utf-8")

    def config(url: str, seed: int = 0) -> str:
        cfg = {"name": "wr", "seed": 0, "run_dir": str(tmp_path / "run"),
               "models": {"judge": {"backend": "openai", "model": "judge", "base_url": url, "api_key_env": "NO_KEY",
                                    "max_attempts": 1, "max_concurrency": 4}},
               "stages": {"seeds": {"path": str(seeds)}, "template": {"format": "alpaca"},
                          "evaluate": {"base_model": str(base), "tuned": str(tuned),
                                       "evaluation": {"heldout": str(seeds), "general_text": str(text),
                                                      "max_new_tokens": 6, "max_examples": 8,
                                                      "judge": {"model": "judge", "seed": seed}}}}}
        path = tmp_path / f"config-{seed}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        return str(path)

    return tmp_path / "run", config


def _generations(run) -> dict:
    out: dict = {}
    for line in (run / "evaluate" / "generations.jsonl").read_text().splitlines():
        row = json.loads(line)
        out.setdefault(row["id"], {})[row["model"]] = row["answer"]
    return out


def test_evaluate_judges_both_orders_resumes_and_never_asks_twice(eval_run, monkeypatch, capsys):
    monkeypatch.setenv("NO_KEY", "x")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run, config = eval_run
    # first run: the judge's server fails every request that shows the tuned answer first
    state: dict = {}

    def fail_tuned_first(body: dict, seen: int) -> str | None:
        return "500" if _is_tuned_first(body, state["generations"]) else None

    with FakeOpenAI(answer=_judge_answer) as srv:  # one server (its URL is part of the judge's identity)
        _check_resume(srv, run, config, state, fail_tuned_first, capsys)


def _check_resume(srv, run, config, state, fail_tuned_first, capsys):
    from pipeline.cli import main

    code = main(["run", config(srv.url), "--no-progress"])
    assert code == 0 and len(srv.log) == 16  # 8 instructions x 2 orders
    gens = _generations(run)
    assert all(g["base"] != g["tuned"] for g in gens.values())  # two different models: 16 distinct requests
    results = json.loads((run / "evaluate" / "results.json").read_text())
    win = results["win_rate"]
    # the win rate the judge's known taste gives, computed here from the two models' answers
    expected = []
    for g in gens.values():
        b, t = g["base"], g["tuned"]
        first_order = {"A": 0.0, "B": 1.0, "tie": 0.5}[_pick(b, t)]   # base shown first
        second_order = {"A": 1.0, "B": 0.0, "tie": 0.5}[_pick(t, b)]  # tuned shown first
        expected.append((first_order + second_order) / 2)
    assert win["n"] == 8 and win["win_rate"] == pytest.approx(sum(expected) / 8) and win["judge"] == "judge"
    assert win["low"] <= win["win_rate"] <= win["high"]
    judged = [json.loads(x) for x in (run / "evaluate" / "judgements.jsonl").read_text().splitlines()]
    assert len(judged) == 16 and {j["order"] for j in judged} == {"base_first", "tuned_first"}
    assert all(j["reason"].startswith("picked by hash") for j in judged)
    assert "Judged win rate of the tuned model" in (run / "evaluate" / "README.md").read_text()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["evaluate"]["metrics"]["evaluation"]["win_rate"]["win_rate"] == win["win_rate"]
    capsys.readouterr()
    assert main(["status", str(run)]) == 0
    assert f"judged win rate of the tuned model {win['win_rate']:.3f}" in capsys.readouterr().out

    # a changed option recomputes the stage: every judgement comes from the journal, none is paid twice
    srv.answer = lambda body: "not a verdict"
    assert main(["run", config(srv.url, seed=1), "--no-progress"]) == 0
    assert len(srv.log) == 16
    again = json.loads((run / "evaluate" / "results.json").read_text())["win_rate"]
    assert again["win_rate"] == win["win_rate"]

    # a fresh run whose judge fails half the requests: exit 4, the failures are not verdicts; the next run sends
    # only those and completes
    state["generations"] = gens
    srv.answer, srv.fault_fn = _judge_answer, fail_tuned_first
    assert main(["run", config(srv.url), "--no-progress", "--fresh"]) == 4
    assert len(srv.log) == 32
    failed = json.loads((run / "manifest.json").read_text())["stages"]["evaluate"]
    assert failed["state"] == "complete_with_failures"
    partial = failed["metrics"]["evaluation"]["win_rate"]
    assert partial["failed"] == 8 and partial["n"] == 0 and partial["win_rate"] is None  # no pair complete yet
    srv.fault_fn = None
    assert main(["run", config(srv.url), "--no-progress"]) == 0
    assert len(srv.log) == 40  # only the 8 that failed
    assert json.loads((run / "evaluate" / "results.json").read_text())["win_rate"]["win_rate"] == win["win_rate"]


def test_the_prompts_own_answer_form_copied_is_no_verdict():
    # a small judge often copies the form it was shown: that must never count as a vote for one position
    from pipeline.text.templates import template_file

    form = next(line for line in template_file("judge/pairwise.j2").read_text().splitlines()
                if line.startswith('{"reason"'))
    assert winrate.parse_verdict(form) is None
