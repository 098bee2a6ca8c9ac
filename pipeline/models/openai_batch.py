"""``batch: true`` on an openai model: requests go through the Batch API (``/v1/files`` + ``/v1/batches``).

A call of :func:`run_batches` submits the requests in batches within the API's limits (``batch_max_requests``
lines, ``batch_max_bytes`` a file), polls them every ``batch_poll_s`` and reports each answered item as it is read.
Before a batch is created its input file id is written to the store (``pending:<file>``), and its id and request
keys (``batch:<id>``) before the first poll; so a killed run finds the batch again (a ``pending`` file whose batch
was created is matched by ``input_file_id``) and never submits the same requests twice. Items in the error file,
and items an expired or cancelled batch left unanswered, follow the failure rules of direct requests: transient
ones go into a later batch (up to ``max_attempts``), permanent ones are terminal. Before each batch the client's
budget check (``backend.fits``) sees the batch's worst case (every item at ``max_tokens``); a batch that would
cross the budget is cut to the part that fits, or not sent.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from pipeline.models.base import Failure, ModelRequest, ModelResult, ResultSink
from pipeline.models.openai_wire import alternatives, wire
from pipeline.models.transport import ERROR_CHARS, Fatal, FormatRejected, Retryable, classify_status, one_line

log = logging.getLogger(__name__)
BATCH, PENDING = "batch:", "pending:"
FINAL = ("completed", "expired", "cancelled", "failed")
REPORT_EVERY = 200  # answered items committed together while a file is read
_TRANSIENT_BATCH_ERRORS = ("token_limit_exceeded", "rate_limit_exceeded", "server_error")


class MemoryStore:
    """The store's interface over a dict (a backend used without a journal, and tests)."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    def get(self, key: str) -> str | None:
        return self.data.get(key)

    def put(self, key: str, value: str) -> None:
        self.data[key] = value

    def delete(self, key: str) -> None:
        self.data.pop(key, None)

    def items(self, prefix: str = "") -> list[tuple[str, str]]:
        return sorted((k, v) for k, v in self.data.items() if k.startswith(prefix))


def batches_in_flight(store_items: Iterable[tuple[str, str]]) -> list[str]:
    """One line per batch submitted and not yet collected (for ``seedtune status``)."""
    lines = []
    for key, value in store_items:
        if not key.startswith(BATCH):
            continue
        entry = json.loads(value)
        if entry.get("state") == "submitted":
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.get("created", 0)))
            lines.append(f"{key[len(BATCH):]}: {len(entry['keys'])} requests, submitted {when}")
    return lines


