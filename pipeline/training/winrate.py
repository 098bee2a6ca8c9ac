"""Judged win rate: a judge model compares the base and the tuned model's answers to the same held-out
instructions, head to head.

Each instruction is judged twice, once with the base answer shown first and once with the tuned answer first,
because judges favour a position; a verdict is "A", "B" or "tie". The tuned model scores 1 for a win, 0.5 for
a tie and 0 for a loss in each order; an instruction's score is the mean of its two orders, and it counts only
when both orders gave a verdict. The win rate is the mean over instructions, with a bootstrap 95% interval that
resamples instructions (the two orders of one instruction stay together). A win rate of 0.5 is "no better,
no worse".

The requests go through the stage's journaled client, so a judgement already paid for is never asked again,
a killed run resumes where it stopped, and a failed request is reported as failed (and retried by the next
run), never counted as a verdict. Every judgement, with the judge's reason, is kept.

Also reported, to read the number with: how often the judge preferred the answer shown first (position bias),
how often its two orders agreed, and how often it preferred the longer answer (length bias).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipeline.models.base import Completion, GenParams, Message, ModelRequest
from pipeline.text.parsing import json_objects
from pipeline.text.templates import render

ORDERS = ("base_first", "tuned_first")
RESAMPLES = 2000
_VERDICT_WORDS = {"a": "A", "answer a": "A", "assistant a": "A", "b": "B", "answer b": "B", "assistant b": "B",
                  "tie": "tie", "draw": "tie", "equal": "tie", "both": "tie", "neither": "tie", "none": "tie"}
_VERDICT_KEYS = ("winner", "verdict", "better", "preferred", "choice")
_VERDICT_TEXT = re.compile(r"\b(?:winner|verdict|better answer|preferred answer)\b\W{0,3}(?:is\W{0,2})?"
                           r"(?:answer\s+|assistant\s+)?\"?(A|B|tie)\b", re.I)
_BRACKETED = re.compile(r"\[\[(A|B|C|tie)\]\]", re.I)
# "A." or "Tie:" opening the answer, never the article in "A good answer ..."
_LEADING = re.compile(r"^\W{0,3}(?:answer\s+)?(A|B|tie)\s*(?:$|[.:,;)\n-])", re.I)


def _default_params() -> GenParams:
    return GenParams(temperature=0.0, max_tokens=256)


class JudgeOptions(BaseModel):
    """``evaluation.judge``: the model (a name under ``models:``) that compares base and tuned answers."""

    model_config = ConfigDict(extra="forbid")

    model: str
    template: str = "judge/pairwise.j2"
    json_output: bool = True  # ask the backend for JSON (GenParams.json_schema)
    params: GenParams = Field(default_factory=_default_params)
    seed: int = 0  # the bootstrap's


SCHEMA = {"type": "object", "properties": {"reason": {"type": "string"},
                                           "winner": {"type": "string", "enum": ["A", "B", "tie"]}},
          "required": ["reason", "winner"]}


def build_request(sample: dict[str, Any], answer_a: str, answer_b: str, o: JudgeOptions) -> ModelRequest:
    prompt = render(o.template, instruction=sample.get("instruction") or "", input=sample.get("input") or "",
                    answer_a=answer_a, answer_b=answer_b)
    params = o.params.model_copy(update={"json_schema": SCHEMA}) if o.json_output else o.params
    return ModelRequest(messages=[Message(role="user", content=prompt)], params=params)


def _word(value: Any) -> str | None:
    return _VERDICT_WORDS.get(" ".join(str(value).lower().split()).strip(" .\"'")) if value is not None else None


def parse_verdict(text: str) -> tuple[str, str] | None:
    """("A" | "B" | "tie", reason) from a judge's answer, or None when it names no winner.

    JSON first (``winner``/``verdict``/... with "A", "B" or "tie"; possibly fenced or inside prose), then text:
    "Winner: A", "The better answer is B", "[[A]]" ("[[C]]" is a tie), or an answer that starts with the verdict.
    """
    text = (text or "").strip()
    if not text:
        return None
    for obj in json_objects(text):
        lowered = {str(k).lower(): v for k, v in obj.items()}
        for key in _VERDICT_KEYS:
            if key in lowered:
                verdict = _word(lowered[key])
                if verdict is None:
                    return None
                reason = lowered.get("reason", lowered.get("explanation", lowered.get("rationale", "")))
                return verdict, " ".join(str(reason).split())
    for pattern in (_VERDICT_TEXT, _BRACKETED):
        m = pattern.search(text)
        if m:
            word = m.group(1).lower()
            return ("tie" if word in ("c", "tie") else word.upper()), _rest(text, m)
    m = _LEADING.match(text)
    if m:
        return _word(m.group(1)) or "tie", _rest(text, m)
    return None


def _rest(text: str, m: re.Match) -> str:
    return " ".join((text[: m.start()] + " " + text[m.end():]).split()).strip(" .:-")


def _winner(order: str, verdict: str) -> str:
    """Which model a verdict names: base, tuned or tie."""
    if verdict == "tie":
        return "tie"
    first = "base" if order == "base_first" else "tuned"
    second = "tuned" if first == "base" else "base"
    return first if verdict == "A" else second


def judge(client: Any, base: list[dict[str, Any]], tuned: list[dict[str, Any]],
          o: JudgeOptions) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Judge every held-out instruction in both orders; the summary and every judgement.

    ``base`` and ``tuned`` are the two models' ``samples`` (the same instructions in the same order).
    ``client`` is the stage's journaled model client."""
    pairs = [(b, t) for b, t in zip(base, tuned) if b.get("id") == t.get("id")]
    asked = []
    for i, (b, t) in enumerate(pairs):
        asked.append((i, "base_first", build_request(b, b["answer"], t["answer"], o)))
        asked.append((i, "tuned_first", build_request(b, t["answer"], b["answer"], o)))
    results = client.generate([r for _, _, r in asked], desc="win rate")
    judgements = []
    for (i, order, req), res in zip(asked, results):
        b, t = pairs[i]
        row: dict[str, Any] = {"id": b.get("id"), "instruction": b.get("instruction"), "order": order,
                               "request_key": client.key(req)}
        if not isinstance(res, Completion):
            row.update(status="failed", error=f"{res.kind}: {res.error}")
        else:
            got = parse_verdict(res.texts[0])
            if got is None:
                row.update(status="unparseable", answer=" ".join(res.texts[0].split())[:300])
            else:
                verdict, reason = got
                row.update(status="ok", verdict=verdict, winner=_winner(order, verdict), reason=reason,
                           longer="tuned" if len(t["answer"]) > len(b["answer"]) else
                           "base" if len(b["answer"]) > len(t["answer"]) else "same")
        judgements.append(row)
    return {**summarize(judgements, len(pairs), o.seed), "judge": o.model}, judgements


