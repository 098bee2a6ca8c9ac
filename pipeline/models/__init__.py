"""Model backends behind one interface (see :mod:`pipeline.models.base`).

Backend modules are imported only when a config names them, so a missing optional package (vLLM) only
matters to the configs that use it. Each backend module exposes ``Options`` (a pydantic model of its
settings), ``identity(options)`` (static: what shapes its answers; never loads a model or opens a connection),
``create(options) -> Backend``, and optionally ``alternatives(options, request)`` (the wire forms it may send a
request in, each with its own journal key).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from pydantic import BaseModel, ConfigDict

BACKENDS: dict[str, str] = {
    "openai": "pipeline.models.openai_backend",
    "transformers": "pipeline.models.transformers_backend",
    "vllm": "pipeline.models.vllm_backend",
    "test": "pipeline.models.testing",
}

# Settings common to every backend; the rest of a model definition belongs to the backend's Options.
COMMON_KEYS = ("backend", "price", "budget")


class Price(BaseModel):
    """US dollars per million tokens."""

    model_config = ConfigDict(extra="forbid")

    input_per_million: float = 0.0
    output_per_million: float = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_million + completion_tokens * self.output_per_million) / 1e6


class Budget(BaseModel):
    """Limits of one model in each stage that calls it: the stage stops cleanly when either is reached (spent on
    answers the stage used, earlier runs' included); a re-run with a larger budget continues."""

    model_config = ConfigDict(extra="forbid")

    max_cost_usd: float | None = None
    max_tokens: int | None = None


def backend_module(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise KeyError(name)
    return importlib.import_module(BACKENDS[name])


def backend_options(name: str, options: dict[str, Any]) -> BaseModel:
    """Validate a backend's own options (raises pydantic.ValidationError)."""
    return backend_module(name).Options.model_validate(options)


def model_identity(name: str, options: BaseModel) -> dict[str, Any]:
    return backend_module(name).identity(options)


def request_forms(name: str, options: BaseModel, request: Any) -> list[Any]:
    """The request in each wire form the backend may send it (the first is its preference)."""
    module = backend_module(name)
    return list(module.alternatives(options, request)) if hasattr(module, "alternatives") else [request]
