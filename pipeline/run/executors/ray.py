"""``executor: ray``: a model's requests on long-lived Ray actors, results streamed back and journaled by the driver.

One pool of actors per model and run. On the model's first request the executor starts ``ray.workers`` Ray
actors (``num_cpus_per_worker`` CPUs and ``num_gpus_per_worker`` GPUs each; the GPUs default to what the backend
needs, a vLLM engine's tensor-parallel size), and each builds the model's backend once
(``backend_module(name).create(options)``: a vLLM engine per GPU worker, the transformers model, or the async
openai client). Every later call goes to the same actors: every round of a stage, and every later stage that
calls the same model (the runner keeps the executor from the model's first stage to its last). :meth:`close`
kills the actors and shuts Ray down if seedtune started it.

The driver (the seedtune process) cuts a call's requests into chunks and keeps up to ``IN_FLIGHT`` chunks queued
on each actor, so an actor starts its next chunk as soon as one is done. Each chunk's results go to
``on_result`` as it completes, which commits them to the journal before the stage uses them; a killed driver
therefore resumes by sending only the requests not yet committed, and its actors die with it (each watches its
raylet). When ``on_result`` says stop (the budget), no further chunk is sent and the queued ones are cancelled;
chunks already running finish and are reported.

Answers are the same as with the local executor: they are keyed by request, and a backend whose batches sample
with one seed drawn from their members (transformers) exposes ``batches(options, requests)``; a chunk is then
made of whole batches, so the worker forms exactly the batches the local backend would.

``ray_data_llm: true`` (vLLM only) sends the requests through Ray Data's own LLM processor instead, built once
per executor (see :mod:`pipeline.run.executors.ray_llm`).

No ``address`` (and no ``RAY_ADDRESS``): seedtune starts a local Ray instance on this machine and stops it when
the last executor of this process that uses it closes (two models on Ray share the instance, whichever started
it); with one, it joins that cluster and leaves it running.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, TypeAdapter

from pipeline.errors import MissingExtra
from pipeline.models import RayOptions, backend_module, capacity, ray_runtime, worker_gpus
from pipeline.models.base import Backend, BackendUnavailable, ModelRequest, ModelResult, ResultSink, error_line

log = logging.getLogger(__name__)

RESULT = TypeAdapter(ModelResult)
IN_FLIGHT = 2  # chunks queued on one actor: the next one starts without waiting for the driver
CLOSE_TIMEOUT_S = 60


class _Runtime:
    """The Ray instance this process's executors share: stopped when the last of them closes, if one started it."""

    users = 0
    started = False


class ChunkWorker:
    """A Ray actor: builds the backend once, then answers one chunk per call for as long as the model is used."""

    def __init__(self, backend: str, options_json: str):
        _exit_with_parent()
        module = backend_module(backend)
        self.backend = module.create(module.Options.model_validate_json(options_json))

    def ready(self) -> int:
        """This worker's process id, once its backend is built."""
        return os.getpid()

    def answer(self, payload: str) -> str:
        return answer_chunk(self.backend, payload)

    def close(self) -> None:
        self.backend.close()


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
    """Chunks of at most ``size`` requests (more where one backend batch is larger), made of whole batches."""
    module = backend_module(backend)
    units = module.batches(options, requests) if hasattr(module, "batches") else [[i] for i in range(len(requests))]
    chunks: list[list[int]] = []
    for unit in units:
        if chunks and len(chunks[-1]) + len(unit) <= size:
            chunks[-1].extend(unit)
        else:
            chunks.append(list(unit))
    return chunks


def gpus_per_worker(backend: str, options: BaseModel, ray_options: RayOptions) -> float:
    """The GPUs each actor reserves: as configured, else what one built backend needs."""
    given = ray_options.num_gpus_per_worker
    return worker_gpus(backend, options) if given is None else given


