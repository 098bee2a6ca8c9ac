"""``dedup`` in ``mode: exact`` with ``executor: ray``: Ray Data workers read and parse their byte ranges of the
seeds and the input, tokenize what is compared and hash the exact-duplicate keys; the seedtune process drops
the exact duplicates and runs the greedy ROUGE-L pass (:func:`pipeline.text.rouge_pass.greedy`, the function
the one-process mode runs) over the items in input order, so every decision, nearest and score is the local one.

The pass stays in one process: which kept items a record is compared with depends on every decision before it,
and so does the nearest a kept record reports (the best among the items the index's filters leave, which
depend on the pool at that point), so no worker can compute it from its own slice. What moves to the workers is
reading, parsing and tokenizing every record.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.records import Task
from pipeline.stages.context import StageInput
from pipeline.stages.on_ray import (DataRayOptions, MinHashDecisions, _as_chunks, _chunk_rows, _pool, pool_chunks,
                                    read_chunk)
from pipeline.text.rouge import Decision
from pipeline.text.rouge_pass import Item, greedy


def digest(text: str) -> bytes:
    """128 bits of dedup's normalised text (two different texts share one with probability 2^-128)."""
    from pipeline.stages.dedup import normalise

    return hashlib.blake2b(normalise(text).encode(), digest_size=16).digest()


def _exact_key(task: Task) -> bytes:
    from pipeline.stages.dedup import exact_text

    return digest(exact_text(task))  # normalising the normalised text again changes nothing


@dataclass(frozen=True)
class _Setup:
    with_input: bool
    seeds: int  # records of the seed pool (indices below this are seeds)


class _Items:
    """A worker: each record of its chunks as an :class:`Item`, with a task's exact-duplicate key."""

    def __init__(self, setup: _Setup):
        self.setup = setup

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipeline.stages.dedup import rouge_item

        out = []
        for c in _as_chunks(batch):
            rows = [(rouge_item(t, self.setup.with_input, digest), _exact_key(t) if n >= self.setup.seeds else None)
                    for n, t in enumerate(read_chunk(c), start=c.first)]
            out.append(pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL))
        return {"out": np.array(out, dtype=object)}


def rouge_dedup(ray: Any, options: DataRayOptions, seeds: StageInput | None, tasks: StageInput, on: str,
                threshold: float, exact: bool, shared_text: bool,
                exact_nearest: bool) -> tuple[MinHashDecisions, dict[str, Any]]:
    """The decisions of dedup's exact-duplicate step and exact mode for ``tasks`` against ``seeds`` (task
    numbers; every task that is no exact duplicate has one), and the ``shared_text`` metric."""
    cs, n_seeds = pool_chunks(options, seeds, tasks)
    if not cs:
        return MinHashDecisions({}, {}, n_seeds), {}
    with_input = on == "instruction_input"
    rows = ray.data.from_items(_chunk_rows(cs), override_num_blocks=len(cs))
    rows = rows.map_batches(_Items, fn_constructor_args=(_Setup(with_input, n_seeds),), batch_size=1,
                            compute=_pool(ray, options), num_cpus=1)
    pool: list[Item] = []
    judged: list[int] = []  # task number of each item after the seeds
    dup: dict[int, str] = {}
    first: dict[bytes, str] = {}  # exact-duplicate key -> id of its first task
    n = -n_seeds
    for row in rows.iter_rows():  # in input order (on_ray.session)
        for item, key in pickle.loads(row["out"]):
            if n >= 0 and exact:
                if key in first:
                    dup[n] = first[key]
                    n += 1
                    continue
                first[key] = item.id
            pool.append(item)
            if n >= 0:
                judged.append(n)
            n += 1
    decided: list[Decision]
    decided, shared = greedy(pool[:n_seeds], pool[n_seeds:], threshold, with_input, shared_text, exact_nearest)
    return MinHashDecisions(dup, {k: (d.kept, d.score, d.nearest) for k, d in zip(judged, decided)}, n_seeds), shared
