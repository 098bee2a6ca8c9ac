"""``executor: ray``: a model's requests on Ray Data actors, results streamed back and journaled by the driver.

The driver (the seedtune process) turns the requests the journaled client still has to send into keyed rows
(request indices and the requests as JSON), one row per *chunk*. ``map_batches`` with an actor class
(``concurrency`` = ``ray.workers``) builds the model's backend once per worker
(``backend_module(name).create(options)``: a vLLM engine per GPU worker, the transformers model, or the async
openai client) and answers each chunk with it. The driver iterates the mapped dataset as rows complete and hands
each chunk's results to ``on_result``, which commits them to the journal before the stage uses them; a killed
driver therefore resumes by sending only the requests not yet committed. Rounds of a stage stay rounds: each
``generate`` call is one Ray dataset (its actors start with it).

Answers are the same as with the local executor: they are keyed by request, and a backend whose batches sample
with one seed drawn from their members (transformers) exposes ``batches(options, requests)``; a chunk is then
made of whole batches, so the worker forms exactly the batches the local backend would.

No ``address`` (and no ``RAY_ADDRESS``): seedtune starts a local Ray instance on this machine's CPUs and stops
it when the run closes its models; with one, it joins that cluster and leaves it running.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, TypeAdapter

from pipeline.errors import MissingExtra
from pipeline.models import RayOptions, backend_module, ray_runtime
from pipeline.models.base import Backend, BackendUnavailable, ModelRequest, ModelResult, ResultSink, error_line

log = logging.getLogger(__name__)

RESULT = TypeAdapter(ModelResult)
DEFAULT_CHUNK = 16


class ChunkWorker:
    """A Ray Data actor: builds the backend once, then answers one chunk per row."""

    def __init__(self, backend: str, options_json: str):
        _exit_with_parent()
        module = backend_module(backend)
        self.backend = module.create(module.Options.model_validate_json(options_json))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"results": [answer_chunk(self.backend, payload) for payload in batch["chunk"]]}

    def __del__(self) -> None:
        try:
            self.backend.close()
        except Exception:  # noqa: BLE001 - a worker going away closes best effort
            pass


def _exit_with_parent() -> None:
    """End this worker as soon as its raylet is gone (a killed driver takes its local Ray instance with it): Ray's
    own workers notice only after tens of seconds, sending requests meanwhile whose answers nobody commits."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="seedtune-parent-watch").start()


def answer_chunk(backend: Backend, payload: str) -> str:
    """Answer a chunk (JSON ``[[index, request], ...]``); JSON ``[[index, result, sent request or null], ...]``."""
    items = json.loads(payload)
    requests = [ModelRequest.model_validate(r) for _, r in items]
    got: list[tuple] = []
    backend.generate(requests, lambda group: got.extend(group) or True)
    return json.dumps([[items[t[0]][0], t[1].model_dump(mode="json"),
                        t[2].model_dump(mode="json") if len(t) > 2 else None] for t in got])


def read_results(payload: str) -> list[tuple]:
    out: list[tuple] = []
    for index, result, sent in json.loads(payload):
        res: ModelResult = RESULT.validate_python(result)
        out.append((index, res) if sent is None else (index, res, ModelRequest.model_validate(sent)))
    return out


def plan_chunks(backend: str, options: BaseModel, requests: Sequence[ModelRequest], size: int) -> list[list[int]]:
    """Rows of at most ``size`` requests (more where one backend batch is larger), made of whole batches."""
    module = backend_module(backend)
    units = module.batches(options, requests) if hasattr(module, "batches") else [[i] for i in range(len(requests))]
    chunks: list[list[int]] = []
    for unit in units:
        if chunks and len(chunks[-1]) + len(unit) <= size:
            chunks[-1].extend(unit)
        else:
            chunks.append(list(unit))
    return chunks


def default_chunk(options: BaseModel) -> int:
    """Requests per row: enough to keep one worker's backend busy (its batch, its concurrency, its chunk)."""
    for name in ("batch_size", "max_concurrency", "chunk_size"):
        value = getattr(options, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_CHUNK


class RayExecutor:
    """A backend that runs another backend's requests on Ray Data workers."""

    def __init__(self, backend: str, options: BaseModel, ray_options: RayOptions, local: Backend):
        self.backend_name = backend
        self.options = options
        self.ray_options = ray_options
        self.local = local  # identity and check come from the backend itself: the executor never changes answers
        self._started_here = False
        self._ray: Any = None

    def identity(self) -> dict[str, Any]:
        return self.local.identity()

    def check(self) -> None:
        """Ray is installed and reachable; the model itself is built (and checked) by each worker, never here."""
        try:
            self._connect()
        except MissingExtra:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. no cluster at the address: one line
            raise BackendUnavailable(f"Ray: {error_line(e)}") from None

    def _connect(self) -> Any:
        if self._ray is None:
            o = self.ray_options
            self._ray, self._started_here = ray_runtime.connect(o.address, o.workers * o.num_cpus_per_worker,
                                                                o.workers * o.num_gpus_per_worker)
        return self._ray

    def generate(self, requests: Sequence[ModelRequest], on_result: ResultSink, store: Any = None) -> None:
        if not requests:
            return
        ray = self._connect()
        o = self.ray_options
        chunks = plan_chunks(self.backend_name, self.options, requests, o.batch_size or default_chunk(self.options))
        rows = [{"chunk": json.dumps([[i, requests[i].model_dump(mode="json")] for i in c])} for c in chunks]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        if o.ray_data_llm and self.backend_name == "vllm":
            from pipeline.run.executors.ray_llm import vllm_processor

            mapped = vllm_processor(ds, self.options, o)
        else:
            mapped = ds.map_batches(ChunkWorker, fn_constructor_args=(self.backend_name, self.options.model_dump_json()),
                                    batch_size=1, concurrency=o.workers, num_cpus=o.num_cpus_per_worker,
                                    num_gpus=o.num_gpus_per_worker or None, batch_format="default")
        for row in mapped.iter_rows():
            if not on_result(read_results(row["results"])):
                return  # the budget: stop consuming; Ray stops the dataset, unreported answers are re-sent next run

    def close(self) -> None:
        try:
            self.local.close()
        finally:
            if self._ray is not None and self._started_here:
                ray_runtime.stop(self._ray)
            self._ray = None
            self._started_here = False