class _Batches:
    def __init__(self, backend: Any, requests: Sequence[ModelRequest], on_result: ResultSink, store: Any):
        self.backend, self.o, self.requests, self.on_result, self.store = backend, backend.options, requests, \
            on_result, store
        self.client = backend.sync_client()
        ident = backend.identity()
        self.by_key: dict[str, tuple[int, ModelRequest]] = {}  # the key of every form -> (index, form)
        for i, r in enumerate(requests):
            for f in alternatives(self.o, r):
                self.by_key.setdefault(f.key(ident), (i, f))
        self.ident = ident
        self.done: set[int] = set()
        self.attempts: Counter[int] = Counter()
        self.live: list[str] = []  # batch ids being polled
        self.more = True  # False once the sink asks for no more requests
        self.group: list[tuple] = []

    # ---- reporting --------------------------------------------------------------------------------------
    def _report(self, i: int, result: ModelResult, form: ModelRequest, flush: bool = False) -> None:
        if i in self.done:
            return
        self.done.add(i)
        self.group.append((i, result) if form is self.requests[i] else (i, result, form))
        if flush or len(self.group) >= REPORT_EVERY:
            self._flush()

    def _flush(self) -> None:
        if self.group:
            group, self.group = self.group, []
            if not self.on_result(group):
                self.more = False

    def _retry_or_fail(self, i: int, form: ModelRequest, kind: str, error: str, todo: list[int]) -> None:
        self.attempts[i] += 1
        if self.attempts[i] < self.o.max_attempts:
            todo.append(i)
        else:
            self._report(i, Failure(error=error[:ERROR_CHARS], kind=kind, attempts=self.attempts[i]), form)

    # ---- submitting -------------------------------------------------------------------------------------
    def _lines(self, todo: list[int]) -> list[tuple[int, ModelRequest, bytes]]:
        out = []
        for i in todo:
            form = self.backend._form(self.requests[i])
            path, body = wire(self.o, form)
            line = {"custom_id": form.key(self.ident), "method": "POST", "url": "/v1" + path, "body": body}
            out.append((i, form, (json.dumps(line, ensure_ascii=False) + "\n").encode()))
        return out

    def _worst_case(self, form: ModelRequest, line: bytes) -> tuple[int, int]:
        prompt = (self.backend.count_tokens(form).prompt_tokens if self.o.tokenizer else len(line) // 3)
        return prompt, form.params.max_tokens * form.params.n

    def _submit(self, todo: list[int]) -> None:
        lines = self._lines(todo)
        todo.clear()
        while lines and self.more:
            chunk, size, prompt, completion = [], 0, 0, 0
            for item in lines:
                p, c = self._worst_case(item[1], item[2])
                if chunk and (len(chunk) >= self.o.batch_max_requests or size + len(item[2]) > self.o.batch_max_bytes):
                    break
                if self.backend.fits is not None and not self.backend.fits(prompt + p, completion + c):
                    self.more = False  # the budget's worst case: what does not fit is not sent
                    break
                chunk.append(item)
                size, prompt, completion = size + len(item[2]), prompt + p, completion + c
            if not chunk:
                break
            lines = lines[len(chunk):]
            self._create(chunk)

    def _create(self, chunk: list[tuple[int, ModelRequest, bytes]]) -> None:
        keys = [form.key(self.ident) for _, form, _ in chunk]
        f = self.client.files.create(file=("seedtune-batch.jsonl", b"".join(line for _, _, line in chunk)),
                                     purpose="batch")
        self.store.put(PENDING + f.id, json.dumps({"keys": keys, "endpoint": self._endpoint()}))
        self._start(f.id, keys)

    def _endpoint(self) -> str:
        return "/v1/chat/completions" if self.o.api == "chat" else "/v1/completions"

    def _start(self, file_id: str, keys: list[str]) -> None:
        batch = self.client.batches.create(input_file_id=file_id, endpoint=self._endpoint(),  # type: ignore[arg-type]
                                           completion_window=self.o.batch_window, metadata={"seedtune": "1"})
        self._adopt(batch.id, file_id, keys)

    def _adopt(self, batch_id: str, file_id: str, keys: list[str]) -> None:
        self.store.put(BATCH + batch_id, json.dumps({"keys": keys, "state": "submitted", "file": file_id,
                                                     "created": time.time()}))
        self.store.delete(PENDING + file_id)
        self.live.append(batch_id)
        log.info("batch %s submitted (%d requests); polling every %gs", batch_id, len(keys), self.o.batch_poll_s)

    # ---- resuming ---------------------------------------------------------------------------------------
    def resume(self) -> set[int]:
        """Batches an earlier run left: adopt them; the indices they cover."""
        pending = self.store.items(PENDING)
        if pending:
            created = {b.input_file_id: b.id for b in self.client.batches.list(limit=100)}
            for key, value in pending:
                file_id, keys = key[len(PENDING):], json.loads(value)["keys"]
                if file_id in created:
                    self._adopt(created[file_id], file_id, keys)
                else:
                    self._start(file_id, keys)
        covered: set[int] = set()
        for key, value in self.store.items(BATCH):
            entry = json.loads(value)
            mine = [self.by_key[k][0] for k in entry["keys"] if k in self.by_key]
            if mine and entry.get("state") in ("submitted", "collected"):
                covered.update(mine)
                if key[len(BATCH):] not in self.live:
                    self.live.append(key[len(BATCH):])
        return covered

    # ---- collecting -------------------------------------------------------------------------------------
    def _file_lines(self, file_id: str | None) -> list[dict]:
        if not file_id:
            return []
        text = self.client.files.content(file_id).text
        return [json.loads(x) for x in text.splitlines() if x.strip()]

    def _item(self, line: dict, todo: list[int]) -> None:
        hit = self.by_key.get(line.get("custom_id", ""))
        if hit is None:
            return
        i, form = hit
        if i in self.done:
            return
        response = line.get("response") or {}
        status, body = response.get("status_code"), response.get("body")
        if status == 200 and isinstance(body, dict):
            try:
                self._report(i, self.backend.completion(body, form), form)
            except Fatal as e:
                self._report(i, Failure(error=e.error, kind=e.kind, permanent=True), form)
            except Retryable as e:
                self._retry_or_fail(i, form, e.kind, e.error, todo)
            return
        err = (body or {}).get("error") if isinstance(body, dict) else None
        message = one_line((err or {}).get("message") if isinstance(err, dict) else
                           (line.get("error") or {}).get("message") or json.dumps(line)[:ERROR_CHARS])
        if not isinstance(status, int):
            return self._retry_or_fail(i, form, "batch_item", message, todo)
        verdict = classify_status(status, f"HTTP {status}: {message}", "response_format" in wire(self.o, form)[1])
        if isinstance(verdict, FormatRejected):
            self.backend.reject_format(form.params.output_format, str(verdict))
            todo.append(i)
        elif isinstance(verdict, Fatal):
            self._report(i, Failure(error=verdict.error, kind=verdict.kind, permanent=True), form)
        else:
            self._retry_or_fail(i, form, verdict.kind, verdict.error, todo)  # type: ignore[union-attr]

    def collect(self, batch: Any, todo: list[int]) -> None:
        entry = json.loads(self.store.get(BATCH + batch.id) or '{"keys": []}')
        entry.update(state="collected", output=batch.output_file_id, errors=batch.error_file_id)
        self.store.put(BATCH + batch.id, json.dumps(entry))
        queued = len(todo)
        for line in self._file_lines(batch.output_file_id) + self._file_lines(batch.error_file_id):
            self._item(line, todo)
        self._flush()
        handled = set(todo[queued:])  # items of this batch already queued for a later one
        left = [k for k in entry["keys"] if k in self.by_key and self.by_key[k][0] not in self.done
                and self.by_key[k][0] not in handled]
        reason = f"batch {batch.id} {batch.status}"
        if batch.status == "failed":
            errors = getattr(getattr(batch, "errors", None), "data", None) or []
            codes = [getattr(e, "code", "") or "" for e in errors]
            reason += ": " + one_line("; ".join(getattr(e, "message", "") or "" for e in errors))[:ERROR_CHARS]
            if not any(c in _TRANSIENT_BATCH_ERRORS for c in codes):
                for k in left:
                    i, form = self.by_key[k]
                    self._report(i, Failure(error=reason, kind="batch_failed", permanent=True), form)
                left = []
        for k in dict.fromkeys(left):
            i, form = self.by_key[k]
            self._retry_or_fail(i, form, f"batch_{batch.status}", f"{reason} before answering it", todo)
        self._flush()
        others = [k for k in entry["keys"] if k not in self.by_key]
        if others:  # answers for requests of a later call (another round): keep the files' ids for it
            entry["keys"] = others
            self.store.put(BATCH + batch.id, json.dumps(entry))
        else:
            self.store.delete(BATCH + batch.id)

    def poll(self, todo: list[int]) -> None:
        for batch_id in list(self.live):
            batch = self.client.batches.retrieve(batch_id)
            if batch.status in FINAL:
                self.live.remove(batch_id)
                self.collect(batch, todo)


def run_batches(backend: Any, requests: Sequence[ModelRequest], on_result: ResultSink, store: Any) -> None:
    """Answer ``requests`` through the Batch API (see the module's docstring)."""
    run = _Batches(backend, requests, on_result, store)
    covered = run.resume()
    todo = [i for i in range(len(requests)) if i not in covered]
    first = bool(run.live)
    while True:
        if todo and run.more:
            run._submit(todo)
        todo = [i for i in todo if i not in run.done]
        if not run.live:
            if todo and run.more:
                continue
            break
        if not first:
            time.sleep(run.o.batch_poll_s)
        first = False
        run.poll(todo)
    run._flush()
