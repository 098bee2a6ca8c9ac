"""Rendering one instance of a task into a training format; the texts live in prompts/formats/.

* ``alpaca`` — the two classic prompts (with / without input), each ending on a token boundary
  (``### Response:`` and a newline); response = output (the SFT data path appends the end id);
* ``chat`` — messages (optional system, user = instruction + input, assistant = output), rendered later with
  the target model's own chat template;
* ``sharegpt`` — ``conversations`` with ``from``/``value``;
* ``custom`` — any Jinja template given by path, rendered with the record's fields (the prompt).
"""

from __future__ import annotations

from typing import Literal

from pipeline.records import Task, TrainingExample
from pipeline.text.templates import render

ALPACA_INPUT = "formats/alpaca_input.j2"
ALPACA_NO_INPUT = "formats/alpaca_no_input.j2"
CHAT_USER = "formats/chat_user.j2"
Format = Literal["alpaca", "chat", "sharegpt", "custom"]


def render_instance(task: Task, index: int, fmt: Format, *, system_prompt: str | None = None,
                    template: str | None = None, alpaca_input: str = ALPACA_INPUT,
                    alpaca_no_input: str = ALPACA_NO_INPUT, chat_user: str = CHAT_USER) -> TrainingExample:
    """Instance ``index`` of ``task`` as a training example in format ``fmt`` (``template``: the custom one)."""
    inst = task.instances[index]
    base = dict(id=f"{task.id}:{index}", task_id=task.id, instruction=task.instruction, input=inst.input,
                output=inst.output, is_classification=task.is_classification, format=fmt)
    fields = {"instruction": task.instruction, "input": inst.input, "output": inst.output}
    if fmt == "alpaca":
        tpl = alpaca_input if inst.input.strip() else alpaca_no_input
        return TrainingExample(**base, prompt=render(tpl, **fields), response=inst.output)
    if fmt == "custom":
        return TrainingExample(**base, prompt=render(template, **fields), response=inst.output)
    user = render(chat_user, **fields)
    if fmt == "chat":
        msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": inst.output}]
        return TrainingExample(**base, messages=msgs, response=inst.output)
    conv = ([{"from": "system", "value": system_prompt}] if system_prompt else []) + [
        {"from": "human", "value": user}, {"from": "gpt", "value": inst.output}]
    return TrainingExample(**base, conversations=conv, response=inst.output)
