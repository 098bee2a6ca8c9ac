"""The data stages (``filter``, ``dedup`` in MinHash mode, ``decontaminate``) with ``executor: ray``.

The stage's input files are cut into byte ranges of ``chunk_records`` records; Ray Data workers read their
ranges themselves (the run folder must be reachable at the same path from every node: a local instance, or a
cluster on a shared filesystem) and the seedtune process only receives what it must write. Decisions are the
one-process mode's, and so are the files:

* per-record stages (:func:`map_tasks`): each worker judges its records with the stage's own function (set-wide
  statistics, such as the filter's languages, are computed first and handed to the workers); the results come
  back in input order and the seedtune process writes ``records.jsonl`` and ``rejected.jsonl`` as the local
  code does;
* MinHash dedup (:func:`minhash_dedup`): signatures and band keys in ``map_batches``; the band rows grouped by
  band with Ray Data's ``groupby`` (inside a band, equal keys by a sort), which gives every pair of records that
  share a band, and the exact-duplicate groups; the pairs' ROUGE-L scores verified exactly; then the greedy
  decisions of :class:`pipeline.text.minhash.MinHashIndex` replayed in input order over those pairs. The
  seedtune process holds per-pair state only, never the records (it streams them once more to write them).

No ``address`` (and no ``RAY_ADDRESS``) starts a local Ray instance, stopped at the stage's end; an address
joins a cluster and leaves it running (:mod:`pipeline.models.ray_runtime`).
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pipeline.records import Task
from pipeline.stages.context import RECORDS_FILE, StageContext, StageInput


class DataRayOptions(BaseModel):
    """Where a data stage with ``executor: ray`` runs."""

    model_config = ConfigDict(extra="forbid")

    address: str | None = None  # a cluster to join; else $RAY_ADDRESS; else a local instance on this machine
    workers: int = Field(2, ge=1)  # parallel tasks (and CPUs of a local instance)
    chunk_records: int = Field(5000, ge=1)  # records per Ray row (one read of the input file)


@dataclass(frozen=True)
class Chunk:
    path: str
    start: int  # byte range of the file
    end: int
    first: int  # index of its first record in the file
    count: int  # records in it


def chunks(path: Path, size: int) -> tuple[list[Chunk], int]:
    """The file's records in byte ranges of ``size`` records, and their number (blank lines are no record,
    as in :func:`pipeline.records.read_jsonl`)."""
    out: list[Chunk] = []
    n = pos = start = first = in_chunk = 0
    name = str(Path(path).resolve())  # workers need not share this process's working directory
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                if in_chunk == size:
                    out.append(Chunk(name, start, pos, first, in_chunk))
                    start, first, in_chunk = pos, n, 0
                n += 1
                in_chunk += 1
            pos += len(line)
    if in_chunk:
        out.append(Chunk(name, start, pos, first, in_chunk))
    return out, n


def read_chunk(c: Chunk) -> list[Task]:
    with open(c.path, "rb") as f:
        f.seek(c.start)
        data = f.read(c.end - c.start)
    return [Task.model_validate_json(line) for line in data.split(b"\n") if line.strip()]


def count(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def every(path: Path, step: int) -> list[Task]:
    """Records 0, ``step``, 2·``step``, ... of a file (a sample, parsed without reading the others)."""
    out, n = [], 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                if n % step == 0:
                    out.append(Task.model_validate_json(line))
                n += 1
    return out


def records_at(path: Path, indices: list[int]) -> Iterator[tuple[int, Task]]:
    """The records of a file at the given sorted indices (the others are not parsed)."""
    if not indices:
        return
    k, n = 0, 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                if n == indices[k]:
                    yield n, Task.model_validate_json(line)
                    k += 1
                    if k == len(indices):
                        return
                n += 1


@contextmanager
def session(options: DataRayOptions) -> Iterator[Any]:
    """Ray joined or started for one stage; results of a dataset come back in input order inside."""
    from pipeline.models.ray_runtime import connect, stop

    ray, started = connect(options.address, cpus=options.workers)
    data_ctx = ray.data.DataContext.get_current()
    was = data_ctx.execution_options.preserve_order
    data_ctx.execution_options.preserve_order = True
    try:
        yield ray
    finally:
        data_ctx.execution_options.preserve_order = was
        if started:
            stop(ray)


def _chunk_rows(cs: list[Chunk]) -> list[dict[str, Any]]:
    return [{"path": c.path, "start": c.start, "end": c.end, "first": c.first, "count": c.count} for c in cs]


def _as_chunks(batch: dict[str, np.ndarray]) -> list[Chunk]:
    return [Chunk(str(p), int(s), int(e), int(f), int(n))
            for p, s, e, f, n in zip(batch["path"], batch["start"], batch["end"], batch["first"], batch["count"])]


def _pool(ray: Any, options: DataRayOptions) -> Any:
    return ray.data.ActorPoolStrategy(size=options.workers)


class _PerTask:
    """A Ray Data worker: ``make(*args)`` built once, then called on every record of its chunks."""

    def __init__(self, make: Callable[..., Callable[[Task], Any]], args: tuple):
        self.fn = make(*args)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cs = _as_chunks(batch)
        out = [pickle.dumps([self.fn(t) for t in read_chunk(c)], protocol=pickle.HIGHEST_PROTOCOL) for c in cs]
        return {"first": np.array([c.first for c in cs]), "out": np.array(out, dtype=object)}


def map_tasks(ray: Any, options: DataRayOptions, source: Path, make: Callable[..., Callable[[Task], Any]],
              args: tuple) -> Iterator[Any]:
    """``make(*args)(task)`` for every record of ``source``, computed on Ray workers, yielded in input order.
    ``make`` must be a module-level function (workers import it by name)."""
    cs, _ = chunks(source, options.chunk_records)
    if not cs:
        return
    ds = ray.data.from_items(_chunk_rows(cs), override_num_blocks=len(cs))
    ds = ds.map_batches(_PerTask, fn_constructor_args=(make, args), batch_size=1, compute=_pool(ray, options),
                        num_cpus=1)
    for row in ds.iter_rows():
        yield from pickle.loads(row["out"])


# ---- MinHash dedup ---------------------------------------------------------------------------------------

EXACT_BAND = -1  # the band number of the exact-duplicate keys


def _exact_key(task: Task) -> int:
    """A 64-bit hash of dedup's exact-duplicate key (two different keys share one with probability 2^-64)."""
    from pipeline.stages.dedup import normalise

    key = normalise("\n".join([task.instruction] + [i.input for i in task.instances]))
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


