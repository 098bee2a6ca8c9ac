"""The staged runner: one decision per stage (cached, restored or run), exact resume, backups, manifest.

Layout of a run directory (everything in it that seedtune writes; nothing else is touched)::

    manifest.json       the config as given (no secrets), each stage's state and numbers, package versions,
                        each model's executor counters (Ray actors started, calls)
    journal.sqlite      every model answer received (WAL), keyed by request; failures apart; small state
    seedtune.log        the log
    .lock               held by the run in progress (a second run on the folder stops at once)
    <stage>/            a complete stage: records.jsonl, rejected.jsonl, _stage.json, other outputs
    .partial/<stage>/   the stage being computed (emptied when an attempt starts)
    .scratch/<stage>/   kept across attempts of the same fingerprint (training checkpoints)
    .backup/<stage>/<fingerprint>/   earlier outputs, restored when the options change back

A stage's fingerprint is described in :mod:`pipeline.run.identity`. A complete stage whose fingerprint is
unchanged is skipped; a changed one is recomputed (its answered model requests still come from the journal),
and so is everything downstream of it whose inputs changed. A stage is complete when none of its requests
failed transiently; permanent failures are terminal and keep it cacheable.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.config import Config, StageSpec
from pipeline.errors import UserError
from pipeline.hashing import strip_credentials_in_text
from pipeline.models import backend_module
from pipeline.models.base import BudgetExceeded
from pipeline.run.client import JournaledClient, JournalStore
from pipeline.run.distributed import lead_stage
from pipeline.run.executors import executor_for
from pipeline.run.identity import STAGE_FILE, dir_digest, fingerprint
from pipeline.run.journal import Journal
from pipeline.run.models import RunModels
from pipeline.run.manifest import now_iso, package_versions, read_manifest, write_manifest
from pipeline.run.revisions import pin_revisions
from pipeline.run.rundir import RunLock, ensure_owned, fresh_start
from pipeline.stages import stage_module
from pipeline.stages.context import StageContext, StageInput, StageStats, top_rules

log = logging.getLogger(__name__)

JOURNAL = "journal.sqlite"
LOG_FILE = "seedtune.log"


class Interrupted(Exception):
    def __init__(self, stage: str):
        super().__init__(stage)
        self.stage = stage


class StageStopped(Exception):
    """A stage stopped cleanly before finishing (its budget): the run can be continued."""


class AllRequestsFailed(Exception):
    """Every request of a stage failed: the run stops there rather than carry an empty dataset on."""


class RemovedEverything(UserError):
    """A data stage dropped every record it read: the run stops there rather than carry an empty dataset on."""


DATA_KINDS = ("seeds", "filter", "dedup", "judge", "decontaminate")  # stages that keep or drop what they read


def check_not_emptied(name: str, kind: str, stats: dict[str, Any], folder: Path) -> None:
    """Stop the run when a data stage kept none of the records it read, naming the rule that dropped most."""
    if kind not in DATA_KINDS or not stats.get("rows_in") or stats.get("rows_out"):
        return
    rules = top_rules(stats.get("rejected") or {})
    top = ", ".join(f"{r} {n:,}" for r, n in rules[:3]) or "no rule"
    raise RemovedEverything(f"stage '{name}' removed all {stats['rows_in']:,} records (most by {top}); the run "
                            f"stops here. The drops and their reasons: {folder / 'rejected.jsonl'}")


@dataclass
class RunOptions:
    fresh: bool = False
    until: str | None = None
    from_stage: str | None = None
    show_progress: bool = True
    retry_failed: bool = False


@dataclass
class StageOutcome:
    name: str
    kind: str
    state: str  # cached | restored | complete | complete_with_failures | failed | interrupted | budget_stopped
    stats: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0
    dir: Path | None = None


Events = Callable[[str, dict[str, Any]], None]


def read_stage_file(folder: Path) -> dict[str, Any] | None:
    p = folder / STAGE_FILE
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def decide(run_dir: Path, name: str, fp: str, force: bool = False) -> tuple[str, dict[str, Any] | None]:
    """The one decision for a stage: ("cached", its info), ("restore", the backup's info) or ("run", None)."""
    if force:
        return "run", None
    info = read_stage_file(run_dir / name)
    if info and info.get("fingerprint") == fp and info.get("state") == "complete":
        return "cached", info
    backup = read_stage_file(run_dir / ".backup" / name / fp)
    if backup and backup.get("state") == "complete":
        return "restore", backup
    return "run", None


class _NoSecretsInLog(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = strip_credentials_in_text(record.getMessage())
        record.args = None
        return True


class Runner:
    def __init__(self, config: Config, table: dict[str, str], options: RunOptions | None = None,
                 events: Events | None = None):
        self.config = config
        self.table = table
        self.options = options or RunOptions()
        self.events = events or (lambda kind, data: None)
        self.run_dir = Path(config.run_dir)
        self.manifest: dict[str, Any] = {}
        self.unresolved: dict[str, str] = {}  # stage name -> why a Hub model it needs has no commit
        names = [s.name for s in config.stages]
        for opt, val in (("--until", self.options.until), ("--from", self.options.from_stage)):
            if val is not None and val not in names:
                raise UserError(f"{opt} {val}: no such stage (stages: {', '.join(names)})")

    # -- models: built when a stage's client must send a request, kept for the run (see pipeline.run.models)
    def build_backend(self, name: str):
        spec = self.config.models[name]
        return executor_for(spec, backend_module(spec.backend).create(spec.options))

    # -- planning
    def plan(self) -> list[dict[str, Any]]:
        """What a run would do now, without doing it: the same decisions as :meth:`run`."""
        self.config = pin_revisions(self.config, self.table, self._pins()).config
        rows, upstream, dirty = [], [], False
        names = [s.name for s in self.config.stages]
        forced_from = names.index(self.options.from_stage) if self.options.from_stage else len(names)
        for idx, spec in enumerate(self.config.stages):
            module = stage_module(spec.kind, self.table)
            fp = fingerprint(self.config, spec, module, upstream)
            action, info = decide(self.run_dir, spec.name, fp, force=dirty or idx >= forced_from)
            rows.append({"name": spec.name, "kind": spec.kind, "action": action, "fingerprint": fp})
            if info is None:
                dirty = True  # its digest is not known before it runs: everything after it runs too
            else:
                upstream = upstream + [(spec.name, info["digest"])]
        return rows

    # -- running
    def run(self) -> list[StageOutcome]:
        if self.options.fresh:
            fresh_start(self.run_dir, self.config.path, [s.name for s in self.config.stages])
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with RunLock(self.run_dir):
            handler = logging.FileHandler(self.run_dir / LOG_FILE, encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            handler.addFilter(_NoSecretsInLog())
            root = logging.getLogger("pipeline")
            root.addHandler(handler)
            if root.level == logging.NOTSET or root.level > logging.INFO:
                root.setLevel(logging.INFO)
            journal = Journal(self.run_dir / JOURNAL)
            try:
                return self._run(journal)
            finally:
                journal.close()
                root.removeHandler(handler)
                handler.close()

    def _pins(self) -> dict[str, str]:
        """The Hub commits this run folder is pinned to (see :mod:`pipeline.run.revisions`)."""
        return (read_manifest(self.run_dir) or {}).get("revisions") or {}

    def _init_manifest(self) -> None:
        old = read_manifest(self.run_dir) or {}
        pinned = pin_revisions(self.config, self.table, old.get("revisions") or {})
        self.config, self.unresolved = pinned.config, pinned.unresolved
        self.manifest = {
            "seedtune_version": __version__,
            "name": self.config.name,
            "config_path": str(self.config.path),
            "config": self.config.as_given,
            "config_hash": self.config.hash,
            "overrides": self.config.overrides_redacted,
            "seed": self.config.seed,
            "packages": package_versions(),
            "revisions": pinned.revisions,
            "stages": {s.name: {"kind": s.kind, **(old.get("stages", {}).get(s.name, {}))}
                       for s in self.config.stages},
        }
        write_manifest(self.run_dir, self.manifest)

    def _set(self, name: str, **fields: Any) -> None:
        self.manifest["stages"][name].update(fields)
        write_manifest(self.run_dir, self.manifest)

    def _run(self, journal: Journal) -> list[StageOutcome]:
        self._init_manifest()
        outcomes: list[StageOutcome] = []
        models = RunModels(self.config, self.table, self.build_backend)
        try:
            return self._stages(journal, models, outcomes)
        finally:
            models.close()  # also on an interrupt or an error: engines, Ray actors and Ray itself never outlive it
            if models.stats:
                self.manifest["models"] = models.stats
                write_manifest(self.run_dir, self.manifest)

    def _stages(self, journal: Journal, models: RunModels, outcomes: list[StageOutcome]) -> list[StageOutcome]:
        upstream: list[tuple[str, str]] = []
        inputs: list[StageInput] = []
        names = [s.name for s in self.config.stages]
        forced_from = names.index(self.options.from_stage) if self.options.from_stage else len(names)
        for idx, spec in enumerate(self.config.stages):
            module = stage_module(spec.kind, self.table)
            fp = fingerprint(self.config, spec, module, upstream)
            action, info = decide(self.run_dir, spec.name, fp, force=idx >= forced_from)
            models.before_stage(idx)
            if action == "cached":
                outcome = self._cached(spec, fp, info or {})
            elif action == "restore":
                outcome = self._restore(spec, fp, info or {})
            else:
                if spec.name in self.unresolved:  # nothing is keyed under a commit not yet known
                    raise UserError(self.unresolved[spec.name])
                outcome = self._compute(spec, module, fp, inputs, journal, models)
            models.after_stage(idx)
            outcomes.append(outcome)
            info = read_stage_file(self.run_dir / spec.name) or {}
            upstream = upstream + [(spec.name, info.get("digest", ""))]
            inputs = inputs + [StageInput(spec.name, spec.kind, self.run_dir / spec.name)]
            st = outcome.stats
            check_not_emptied(spec.name, spec.kind, st, self.run_dir / spec.name)
            if action == "run" and st.get("failures") and not st.get("answers"):
                kinds = ", ".join(f"{k} {v}" for k, v in (st.get("failure_kinds") or {}).items())
                raise AllRequestsFailed(f"stage '{spec.name}': all {st['failures']} requests failed ({kinds}); "
                                        f"the run stops here. `seedtune status {self.run_dir}` lists the reasons")
            if self.options.until == spec.name:
                break
        return outcomes

    def _cached(self, spec: StageSpec, fp: str, info: dict[str, Any]) -> StageOutcome:
        self._set(spec.name, state="cached", fingerprint=fp, **_summary(info))
        self.events("stage_cached", {"name": spec.name, "kind": spec.kind, "info": info})
        return StageOutcome(spec.name, spec.kind, "cached", info.get("stats", {}), 0.0, self.run_dir / spec.name)

    def _restore(self, spec: StageSpec, fp: str, info: dict[str, Any]) -> StageOutcome:
        self._promote(spec.name, self.run_dir / ".backup" / spec.name / fp)
        self._set(spec.name, state="restored", fingerprint=fp, **_summary(info))
        self.events("stage_restored", {"name": spec.name, "kind": spec.kind, "info": info})
        return StageOutcome(spec.name, spec.kind, "restored", info.get("stats", {}), 0.0, self.run_dir / spec.name)

    def _promote(self, name: str, source: Path) -> None:
        """Move ``source`` into place as the stage's outputs; the current outputs go to the backup folder."""
        final = self.run_dir / name
        if final.exists():
            ensure_owned(final)
            old = read_stage_file(final) or {}
            dest = self.run_dir / ".backup" / name / old.get("fingerprint", f"unknown-{time.time_ns()}")
            if dest.exists():
                shutil.rmtree(dest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            final.rename(dest)
        source.rename(final)

    def _compute(self, spec: StageSpec, module: Any, fp: str, inputs: list[StageInput],
                 journal: Journal, models: RunModels) -> StageOutcome:
        final = self.run_dir / spec.name
        if final.exists():
            ensure_owned(final)  # before any work: a user's folder of that name is never moved
        partial = self.run_dir / ".partial" / spec.name
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        scratch = self.run_dir / ".scratch" / spec.name
        marker = scratch / ".fingerprint"
        if scratch.exists() and (not marker.exists() or marker.read_text() != fp):
            shutil.rmtree(scratch)
        scratch.mkdir(parents=True, exist_ok=True)
        marker.write_text(fp)

        stats = StageStats(judges_rows=spec.kind in DATA_KINDS)
        clients: dict[str, JournaledClient] = {}

        def get_model(name: str) -> JournaledClient:
            if name not in self.config.models:
                raise UserError(f"stage '{spec.name}': no model named '{name}'")
            if name not in clients:
                m = self.config.models[name]
                clients[name] = JournaledClient(
                    name, lambda: models.get(name), journal, spec.name, stats, m.price, m.budget,
                    self.options.show_progress, identity=backend_module(m.backend).identity(m.options),
                    backend_name=m.backend, options=m.options, retry_failed=self.options.retry_failed)
            return clients[name]

        ctx = StageContext(name=spec.name, kind=spec.kind, options=spec.options, seed=self.config.seed,
                           run_dir=self.run_dir, out_dir=partial, scratch_dir=scratch, inputs=list(inputs),
                           get_model=get_model, log=logging.getLogger(f"pipeline.stages.{spec.kind}"),
                           stats=stats, show_progress=self.options.show_progress,
                           store=JournalStore(journal, f"stage:{spec.name}"))
        started = time.time()
        self._set(spec.name, state="running", fingerprint=fp, started=now_iso(started), ended=None)
        self.events("stage_start", {"name": spec.name, "kind": spec.kind})
        log.info("stage %s (%s) started, fingerprint %s", spec.name, spec.kind, fp)

        def finish(state: str, **extra: Any) -> None:
            ctx.close()  # the models stay built for the run's later stages (see pipeline.run.models)
            ended = time.time()
            if stats.failures:
                log.warning("stage %s: %d requests failed (%s)", spec.name, stats.failures,
                            ", ".join(f"{k} {v}" for k, v in sorted(stats.failure_kinds.items())))
            self._set(spec.name, state=state, ended=now_iso(ended), elapsed_s=round(ended - started, 3),
                      **stats.as_dict(), open_failures=stats.failures - stats.failures_permanent, **extra)

        try:
            with lead_stage(ctx):  # a training stage under torchrun/accelerate: every rank trains it
                module.run(ctx)
        except KeyboardInterrupt:
            finish("interrupted")
            self.events("stage_end", {"name": spec.name, "state": "interrupted"})
            raise Interrupted(spec.name) from None
        except BudgetExceeded as e:
            finish("budget_stopped", error=str(e))
            self.events("stage_end", {"name": spec.name, "state": "budget_stopped"})
            raise StageStopped(f"{e}. Answers so far are kept: raise the budget and run again to continue.") from None
        except UserError as e:
            finish("failed", error=str(e))
            raise
        except Exception as e:
            finish("failed", error=f"{type(e).__name__}: {e}")
            raise
        transient = stats.failures - stats.failures_permanent
        state = "complete_with_failures" if transient else "complete"
        ctx.close()
        digest = dir_digest(partial)
        ended = time.time()
        info = {"name": spec.name, "kind": spec.kind, "fingerprint": fp, "state": state, "digest": digest,
                "started": now_iso(started), "ended": now_iso(ended), "elapsed_s": round(ended - started, 3),
                "stats": stats.as_dict()}
        (partial / STAGE_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        self._promote(spec.name, partial)
        shutil.rmtree(scratch, ignore_errors=True)
        finish(state, digest=digest)
        self.events("stage_end", {"name": spec.name, "kind": spec.kind, "state": state, "info": info})
        return StageOutcome(spec.name, spec.kind, state, info["stats"], ended - started, self.run_dir / spec.name)


def _summary(info: dict[str, Any]) -> dict[str, Any]:
    """Manifest fields of a complete stage taken from its _stage.json."""
    return {**info.get("stats", {}), "digest": info.get("digest"), "elapsed_s": info.get("elapsed_s"),
            "started": info.get("started"), "ended": info.get("ended"),
            "open_failures": 0, "error": None}
