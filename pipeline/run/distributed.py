"""Several processes for SFT: ``torchrun --nproc-per-node N -m pipeline run CONFIG`` or
``accelerate launch -m pipeline run CONFIG`` (``WORLD_SIZE`` > 1).

Rank 0 is seedtune as usual: it alone holds the run lock and runs every stage's bookkeeping (stage folders,
manifest, journal, promotion, cards, evaluation) and every stage that is not training. The other ranks are
*followers*: they compute no earlier stage; they wait until rank 0 starts a training stage, receive what that stage
needs (its name, kind, options, seed, input folders and checkpoint folder, broadcast as one object), run the same
stage function so that every rank trains (transformers' Trainer shards the data and all-reduces the gradients over
the process group set up here: gloo on CPU, NCCL for CUDA tensors), and wait for the next message. When rank 0's
run ends it broadcasts its exit code; every follower exits with it.

A training stage that fails on any rank ends every rank at once, non-zero, with that rank's error line: the other
ranks are inside the stage's collectives, which can never complete. A failing follower writes its line to
``<run_dir>/.ranks/<stage>.failed-rank<N>`` and exits; its peers' collectives break as its connections close (and
torchrun stops the others); rank 0 records the follower's line as the stage's error and exits too. A failing
rank 0 records its own error and exits without the goodbye. A stage that succeeds ends with every rank reporting
how its part ended.

Two bounds, both settable: ``SEEDTUNE_RANK_WAIT_HOURS`` (default 72) is how long a follower waits for rank 0 to
hand over the next training stage or the end (generation before the first one can take long; these messages go
over a gloo group of their own); ``SEEDTUNE_RANK_TIMEOUT_MINUTES`` (default 60) bounds every collective inside a
training stage, the followers' wait while rank 0 evaluates the base model included.

A follower writes its stage outputs to ``<run_dir>/.ranks/<stage>-rank<N>/``, emptied before and removed after the
stage (a killed run's is emptied by the next): only rank 0's outputs are kept.
Checkpoints are written by the Trainer on rank 0 into the shared scratch folder (each rank adds its own RNG
state), so a run killed mid-training and started again under the same launcher resumes from the last checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.models.base import error_line
from pipeline.stages import stage_module
from pipeline.stages.context import StageContext, StageInput

log = logging.getLogger(__name__)

# Stage kinds that every rank runs (the others run on rank 0 alone).
RANKED_KINDS = ("sft",)
LEAVE = timedelta(minutes=5)  # how long the ranks wait for each other at the end
NOTE_WAIT_S = 3.0  # how long rank 0, its collective broken, looks for the failing follower's line


class RankFailed(Exception):
    """A training stage failed on one rank; every rank ends now with ``code`` and this line."""

    def __init__(self, line: str, code: int = 1):
        super().__init__(line)
        self.code = code


def _bound(name: str, default: float, unit: str) -> timedelta:
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw.strip() else default
    except ValueError:
        raise UserError(f"{name}={raw!r}: not a number of {unit}") from None
    if value <= 0:
        raise UserError(f"{name}={raw!r}: must be above 0 {unit}")
    return timedelta(**{unit: value})


def wait_bound() -> timedelta:
    """How long a follower waits for rank 0's next message (a training stage, or the end)."""
    return _bound("SEEDTUNE_RANK_WAIT_HOURS", 72.0, "hours")


def collective_bound() -> timedelta:
    """How long any collective of a training stage waits for the other ranks."""
    return _bound("SEEDTUNE_RANK_TIMEOUT_MINUTES", 60.0, "minutes")


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
            dist.init_process_group(backend="cpu:gloo,cuda:nccl", timeout=collective_bound())
        else:
            dist.init_process_group(backend="gloo", timeout=collective_bound())
    return dist


@functools.cache
def _control() -> Any:
    """The gloo group of rank 0's messages (stages, end, how a stage ended), with the long wait. Made once per
    process, like the default group it sits beside; every rank makes it at the start of ``run_ranks``."""
    return _group().new_group(backend="gloo", timeout=wait_bound())


def _broadcast(message: dict[str, Any] | None = None) -> dict[str, Any]:
    box = [message]
    _group().broadcast_object_list(box, src=0, group=_control())
    return box[0]  # type: ignore[return-value]