@dataclass(frozen=True)
class _Setup:
    on: str  # what is compared (dedup's ``compared``)
    threshold: float
    num_perm: int
    bands: int
    exact: bool  # exact duplicates first
    seeds: int  # records of the seed pool (indices below this are seeds)


class _Bands:
    """A worker: every record's band keys (and, for a task, its exact-duplicate key) as rows band/key/idx."""

    def __init__(self, setup: _Setup):
        from pipeline.text.minhash import MinHashIndex

        self.setup, self.index = setup, MinHashIndex(setup.threshold, setup.num_perm, setup.bands)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipeline.stages.dedup import compared_text
        from pipeline.text.rouge import tokenize

        s, band_no = self.setup, np.arange(self.setup.bands, dtype=np.int32)
        bands, keys, idx = [], [], []
        for c in _as_chunks(batch):
            for n, task in enumerate(read_chunk(c), start=c.first):
                tokens = tokenize(compared_text(task, s.on))
                if tokens:
                    bands.append(band_no)
                    keys.append(np.array(self.index._band_keys(tokens), dtype=np.uint64))
                    idx.append(np.full(s.bands, n, dtype=np.int64))
                if s.exact and n >= s.seeds:
                    bands.append(np.array([EXACT_BAND], dtype=np.int32))
                    keys.append(np.array([_exact_key(task)], dtype=np.uint64))
                    idx.append(np.array([n], dtype=np.int64))
        if not bands:
            return {"band": np.zeros(0, np.int32), "key": np.zeros(0, np.uint64), "idx": np.zeros(0, np.int64)}
        return {"band": np.concatenate(bands), "key": np.concatenate(keys), "idx": np.concatenate(idx)}


