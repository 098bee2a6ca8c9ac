"""Before/after evaluation: one model measured (:func:`evaluate_model`), and the change between two
(:func:`compare`), with the same examples and options for the base and the tuned model.

* **validation loss** — mean token loss on the response tokens of the validation split;
* **instruction following** — greedy answers to held-out instructions (``data/eval_instructions.jsonl`` or
  a user file in any format the ``seeds`` stage reads, rendered in the training format; the validation
  split when there is none), scored with ROUGE-L F1 against the references (Self-Instruct's metric), and
  the **stop rate**: the share of answers that end with an end id before ``max_new_tokens``;
* **forgetting** — perplexity on a general-text sample (``data/general_text.txt`` or a user file): plain
  fine-tuning and instruct tuning can make a model lose what it knew, and a rise measures how much;
* **IFEval** (``ifeval:``, :mod:`pipeline.training.ifeval`) — prompt- and instruction-level accuracy, strict
  and loose, on prompts whose constraints a program checks;
* **judged win rate** (``judge:``, :mod:`pipeline.training.winrate`) — a judge model compares the two models'
  held-out answers head to head, in both orders; the stage sends those requests through its journaled client.

A handful of held-out answers can move a metric by chance, so every change comes with ``n`` and a paired
bootstrap 95% interval (the same examples or text windows resampled for both models); a change whose
interval includes 0 is reported as no measurable change. Deterministic: greedy decoding, seeded choices.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from pipeline.errors import UserError
from pipeline.paths import DATA_DIR
from pipeline.records import Task, TrainingExample
from pipeline.text.templates import template_file
from pipeline.training import ifeval, metrics, winrate
from pipeline.training.data import response_text
from pipeline.training.formats import render_instance

log = logging.getLogger(__name__)

DEFAULT_GENERAL_TEXT = DATA_DIR / "general_text.txt"
DEFAULT_HELDOUT = DATA_DIR / "eval_instructions.jsonl"
RESAMPLES = 2000
# metric -> how its units combine: "mean" of per-example values, "ratio" of summed NLL to tokens, "ppl" exp(ratio)
METRICS = {"validation_loss": "ratio", "rouge_l": "mean", "stop_rate": "mean", "general_ppl": "ppl",
           **ifeval.METRICS}
NOT_SUMMARY = ("samples", "units", "ifeval_samples")


class EvalOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_examples: int = 32  # held-out instances generated for
    max_new_tokens: int = 128
    batch_size: int = 8
    max_length: int = 512  # validation rows are cut like training rows
    max_validation_examples: int | None = 256  # validation rows scored for the loss (None: all)
    general_text: str | None = None  # default: data/general_text.txt
    max_general_tokens: int = 4096
    block_size: int = 512  # perplexity window (capped at the model's positions)
    stride: int = 256  # perplexity window step (< block_size: every token scored once, with overlap as context)
    heldout: str | None = None  # default: data/eval_instructions.jsonl, else the validation split
    heldout_format: Literal["auto", "alpaca", "chat"] = "auto"  # auto: the validation examples' format
    ifeval: str | None = None  # IFEval prompts (input_data.jsonl's layout); None: no IFEval
    ifeval_max_prompts: int | None = None  # a seeded subset (CPU runs); None: every prompt
    ifeval_max_new_tokens: int = 512
    # a judge model (a name under models:, or {model: ..., template: ...}) compares base and tuned answers to
    # the held-out instructions: the tuned model's win rate (pipeline.training.winrate)
    judge: winrate.JudgeOptions | None = None
    seed: int = 0

    @field_validator("judge", mode="before")
    @classmethod
    def _judge_by_name(cls, value: object) -> object:
        return {"model": value} if isinstance(value, str) else value


def win_rate(o: EvalOptions, model: Any, before: dict[str, Any],
             after: dict[str, Any]) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The judged win rate of ``after`` over ``before`` and every judgement (None and none without a judge);
    ``model(name)`` is the stage's journaled client for a model."""
    if o.judge is None:
        return None, []
    return winrate.judge(model(o.judge.model), before["samples"], after["samples"], o.judge)


def judge_models(o: EvalOptions | None) -> list[str]:
    """The model an evaluation calls (its judge), for a stage's ``models(options)``."""
    return [o.judge.model] if o is not None and o.judge is not None else []


def sample(items: list[Any], n: int | None, seed: int, salt: str) -> list[Any]:
    """A seeded subset of at most n items, in their original order."""
    if n is None or len(items) <= n:
        return list(items)
    keep = sorted(random.Random(f"{seed}:{salt}").sample(range(len(items)), n))
    return [items[i] for i in keep]


# ---- the files it reads -------------------------------------------------------------------------------

def general_text_path(o: EvalOptions) -> Path:
    return Path(o.general_text) if o.general_text else DEFAULT_GENERAL_TEXT


def heldout_path(o: EvalOptions) -> Path | None:
    """The held-out instruction file, or None when there is none (the validation split is used)."""
    path = Path(o.heldout) if o.heldout else DEFAULT_HELDOUT
    if o.heldout and not path.exists():
        raise UserError(f"evaluation.heldout: file not found: {path}")
    return path if path.exists() else None


def dependencies(o: EvalOptions) -> list[Path]:
    """The evaluation files whose content enters a stage's fingerprint."""
    held = heldout_path(o)
    return ([general_text_path(o)] + ([held] if held else []) + ([Path(o.ifeval)] if o.ifeval else [])
            + ([template_file(o.judge.template)] if o.judge else []))


def read_general_text(o: EvalOptions) -> str:
    path = general_text_path(o)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"evaluation.general_text: cannot read {path} ({e})") from None


