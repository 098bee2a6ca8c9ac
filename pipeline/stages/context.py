"""What the runner hands a stage: its options, its inputs, journaled model clients, its output folder.

A stage module exposes:

* ``Options`` — a pydantic model (``extra="forbid"``) of the stage's settings;
* ``run(ctx: StageContext) -> None`` — the entry point; it writes its outputs under ``ctx.out_dir``;
* optionally ``dependencies(options) -> list[Path]`` — files whose *content* enters the stage's
  fingerprint (templates it renders, data files it reads);
* optionally ``models(options) -> list[str]`` — the model names it calls (default: ``options.model``
  when the options have such a field);
* optionally ``check(options) -> None`` — used by ``seedtune validate`` (e.g. render every template with
  a sample record); raise :class:`pipeline.errors.UserError` on a problem.

Stages never import the runner or the CLI.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel

from pipeline.models.base import ModelRequest, ModelResult, StateStore
from pipeline.records import Task, dumps, read_jsonl, write_jsonl

RECORDS_FILE = "records.jsonl"
REJECTED_FILE = "rejected.jsonl"

R = TypeVar("R", bound=BaseModel)


class ModelClient(Protocol):
    """A journaled model: answers already committed are returned without a request."""

    name: str

    def identity(self) -> dict[str, Any]: ...

    def key(self, request: ModelRequest) -> str:
        """The journal key of ``request`` (record it in provenance)."""

    def lookup(self, requests: Sequence[ModelRequest]) -> list[str]:
        """Per request, without sending: "answered", "failed", "terminal" or "new"."""

    def generate(self, requests: Sequence[ModelRequest], desc: str | None = None) -> list[ModelResult]:
        """Results in request order. Raises ``BudgetExceeded`` when the model's budget is spent."""

    def backend(self) -> Any:
        """The underlying backend (e.g. for a local model's tokenizer). Rarely needed."""


# A rule that only follows from others (every instance of a task dropped by instance rules) never names the
# cause of a stage's drops while another rule does.
DERIVED_RULES = ("no_instances_left",)


def top_rules(rejected: dict[str, int]) -> list[tuple[str, int]]:
    """Rules by the rows they dropped, most first; derived rules after the rest."""
    return sorted(rejected.items(), key=lambda kv: (kv[0] in DERIVED_RULES, -kv[1], kv[0]))


@dataclass
class StageStats:
    rows_in: int = 0
    rows_out: int = 0
    rejected: Counter = field(default_factory=Counter)  # rule -> count
    metrics: dict[str, Any] = field(default_factory=dict)  # stage-specific numbers for manifest/status
    # model traffic, filled in by the journaled client
    requests_sent: int = 0
    requests_cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0  # of every answer the stage used, earlier runs included
    cost_usd_this_run: float = 0.0
    answers: int = 0  # answers the stage used (journaled or new)
    failures: int = 0  # failed requests, permanent ones included
    failures_permanent: int = 0
    failure_kinds: Counter = field(default_factory=Counter)
    failure_samples: list = field(default_factory=list)  # the first few, with their reasons
    rejection_samples: dict = field(default_factory=dict)  # rule -> the first two drops {record, reason}
    # a stage that keeps or drops the records it reads (seeds, filter, dedup, judge, decontaminate); a generation
    # stage reads seeds and writes new records, so its rows in and out are no drop
    judges_rows: bool = False

    def drop_warning(self) -> dict[str, Any] | None:
        """Where the stage dropped more than half its rows: the share, the rule that dropped most and two of its
        drops (record, reason)."""
        if not self.judges_rows or not self.rows_in or self.rows_out * 2 >= self.rows_in or not self.rejected:
            return None
        rule, n = top_rules(self.rejected)[0]
        return {"dropped_share": round(1 - self.rows_out / self.rows_in, 4), "top_rule": rule, "top_rule_count": n,
                "examples": self.rejection_samples.get(rule, [])}

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "rejected": dict(sorted(self.rejected.items())),
            "rejected_total": sum(self.rejected.values()),
            "requests_sent": self.requests_sent,
            "requests_cached": self.requests_cached,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": round(self.cost_usd, 6),
            "cost_usd_this_run": round(self.cost_usd_this_run, 6),
            "answers": self.answers,
            "failures": self.failures,
            "failures_permanent": self.failures_permanent,
            "failure_kinds": dict(sorted(self.failure_kinds.items())),
            "failure_samples": self.failure_samples,
            "drop_warning": self.drop_warning(),
            "metrics": self.metrics,
        }


