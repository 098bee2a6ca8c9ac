"""``filter``: instruction and instance rules, every drop kept with its rule in ``rejected.jsonl``.

Instruction rules drop the whole task; instance rules drop single instances (a task left with none is
dropped as ``no_instances_left``); a task whose instances share an input but differ in output is dropped
(``conflicting_instances``). Empty-input markers (``<noinput>``, "No input", ...) are normalised to "".
Every drop is a line of ``rejected.jsonl`` with its rule (instance drops hold ``task_id`` and ``instance``);
``stats.metrics`` gets ``instances_in`` / ``instances_out``. Runs on any earlier stage's tasks, e.g. an
Alpaca file loaded by ``seeds`` with no generation stage.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from pipeline.records import Instance, Task
from pipeline.stages.context import StageContext
from pipeline.text.rules import (InstanceRules, InstructionRules, RuleHit, check_instance, check_instruction,
                                 conflicting_inputs, normalize_empty_input)


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instruction_rules: InstructionRules = Field(default_factory=InstructionRules)
    instance_rules: InstanceRules = Field(default_factory=InstanceRules)
    drop_conflicting: bool = True  # a task whose instances share an input but differ in output (Self-Instruct)
    drop_duplicate_instances: bool = True  # the same (input, output) twice in one task
    max_instances: int | None = 5  # per task, after filtering (the originals keep at most 5); extras rejected


def _instance_record(task: Task, inst: Instance, n: int) -> dict:
    return {"task_id": task.id, "instance": n, "instruction": task.instruction, **inst.model_dump()}


def filter_task(task: Task, o: Options, reject) -> Task | None:
    """The task with its surviving instances, or None; ``reject(record, rule, reason)`` gets every drop.

    A task that had no instances to begin with (instructions only) is judged on its instruction alone.
    """
    hit = check_instruction(task.instruction, o.instruction_rules)
    if hit:
        reject(task, hit.rule, hit.reason)
        return None
    if not task.instances:
        return task
    instances = [i.model_copy(update={"input": normalize_empty_input(i.input)}) for i in task.instances]
    task = task.model_copy(update={"instances": instances})
    if o.drop_conflicting:
        conflict = conflicting_inputs(task)
        if conflict is not None:
            reject(task, "conflicting_instances",
                   f"two instances share the input {conflict[:60]!r} with different outputs")
            return None
    labels = {str(x).strip().lower() for x in task.meta.get("labels", [])} or None
    kept: list[Instance] = []
    seen: set[tuple[str, str]] = set()
    for n, inst in enumerate(instances):
        hit = check_instance(task.instruction, inst, o.instance_rules, task.is_classification, labels)
        pair = (inst.input.strip(), inst.output.strip())
        if hit is None and o.drop_duplicate_instances and pair in seen:
            hit = RuleHit("duplicate_instance", "the same input and output appear earlier in the task")
        if hit is None and o.max_instances is not None and len(kept) >= o.max_instances:
            hit = RuleHit("max_instances", f"the task already has {o.max_instances} instances")
        if hit:
            reject(_instance_record(task, inst, n), hit.rule, hit.reason)
            continue
        seen.add(pair)
        kept.append(inst)
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
