"""The journaled model client a stage receives: answers already committed are never requested again.

For each request the client looks up, in the journal, the key of every wire form the backend may send it in
(``alternatives``); the first hit is the answer. The rest go to the backend, which is asked of the factory only
now (a stage whose answers are all journaled never loads a model or opens a connection); the factory hands a
built and checked backend that the client borrows (the runner keeps it for the run, see
:mod:`pipeline.run.models`). Each answer is committed under the key of the request actually sent before the stage sees it. A
permanent failure recorded by an earlier run is not sent again unless ``retry_failed``; a transient one is.
Each model has its own budget counter in the stage.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.errors import UserError
from pipeline.models import Budget, Price, request_forms
from pipeline.models.base import (Backend, BackendUnavailable, BudgetExceeded, Completion, Failure, ModelRequest,
                                  ModelResult)
from pipeline.run.journal import Entry, Journal
from pipeline.stages.context import StageStats

log = logging.getLogger(__name__)


class JournalStore:
    """A model's persistent key/value state, in the journal (see :class:`pipeline.models.base.StateStore`)."""

    def __init__(self, journal: Journal, namespace: str):
        self.journal, self.namespace = journal, namespace

    def get(self, key: str) -> str | None:
        return self.journal.state_get(self.namespace, key)

    def put(self, key: str, value: str) -> None:
        self.journal.state_put(self.namespace, key, value)

    def delete(self, key: str) -> None:
        self.journal.state_delete(self.namespace, key)

    def items(self, prefix: str = "") -> list[tuple[str, str]]:
        return self.journal.state_items(self.namespace, prefix)


