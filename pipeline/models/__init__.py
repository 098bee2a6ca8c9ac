"""Model backends behind one interface (see :mod:`pipeline.models.base`).

Backend modules are imported only when a config names them, so a missing optional package (vLLM) only
matters to the configs that use it. Each backend module exposes ``Options`` (a pydantic model of its
settings), ``identity(options)`` (static: what shapes its answers; never loads a model or opens a connection),
``create(options) -> Backend``, ``capacity(options)`` (static: how many requests one built backend runs at once,
what a generation round holds by default), and optionally ``alternatives(options, request)`` (the wire forms it
may send a request in, each with its own journal key) and ``gpus(options)`` (GPUs one built backend needs).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

BACKENDS: dict[str, str] = {
    "openai": "pipeline.models.openai_backend",
    "transformers": "pipeline.models.transformers_backend",
    "vllm": "pipeline.models.vllm_backend",
    "test": "pipeline.models.testing",
}

# Settings common to every backend; the rest of a model definition belongs to the backend's Options.
COMMON_KEYS = ("backend", "price", "budget", "executor", "ray")


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


class RayOptions(BaseModel):
    """Where ``executor: ray`` runs a model's requests (see pipeline/run/executors/ray.py)."""

    model_config = ConfigDict(extra="forbid")

    address: str | None = None  # a cluster to join; else $RAY_ADDRESS; else a local instance on this machine
    workers: int = Field(1, ge=1)  # actors, each building the backend once for the whole run
    batch_size: int | None = Field(None, ge=1)  # requests per task sent to an actor (default: its capacity)
    num_gpus_per_worker: float | None = Field(None, ge=0)  # default: what the backend needs (vLLM: its TP size)
    num_cpus_per_worker: float = Field(1, ge=0)
    # vLLM on GPU workers through Ray Data's own LLM processor (ray.data.llm) instead of seedtune's vllm backend.
    ray_data_llm: bool = False


def backend_module(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise KeyError(name)
    return importlib.import_module(BACKENDS[name])


def backend_options(name: str, options: dict[str, Any]) -> BaseModel:
    """Validate a backend's own options (raises pydantic.ValidationError)."""
    return backend_module(name).Options.model_validate(options)


def model_identity(name: str, options: BaseModel) -> dict[str, Any]:
    return backend_module(name).identity(options)


def capacity(name: str, options: BaseModel) -> int:
    """Requests one built backend runs at once (static: no model loaded, no connection opened)."""
    return int(backend_module(name).capacity(options))


def worker_gpus(name: str, options: BaseModel) -> float:
    """GPUs one built backend needs (0 for a backend on the CPU or behind a server)."""
    module = backend_module(name)
    return float(module.gpus(options)) if hasattr(module, "gpus") else 0.0


def request_forms(name: str, options: BaseModel, request: Any) -> list[Any]:
    """The request in each wire form the backend may send it (the first is its preference)."""
    module = backend_module(name)
    return list(module.alternatives(options, request)) if hasattr(module, "alternatives") else [request]
