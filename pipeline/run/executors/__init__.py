"""Where a model's requests run: ``executor: local`` (the backend in this process, the default) or
``executor: ray`` (Ray Data actors on this machine or a cluster; see :mod:`pipeline.run.executors.ray`).

An executor is itself a backend: the journaled client sees the same ``generate(requests, on_result)`` and
commits every result it reports, whichever process produced it.
"""

from __future__ import annotations

from typing import Any

from pipeline.models.base import Backend


def executor_for(model_spec: Any, backend: Backend) -> Backend:
    """``backend`` unchanged for ``executor: local``; wrapped to run on Ray Data for ``executor: ray``."""
    if getattr(model_spec, "executor", "local") != "ray":
        return backend
    from pipeline.run.executors.ray import RayExecutor

    return RayExecutor(model_spec.backend, model_spec.options, model_spec.ray, backend)