def _pairs(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One band's rows (grouped by Ray Data) to pairs (later, earlier) of records sharing a key; in the exact
    band, each later record of a key paired with its first. Column ``exact`` marks the latter."""
    band = int(group["band"][0])
    key, idx = group["key"], group["idx"]
    order = np.lexsort((idx, key))
    key, idx = key[order], idx[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    ends = np.r_[starts[1:], len(key)]
    later, earlier = [], []
    for a, b in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
        members = idx[a:b]
        if band == EXACT_BAND:
            later.append(members[1:])
            earlier.append(np.full(b - a - 1, members[0], dtype=np.int64))
        else:
            j, i = np.triu_indices(b - a, k=1)
            later.append(members[i])
            earlier.append(members[j])
    if not later:
        return {"later": np.zeros(0, np.int64), "earlier": np.zeros(0, np.int64), "exact": np.zeros(0, bool)}
    lat = np.concatenate(later)
    return {"later": lat, "earlier": np.concatenate(earlier), "exact": np.full(len(lat), band == EXACT_BAND)}


class _Tokens:
    """A worker: id and compared tokens of the records in ``wanted`` (a sorted index array)."""

    def __init__(self, on: str, wanted: Any):
        self.on, self.wanted = on, wanted

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipeline.stages.dedup import compared_text
        from pipeline.text.rouge import tokenize

        out = []
        for c in _as_chunks(batch):
            lo, hi = np.searchsorted(self.wanted, [c.first, c.first + c.count])
            want = set(self.wanted[lo:hi].tolist())
            if want:
                out.append(pickle.dumps({n: (t.id, tokenize(compared_text(t, self.on)))
                                         for n, t in enumerate(read_chunk(c), start=c.first) if n in want}))
        return {"out": np.array(out, dtype=object)}


@dataclass
class MinHashDecisions:
    """What the greedy replay decided: exact duplicates (task index -> id of the first), and for every task
    with a candidate, (kept, best F1, nearest id); a task with none is kept with (0.0, None)."""

    exact: dict[int, str]
    near: dict[int, tuple[bool, float, str | None]]
    seeds: int


def _verify(pairs: np.ndarray, tokens: dict[int, tuple[str, list[str]]], threshold: float, seeds: int,
            ) -> dict[int, tuple[bool, float, str | None]]:
    """:meth:`MinHashIndex._best` for every task with candidates, in input order: the candidates still kept
    (seeds always), the pre-screen where there are more than six, the first best F1."""
    from rapidfuzz.distance import Indel, LCSseq

    from pipeline.text.rouge import SLACK, TokenCodes, f1_from_lcs

    near: dict[int, tuple[bool, float, str | None]] = {}
    dropped: set[int] = set()
    cutoff = max(0.0, threshold - SLACK)
    bounds = np.flatnonzero(np.r_[True, pairs[1:, 0] != pairs[:-1, 0], True]) if len(pairs) else np.zeros(1, int)
    for a, b in zip(bounds[:-1], bounds[1:]):
        j = int(pairs[a, 0])
        if j < seeds:
            continue  # seeds are the pool: never judged
        ids = [int(i) for i in pairs[a:b, 1] if int(i) not in dropped]
        if not ids:
            continue
        mine = tokens[j][1]
        coder = TokenCodes()  # one pair at a time: LCS and Indel need equal tokens to share a code, no more
        code = coder.encode(mine, assign=True)[0]
        theirs = {i: coder.encode(tokens[i][1], assign=True)[0] for i in ids}
        if len(ids) > 6:
            ids = [i for i in ids if Indel.normalized_similarity(code, theirs[i]) >= cutoff]
        best, best_i = 0.0, -1
        for i in ids:
            f = f1_from_lcs(int(LCSseq.similarity(code, theirs[i])), len(mine), len(tokens[i][1]))
            if f > best:
                best, best_i = f, i
        kept = not best > threshold
        near[j] = (kept, best, tokens[best_i][0] if best_i >= 0 else None)
        if not kept:
            dropped.add(j)
    return near


def minhash_dedup(ray: Any, options: DataRayOptions, seeds: StageInput | None, tasks: StageInput, on: str,
                  threshold: float, num_perm: int, bands: int, exact: bool) -> MinHashDecisions:
    """The decisions of dedup's exact-duplicate step and MinHash mode for ``tasks`` against ``seeds``
    (indices: the seeds' records first, then the tasks')."""
    seed_chunks, n_seeds = chunks(seeds.dir / RECORDS_FILE, options.chunk_records) if seeds else ([], 0)
    task_chunks, _ = chunks(tasks.dir / RECORDS_FILE, options.chunk_records)
    task_chunks = [Chunk(c.path, c.start, c.end, c.first + n_seeds, c.count) for c in task_chunks]
    cs = seed_chunks + task_chunks
    if not cs:
        return MinHashDecisions({}, {}, n_seeds)
    setup = _Setup(on, threshold, num_perm, bands, exact, n_seeds)
    rows = ray.data.from_items(_chunk_rows(cs), override_num_blocks=len(cs))
    band_rows = rows.map_batches(_Bands, fn_constructor_args=(setup,), batch_size=1,
                                 compute=_pool(ray, options), num_cpus=1)
    grouped = band_rows.groupby("band").map_groups(_pairs, batch_format="numpy")
    near_pairs, exact_pairs = [], []
    for batch in grouped.iter_batches(batch_format="numpy", batch_size=None):
        both = np.stack([batch["later"], batch["earlier"]], axis=1)
        exact_pairs.append(both[batch["exact"]])
        near_pairs.append(both[~batch["exact"]])
    ex = np.concatenate(exact_pairs) if exact_pairs else np.zeros((0, 2), np.int64)
    pairs = np.concatenate(near_pairs) if near_pairs else np.zeros((0, 2), np.int64)
    # an exact duplicate leaves the pool before the near-duplicate step
    if len(ex):
        pairs = pairs[~(np.isin(pairs[:, 0], ex[:, 0]) | np.isin(pairs[:, 1], ex[:, 0]))]
    pairs = np.unique(pairs, axis=0)  # sorted by later, then earlier; a pair sharing several bands once
    wanted = np.unique(np.concatenate([pairs.ravel(), ex[:, 1]]))
    tokens: dict[int, tuple[str, list[str]]] = {}
    if len(wanted):
        # only the chunks holding a wanted record are read again
        starts = np.array([c.first for c in cs])
        holding = sorted(set(np.searchsorted(starts, wanted, side="right").tolist()))
        part = [cs[k - 1] for k in holding]
        toks = ray.data.from_items(_chunk_rows(part), override_num_blocks=len(part))
        toks = toks.map_batches(_Tokens, fn_constructor_args=(on, wanted), batch_size=1,
                                compute=_pool(ray, options), num_cpus=1)
        for row in toks.iter_rows():
            tokens.update(pickle.loads(row["out"]))
    near = _verify(pairs, tokens, threshold, n_seeds)
    return MinHashDecisions({int(j) - n_seeds: tokens[int(i)][0] for j, i in ex},
                            {j - n_seeds: d for j, d in near.items()}, n_seeds)
