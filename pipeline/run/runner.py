"""The staged runner: fingerprints, exact resume, backups, manifest.

Layout of a run directory::

    manifest.json       the config as given (no secrets), each stage's state and numbers, package versions
    journal.sqlite      every model answer received (WAL), keyed by request
    seedtune.log        the log
    <stage>/            a complete stage: records.jsonl, rejected.jsonl, _stage.json, other outputs
    .partial/<stage>/   the stage being computed (emptied when an attempt starts)
    .scratch/<stage>/   kept across attempts of the same fingerprint (training checkpoints)
    .backup/<stage>/<fingerprint>/   earlier outputs, restored when the options change back

A stage's fingerprint hashes its kind and options, the content of every file it declares (templates, data),
the identity of each model it calls, the digests of all earlier stages' outputs, the run seed and the
seedtune version. A complete stage whose fingerprint is unchanged is skipped; a changed one is recomputed
(its answered model requests still come from the journal), and so is everything downstream of it whose
inputs changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.config import Config, StageSpec, stage_models
from pipeline.errors import UserError
from pipeline.models import backend_module
from pipeline.models.base import Backend, BackendUnavailable, BudgetExceeded
from pipeline.run.client import JournaledClient
from pipeline.run.executors import executor_for
from pipeline.run.journal import Journal
from pipeline.run.manifest import now_iso, package_versions, read_manifest, write_manifest
from pipeline.stages import stage_module
from pipeline.stages.context import StageContext, StageInput, StageStats

log = logging.getLogger(__name__)

STAGE_FILE = "_stage.json"
JOURNAL = "journal.sqlite"
LOG_FILE = "seedtune.log"


class Interrupted(Exception):
    def __init__(self, stage: str):
        super().__init__(stage)
        self.stage = stage


class StageStopped(Exception):
    """A stage stopped cleanly before finishing (its budget): the run can be continued."""


@dataclass
class RunOptions:
    fresh: bool = False
    until: str | None = None
    from_stage: str | None = None
    show_progress: bool = True


@dataclass
class StageOutcome:
    name: str
    kind: str
    state: str  # cached | restored | complete | complete_with_failures | failed | interrupted | budget_stopped
    stats: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0
    dir: Path | None = None


Events = Callable[[str, dict[str, Any]], None]


# ---- hashing ------------------------------------------------------------------------------------------

def _sha_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dir_digest(path: Path) -> str:
    """Content digest of a stage folder (every file but _stage.json)."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file() and p.name != STAGE_FILE):
        h.update(str(f.relative_to(path)).encode() + b"\0" + _sha_file(f).encode() + b"\0")
    return h.hexdigest()


def stage_dependencies(module: Any, options: Any) -> dict[str, str]:
    deps = module.dependencies(options) if hasattr(module, "dependencies") else []
    out = {}
    for p in deps:
        p = Path(p)
        out[str(p)] = _sha_file(p) if p.is_file() else ("dir:" + dir_digest(p) if p.is_dir() else "missing")
    return out


