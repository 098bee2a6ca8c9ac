"""The data stages (``filter``, ``dedup`` in MinHash mode, ``decontaminate``) with ``executor: ray``
(``dedup``'s exact mode: :mod:`pipeline.stages.on_ray_exact`).

The stage's input files are cut into byte ranges of ``chunk_records`` records; Ray Data workers read their
ranges themselves (the run folder must be reachable at the same path from every node: a local instance, or a
cluster on a shared filesystem) and the seedtune process only receives what it must write. Decisions are the
one-process mode's, and so are the files:

* per-record stages (:func:`map_tasks`): each worker judges its records with the stage's own function (set-wide
  statistics, such as the filter's languages, are computed first and handed to the workers); the results come
  back in input order and the seedtune process writes ``records.jsonl`` and ``rejected.jsonl`` as the local
  code does;
* MinHash dedup (:func:`minhash_dedup`): signatures and band keys in ``map_batches``; the band rows grouped by
  band with Ray Data's ``groupby`` (inside a band, equal keys by a sort), which gives the records that share a
  band key with another, and the exact-duplicate groups; those records' tokens and keys read back, and
  :class:`pipeline.text.minhash.MinHashIndex`'s greedy pass, exact ROUGE-L verification included, run over them
  alone in input order (:func:`pipeline.text.minhash.replay`: a record sharing no key can neither be nor have a
  candidate). The seedtune process holds state for those records only, never the whole set (it streams the
  records once more to write them).

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
    from pipeline.stages.dedup import exact_text

    return int.from_bytes(hashlib.blake2b(exact_text(task).encode(), digest_size=8).digest(), "little")


def pool_chunks(options: DataRayOptions, seeds: StageInput | None, tasks: StageInput) -> tuple[list[Chunk], int]:
    """The chunks of the seeds' records and then the tasks' (numbered on from the seeds), and the seeds' count."""
    seed_chunks, n_seeds = chunks(seeds.dir / RECORDS_FILE, options.chunk_records) if seeds else ([], 0)
    task_chunks, _ = chunks(tasks.dir / RECORDS_FILE, options.chunk_records)
    return seed_chunks + [Chunk(c.path, c.start, c.end, c.first + n_seeds, c.count) for c in task_chunks], n_seeds


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

        s, out = self.setup, {"band": [], "key": [], "idx": []}
        for c in _as_chunks(batch):
            tasks = read_chunk(c)
            keys = self.index.band_matrix([tokenize(compared_text(t, s.on)) for t in tasks])
            idx = np.arange(c.first, c.first + len(tasks))
            full = keys.any(axis=1)  # an empty text is in no band
            out["band"].append(np.tile(np.arange(s.bands, dtype=np.int32), int(full.sum())))
            out["key"].append(keys[full].ravel())
            out["idx"].append(np.repeat(idx[full], s.bands))
            if s.exact:
                judged = idx >= s.seeds
                out["band"].append(np.full(int(judged.sum()), EXACT_BAND, dtype=np.int32))
                out["key"].append(np.array([_exact_key(t) for t, j in zip(tasks, judged) if j], dtype=np.uint64))
                out["idx"].append(idx[judged])
        return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}


