"""``decontaminate``: drop records that overlap user-given evaluation sets.

A record is dropped when its instruction (+ input) shares an n-gram of ``ngram`` words with an evaluation
record, or its instruction's ROUGE-L F1 with an evaluation instruction exceeds ``rouge_threshold``.
Evaluation sets load like seeds (Self-Instruct JSONL such as the 252-task user-oriented set, Alpaca JSON,
datasets files); each removal names the evaluation record it matched.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from pipeline.stages.context import StageContext
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


def dependencies(options: Options) -> list[Path]:
    return [Path(p) for p in options.eval_sets]


def check(options: Options) -> None:
    for p in options.eval_sets:
        load_tasks(SeedOptions(path=p, allow_empty_outputs=True))


def _ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)} if len(tokens) >= n else set()


def _text(instruction: str, inp: str, include_input: bool) -> list[str]:
    return tokenize(instruction + (" " + inp if include_input and inp else ""))


def run(ctx: StageContext) -> None:
    o: Options = ctx.options
    grams: dict[tuple[str, ...], str] = {}
    index = NearDuplicateIndex(o.rouge_threshold if o.rouge_threshold is not None else 1.0)
    n_eval = 0
    for path in o.eval_sets:
        for t in load_tasks(SeedOptions(path=path, allow_empty_outputs=True)):
            n_eval += 1
            ref = f"{path}#{t.id}"
            index.add(t.instruction, ref)
            if o.ngram:
                for inst in t.instances or [None]:
                    toks = _text(t.instruction, inst.input if inst else "", o.include_input)
                    for g in _ngrams(toks, o.ngram):
                        grams.setdefault(g, ref)
    out = []
    n = 0
    for task in ctx.read_records():
        n += 1
        hit = None
        if o.ngram:
            for inst in task.instances or [None]:
                toks = _text(task.instruction, inst.input if inst else "", o.include_input)
                common = next((g for g in _ngrams(toks, o.ngram) if g in grams), None)
                if common:
                    hit = ("decontam_ngram", f"shares the {o.ngram}-gram '{' '.join(common)}' with {grams[common]}")
                    break
        if hit is None and o.rouge_threshold is not None:
            d = index.check(task.instruction)
            if not d.kept:
                hit = ("decontam_rouge", f"ROUGE-L {d.score:.3f} > {o.rouge_threshold} with {d.nearest}")
        if hit:
            ctx.reject(task, *hit)
            continue
        out.append(task)
    ctx.stats.rows_in = n
    ctx.write_records(out)
    ctx.stats.metrics.update(eval_records=n_eval, instances_out=sum(len(t.instances) for t in out))
