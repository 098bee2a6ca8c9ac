"""Joining or starting Ray, shared by everything that runs on it (model executors, data stages).

No ``address`` (and no ``RAY_ADDRESS``): a local Ray instance on this machine's CPUs is started and the caller
that started it stops it; with one, the cluster is joined and left running. A caller that finds Ray already
initialised (another part of the same run started it) uses that instance and never stops it.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from pipeline.errors import MissingExtra

log = logging.getLogger(__name__)


def import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401 - the extra is ray[data]
    except ImportError:
        raise MissingExtra("executor: ray", "ray") from None
    return ray


def connect(address: str | None, cpus: float = 2, gpus: float = 0) -> tuple[Any, bool]:
    """``(ray, started_here)``: Ray joined at ``address`` (else ``$RAY_ADDRESS``), or a local instance with
    ``cpus`` CPUs and ``gpus`` GPUs started; ``started_here`` says whether the caller must :func:`stop` it."""
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        if address:
            ray.init(address=address, **quiet)
        else:
            n = max(2, math.ceil(cpus))
            ray.init(num_cpus=n, num_gpus=math.ceil(gpus) or None, **quiet)
            started = True
            log.info("started a local Ray instance (%d CPUs)", n)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False  # results come back as they complete
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return ray, started


def stop(ray: Any) -> None:
    """Stop the local instance this process started."""
    ray.shutdown()
    log.info("stopped the local Ray instance")
