"""``template``: render every instance into a training format whose text lives in prompts/formats/
(``alpaca``, ``chat``, ``sharegpt`` or ``custom``; see :mod:`pipeline.training.formats`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from pipeline.errors import UserError
from pipeline.records import Instance, Task, TrainingExample
from pipeline.stages.context import StageContext
from pipeline.text.templates import template_file
from pipeline.training.formats import ALPACA_INPUT, ALPACA_NO_INPUT, CHAT_USER, Format, render_instance


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Format = "alpaca"
    template: str | None = None  # custom: a Jinja template rendering the prompt
    system_prompt: str | None = None
    max_instances_per_task: int = 5
    alpaca_input_template: str = ALPACA_INPUT
    alpaca_no_input_template: str = ALPACA_NO_INPUT
    chat_user_template: str = CHAT_USER


def _templates(o: Options) -> list[str]:
    if o.format == "alpaca":
        return [o.alpaca_input_template, o.alpaca_no_input_template]
    if o.format == "custom":
        if not o.template:
            raise UserError("stages.template.template: format 'custom' needs a template path")
        return [o.template]
    return [o.chat_user_template]


def dependencies(options: Options) -> list[Path]:
    return [template_file(t) for t in _templates(options)]


def check(options: Options) -> None:
    task = Task(id="sample", instruction="Name the capital of the given country.",
                instances=[Instance(input="France", output="Paris")])
    render_example(task, 0, options)
    render_example(task.model_copy(update={"instances": [Instance(output="Paris")]}), 0, options)


def render_example(task: Task, index: int, o: Options) -> TrainingExample:
    return render_instance(task, index, o.format, system_prompt=o.system_prompt, template=o.template,
                           alpaca_input=o.alpaca_input_template, alpaca_no_input=o.alpaca_no_input_template,
                           chat_user=o.chat_user_template)


def run(ctx: StageContext) -> None:
    o: Options = ctx.options
    out = []
    n = 0
    for task in ctx.read_records():
        n += 1
        for i in range(min(len(task.instances), o.max_instances_per_task)):
            out.append(render_example(task, i, o))
    ctx.stats.rows_in = n
    ctx.write_records(out)
    ctx.stats.metrics.update(examples=len(out))
