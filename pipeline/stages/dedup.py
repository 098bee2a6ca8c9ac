"""``dedup``: exact duplicates, then ROUGE-L near-duplicates with the originals' greedy semantics.

1. Exact duplicates: the same normalised instruction + input (lowercase, whitespace collapsed).
2. Near-duplicates, in generation order: a candidate whose ROUGE-L F1 (rouge_score's tokenizer and F1, no
   stemming) with any kept instruction — seeds included (``against_seeds``) — exceeds ``threshold`` is
   rejected; a kept one joins the pool at once. ``mode: exact`` makes rouge_score's decisions item for item
   (:class:`pipeline.text.rouge.NearDuplicateIndex`); ``mode: minhash`` is MinHash-LSH with exact verification
   for pools far beyond a million records (it can miss a near-duplicate, never invent one).
Every record carries its nearest kept instruction and the score (``meta.rouge_nearest``, ``meta.rouge_score``):
exact for every rejection, and for kept records when ``exact_nearest`` (the default, exact mode only; a full
search, about 0.5 ms per record at a 20,000-instruction pool; otherwise the best among the items that could
come close, or 0.0/None). Runs on any earlier stage's tasks (e.g. an Alpaca file
loaded by ``seeds``: the seeds are then the data, not a pool to compare against).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.records import Task
from pipeline.stages.context import StageContext
from pipeline.text.rouge import NearDuplicateIndex


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(0.7, ge=0.0, le=1.0)
    mode: Literal["exact", "minhash"] = "exact"
    against_seeds: bool = True
    exact_duplicates: bool = True
    rouge_on: Literal["instruction", "instruction_input"] = "instruction"  # the originals: instruction only
    exact_nearest: bool = True  # exact mode: search the whole pool for a kept record's nearest instruction
    num_perm: int = 256  # minhash
    bands: int = 64  # minhash


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def _index(o: Options):
    if o.mode == "minhash":
        from pipeline.text.minhash import MinHashIndex

        return MinHashIndex(o.threshold, num_perm=o.num_perm, bands=o.bands)
    return NearDuplicateIndex(o.threshold)


def _rouge_text(task: Task, o: Options) -> str:
    if o.rouge_on == "instruction_input" and task.instances and task.instances[0].input:
        return f"{task.instruction}\n{task.instances[0].input}"
    return task.instruction


def run(ctx: StageContext) -> None:
    o: Options = ctx.options
    index = _index(o)
    seeds_in = ctx.find_input("seeds")
    source = ctx.previous()
    n_seeds = 0
    if o.against_seeds and seeds_in is not None and seeds_in.name != source.name:
        for seed in ctx.read_records(seeds_in):
            index.add(_rouge_text(seed, o), seed.id)
            n_seeds += 1
    seen: dict[str, str] = {}
    out = []
    n = 0
    for task in ctx.read_records(source):
        n += 1
        if o.exact_duplicates:
            key = normalise("\n".join([task.instruction] + [i.input for i in task.instances]))
            if key in seen:
                ctx.reject(task, "exact_duplicate", f"the same normalised instruction and input as {seen[key]}")
                continue
            seen[key] = task.id
        text = _rouge_text(task, o)
        if o.mode == "exact":
            d = index.check_and_add(text, task.id, exact_nearest=o.exact_nearest)
        else:
            d = index.check_and_add(text, task.id)
        task.meta.update(rouge_nearest=d.nearest, rouge_score=round(d.score, 6))
        if not d.kept:
            ctx.reject(task, "rouge_near_duplicate", f"ROUGE-L {d.score:.3f} > {o.threshold} with {d.nearest}")
            continue
        out.append(task)
    ctx.stats.rows_in = n
    ctx.write_records(out)
    ctx.stats.metrics.update(pool_seeds=n_seeds, instances_out=sum(len(t.instances) for t in out))