def _brief(record: BaseModel | dict[str, Any]) -> str:
    """A dropped record in one short line: its id and the start of its text."""
    rec = record.model_dump() if isinstance(record, BaseModel) else record
    rid = rec.get("id") or rec.get("task_id") or ""
    text = rec.get("instruction") or rec.get("text") or ""
    inp = rec.get("input") or ((rec.get("instances") or [{}])[0] or {}).get("input") or ""
    shown = " ".join(f"{text} | {inp}".split()) if inp else " ".join(str(text).split())
    return f"{rid}: {shown[:100]}{'…' if len(shown) > 100 else ''}" if rid else shown[:100]


@dataclass
class StageInput:
    name: str
    kind: str
    dir: Path


@dataclass
class StageContext:
    name: str
    kind: str
    options: Any  # the stage module's Options instance
    seed: int  # the run's seed
    run_dir: Path
    out_dir: Path  # this attempt's output folder; emptied when an attempt starts
    scratch_dir: Path  # kept across attempts with the same fingerprint (e.g. training checkpoints)
    inputs: list[StageInput]  # every earlier stage, in pipeline order
    get_model: Callable[[str], ModelClient]
    log: logging.Logger
    stats: StageStats = field(default_factory=StageStats)
    show_progress: bool = True
    store: StateStore | None = None  # the stage's small persistent state (kept in the journal)
    _rejected_file: Any = None
    _reject_heads: dict[str, str] = field(default_factory=dict)  # rule -> the line's start, up to "reason":

    # ---- inputs -------------------------------------------------------------------------------------
    def previous(self) -> StageInput:
        if not self.inputs:
            raise ValueError(f"stage '{self.name}' needs an earlier stage to read from")
        return self.inputs[-1]

    def find_input(self, kind: str) -> StageInput | None:
        """The latest earlier stage of this kind, if any."""
        for inp in reversed(self.inputs):
            if inp.kind == kind:
                return inp
        return None

    def read_records(self, source: StageInput | None = None, model: type[R] = Task) -> Iterator[R]:  # type: ignore[assignment]
        src = source or self.previous()
        return read_jsonl(src.dir / RECORDS_FILE, model)

    # ---- outputs ------------------------------------------------------------------------------------
    def write_records(self, records: Iterable[BaseModel], filename: str = RECORDS_FILE) -> int:
        n = write_jsonl(self.out_dir / filename, records)
        if filename == RECORDS_FILE:
            self.stats.rows_out = n
        return n

    def reject(self, record: BaseModel | dict[str, Any], rule: str, reason: str) -> None:
        """Keep a dropped record, with the rule that dropped it, in ``rejected.jsonl``."""
        if self._rejected_file is None:
            self._rejected_file = open(self.out_dir / REJECTED_FILE, "a", encoding="utf-8")
        # pipeline.records.Rejection's fields in their declared order (what dumps(Rejection(...)) writes), the
        # record serialised once
        head = self._reject_heads.get(rule)
        if head is None:
            head = self._reject_heads[rule] = dumps({"stage": self.name, "rule": rule, "reason": ""})[:-3]
        self._rejected_file.write(f'{head}{dumps(reason)},"record":{dumps(record)}}}\n')
        self.stats.rejected[rule] += 1
        samples = self.stats.rejection_samples.setdefault(rule, [])
        if len(samples) < 2:
            samples.append({"record": _brief(record), "reason": reason})

    def close(self) -> None:
        if self._rejected_file is not None:
            self._rejected_file.flush()
            self._rejected_file.close()
            self._rejected_file = None

    def model(self, name: str) -> ModelClient:
        return self.get_model(name)

    def progress(self, total: int | None, desc: str, unit: str = "it"):
        """A progress bar (done/total, rate, ETA) on stderr; silent when progress is off."""
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"{self.name}: {desc}", unit=unit, disable=not self.show_progress,
                    dynamic_ncols=True, leave=False)

    def write_side_json(self, filename: str, data: Any) -> None:
        (self.out_dir / filename).write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n",
                                             encoding="utf-8")
