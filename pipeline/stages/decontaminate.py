"""``decontaminate``: drop records that overlap user-given evaluation sets.

A record is dropped when its instruction (+ input) shares an n-gram of ``ngram`` words with an evaluation
record, or its instruction's ROUGE-L F1 with an evaluation instruction exceeds ``rouge_threshold``.
Evaluation sets load like seeds (Self-Instruct JSONL such as the 252-task user-oriented set, Alpaca JSON,
datasets files); each removal names the evaluation record it matched. ``executor: ray`` checks the records on
Ray Data workers (:mod:`pipeline.stages.on_ray`), each holding the evaluation sets; the files are the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.records import Task
from pipeline.stages.context import RECORDS_FILE, StageContext
from pipeline.stages.on_ray import DataRayOptions
from pipeline.stages.seeds import Options as SeedOptions
from pipeline.stages.seeds import load_tasks
from pipeline.text.rouge import NearDuplicateIndex, tokenize


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Self-Instruct JSONL (e.g. user_oriented_instructions.jsonl), seed_tasks.jsonl, Alpaca JSON/JSONL, ...
    eval_sets: list[str] = Field(min_length=1)
    ngram: int | None = Field(13, ge=1)  # a shared run of this many ROUGE tokens drops the record; None: off
    rouge_threshold: float | None = Field(0.7, ge=0.0, le=1.0)  # instruction ROUGE-L F1 above this drops; None: off
    include_input: bool = True  # n-grams over instruction + input (each instance), not the instruction alone
    executor: Literal["local", "ray"] = "local"
    ray: DataRayOptions = Field(default_factory=DataRayOptions)


def dependencies(options: Options) -> list[Path]:
    return [Path(p) for p in options.eval_sets]


def check(options: Options) -> None:
    for p in options.eval_sets:
        load_tasks(SeedOptions(path=p, allow_empty_outputs=True))


def _ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)} if len(tokens) >= n else set()


def _text(instruction: str, inp: str, include_input: bool) -> list[str]:
    return tokenize(instruction + (" " + inp if include_input and inp else ""))


@dataclass
class EvalSets:
    """The evaluation sets as the checks use them: n-grams (each with the first record holding it) and an
    index of instructions."""

    index: NearDuplicateIndex
    grams: dict[tuple[str, ...], str] = field(default_factory=dict)
    records: int = 0


def load_eval_sets(o: Options) -> EvalSets:
    ev = EvalSets(NearDuplicateIndex(o.rouge_threshold if o.rouge_threshold is not None else 1.0))
    for path in o.eval_sets:
        for t in load_tasks(SeedOptions(path=path, allow_empty_outputs=True)):
            ev.records += 1
            ref = f"{path}#{t.id}"
            ev.index.add(t.instruction, ref)
            if o.ngram:
                for inst in t.instances or [None]:
                    toks = _text(t.instruction, inst.input if inst else "", o.include_input)
                    for g in _ngrams(toks, o.ngram):
                        ev.grams.setdefault(g, ref)
    return ev


def overlap(task: Task, o: Options, ev: EvalSets) -> tuple[str, str] | None:
    """The rule and reason that drop ``task``, or None."""
    if o.ngram:
        for inst in task.instances or [None]:
            toks = _text(task.instruction, inst.input if inst else "", o.include_input)
            common = next((g for g in _ngrams(toks, o.ngram) if g in ev.grams), None)
            if common:
                return "decontam_ngram", f"shares the {o.ngram}-gram '{' '.join(common)}' with {ev.grams[common]}"
    if o.rouge_threshold is not None:
        d = ev.index.check(task.instruction)
        if not d.kept:
            return "decontam_rouge", f"ROUGE-L {d.score:.3f} > {o.rouge_threshold} with {d.nearest}"
    return None


def judge(o: Options, ev: EvalSets) -> Callable[[Task], tuple[Task, tuple[str, str] | None]]:
    """One record's verdict as a Ray worker gives it (the evaluation sets travel to each worker once)."""
    return lambda task: (task, overlap(task, o, ev))


def run(ctx: StageContext) -> None:
    o: Options = ctx.options
    ev = load_eval_sets(o)
    if o.executor == "ray":
        from pipeline.stages import on_ray

        with on_ray.session(o.ray) as rs:
            verdicts = on_ray.map_tasks(rs, o.ray, ctx.previous().dir / RECORDS_FILE, judge, (o, ev))
            _write(ctx, verdicts, ev)
    else:
        _write(ctx, ((task, overlap(task, o, ev)) for task in ctx.read_records()), ev)


def _write(ctx: StageContext, verdicts, ev: EvalSets) -> None:
    out = []
    n = 0
    for task, hit in verdicts:
        n += 1
        if hit:
            ctx.reject(task, *hit)
            continue
        out.append(task)
    ctx.stats.rows_in = n
    ctx.write_records(out)
    ctx.stats.metrics.update(eval_records=ev.records, instances_out=sum(len(t.instances) for t in out))