def summarize(judgements: list[dict[str, Any]], n_instructions: int, seed: int = 0) -> dict[str, Any]:
    """Win rate of the tuned model with its interval, and the counts that qualify it."""
    import numpy as np

    by_id: dict[Any, dict[str, str]] = {}
    for j in judgements:
        if j["status"] == "ok":
            by_id.setdefault(j["id"], {})[j["order"]] = j["winner"]
    value = {"tuned": 1.0, "tie": 0.5, "base": 0.0}
    scores = [sum(value[w] for w in v.values()) / 2 for v in by_id.values() if len(v) == 2]
    ok = [j for j in judgements if j["status"] == "ok"]
    decisive = [j for j in ok if j["winner"] != "tie"]
    out: dict[str, Any] = {
        "n": len(scores), "instructions": n_instructions, "judgements": len(judgements),
        "wins": sum(j["winner"] == "tuned" for j in ok), "ties": len(ok) - len(decisive),
        "losses": sum(j["winner"] == "base" for j in ok),
        "unparseable": sum(j["status"] == "unparseable" for j in judgements),
        "failed": sum(j["status"] == "failed" for j in judgements),
        "win_rate": float(np.mean(scores)) if scores else None, "low": None, "high": None, "measurable": False,
        "first_position_preferred": (sum(j["verdict"] == "A" for j in decisive) / len(decisive)) if decisive else None,
        "orders_agree": (sum(v["base_first"] == v["tuned_first"] for v in by_id.values() if len(v) == 2)
                         / len(scores)) if scores else None,
        "longer_preferred": (sum(j["winner"] == j["longer"] for j in decisive) / len(decisive)) if decisive else None,
    }
    if len(scores) >= 2:
        arr = np.asarray(scores)
        idx = np.random.default_rng(seed).integers(0, len(arr), size=(RESAMPLES, len(arr)))
        low, high = (float(x) for x in np.percentile(arr[idx].mean(axis=1), [2.5, 97.5]))
        out.update(low=low, high=high, measurable=bool(low > 0.5 or high < 0.5))
    return out
