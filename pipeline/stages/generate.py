"""``generate``: grow an instruction dataset from seed tasks with a model.

``mode: self_instruct`` runs Self-Instruct's steps, each with its own journaled requests:

1. bootstrap instructions — each prompt lists in-context instructions (6 seeds + 2 from the machine pool once
   it has two; all seeds before) and ends on the next list number (or, ``bootstrap_style: chat``, asks for a
   JSON list);
2. classify each new instruction (few-shot, the examples drawn from the seed tasks' own labels);
3. generate instances — output-first for classification tasks, input-first otherwise (or
   ``instances_style: answer``: the model simply answers the instruction, what a small instruct model does best).

``mode: alpaca`` writes instruction, input and output together, 3 seed tasks per prompt.

``mode: evol`` (Evol-Instruct) rewrites the seed instructions round after round into harder or new ones,
eliminates failed evolutions, then writes instances like Self-Instruct.

Generation continues until ``target`` instructions pass the instruction rules and the ROUGE-L near-duplicate
check against seeds plus everything kept so far (the same code as the filter and dedup stages), or until
``max_requests``. The in-context examples of request i come from the run seed and i alone, and requests go
in rounds that never re-key (:mod:`pipeline.stages.generation.pool`), so the same seed and the same answers
give the same dataset across any number of resumes, and an answer once paid for is never orphaned.
The algorithms live in :mod:`pipeline.stages.generation`, one module each.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipeline.records import Instance, Task
from pipeline.stages.context import StageContext
from pipeline.stages.generation import alpaca, evol, self_instruct
from pipeline.stages.generation.options import Options, Templates  # noqa: F401 - the stage's options
from pipeline.stages.generation.pool import Generation
from pipeline.stages.generation.prompts import example_dicts
from pipeline.text.templates import render, template_file

MODES = {"self_instruct": self_instruct.run, "alpaca": alpaca.run, "evol": evol.run}


def _used_templates(o: Options) -> list[str]:
    t = o.templates
    if o.mode == "alpaca":
        return [t.alpaca if o.alpaca_style == "completion" else t.alpaca_chat]
    if o.mode == "evol":
        used = [t.evol_depth, t.evol_breadth]
    else:
        used = [t.bootstrap if o.bootstrap_style == "completion" else t.bootstrap_chat]
    if o.classify:
        used.append(t.classify)
    used += [t.input_first, t.output_first] if o.instances_style == "input_first" else [t.answer]
    return used


def resolve(options: Options, capacity: Callable[[str], int]) -> Options:
    """A round holds what the model runs at once (``capacity``), unless ``batch_size`` is given: a round's
    prompts show only complete earlier rounds, so the fewer the rounds, the fewer the engine's idle tails."""
    if options.batch_size is None:
        return options.model_copy(update={"batch_size": capacity(options.model)})
    return options


def dependencies(options: Options) -> list[Path]:
    return [template_file(t) for t in _used_templates(options)]


SAMPLE_TASKS = [Task(id="s0", instruction="Name the capital of the given country.",
                     instances=[Instance(input="France", output="Paris")], is_classification=False),
                Task(id="s1", instruction="Is the review positive or negative?",
                     instances=[Instance(input="Great food.", output="Positive")], is_classification=True)]


def check(options: Options) -> None:
    ex = SAMPLE_TASKS
    for name in _used_templates(options):
        render(name, instructions=[t.instruction for t in ex], num_new=5, examples=example_dicts(ex),
               instruction=ex[0].instruction, input="", num_tasks=5, operation="deepen")


def run(ctx: StageContext) -> None:
    g = Generation(ctx)
    try:
        ctx.stats.rows_in = len(g.seeds)
        MODES[g.o.mode](g)
        ctx.write_records(g.kept)
        ctx.stats.metrics.update(tasks_out=len(g.kept), instances_out=sum(len(t.instances) for t in g.kept),
                                 classification=sum(1 for t in g.kept if t.is_classification))
    finally:
        g.close()
