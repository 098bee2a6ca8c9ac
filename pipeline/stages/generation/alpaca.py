"""Alpaca: the model writes instruction, input and output together, from ``alpaca_examples`` seed tasks a prompt.

The examples of request i come from the run seed and i alone; every answer's tasks go through the shared
online filter, in rounds (see :mod:`pipeline.stages.generation.pool`).
"""

from __future__ import annotations

import random

from pipeline.models.base import Completion
from pipeline.records import Instance, Task
from pipeline.stages.generation.pool import Generation, Item, next_round, run_rounds
from pipeline.stages.generation.prompts import example_dicts
from pipeline.text import parsing
from pipeline.text.templates import render

TASK_SCHEMA = {"type": "array", "items": {
    "type": "object", "properties": {k: {"type": "string"} for k in ("instruction", "input", "output")},
    "required": ["instruction", "input", "output"]}}


def run(g: Generation) -> None:
    o = g.o
    chat = o.alpaca_style == "chat"
    tpl = o.templates.alpaca_chat if chat else o.templates.alpaca
    params = o.alpaca_params.model_copy(update={"json_schema": TASK_SCHEMA}) if chat and o.json_mode \
        else o.alpaca_params

    def prompt(rng: random.Random) -> tuple[str, list[Task]]:
        ex = rng.sample(g.seeds, min(o.alpaca_examples, len(g.seeds)))
        return render(tpl, examples=example_dicts(ex), num_tasks=o.alpaca_num_tasks), ex

    def build_round(r: int) -> list[Item]:
        return next_round(g, "alpaca", tpl, params, chat, prompt)

    def absorb(it: Item, res: Completion) -> None:
        text, truncated = res.texts[0], res.finish_reasons[0] == "length"
        parsed = parsing.parse_json_items(text, truncated, required=("instruction", "output")) if chat else None
        if parsed is None:
            parsed = parsing.parse_alpaca(text, truncated, chat=chat)
        g.reject_dropped(parsed, it.provenance)
        for x in parsed.items:
            g.consider(x.instruction, it.provenance, [Instance(input=x.input, output=x.output)])

    run_rounds(g, "alpaca", build_round, absorb)
    for t in g.kept:
        t.is_classification = None
    g.m["instances_generated"] = sum(len(t.instances) for t in g.kept)
