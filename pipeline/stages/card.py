"""Numbers for the dataset card: the funnel, lengths, shares, diversity, and the plots."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.records import Task, TrainingExample, read_jsonl
from pipeline.stages.context import REJECTED_FILE, StageInput
from pipeline.text.rouge import NearDuplicateIndex

CLEANING_KINDS = ("generate", "filter", "judge", "dedup", "decontaminate")


def stage_info(inp: StageInput) -> dict[str, Any]:
    p = inp.dir / "_stage.json"
    return json.loads(p.read_text(encoding="utf-8")) if p.exists() else {"stats": {}}


def _task_level_rejections(inp: StageInput) -> tuple[Counter, Counter]:
    """Per-rule counts of dropped tasks/items, and of dropped single instances (records naming a task_id)."""
    tasks, instances = Counter(), Counter()
    path = inp.dir / REJECTED_FILE
    if path.exists():
        with open(path, encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                (instances if "task_id" in rec["record"] else tasks)[rec["rule"]] += 1
    return tasks, instances


def funnel(inputs: list[StageInput], final_examples: int) -> tuple[list[dict], dict[str, int]]:
    rows: list[dict] = []
    instance_notes: Counter = Counter()
    remaining = None
    for inp in inputs:
        info = stage_info(inp)
        st = info.get("stats", {})
        if inp.kind == "seeds" and not any(i.kind == "generate" for i in inputs):
            remaining = st.get("rows_out", 0)
            rows.append({"step": f"{inp.name}: records loaded", "removed": None, "remaining": remaining})
        if inp.kind not in CLEANING_KINDS:
            continue
        tasks, insts = _task_level_rejections(inp)
        instance_notes.update({f"{inp.name}/{k}": v for k, v in insts.items()})
        if inp.kind == "generate":
            m = st.get("metrics", {})
            rows.append({"step": f"{inp.name}: requests", "removed": None, "remaining": m.get("requests")})
            remaining = m.get("items_parsed", st.get("rows_in", 0))
            rows.append({"step": f"{inp.name}: items parsed", "removed": None, "remaining": remaining})
        if not tasks:
            rows.append({"step": f"{inp.name}: nothing removed", "removed": 0, "remaining": remaining})
        for rule, n in sorted(tasks.items(), key=lambda kv: -kv[1]):
            remaining = (remaining or 0) - n
            rows.append({"step": f"{inp.name}: {rule}", "removed": n, "remaining": remaining})
        if remaining != st.get("rows_out"):
            rows.append({"step": f"{inp.name}: (unaccounted)", "removed": (remaining or 0) - st.get("rows_out", 0),
                         "remaining": st.get("rows_out")})
            remaining = st.get("rows_out")
    rows.append({"step": "final: tasks", "removed": None, "remaining": remaining})
    rows.append({"step": "final: examples (one per instance)", "removed": None, "remaining": final_examples})
    return rows, dict(instance_notes)


def judge_scores(inputs: list[StageInput]) -> list[dict[str, Any]]:
    """Each judge stage's score distribution: [{name, min_score, rows: [{score, count, share}], judged}]."""
    out = []
    for inp in inputs:
        if inp.kind != "judge":
            continue
        info = stage_info(inp)
        metrics = info.get("stats", {}).get("metrics", {})
        scores = metrics.get("judge_scores", {})
        total = sum(scores.values())
        rows = [{"score": int(s), "count": n, "share": n / total if total else 0.0}
                for s, n in sorted(scores.items(), key=lambda kv: int(kv[0]))]
        out.append({"name": inp.name, "min_score": metrics.get("min_score"), "rows": rows,
                    "judged": total})
    return out


def _words(s: str) -> int:
    return len(s.split())


def length_stats(examples: list[TrainingExample]) -> dict[str, dict[str, float]]:
    out = {}
    for field in ("instruction", "input", "output"):
        vals = [_words(getattr(e, field)) for e in examples] or [0]
        out[field] = {"mean": round(statistics.mean(vals), 1), "median": statistics.median(vals), "max": max(vals)}
    return out