def fingerprint(spec: StageSpec, module: Any, seed: int, identities: dict[str, Any],
                upstream: list[tuple[str, str]]) -> str:
    payload = {
        "seedtune": __version__,
        "kind": spec.kind,
        "options": spec.options.model_dump(mode="json"),
        "files": stage_dependencies(module, spec.options),
        "models": identities,
        "upstream": upstream,
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def read_stage_file(folder: Path) -> dict[str, Any] | None:
    p = folder / STAGE_FILE
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


# ---- the runner ---------------------------------------------------------------------------------------

class Runner:
    def __init__(self, config: Config, table: dict[str, str], options: RunOptions | None = None,
                 events: Events | None = None):
        self.config = config
        self.table = table
        self.options = options or RunOptions()
        self.events = events or (lambda kind, data: None)
        self.run_dir = Path(config.run_dir)
        self._backends: dict[str, Backend] = {}
        self.manifest: dict[str, Any] = {}
        names = [s.name for s in config.stages]
        for opt, val in (("--until", self.options.until), ("--from", self.options.from_stage)):
            if val is not None and val not in names:
                raise UserError(f"{opt} {val}: no such stage (stages: {', '.join(names)})")

    # -- models
    def backend(self, name: str) -> Backend:
        if name not in self._backends:
            spec = self.config.models[name]
            self._backends[name] = executor_for(spec, backend_module(spec.backend).create(spec.options))
        return self._backends[name]

    def identities(self, spec: StageSpec) -> dict[str, Any]:
        module = stage_module(spec.kind, self.table)
        return {m: self.backend(m).identity() for m in stage_models(module, spec.options)}

    def close(self) -> None:
        for b in self._backends.values():
            try:
                b.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                log.debug("closing backend failed", exc_info=True)
        self._backends.clear()

    # -- planning
    def plan(self) -> list[dict[str, Any]]:
        """What a run would do now, without doing it: cached / restore / run."""
        rows, upstream, dirty = [], [], False
        for spec in self.config.stages:
            module = stage_module(spec.kind, self.table)
            row = {"name": spec.name, "kind": spec.kind}
            if dirty:
                row["action"] = "run"
                rows.append(row)
                continue
            fp = fingerprint(spec, module, self.config.seed, self.identities(spec), upstream)
            info = read_stage_file(self.run_dir / spec.name)
            backup = read_stage_file(self.run_dir / ".backup" / spec.name / fp)
            if info and info.get("fingerprint") == fp and info.get("state") == "complete":
                row["action"], digest = "cached", info["digest"]
            elif backup and backup.get("state") == "complete":
                row["action"], digest = "restore", backup["digest"]
            else:
                row["action"], digest, dirty = "run", None, True
            row["fingerprint"] = fp
            if digest:
                upstream = upstream + [(spec.name, digest)]
            rows.append(row)
        return rows

    # -- running
    def run(self) -> list[StageOutcome]:
        if self.options.fresh and self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.run_dir / LOG_FILE, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger("pipeline")
        root.addHandler(handler)
        if root.level == logging.NOTSET or root.level > logging.INFO:
            root.setLevel(logging.INFO)
        journal = Journal(self.run_dir / JOURNAL)
        try:
            return self._run(journal)
        finally:
            journal.close()
            self.close()
            root.removeHandler(handler)
            handler.close()

    def _init_manifest(self) -> None:
        old = read_manifest(self.run_dir) or {}
        self.manifest = {
            "seedtune_version": __version__,
            "name": self.config.name,
            "config_path": str(self.config.path),
            "config": self.config.as_given,
            "config_hash": self.config.hash,
            "overrides": self.config.overrides,
            "seed": self.config.seed,
            "packages": package_versions(),
            "stages": {s.name: {"kind": s.kind, **(old.get("stages", {}).get(s.name, {}))}
                       for s in self.config.stages},
        }
        self.manifest["stages"] = {s.name: self.manifest["stages"][s.name] for s in self.config.stages}
        write_manifest(self.run_dir, self.manifest)

    def _set(self, name: str, **fields: Any) -> None:
        self.manifest["stages"][name].update(fields)
        write_manifest(self.run_dir, self.manifest)

    def _run(self, journal: Journal) -> list[StageOutcome]:
        self._init_manifest()
        outcomes: list[StageOutcome] = []
        upstream: list[tuple[str, str]] = []
        inputs: list[StageInput] = []
        names = [s.name for s in self.config.stages]
        forced_from = names.index(self.options.from_stage) if self.options.from_stage else len(names)
        for idx, spec in enumerate(self.config.stages):
            module = stage_module(spec.kind, self.table)
            try:
                identities = self.identities(spec)
            except BackendUnavailable as e:
                raise UserError(str(e)) from None
            fp = fingerprint(spec, module, self.config.seed, identities, upstream)
            outcome = self._stage(spec, module, fp, inputs, journal, force=idx >= forced_from)
            outcomes.append(outcome)
            info = read_stage_file(self.run_dir / spec.name) or {}
            upstream = upstream + [(spec.name, info.get("digest", ""))]
            inputs = inputs + [StageInput(spec.name, spec.kind, self.run_dir / spec.name)]
            if self.options.until == spec.name:
                break
        return outcomes

    def _stage(self, spec: StageSpec, module: Any, fp: str, inputs: list[StageInput], journal: Journal,
               force: bool) -> StageOutcome:
        final = self.run_dir / spec.name
        info = read_stage_file(final)
        if not force and info and info.get("fingerprint") == fp and info.get("state") == "complete":
            self._set(spec.name, state="cached", fingerprint=fp, **_summary(info))
            self.events("stage_cached", {"name": spec.name, "kind": spec.kind, "info": info})
            return StageOutcome(spec.name, spec.kind, "cached", info.get("stats", {}), 0.0, final)
        backup = self.run_dir / ".backup" / spec.name / fp
        binfo = read_stage_file(backup)
        if not force and binfo and binfo.get("state") == "complete":
            self._promote(spec.name, backup)
            self._set(spec.name, state="restored", fingerprint=fp, **_summary(binfo))
            self.events("stage_restored", {"name": spec.name, "kind": spec.kind, "info": binfo})
            return StageOutcome(spec.name, spec.kind, "restored", binfo.get("stats", {}), 0.0, final)
        return self._compute(spec, module, fp, inputs, journal)

    def _promote(self, name: str, source: Path) -> None:
        """Move ``source`` into place as the stage's outputs; the current outputs go to the backup folder."""
        final = self.run_dir / name
        if final.exists():
            old = read_stage_file(final) or {}
            dest = self.run_dir / ".backup" / name / old.get("fingerprint", f"unknown-{time.time_ns()}")
            if dest.exists():
                shutil.rmtree(dest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            final.rename(dest)
        source.rename(final)

    def _compute(self, spec: StageSpec, module: Any, fp: str, inputs: list[StageInput],
                 journal: Journal) -> StageOutcome:
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

        stats = StageStats()
        clients: dict[str, JournaledClient] = {}

        def get_model(name: str) -> JournaledClient:
            if name not in self.config.models:
                raise UserError(f"stage '{spec.name}': no model named '{name}'")
            if name not in clients:
                m = self.config.models[name]
                clients[name] = JournaledClient(name, self.backend(name), journal, spec.name, stats, m.price,
                                                m.budget, self.options.show_progress)
            return clients[name]

        ctx = StageContext(name=spec.name, kind=spec.kind, options=spec.options, seed=self.config.seed,
                           run_dir=self.run_dir, out_dir=partial, scratch_dir=scratch, inputs=list(inputs),
                           get_model=get_model, log=logging.getLogger(f"pipeline.stages.{spec.kind}"),
                           stats=stats, show_progress=self.options.show_progress)
        started = time.time()
        self._set(spec.name, state="running", fingerprint=fp, started=now_iso(started), ended=None)
        self.events("stage_start", {"name": spec.name, "kind": spec.kind})
        log.info("stage %s (%s) started, fingerprint %s", spec.name, spec.kind, fp)

        def finish(state: str, **extra: Any) -> None:
            ended = time.time()
            failures = journal.open_failures(spec.name)
            self._set(spec.name, state=state, ended=now_iso(ended), elapsed_s=round(ended - started, 3),
                      **stats.as_dict(), open_failures=len(failures),
                      failure_samples=[{k: f[k] for k in ("kind", "error", "runs")} for f in failures[:20]],
                      **extra)

        try:
            module.run(ctx)
        except KeyboardInterrupt:
            ctx.close()
            finish("interrupted")
            self.events("stage_end", {"name": spec.name, "state": "interrupted"})
            raise Interrupted(spec.name) from None
        except BudgetExceeded as e:
            ctx.close()
            finish("budget_stopped", error=str(e))
            self.events("stage_end", {"name": spec.name, "state": "budget_stopped"})
            raise StageStopped(f"{e}. Answers so far are kept: raise the budget and run again to continue.") from None
        except UserError as e:
            ctx.close()
            finish("failed", error=str(e))
            raise
        except Exception as e:
            ctx.close()
            finish("failed", error=f"{type(e).__name__}: {e}")
            raise
        ctx.close()
        open_failures = journal.open_failures(spec.name)
        state = "complete_with_failures" if stats.failures or open_failures else "complete"
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
            "started": info.get("started"), "ended": info.get("ended")}