class JournaledClient:
    def __init__(self, name: str, backend: Backend | Callable[[], Backend], journal: Journal, stage: str,
                 stats: StageStats, price: Price, budget: Budget, show_progress: bool = True, *,
                 identity: dict[str, Any] | None = None, backend_name: str | None = None, options: Any = None,
                 retry_failed: bool = False):
        self.name = name
        self._factory = backend if callable(backend) and not hasattr(backend, "generate") else None
        self._backend: Backend | None = None if self._factory else backend  # type: ignore[assignment]
        self.journal = journal
        self.stage = stage
        self.stats = stats
        self.price = price
        self.budget = budget
        self.show_progress = show_progress
        self.retry_failed = retry_failed
        self._identity = identity
        self._backend_name, self._options = backend_name, options
        self._answered: dict[str, str] = {}  # first-form key -> key of the form that answered
        self.spent_cost = 0.0  # this model's spending in this stage (its budget)
        self.spent_tokens = 0

    # ---- identity and keys ----------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        if self._identity is None:
            self._identity = self.backend().identity()  # type: ignore[attr-defined]
        return self._identity

    def forms(self, request: ModelRequest) -> list[ModelRequest]:
        if self._backend_name is None:
            return [request]
        return request_forms(self._backend_name, self._options, request)

    def key(self, request: ModelRequest) -> str:
        """The journal key of ``request`` for this model: of the form that answered it, where one did."""
        first = self.forms(request)[0].key(self.identity())
        return self._answered.get(first, first)

    def lookup(self, requests: Sequence[ModelRequest]) -> list[str]:
        """Where each request stands in the journal, sending nothing: "answered", "failed" (a re-send may
        answer it), "terminal" (failed permanently; re-sent only with retry_failed) or "new" (never sent)."""
        identity = self.identity()
        keys = [[f.key(identity) for f in self.forms(r)] for r in requests]
        flat = [k for ks in keys for k in ks]
        answered = self.journal.get_many(flat)
        failed = self.journal.failures_of(flat)
        out = []
        for ks in keys:
            if any(k in answered for k in ks):
                out.append("answered")
            elif any(k in failed for k in ks):
                permanent = any(failed[k]["permanent"] for k in ks if k in failed)
                out.append("terminal" if permanent and not self.retry_failed else "failed")
            else:
                out.append("new")
        return out

    # ---- the backend, asked for when first needed ------------------------------------------------------
    def backend(self) -> Backend:
        if self._backend is None:
            assert self._factory is not None
            try:
                self._backend = self._factory()
            except BackendUnavailable as e:
                raise UserError(f"stage '{self.stage}': model '{self.name}': {e}") from None
        return self._backend

    # ---- budget ----------------------------------------------------------------------------------------
    def budget_reached(self) -> bool:
        b = self.budget
        return (b.max_cost_usd is not None and self.spent_cost >= b.max_cost_usd) or (
            b.max_tokens is not None and self.spent_tokens >= b.max_tokens)

    def _account(self, completion: Completion, cost: float, fresh: bool) -> None:
        u = completion.usage
        if (self.price.input_per_million or self.price.output_per_million) and not (
                u.prompt_tokens or u.completion_tokens):
            raise UserError(
                f"stage '{self.stage}': model '{self.name}' has a price but its server reported no token usage, so "
                f"its cost cannot be counted; set the model's `tokenizer:` to count tokens locally, or remove `price`")
        s = self.stats
        s.prompt_tokens += u.prompt_tokens
        s.completion_tokens += u.completion_tokens
        s.cost_usd += cost
        s.answers += 1
        self.spent_cost += cost
        self.spent_tokens += u.prompt_tokens + u.completion_tokens
        if fresh:
            s.cost_usd_this_run += cost

    def _failed(self, key: str, failure: Failure, sent: bool) -> None:
        s = self.stats
        s.failures += 1
        s.failure_kinds[failure.kind] += 1
        if failure.permanent:
            s.failures_permanent += 1
        if len(s.failure_samples) < 20:
            s.failure_samples.append({"key": key, "kind": failure.kind, "error": failure.error,
                                      "permanent": failure.permanent, "sent": sent})

    # ---- requests --------------------------------------------------------------------------------------
    def generate(self, requests: Sequence[ModelRequest], desc: str | None = None) -> list[ModelResult]:
        identity = self.identity()
        forms = [self.forms(r) for r in requests]
        keys = [[f.key(identity) for f in fs] for fs in forms]
        results: list[ModelResult | None] = [None] * len(requests)
        cached = self.journal.get_many([k for ks in keys for k in ks])
        for i, ks in enumerate(keys):
            hit = next((k for k in ks if k in cached), None)
            if hit is not None:
                results[i] = cached[hit].completion
                self._answered[ks[0]] = hit
                self.stats.requests_cached += 1
                self._account(cached[hit].completion, cached[hit].cost_usd, fresh=False)
        if not self.retry_failed:
            known = self.journal.failures_of([k for i, ks in enumerate(keys) if results[i] is None for k in ks])
            for i, ks in enumerate(keys):
                rec = next((known[k] for k in ks if k in known and known[k]["permanent"]), None)
                if results[i] is None and rec is not None:
                    failure = Failure(error=rec["error"], kind=rec["kind"], permanent=True, attempts=0)
                    results[i] = failure
                    self._failed(ks[0], failure, sent=False)
        # Identical requests in one batch are sent once.
        first: dict[str, int] = {}
        todo: list[int] = []
        for i, ks in enumerate(keys):
            if results[i] is None and ks[0] not in first:
                first[ks[0]] = i
                todo.append(i)
        if todo and self.budget_reached():
            raise BudgetExceeded(self._budget_message())
        if todo:
            self._send(requests, keys, todo, results, desc)
        for i, ks in enumerate(keys):
            if results[i] is None and ks[0] in first and results[first[ks[0]]] is not None:
                results[i] = results[first[ks[0]]]
        if any(r is None for r in results):
            raise BudgetExceeded(self._budget_message())
        return results  # type: ignore[return-value]

    def fits(self, prompt_tokens: int, completion_tokens: int, factor: float = 1.0) -> bool:
        """Whether a worst case of this many tokens stays within the budget (a backend asks before a batch)."""
        b, cost = self.budget, self.price.cost(prompt_tokens, completion_tokens) * factor
        return (b.max_cost_usd is None or self.spent_cost + cost <= b.max_cost_usd) and (
            b.max_tokens is None or self.spent_tokens + prompt_tokens + completion_tokens <= b.max_tokens)

    def _send(self, requests, keys, todo, results, desc) -> None:
        backend = self.backend()
        factor = getattr(backend, "cost_factor", 1.0)  # the share of the list price (the Batch API's discount)
        if hasattr(backend, "fits"):
            backend.fits = lambda p, c: self.fits(p, c, factor)
        bar = None
        if self.show_progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=f"{self.stage}: {desc or 'requests'}", unit="req",
                       dynamic_ncols=True, leave=False)
        sub = [requests[i] for i in todo]

        def on_result(group: list[tuple]) -> bool:
            entries, placed = [], []
            for item in group:
                j, res = item[0], item[1]
                i = todo[j]
                sent = item[2] if len(item) > 2 and item[2] is not None else None
                key = sent.key(self.identity()) if sent is not None else keys[i][0]
                cost = self.price.cost(res.usage.prompt_tokens, res.usage.completion_tokens) * factor \
                    if isinstance(res, Completion) else 0.0
                body = (sent or requests[i]).model_dump(mode="json")
                entries.append(Entry(key, json.dumps(body, ensure_ascii=False), res, cost,
                                     clears=tuple(k for k in keys[i] if k != key)))
                placed.append((i, key, res))
            self.journal.commit(self.stage, self.name, entries)
            for e, (i, key, res) in zip(entries, placed):
                self.stats.requests_sent += 1
                results[i] = res
                if isinstance(res, Completion):
                    self._answered[keys[i][0]] = key
                    self._account(res, e.cost_usd, fresh=True)
                else:
                    self._failed(key, res, sent=True)
            if bar is not None:
                bar.update(len(group))
                if self.price.input_per_million or self.price.output_per_million:
                    bar.set_postfix(cost=f"${self.stats.cost_usd:.4f}", refresh=False)
            return not self.budget_reached()

        try:
            backend.generate(sub, on_result, JournalStore(self.journal, f"model:{self.name}"))
        finally:
            if bar is not None:
                bar.close()

    def _budget_message(self) -> str:
        return (f"model '{self.name}' reached its budget in stage '{self.stage}' "
                f"(${self.spent_cost:.4f}, {self.spent_tokens} tokens; limits: max_cost_usd={self.budget.max_cost_usd}, "
                f"max_tokens={self.budget.max_tokens})")