def leading_verbs(examples: list[TrainingExample], k: int = 15) -> list[tuple[str, int]]:
    seen_tasks: dict[str, str] = {}
    for e in examples:
        seen_tasks.setdefault(e.task_id, e.instruction)
    words = [t.split()[0].strip(".,:;!?").lower() for t in seen_tasks.values() if t.split()]
    return Counter(words).most_common(k)


def rouge_to_seeds(examples: list[TrainingExample], seeds: list[Task]) -> list[float]:
    index = NearDuplicateIndex(1.0)
    for s in seeds:
        index.add(s.instruction, s.id)
    tasks: dict[str, str] = {}
    for e in examples:
        tasks.setdefault(e.task_id, e.instruction)
    return [index.query(t)[0] for t in tasks.values()]


def rouge_from_dedup(dedup: StageInput, examples: list[TrainingExample]) -> list[float]:
    """Each final task's ROUGE-L to its nearest earlier record as the dedup stage found it (no new search)."""
    final = {e.task_id for e in examples}
    out = []
    with open(dedup.dir / "records.jsonl", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec["id"] in final:
                out.append(float((rec.get("meta") or {}).get("rouge_score") or 0.0))
    return out


def similarity(inputs: list[StageInput], examples: list[TrainingExample], seeds: list[Task]) -> tuple[str, list[float]]:
    """What the card's similarity histogram shows, and its values, without comparing every record with every
    other: generated data against its seed tasks (a small pool); a cleaned file from its dedup stage's numbers
    (the seeds are the data there), or nothing without one."""
    if any(i.kind == "generate" for i in inputs):
        return "the nearest seed task", (rouge_to_seeds(examples, seeds) if seeds else [])
    dedup = next((i for i in reversed(inputs) if i.kind == "dedup"), None)
    if dedup is None or not (dedup.dir / "records.jsonl").exists():
        return "", []
    return "the nearest earlier record, as the dedup stage compared them", rouge_from_dedup(dedup, examples)


def drop_warnings(inputs: list[StageInput]) -> list[dict[str, Any]]:
    """The stages that dropped more than half of what they read, with their top rule and two drops."""
    out = []
    for inp in inputs:
        w = stage_info(inp).get("stats", {}).get("drop_warning")
        if w:
            out.append({"name": inp.name, **w})
    return out


def histogram(values: list[float], bins: int = 10) -> list[dict]:
    counts = Counter(min(int(v * bins), bins - 1) for v in values)
    return [{"range": f"{i / bins:.1f}-{(i + 1) / bins:.1f}", "count": counts.get(i, 0)} for i in range(bins)]


def plots(out_dir: Path, examples: list[TrainingExample], rouge: list[float],
          verbs: list[tuple[str, int]], rouge_label: str = "the nearest seed task") -> list[dict]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []

    def save(fig, name: str, title: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=90)
        plt.close(fig)
        made.append({"file": name, "title": title})

    fig, axes = plt.subplots(1, 3, figsize=(11, 3))
    for ax, field in zip(axes, ("instruction", "input", "output")):
        ax.hist([_words(getattr(e, field)) for e in examples], bins=20, color="#4c72b0")
        ax.set_title(f"{field} length")
        ax.set_xlabel("words")
        ax.set_ylabel("examples")
    save(fig, "lengths.png", "Lengths of instruction, input and output")
    if rouge:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.hist(rouge, bins=[i / 10 for i in range(11)], color="#55a868")
        ax.set_title("ROUGE-L to " + rouge_label, fontsize=9)
        ax.set_xlabel("ROUGE-L F1")
        ax.set_ylabel("tasks")
        save(fig, "rouge_to_seeds.png", "ROUGE-L to " + rouge_label)
    if verbs:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.barh([v for v, _ in verbs][::-1], [n for _, n in verbs][::-1], color="#c44e52")
        ax.set_title("Most frequent leading verbs")
        ax.set_xlabel("tasks")
        ax.set_ylabel("first word of the instruction")
        save(fig, "leading_verbs.png", "Most frequent leading verbs")
    return made


def read_examples(inp: StageInput) -> list[TrainingExample]:
    return list(read_jsonl(inp.dir / "records.jsonl", TrainingExample))
