"""``judge``: a model scores each task against a rubric; tasks below ``min_score`` are dropped.

For every task the rubric template (``prompts/judge/rubric.j2`` by default) is rendered with the instruction
and its first instance (``judge: all_instances``: every instance) and sent through the stage's journaled model
client, so answers already paid for are never requested again and a killed run resumes where it stopped. The
request asks for JSON (``{"score": n, "reason": "..."}``) through ``GenParams.json_schema``, which backends with
JSON or guided output honour; any other answer is parsed as text ("Score: 4 ...", "4/5", a lone digit).

Each kept task carries ``meta.judge_score``, ``meta.judge_reason`` and ``meta.judge_request_key``. Drops, each
in ``rejected.jsonl`` with its score and reason: ``judge_below_min`` (score < ``min_score``),
``judge_unparseable`` (no score in 1..``max_score`` in the answer), ``judge_request_failed`` (the request
failed; a transient failure is retried by the next run). ``stats.metrics["judge_scores"]`` is the score
distribution over every parsed judgement: ``{"1": n1, ..., "5": n5}``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.models.base import Completion, GenParams, Message, ModelRequest
from pipeline.records import Instance, Task
from pipeline.stages.context import StageContext
from pipeline.text.parsing import json_objects
from pipeline.text.templates import render, template_file


def _default_params() -> GenParams:
    return GenParams(temperature=0.0, max_tokens=256)


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    template: str = "judge/rubric.j2"
    max_score: int = Field(5, ge=2, le=100)  # the rubric's scale is 1..max_score
    min_score: int | None = Field(None, ge=1)  # keep tasks scoring at least this; None keeps every parsed one
    judge: Literal["first_instance", "all_instances"] = "first_instance"
    json_output: bool = True  # ask the backend for JSON (GenParams.json_schema)
    params: GenParams = Field(default_factory=_default_params)


def dependencies(options: Options) -> list[Path]:
    return [template_file(options.template)]


def check(options: Options) -> None:
    sample = Task(id="s", instruction="Name the capital of the given country.",
                  instances=[Instance(input="France", output="Paris")])
    render(options.template, **_template_data(sample, options))


def _template_data(task: Task, o: Options) -> dict[str, Any]:
    instances = task.instances if o.judge == "all_instances" else task.instances[:1]
    return {"instruction": task.instruction, "instances": [i.model_dump() for i in instances],
            "max_score": o.max_score}


def _schema(o: Options) -> dict[str, Any]:
    return {"type": "object", "properties": {"score": {"type": "integer", "minimum": 1, "maximum": o.max_score},
                                             "reason": {"type": "string"}},
            "required": ["score", "reason"]}


def build_request(task: Task, o: Options) -> ModelRequest:
    params = o.params.model_copy(update={"json_schema": _schema(o)}) if o.json_output else o.params
    prompt = render(o.template, **_template_data(task, o))
    return ModelRequest(messages=[Message(role="user", content=prompt)], params=params)


# ---- parsing a judgement ----------------------------------------------------------------------------------
_SCORE_WORD = re.compile(r"\b(?:score|rating|grade)\b\W{0,3}(?:is\W{0,2})?(\d{1,3}(?:\.\d+)?)(?!\.\d)", re.I)
_OUT_OF = re.compile(r"\b(\d{1,3})\s*(?:/|out of)\s*(\d{1,3})\b", re.I)
_LEADING = re.compile(r"^\W{0,3}(\d{1,3})(?:\.0)?\s*(?:$|[-:.,)\n]\s*)")


def _as_score(value: Any, max_score: int) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = value.strip()
        if not re.fullmatch(r"\d{1,3}(?:\.0+)?", value):
            return None
        value = float(value)
    if isinstance(value, (int, float)) and float(value).is_integer() and 1 <= value <= max_score:
        return int(value)
    return None


def _from_json(text: str, max_score: int) -> tuple[int, str] | None:
    for obj in json_objects(text):
        if isinstance(obj.get("items"), dict):  # structured output wraps the schema's value under "items"
            obj = obj["items"]
        lowered = {str(k).lower(): v for k, v in obj.items()}
        for key in ("score", "rating", "grade"):
            if key in lowered:
                score = _as_score(lowered[key], max_score)
                if score is None:
                    return None
                reason = lowered.get("reason", lowered.get("explanation", lowered.get("rationale", "")))
                return score, str(reason).strip()
    return None


def parse_judgement(text: str, max_score: int = 5) -> tuple[int, str] | None:
    """(score, reason) from a judge's answer, or None when it holds no score in 1..max_score.

    JSON first (an object with ``score``/``rating``, possibly fenced or inside prose), then text: "Score: 4",
    "Rating - 4", "4/5" or "4 out of 5" (the scale must match), or an answer that starts with the score."""
    text = (text or "").strip()
    if not text:
        return None
    got = _from_json(text, max_score)
    if got is not None:
        return got
    m = _SCORE_WORD.search(text)
    if m:
        score = _as_score(m.group(1), max_score)
        return (score, _reason(text, m)) if score is not None else None
    m = _OUT_OF.search(text)
    if m and int(m.group(2)) == max_score:
        score = _as_score(m.group(1), max_score)
        return (score, _reason(text, m)) if score is not None else None
    m = _LEADING.match(text)
    if m:
        score = _as_score(m.group(1), max_score)
        return (score, _reason(text, m)) if score is not None else None
    return None


def _reason(text: str, m: re.Match) -> str:
    """The text around the score, without it: what the judge said about the task."""
    rest = (text[: m.start()] + " " + text[m.end():]).strip()
    rest = re.sub(r"^\W*(?:reason|explanation|because)\b\W*", "", rest, flags=re.I)
    return " ".join(rest.split())


# ---- the stage ----------------------------------------------------------------------------------------
def run(ctx: StageContext) -> None:
    o: Options = ctx.options
    tasks = list(ctx.read_records())
    client = ctx.model(o.model)
    requests = [build_request(t, o) for t in tasks]
    results = client.generate(requests, desc="judge")
    scores = {str(s): 0 for s in range(1, o.max_score + 1)}
    out = []
    for task, req, res in zip(tasks, requests, results):
        task.meta["judge_request_key"] = client.key(req)
        if not isinstance(res, Completion):
            ctx.reject(task, "judge_request_failed",
                       f"the judge request failed ({res.kind}: {res.error})"
                       + ("" if res.permanent else "; retried on the next run"))
            continue
        got = parse_judgement(res.texts[0], o.max_score)
        if got is None:
            answer = " ".join(res.texts[0].split())[:200]
            ctx.reject(task, "judge_unparseable", f"no score in 1..{o.max_score} in the judge's answer: {answer!r}")
            continue
        score, reason = got
        scores[str(score)] += 1
        task.meta.update(judge_score=score, judge_reason=reason)
        if o.min_score is not None and score < o.min_score:
            ctx.reject(task, "judge_below_min", f"judge score {score} < min_score {o.min_score}: {reason}")
            continue
        out.append(task)
    ctx.stats.rows_in = len(tasks)
    ctx.write_records(out)
    ctx.stats.metrics.update(judge_scores=scores, min_score=o.min_score,
                             instances_out=sum(len(t.instances) for t in out))