def _shared(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One band's rows (grouped by Ray Data) to the records that share their key with another (``first`` -1);
    in the exact band, each later record of a key with the first of its key."""
    from pipeline.text.minhash import first_of_key, shared_rows

    if int(group["band"][0]) == EXACT_BAND:
        pairs = first_of_key(group["key"], group["idx"])
        return {"idx": pairs[:, 0], "first": pairs[:, 1]}
    rows = shared_rows(group["key"], group["idx"])
    return {"idx": rows.astype(np.int64), "first": np.full(len(rows), -1, dtype=np.int64)}


class _Tokens:
    """A worker: id, compared tokens and band keys of the records in ``wanted`` (a sorted index array)."""

    def __init__(self, setup: _Setup, wanted: np.ndarray):
        from pipeline.text.minhash import MinHashIndex

        self.setup, self.wanted = setup, wanted
        self.index = MinHashIndex(setup.threshold, setup.num_perm, setup.bands)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipeline.stages.dedup import compared_text
        from pipeline.text.rouge import tokenize

        out = []
        for c in _as_chunks(batch):
            lo, hi = np.searchsorted(self.wanted, [c.first, c.first + c.count])
            want = set(self.wanted[lo:hi].tolist())
            found = [(n, t.id, tokenize(compared_text(t, self.setup.on)))
                     for n, t in enumerate(read_chunk(c), start=c.first) if n in want]
            keys = self.index.band_matrix([f[2] for f in found])
            out.append(pickle.dumps({n: (rid, toks, k) for (n, rid, toks), k in zip(found, keys)}))
        return {"out": np.array(out, dtype=object)}


@dataclass
class MinHashDecisions:
    """What the greedy pass decided: exact duplicates (task number -> id of the first), and for every task
    that shares a band key with another, (kept, best F1, nearest id); any other task is kept with (0.0, None).
    Exact mode on Ray returns one too, with a decision for every task that is no exact duplicate."""

    exact: dict[int, str]
    near: dict[int, tuple[bool, float, str | None]]
    seeds: int


def minhash_dedup(ray: Any, options: DataRayOptions, seeds: StageInput | None, tasks: StageInput, on: str,
                  threshold: float, num_perm: int, bands: int, exact: bool) -> MinHashDecisions:
    """The decisions of dedup's exact-duplicate step and MinHash mode for ``tasks`` against ``seeds``
    (record numbers: the seeds' records first, then the tasks')."""
    from pipeline.text.minhash import replay

    cs, n_seeds = pool_chunks(options, seeds, tasks)
    if not cs:
        return MinHashDecisions({}, {}, n_seeds)
    setup = _Setup(on, threshold, num_perm, bands, exact, n_seeds)
    rows = ray.data.from_items(_chunk_rows(cs), override_num_blocks=len(cs))
    band_rows = rows.map_batches(_Bands, fn_constructor_args=(setup,), batch_size=1,
                                 compute=_pool(ray, options), num_cpus=1)
    involved, ex = [], []
    for batch in band_rows.groupby("band").map_groups(_shared, batch_format="numpy").iter_batches(
            batch_format="numpy", batch_size=None):
        near = batch["first"] < 0
        involved.append(batch["idx"][near])
        ex.append(np.stack([batch["idx"][~near], batch["first"][~near]], axis=1))
    pairs = np.concatenate(ex) if ex else np.zeros((0, 2), np.int64)
    # an exact duplicate leaves the pool before the near-duplicate step
    rest = np.setdiff1d(np.concatenate(involved) if involved else np.zeros(0, np.int64), pairs[:, 0])
    wanted = np.union1d(rest, pairs[:, 1]).astype(np.int64)
    found: dict[int, tuple[str, list[str], np.ndarray]] = {}
    if len(wanted):
        # only the chunks holding a wanted record are read again
        part = [cs[k - 1] for k in sorted(set(np.searchsorted([c.first for c in cs], wanted, side="right").tolist()))]
        toks = ray.data.from_items(_chunk_rows(part), override_num_blocks=len(part))
        toks = toks.map_batches(_Tokens, fn_constructor_args=(setup, wanted), batch_size=1,
                                compute=_pool(ray, options), num_cpus=1)
        for row in toks.iter_rows():
            found.update(pickle.loads(row["out"]))
    decided = replay(rest.tolist(), {n: f[1] for n, f in found.items()}, {n: f[2] for n, f in found.items()},
                     threshold, num_perm, bands, n_seeds)
    return MinHashDecisions(
        {int(j) - n_seeds: found[int(i)][0] for j, i in pairs},
        {n - n_seeds: (d.kept, d.score, found[int(d.nearest)][0] if d.nearest is not None else None)
         for n, d in decided.items()}, n_seeds)