class RayExecutor:
    """A backend that runs another backend's requests on a pool of Ray actors, started once."""

    def __init__(self, backend: str, options: BaseModel, ray_options: RayOptions, local: Backend):
        self.backend_name = backend
        self.options = options
        self.ray_options = ray_options
        self.local = local  # identity and check come from the backend itself: the executor never changes answers
        self._ray: Any = None
        self._actors: list[Any] = []
        self._processor: Any = None
        self.actor_starts = 0  # actors started (each built the backend once) since this executor was made
        self.calls = 0  # generate calls with requests to send

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

    def stats(self) -> dict[str, Any]:
        return {"executor": "ray", "ray_workers": self.ray_options.workers, "ray_actor_starts": self.actor_starts,
                "ray_calls": self.calls}

    def _connect(self) -> Any:
        if self._ray is None:
            o = self.ray_options
            # The machine's CPUs on top of the actors' own: a data stage that runs on the same instance while the
            # actors wait for the model's next stage still finds CPUs to run on.
            cpus = o.workers * o.num_cpus_per_worker + (os.cpu_count() or 2)
            self._ray, started = ray_runtime.connect(
                o.address, cpus, o.workers * gpus_per_worker(self.backend_name, self.options, o))
            _Runtime.users += 1
            _Runtime.started = _Runtime.started or started
        return self._ray

    def _pool(self) -> list[Any]:
        """The actors, started (and their backends built) on the first call."""
        if not self._actors:
            ray, o = self._connect(), self.ray_options
            worker = ray.remote(ChunkWorker).options(
                num_cpus=o.num_cpus_per_worker, num_gpus=gpus_per_worker(self.backend_name, self.options, o),
                max_restarts=0, max_concurrency=1)
            started = time.perf_counter()
            actors = [worker.remote(self.backend_name, self.options.model_dump_json()) for _ in range(o.workers)]
            try:
                pids = ray.get([a.ready.remote() for a in actors])
            except ray.exceptions.RayError as e:
                for a in actors:
                    ray.kill(a)
                raise RuntimeError(f"model {self.backend_name}: a Ray worker could not build it: "
                                   f"{error_line(e)}") from None
            self._actors = actors
            self.actor_starts += len(actors)
            log.info("model %s: %d Ray workers started in %.1f s (pids %s)", self.backend_name, len(actors),
                     time.perf_counter() - started, ", ".join(map(str, pids)))
        return self._actors

    def generate(self, requests: Sequence[ModelRequest], on_result: ResultSink, store: Any = None) -> None:
        if not requests:
            return
        self.calls += 1
        o = self.ray_options
        size = o.batch_size or capacity(self.backend_name, self.options)
        chunks = plan_chunks(self.backend_name, self.options, requests, size)
        payloads = [json.dumps([[i, requests[i].model_dump(mode="json")] for i in c]) for c in chunks]
        if o.ray_data_llm and self.backend_name == "vllm":
            self._generate_processor(payloads, on_result)
        else:
            self._dispatch(deque(payloads), on_result)

    def _dispatch(self, todo: deque[str], on_result: ResultSink) -> None:
        """Keep up to ``IN_FLIGHT`` chunks on each actor; report each chunk as it completes."""
        actors = self._pool()
        ray = self._ray
        pending: dict[Any, int] = {}  # object ref -> the actor answering it
        load = [0] * len(actors)
        sending = True
        try:
            while pending or (sending and todo):
                while sending and todo:
                    idx = min(range(len(actors)), key=load.__getitem__)
                    if load[idx] >= IN_FLIGHT:
                        break
                    pending[actors[idx].answer.remote(todo.popleft())] = idx
                    load[idx] += 1
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    load[pending.pop(ref)] -= 1
                    try:
                        payload = ray.get(ref)
                    except ray.exceptions.TaskCancelledError:
                        continue
                    except ray.exceptions.RayActorError as e:
                        self._drop_pool()
                        raise RuntimeError(f"a Ray worker of model {self.backend_name} died: {error_line(e)}") from None
                    if not on_result(read_results(payload)) and sending:
                        sending = False  # the budget: queued chunks are cancelled, running ones still reported
                        for queued in pending:
                            ray.cancel(queued)
        finally:
            for ref in pending:  # an error or an interrupt: nothing queued outlives this call
                try:
                    ray.cancel(ref)
                except Exception:  # noqa: BLE001 - cancelling is best effort
                    pass

    def _generate_processor(self, payloads: list[str], on_result: ResultSink) -> None:
        ray = self._connect()
        from pipeline.run.executors.ray_llm import run_processor, vllm_processor

        if self._processor is None:
            self._processor = vllm_processor(self.options, self.ray_options)
        ds = ray.data.from_items([{"chunk": p} for p in payloads], override_num_blocks=len(payloads))
        for row in run_processor(self._processor, ds).iter_rows():
            if not on_result(read_results(row["results"])):
                return  # the budget: stop consuming; Ray stops the dataset, unreported answers are re-sent next run

    def _drop_pool(self) -> None:
        """Close each actor's backend (bounded) and end the actors."""
        actors, self._actors = self._actors, []
        if not actors:
            return
        ray = self._ray
        try:
            ray.get([a.close.remote() for a in actors], timeout=CLOSE_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - a dead or stuck worker is killed all the same
            log.debug("closing the Ray workers failed", exc_info=True)
        for a in actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass

    def close(self) -> None:
        try:
            self.local.close()
        finally:
            try:
                if self._ray is not None:
                    self._drop_pool()
            finally:
                self._processor = None
                if self._ray is not None:
                    _Runtime.users -= 1
                    if _Runtime.users == 0 and _Runtime.started:
                        _Runtime.started = False
                        ray_runtime.stop(self._ray)
                self._ray = None
