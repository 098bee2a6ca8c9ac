"""The before/after table of an evaluation, as Markdown rendered from prompts/card/results_table.md.j2."""

from __future__ import annotations

import math
from typing import Any

from pipeline.text.templates import render

TABLE = "card/results_table.md.j2"
ROWS = [  # metric, what it is, how to read it (the template words each kind of note)
    ("validation_loss", "validation loss (response tokens)", "lower"),
    ("rouge_l", "ROUGE-L F1 on held-out instructions", "higher"),
    ("stop_rate", "generations that stop by themselves", "higher"),
    ("general_ppl", "perplexity on general text (forgetting)", "forgetting"),
    ("ifeval_prompt_strict", "IFEval prompt-level accuracy, strict", "higher"),
    ("ifeval_prompt_loose", "IFEval prompt-level accuracy, loose", "higher"),
    ("ifeval_instruction_strict", "IFEval instruction-level accuracy, strict", "higher"),
    ("ifeval_instruction_loose", "IFEval instruction-level accuracy, loose", "higher"),
]


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _fmt(v: Any) -> str:
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    x = _num(v)
    if x is None:
        return "–"
    return f"{x:.1f}" if abs(x) >= 1000 else f"{x:.4f}" if abs(x) < 10 else f"{x:.2f}"


def _change(b: float | None, a: float | None) -> str:
    if b is None or a is None:
        return "–"
    rel = f" ({100 * (a - b) / abs(b):+.1f}%)" if b else ""
    return f"{a - b:+.4f}{rel}"


def _interval(c: dict[str, Any] | None) -> tuple[str, str, bool | None]:
    """(interval text, n, measurable) of one metric's change; measurable None where there is no interval."""
    if not c:
        return "–", "–", None
    if c.get("low") is None:
        return "–", str(c.get("n", 0)), None
    return f"{c['low']:+.4f} … {c['high']:+.4f}", str(c["n"]), bool(c["measurable"])


def forgetting(before: dict[str, Any], after: dict[str, Any], change: dict[str, Any] | None) -> dict[str, Any]:
    """What the general-text perplexity says about forgetting: a case for the template and its numbers."""
    b, a = _num(before.get("general_ppl")), _num(after.get("general_ppl"))
    if b is None or a is None or b <= 0:
        return {"case": "not_measured"}
    pct = 100 * (a - b) / b
    _, _, measurable = _interval(change)
    case = ("no_measurable_change" if measurable is False else
            "rose" if pct > 1 else "fell" if pct < -1 else "unchanged")
    return {"case": case, "pct": pct, "before": b, "after": a}


def render_results_table(before: dict[str, Any], after: dict[str, Any],
                         change: dict[str, dict[str, Any]] | None = None, win: dict[str, Any] | None = None) -> str:
    """A Markdown before/after table: each metric's change, its n and 95% interval, a note on forgetting, and
    the judged win rate (``win``, from :func:`pipeline.training.winrate.judge`) when there is one."""
    change = change or {}
    rows = []
    for key, name, reading in ROWS:
        if key.startswith("ifeval_") and key not in before:
            continue  # IFEval was not asked for
        b, a = _num(before.get(key)), _num(after.get(key))
        interval, n, measurable = _interval(change.get(key))
        rows.append({"name": name, "before": _fmt(b), "after": _fmt(a), "change": _change(b, a),
                     "interval": interval, "n": n, "measurable": measurable, "reading": reading})
    return render(TABLE, before_label=before.get("label") or "before", after_label=after.get("label") or "after",
                  rows=rows, n_examples=after.get("n_examples", before.get("n_examples", 0)),
                  n_generated=after.get("n_generated") or before.get("n_generated") or 0,
                  source=after.get("heldout_source") or before.get("heldout_source") or "–",
                  general_tokens=after.get("general_tokens", before.get("general_tokens", 0)),
                  ifeval_prompts=before.get("ifeval_prompts"), ifeval_subset_of=before.get("ifeval_subset_of"),
                  forgetting=forgetting(before, after, change.get("general_ppl")), win=win)
