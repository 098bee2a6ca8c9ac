"""The run's models: each built once, when a stage first sends it a request, and kept for the later stages that
call the same model, so a vLLM engine, a loaded transformers model or a pool of Ray actors starts once per run
rather than once per stage (or per round).

A model is released (closed: its engine shut down, its Ray actors ended, a Ray instance seedtune started
stopped) after the last stage of the config that calls it; before a stage that loads weights of its own
(training, evaluation), which needs the memory, every model that stage does not call; and always when the run
ends, however it ends. A model released early and called again is built again. The stages' clients only
borrow the backend: every answer is still committed to the journal by the client before its stage uses it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pipeline.config import Config, stage_models
from pipeline.models.base import Backend
from pipeline.stages import stage_module

log = logging.getLogger(__name__)

OWN_WEIGHTS = ("sft", "evaluate")  # stage kinds that load a model's weights themselves


class RunModels:
    def __init__(self, config: Config, table: dict[str, str], build: Callable[[str], Backend]):
        self.build = build
        self.held: dict[str, Backend] = {}
        self.stats: dict[str, dict[str, Any]] = {}  # per model, over the run: the executor's counters
        self.calls: list[list[str]] = [stage_models(stage_module(s.kind, table), s.options) for s in config.stages]
        self.kinds = [s.kind for s in config.stages]
        self.last_use = {m: i for i, used in enumerate(self.calls) for m in used}

    def get(self, name: str) -> Backend:
        """The model's backend, built and checked on first use."""
        if name not in self.held:
            backend = self.build(name)
            try:
                backend.check()
            except BaseException:
                backend.close()
                raise
            self.held[name] = backend
        return self.held[name]

    def before_stage(self, index: int) -> None:
        if self.kinds[index] in OWN_WEIGHTS:
            for name in [m for m in self.held if m not in self.calls[index]]:
                self.release(name, "before a stage that loads weights of its own")

    def after_stage(self, index: int) -> None:
        for name in [m for m in self.held if self.last_use.get(m, -1) <= index]:
            self.release(name, "after its last stage")

    def release(self, name: str, why: str) -> None:
        backend = self.held.pop(name)
        try:
            backend.close()
        except Exception:  # noqa: BLE001 - closing is best effort
            log.warning("closing model '%s' failed", name, exc_info=True)
        counters = backend.stats() if hasattr(backend, "stats") else {}
        if counters:
            seen = self.stats.setdefault(name, {})
            for k, v in counters.items():  # counters add up over the builds of a model released early
                seen[k] = seen.get(k, 0) + v if k.endswith(("_starts", "_calls")) else v
        log.info("model %s released %s%s", name, why, f" ({counters})" if counters else "")

    def close(self) -> None:
        """Release every model still held (the run ends)."""
        for name in list(self.held):
            self.release(name, "at the end of the run")
