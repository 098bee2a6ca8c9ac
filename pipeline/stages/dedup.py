"""``dedup``: exact duplicates, then ROUGE-L near-duplicates with the originals' greedy semantics.

In generation order, a candidate whose ROUGE-L F1 with any kept instruction (seeds included) exceeds the
threshold is rejected; a kept one joins the pool at once. Every record carries its nearest kept instruction
and the score (``meta.rouge_nearest``, ``meta.rouge_score``). ``mode: minhash`` uses MinHash-LSH for pools
far beyond a million records.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from pipeline.stages.context import StageContext
from pipeline.text.rouge import NearDuplicateIndex


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: float = 0.7
    mode: Literal["exact", "minhash"] = "exact"
    against_seeds: bool = True
    num_perm: int = 128  # minhash
    bands: int = 32  # minhash


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def _index(o: Options):
    if o.mode == "minhash":
        from pipeline.text.minhash import MinHashIndex

        return MinHashIndex(o.threshold, num_perm=o.num_perm, bands=o.bands)
    return NearDuplicateIndex(o.threshold)


def run(ctx: StageContext) -> None:
    o: Options = ctx.options
    index = _index(o)
    seeds_in = ctx.find_input("seeds")
    source = ctx.previous()
    if o.against_seeds and seeds_in is not None and seeds_in is not source:
        for seed in ctx.read_records(seeds_in):
            index.add(seed.instruction, seed.id)
    seen: dict[str, str] = {}
    out = []
    n = 0
    for task in ctx.read_records(source):
        n += 1
        key = normalise(task.instruction + "\n" + (task.instances[0].input if task.instances else ""))
        if key in seen:
            ctx.reject(task, "exact_duplicate", f"same normalised text as {seen[key]}")
            continue
        seen[key] = task.id
        d = index.check_and_add(task.instruction, task.id)
        task.meta.update(rouge_nearest=d.nearest, rouge_score=round(d.score, 6))
        if not d.kept:
            ctx.reject(task, "rouge_near_duplicate", f"ROUGE-L {d.score:.3f} > {o.threshold} with {d.nearest}")
            continue
        out.append(task)
    ctx.stats.rows_in = n
    ctx.write_records(out)
    ctx.stats.metrics.update(instances_out=sum(len(t.instances) for t in out))
