"""``filter``: instruction and instance rules, every drop kept with its rule in ``rejected.jsonl``.

Instruction rules drop the whole task; instance rules drop single instances (a task left with none is
dropped as ``no_instances_left``); a task whose instances share an input but differ in output is dropped
(``conflicting_instances``). Empty-input markers (``<noinput>``, "No input", ...) are normalised to "".
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from pipeline.records import Task
from pipeline.stages.context import StageContext
from pipeline.text.rules import (InstanceRules, InstructionRules, check_instance, check_instruction,
                                 conflicting_inputs, normalize_empty_input)


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instruction_rules: InstructionRules = Field(default_factory=InstructionRules)
    instance_rules: InstanceRules = Field(default_factory=InstanceRules)
    drop_conflicting: bool = True
    max_instances: int | None = 5  # per task, after filtering (the originals keep at most 5)


def filter_task(task: Task, o: Options, reject) -> Task | None:
    """The task with its surviving instances, or None; ``reject(record, rule, reason)`` gets every drop."""
    hit = check_instruction(task.instruction, o.instruction_rules)
    if hit:
        reject(task, hit.rule, hit.reason)
        return None
    instances = [i.model_copy(update={"input": normalize_empty_input(i.input)}) for i in task.instances]
    task = task.model_copy(update={"instances": instances})
    if o.drop_conflicting:
        conflict = conflicting_inputs(task)
        if conflict is not None:
            reject(task, "conflicting_instances", f"two instances share the input {conflict[:60]!r} with different outputs")
            return None
    labels = {str(x).strip().lower() for x in task.meta.get("labels", [])} or None
    kept = []
    for inst in instances:
        hit = check_instance(task.instruction, inst, o.instance_rules, task.is_classification, labels)
        if hit:
            reject({"task_id": task.id, "instruction": task.instruction, **inst.model_dump()}, hit.rule, hit.reason)
        else:
            kept.append(inst)
    if o.max_instances is not None:
        kept = kept[: o.max_instances]
    if not kept:
        reject(task, "no_instances_left", "every instance of the task was dropped")
        return None
    return task.model_copy(update={"instances": kept})


def run(ctx: StageContext) -> None:
    o: Options = ctx.options
    out = []
    n_in = inst_in = 0
    for task in ctx.read_records():
        n_in += 1
        inst_in += len(task.instances)
        kept = filter_task(task, o, ctx.reject)
        if kept is not None:
            out.append(kept)
    ctx.stats.rows_in = n_in
    ctx.write_records(out)
    ctx.stats.metrics.update(instances_in=inst_in, instances_out=sum(len(t.instances) for t in out))