def run_ranks(table: dict[str, str], lead: Callable[[], int]) -> int:
    """The ``run`` command on every rank: rank 0 runs ``lead`` (the usual run), the others follow it. A
    :class:`RankFailed` leaves at once, without the goodbye the other ranks could never answer."""
    dist = _group()
    _control()
    if rank() != 0:
        return follow(table)
    code, failed = 1, False
    try:
        code = lead()
        return code
    except RankFailed:
        failed = True
        raise
    finally:
        if not failed:
            _broadcast({"exit": code})
            _leave(dist)


def _leave(dist: Any) -> None:
    """Leave the process group, every rank together. The Trainer's DDP wrapper, kept alive by reference cycles,
    holds the group and its gloo threads: collected now, while the interpreter is whole (freed during its
    shutdown instead, a rank can abort with "terminate called without an active exception")."""
    gc.collect()
    # no rank tears down the group while another still uses it
    dist.monitored_barrier(group=_control(), timeout=LEAVE)
    dist.destroy_process_group()


def _notes(run_dir: Path, stage: str) -> list[Path]:
    return sorted((Path(run_dir) / ".ranks").glob(f"{stage}.failed-rank*"))


def _follower_failure(run_dir: Path, stage: str, wait_s: float) -> str | None:
    """The first failing follower's line, looked for up to ``wait_s`` seconds (it is written before that rank
    exits, so before its peers' collectives break)."""
    deadline = time.monotonic() + wait_s
    while True:
        notes = _notes(run_dir, stage)
        if notes:
            return notes[0].read_text(encoding="utf-8").strip()
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


def _stage_end() -> None:
    """Every rank waits here at the end of a training stage it finished (rank 0 after its evaluation of the
    tuned model); it raises where a rank left instead (a failed follower has exited)."""
    _group().barrier(group=_control())


@contextlib.contextmanager
def lead_stage(ctx: StageContext) -> Iterator[None]:
    """On rank 0, around a stage: hand a training stage to the followers, and end every rank if it fails on
    any of them (nothing in one process, or for a stage that is not training)."""
    if world_size() <= 1 or ctx.kind not in RANKED_KINDS:
        yield
        return
    for note in _notes(ctx.run_dir, ctx.name):  # an earlier run's
        note.unlink(missing_ok=True)
    log.info("stage %s: training on %d processes", ctx.name, world_size())
    _broadcast({"stage": {"name": ctx.name, "kind": ctx.kind, "options": ctx.options.model_dump(mode="json"),
                          "seed": ctx.seed, "run_dir": str(ctx.run_dir), "scratch_dir": str(ctx.scratch_dir),
                          "inputs": [[i.name, i.kind, str(i.dir)] for i in ctx.inputs]}})
    try:
        yield
    except Exception as e:
        line = _follower_failure(ctx.run_dir, ctx.name, NOTE_WAIT_S)
        raise RankFailed(line or _failed_line(ctx.name, e), 2 if isinstance(e, UserError) and not line else 1) from e
    except KeyboardInterrupt as e:  # torchrun stopping this rank because a follower failed
        line = _follower_failure(ctx.run_dir, ctx.name, NOTE_WAIT_S)
        if line is None:
            raise
        raise RankFailed(line) from e
    try:
        _stage_end()
    except Exception as e:  # noqa: BLE001 - a follower gone after the stage's last collective
        raise RankFailed(_follower_failure(ctx.run_dir, ctx.name, NOTE_WAIT_S)
                         or f"rank 0: stage {ctx.name}: a rank left before the stage ended ({error_line(e)})") from e


def _failed_line(stage: str, e: BaseException) -> str:
    what = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {error_line(e)}"
    return f"rank {rank()}: stage {stage} failed: {what}"


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
    """Run a training stage on this rank. A failure leaves a note for rank 0 and raises :class:`RankFailed`:
    the other ranks wait in this stage's collectives, which only this process ending can break."""
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
    except Exception as e:
        line = _failed_line(s["name"], e)
        note = out.parent / f"{s['name']}.failed-rank{rank()}"
        with contextlib.suppress(OSError):
            note.write_text(line + "\n", encoding="utf-8")
        raise RankFailed(line, 2 if isinstance(e, UserError) else 1) from None
    finally:
        ctx.close()
        shutil.rmtree(out, ignore_errors=True)
        with contextlib.suppress(OSError):  # another follower's folder (or a note) may still be there
            out.parent.rmdir()
    try:
        _stage_end()
    except Exception as e:  # noqa: BLE001 - rank 0 or another rank gone after the stage's last collective
        raise RankFailed(f"rank {rank()}: stage {s['name']}: a rank left before the stage ended "
                         f"({error_line(e)})") from None
