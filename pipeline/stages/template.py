"""``template``: render every instance into a training format whose text lives in prompts/formats/.

* ``alpaca`` — the two classic prompts (with / without input), each ending on a token boundary
  (``### Response:`` and a newline); response = output (the SFT stage appends the EOS id);
* ``chat`` — messages (optional system, user = instruction + input, assistant = output), rendered later with
  the target model's own chat template;
* ``sharegpt`` — ``conversations`` with ``from``/``value``;
* ``custom`` — any Jinja template given by path, rendered with the record's fields (the prompt).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from pipeline.records import Instance, Task, TrainingExample
from pipeline.stages.context import StageContext
from pipeline.text.templates import render, template_file

ALPACA_INPUT = "formats/alpaca_input.j2"
ALPACA_NO_INPUT = "formats/alpaca_no_input.j2"
CHAT_USER = "formats/chat_user.j2"


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["alpaca", "chat", "sharegpt", "custom"] = "alpaca"
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
            from pipeline.errors import UserError

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
    inst = task.instances[index]
    base = dict(id=f"{task.id}:{index}", task_id=task.id, instruction=task.instruction, input=inst.input,
                output=inst.output, is_classification=task.is_classification, format=o.format)
    fields = {"instruction": task.instruction, "input": inst.input, "output": inst.output}
    if o.format == "alpaca":
        tpl = o.alpaca_input_template if inst.input.strip() else o.alpaca_no_input_template
        return TrainingExample(**base, prompt=render(tpl, **fields), response=inst.output)
    if o.format == "custom":
        return TrainingExample(**base, prompt=render(o.template, **fields), response=inst.output)
    user = render(o.chat_user_template, **fields)
    if o.format == "chat":
        msgs = ([{"role": "system", "content": o.system_prompt}] if o.system_prompt else []) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": inst.output}]
        return TrainingExample(**base, messages=msgs, response=inst.output)
    conv = ([{"from": "system", "value": o.system_prompt}] if o.system_prompt else []) + [
        {"from": "human", "value": user}, {"from": "gpt", "value": inst.output}]
    return TrainingExample(**base, conversations=conv, response=inst.output)


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
