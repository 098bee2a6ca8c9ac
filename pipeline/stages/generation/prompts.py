"""Data the generation templates render (never prompt text: that lives in prompts/)."""

from __future__ import annotations

from pipeline.records import Instance, Task


def example_dicts(tasks: list[Task]) -> list[dict]:
    """Examples for templates: each task with its instances, plus its first instance's input/output."""
    out = []
    for t in tasks:
        first = t.instances[0] if t.instances else Instance()
        out.append({"instruction": t.instruction, "is_classification": bool(t.is_classification),
                    "instances": [i.model_dump() for i in t.instances], "input": first.input, "output": first.output})
    return out
