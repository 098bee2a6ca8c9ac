"""Several processes for SFT: ``torchrun --nproc-per-node N -m pipeline run CONFIG`` or
``accelerate launch -m pipeline run CONFIG`` (``WORLD_SIZE`` > 1).

Rank 0 is seedtune as usual: it alone holds the run lock and runs every stage's bookkeeping (stage folders,
manifest, journal, promotion, cards, evaluation) and every stage that is not training. The other ranks are
*followers*: they compute no earlier stage; they wait until rank 0 starts a training stage, receive what that stage
needs (its name, kind, options, seed, input folders and checkpoint folder, broadcast as one object), run the same
stage function so that every rank trains (transformers' Trainer shards the data and all-reduces the gradients over
the process group set up here: gloo on CPU, NCCL for CUDA tensors), and wait for the next message. When rank 0's
run ends it broadcasts its exit code; every follower exits with it.

A follower writes its stage outputs to ``<run_dir>/.ranks/<stage>-rank<N>/``, emptied before and removed after the
stage (a killed run's is emptied by the next): only rank 0's outputs are kept.
Checkpoints are written by the Trainer on rank 0 into the shared scratch folder (each rank adds its own RNG
state), so a run killed mid-training and started again under the same launcher resumes from the last checkpoint.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from pipeline.stages import stage_module
from pipeline.stages.context import StageContext, StageInput

log = logging.getLogger(__name__)

# Stage kinds that every rank runs (the others run on rank 0 alone).
RANKED_KINDS = ("sft",)
# How long a follower waits for rank 0 (generation before the first training stage can take long).
WAIT = timedelta(hours=float(os.environ.get("SEEDTUNE_RANK_WAIT_HOURS", "72")))
LEAVE = timedelta(minutes=5)  # how long the ranks wait for each other at the end


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _group() -> Any:
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend="cpu:gloo,cuda:nccl", timeout=WAIT)
        else:
            dist.init_process_group(backend="gloo", timeout=WAIT)
    return dist


def _broadcast(message: dict[str, Any] | None = None) -> dict[str, Any]:
    dist = _group()
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def run_ranks(table: dict[str, str], lead: Callable[[], int]) -> int:
    """The ``run`` command on every rank: rank 0 runs ``lead`` (the usual run), the others follow it."""
    dist = _group()
    if rank() != 0:
        return follow(table)
    code = 1
    try:
        code = lead()
        return code
    finally:
        _broadcast({"exit": code})
        _leave(dist)


def _leave(dist: Any) -> None:
    """Leave the process group, every rank together. The Trainer's DDP wrapper, kept alive by reference cycles,
    holds the group and its gloo threads: collected now, while the interpreter is whole (freed during its
    shutdown instead, a rank can abort with "terminate called without an active exception")."""
    gc.collect()
    # no rank tears down the group while another still uses it (gloo can time the wait; NCCL cannot)
    if dist.get_backend() == "gloo":
        dist.monitored_barrier(timeout=LEAVE)
    else:
        dist.barrier()
    dist.destroy_process_group()


def lead_stage(ctx: StageContext) -> None:
    """On rank 0, before a stage runs: hand a training stage to the followers (nothing in one process)."""
    if world_size() <= 1 or ctx.kind not in RANKED_KINDS:
        return
    log.info("stage %s: training on %d processes", ctx.name, world_size())
    _broadcast({"stage": {"name": ctx.name, "kind": ctx.kind, "options": ctx.options.model_dump(mode="json"),
                          "seed": ctx.seed, "run_dir": str(ctx.run_dir), "scratch_dir": str(ctx.scratch_dir),
                          "inputs": [[i.name, i.kind, str(i.dir)] for i in ctx.inputs]}})


def follow(table: dict[str, str]) -> int:
    """A follower: run each training stage rank 0 hands over; return rank 0's exit code."""
    dist = _group()
    while True:
        message = _broadcast()
        if "exit" in message:
            _leave(dist)
            return int(message["exit"])
        _follow_stage(message["stage"], table)


def _no_model(name: str) -> Any:
    raise RuntimeError(f"model '{name}': only rank 0 sends model requests")


def _follow_stage(s: dict[str, Any], table: dict[str, str]) -> None:
    module = stage_module(s["kind"], table)
    options = module.Options.model_validate(s["options"])
    out = Path(s["run_dir"]) / ".ranks" / f"{s['name']}-rank{rank()}"  # emptied before and removed after
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    ctx = StageContext(name=s["name"], kind=s["kind"], options=options, seed=s["seed"], run_dir=Path(s["run_dir"]),
                       out_dir=out, scratch_dir=Path(s["scratch_dir"]),
                       inputs=[StageInput(n, k, Path(d)) for n, k, d in s["inputs"]], get_model=_no_model,
                       log=logging.getLogger(f"pipeline.stages.{s['kind']}"), show_progress=False)
    try:
        module.run(ctx)
    except Exception as e:  # noqa: BLE001 - rank 0 reports the stage's failure; this rank waits for its end
        log.warning("rank %d: stage %s failed: %s", rank(), s["name"], e)
    finally:
        ctx.close()
        shutil.rmtree(out, ignore_errors=True)
        with contextlib.suppress(OSError):  # another follower's folder may still be there
            out.parent.rmdir()
