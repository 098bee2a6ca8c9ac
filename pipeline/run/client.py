"""The journaled model client a stage receives: answers already committed are never requested again."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from pipeline.models import Budget, Price
from pipeline.models.base import Backend, BudgetExceeded, Completion, Failure, ModelRequest, ModelResult
from pipeline.run.journal import Entry, Journal
from pipeline.stages.context import StageStats

log = logging.getLogger(__name__)


class JournaledClient:
    def __init__(self, name: str, backend: Backend, journal: Journal, stage: str, stats: StageStats,
                 price: Price, budget: Budget, show_progress: bool = True):
        self.name = name
        self._backend = backend
        self.journal = journal
        self.stage = stage
        self.stats = stats
        self.price = price
        self.budget = budget
        self.show_progress = show_progress
        self._identity: dict[str, Any] | None = None

    def identity(self) -> dict[str, Any]:
        if self._identity is None:
            self._identity = self._backend.identity()
        return self._identity

    def key(self, request: ModelRequest) -> str:
        """The journal key of ``request`` for this model (what provenance records)."""
        return request.key(self.identity())

    def backend(self) -> Backend:
        return self._backend

    def _spent(self) -> tuple[float, int]:
        return self.stats.cost_usd, self.stats.prompt_tokens + self.stats.completion_tokens

    def budget_reached(self) -> bool:
        cost, tokens = self._spent()
        b = self.budget
        return (b.max_cost_usd is not None and cost >= b.max_cost_usd) or (
            b.max_tokens is not None and tokens >= b.max_tokens)

    def _account(self, usage_prompt: int, usage_completion: int, cost: float, fresh: bool) -> None:
        s = self.stats
        s.prompt_tokens += usage_prompt
        s.completion_tokens += usage_completion
        s.cost_usd += cost
        if fresh:
            s.cost_usd_this_run += cost

    def generate(self, requests: Sequence[ModelRequest], desc: str | None = None) -> list[ModelResult]:
        identity = self.identity()
        keys = [r.key(identity) for r in requests]
        results: list[ModelResult | None] = [None] * len(requests)
        cached = self.journal.get_many(keys)
        for i, k in enumerate(keys):
            hit = cached.get(k)
            if hit is not None:
                results[i] = hit.completion
                self.stats.requests_cached += 1
                u = hit.completion.usage
                self._account(u.prompt_tokens, u.completion_tokens, hit.cost_usd, fresh=False)
        # Identical requests in one batch are sent once.
        first: dict[str, int] = {}
        todo: list[int] = []
        for i, k in enumerate(keys):
            if results[i] is None and k not in first:
                first[k] = i
                todo.append(i)
        if todo and self.budget_reached():
            raise BudgetExceeded(self._budget_message())
        if todo:
            self._send(requests, keys, todo, results, desc)
        for i, k in enumerate(keys):
            if results[i] is None and k in first and results[first[k]] is not None:
                results[i] = results[first[k]]
        stopped = [i for i in range(len(requests)) if results[i] is None]
        if stopped:
            raise BudgetExceeded(self._budget_message())
        return results  # type: ignore[return-value]

    def _send(self, requests, keys, todo, results, desc) -> None:
        bar = None
        if self.show_progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=f"{self.stage}: {desc or 'requests'}", unit="req",
                       dynamic_ncols=True, leave=False)
        sub = [requests[i] for i in todo]

        def on_result(group: list[tuple[int, ModelResult]]) -> bool:
            entries = []
            for j, res in group:
                i = todo[j]
                cost = 0.0
                if isinstance(res, Completion):
                    cost = self.price.cost(res.usage.prompt_tokens, res.usage.completion_tokens)
                entries.append(Entry(keys[i], json.dumps(requests[i].model_dump(mode="json"), ensure_ascii=False),
                                     res, cost))
            self.journal.commit(self.stage, self.name, entries)
            for e, (j, res) in zip(entries, group):
                i = todo[j]
                self.stats.requests_sent += 1
                if isinstance(res, Completion):
                    results[i] = res
                    self._account(res.usage.prompt_tokens, res.usage.completion_tokens, e.cost_usd, fresh=True)
                else:
                    results[i] = res
                    self.stats.failures += 1
                    self.stats.failure_kinds[res.kind] += 1
                    log.warning("request failed (%s): %s", res.kind, res.error)
            if bar is not None:
                bar.update(len(group))
                if self.price.input_per_million or self.price.output_per_million:
                    bar.set_postfix(cost=f"${self.stats.cost_usd:.4f}", refresh=False)
            return not self.budget_reached()

        try:
            self._backend.generate(sub, on_result)
        finally:
            if bar is not None:
                bar.close()

    def _budget_message(self) -> str:
        cost, tokens = self._spent()
        return (f"model '{self.name}' reached its budget in stage '{self.stage}' "
                f"(${cost:.4f}, {tokens} tokens; limits: max_cost_usd={self.budget.max_cost_usd}, "
                f"max_tokens={self.budget.max_tokens})")


def failure_reason(result: Failure) -> str:
    return f"{result.kind}: {result.error}"