def heldout_examples(examples: list[TrainingExample], o: EvalOptions, tasks: list[Task] | None,
                     source: str | None = None) -> tuple[list[TrainingExample], str]:
    """Held-out instances rendered like the training data, and where they came from.

    ``tasks`` are the held-out file's tasks (None: no file); they are rendered in the validation examples'
    format. A ``custom`` template cannot be recovered here, so such runs generate for the validation split
    instead, as they do when there is no held-out file.
    """
    fmt = o.heldout_format if o.heldout_format != "auto" else (examples[0].format if examples else "alpaca")
    if tasks is None or fmt == "custom":
        if fmt == "custom":
            log.info("custom training format: generating for the validation split instead of %s", source)
        return sample(examples, o.max_examples, o.seed, "heldout"), "validation"
    system = next((m["content"] for e in examples[:1] for m in (e.messages or []) if m["role"] == "system"), None)
    chosen = sample([(t, i) for t in tasks for i in range(len(t.instances))], o.max_examples, o.seed, "heldout")
    fmt = "chat" if fmt in ("chat", "sharegpt") else "alpaca"
    return [render_instance(t, i, fmt, system_prompt=system) for t, i in chosen], source or "heldout"


# ---- one model ----------------------------------------------------------------------------------------

def evaluate_model(model: Any, tokenizer: Any, examples: list[TrainingExample], held: list[TrainingExample],
                   source: str, options: EvalOptions, label: str) -> dict[str, Any]:
    """Evaluate one model on the validation ``examples`` and the ``held``-out instances (from ``source``)."""
    import torch

    o = options
    torch.manual_seed(o.seed)
    val = sample(examples, o.max_validation_examples, o.seed, "validation")
    v_total, v_count, v_units = metrics.validation_nll(model, tokenizer, val, o.max_length, o.batch_size)
    answers = metrics.generate_ids(model, tokenizer, held, o.max_new_tokens, o.batch_size)
    texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids, _ in answers]
    scores = [metrics.rouge_l(response_text(e), t) for e, t in zip(held, texts)]
    g_total, g_count, g_units = metrics.text_nll(model, tokenizer, read_general_text(o), o.max_general_tokens,
                                                 o.block_size, o.stride, o.batch_size)
    result = {
        "label": label,
        "n_examples": len(val),
        "validation_loss": metrics.ratio(v_total, v_count),
        "n_generated": len(held),
        "heldout_source": source,
        "rouge_l": sum(scores) / len(scores) if scores else None,
        "stop_rate": sum(s for _, s in answers) / len(answers) if answers else None,
        "mean_new_tokens": sum(len(ids) for ids, _ in answers) / len(answers) if answers else None,
        "general_ppl": metrics.ppl(g_total, g_count),
        "general_tokens": g_count,
        "samples": [{"id": e.id, "instruction": e.instruction, "input": e.input, "reference": response_text(e),
                     "answer": t, "stopped": s, "rouge_l": round(r, 4)}
                    for e, t, (_, s), r in zip(held, texts, answers, scores)],
        "units": {"validation_loss": v_units, "rouge_l": scores, "stop_rate": [float(s) for _, s in answers],
                  "general_ppl": g_units},
    }
    if o.ifeval:
        prompts = ifeval.load_prompts(o.ifeval, None, o.seed)
        chosen = sample(prompts, o.ifeval_max_prompts, o.seed, "ifeval")  # the subset load_prompts would take
        ife = ifeval.evaluate(model, tokenizer, chosen, o.ifeval_max_new_tokens, o.batch_size, len(prompts))
        result["units"].update(ife.pop("units"))
        result["ifeval_samples"] = ife.pop("samples")
        result.update(ife)
    log.info("%s: validation loss %s, ROUGE-L %s, stop rate %s, general-text perplexity %s", label,
             result["validation_loss"], result["rouge_l"], result["stop_rate"], result["general_ppl"])
    return result


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """A result without the per-example generations and units (for the manifest)."""
    return {k: v for k, v in result.items() if k not in NOT_SUMMARY}


# ---- the change between two models --------------------------------------------------------------------

def _statistic(kind: str, units: Any, idx: Any) -> Any:
    import numpy as np

    if kind == "mean":
        return np.asarray(units, dtype=float)[idx].mean(axis=-1)
    pairs = np.asarray(units, dtype=float).reshape(-1, 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = pairs[idx, 0].sum(axis=-1) / pairs[idx, 1].sum(axis=-1)
        return np.exp(mean) if kind == "ppl" else mean


def metric_change(kind: str, before: Any, after: Any, seed: int, resamples: int = RESAMPLES) -> dict[str, Any]:
    """n, the change after - before, and its paired bootstrap 95% interval over the shared units."""
    import numpy as np

    n = len(before)
    if n == 0 or len(after) != n:
        return {"n": n, "delta": None, "low": None, "high": None, "measurable": False}
    everything = np.arange(n)
    delta = float(_statistic(kind, after, everything) - _statistic(kind, before, everything))
    if n < 2:
        return {"n": n, "delta": delta, "low": None, "high": None, "measurable": False}
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    diffs = _statistic(kind, after, idx) - _statistic(kind, before, idx)
    low, high = (float(x) for x in np.nanpercentile(diffs, [2.5, 97.5]))
    return {"n": n, "delta": delta, "low": low, "high": high, "measurable": bool(low > 0 or high < 0)}


def compare(before: dict[str, Any], after: dict[str, Any], seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per metric: {n, delta, low, high, measurable}; measurable is False where the interval includes 0."""
    ub, ua = before.get("units") or {}, after.get("units") or {}
    return {m: metric_change(kind, ub.get(m, []), ua.get(m, []), seed) for m, kind in METRICS.items()
            if m in ub or m in ua}  # IFEval only where it was asked for
