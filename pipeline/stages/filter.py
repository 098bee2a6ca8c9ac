"""``filter``: instruction and instance rules, every drop kept with its rule in ``rejected.jsonl``.

Instruction rules drop the whole task; instance rules drop single instances (a task left with none is
dropped as ``no_instances_left``); a task whose instances share an input but differ in output is dropped
(``conflicting_instances``). Empty-input markers (``<noinput>``, "No input", ...) are normalised to "".
Every drop is a line of ``rejected.jsonl`` with its rule (instance drops hold ``task_id`` and ``instance``);
``stats.metrics`` gets ``instances_in`` / ``instances_out``. Runs on any earlier stage's tasks, e.g. an
Alpaca file loaded by ``seeds`` with no generation stage.

``rules:`` picks the profile (:mod:`pipeline.text.rules`): ``self_instruct`` (the originals' rules, made for a
model's own generations) or ``general`` (for data written by others); ``auto`` takes ``self_instruct`` after a
generation stage and ``general`` when cleaning a file. ``instruction_rules:`` / ``instance_rules:`` change
single rules of the profile. With language identification and no ``languages:``, the set's languages are
those of at least 10% of its instructions.

``executor: ray`` judges the records on Ray Data workers (:mod:`pipeline.stages.on_ray`), the set's languages
found first on the same sample; the files are the same as in one process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.records import Instance, Task
from pipeline.stages.context import RECORDS_FILE, StageContext
from pipeline.stages.on_ray import DataRayOptions
from pipeline.text.rules import (InstanceRules, InstructionRules, Profile, RuleHit, check_instance,
                                 check_instruction, conflicting_inputs, normalize_empty_input, profile,
                                 with_overrides)


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rules: Literal["auto", "self_instruct", "general"] = "auto"
    # only the fields set here change the profile's rules
    instruction_rules: InstructionRules = Field(default_factory=InstructionRules)
    instance_rules: InstanceRules = Field(default_factory=InstanceRules)
    drop_conflicting: bool = True  # a task whose instances share an input but differ in output (Self-Instruct)
    drop_duplicate_instances: bool = True  # the same (input, output) twice in one task
    max_instances: int | None = 5  # per task, after filtering (the originals keep at most 5); extras rejected
    executor: Literal["local", "ray"] = "local"
    ray: DataRayOptions = Field(default_factory=DataRayOptions)


def _instance_record(task: Task, inst: Instance, n: int) -> dict:
    return {"task_id": task.id, "instance": n, "instruction": task.instruction, **inst.model_dump()}


@dataclass
class Rules:
    """The rules in force: the profile's, with the user's changes, and the set's languages."""

    profile: Profile
    instruction: InstructionRules
    instance: InstanceRules
    drop_conflicting: bool = True
    drop_duplicate_instances: bool = True
    max_instances: int | None = 5
    languages: set[str] | None = None


def rules_for(o: Options, generated: bool) -> Rules:
    name: Profile = o.rules if o.rules != "auto" else ("self_instruct" if generated else "general")
    ins, inst = profile(name)
    return Rules(name, with_overrides(ins, o.instruction_rules), with_overrides(inst, o.instance_rules),
                 o.drop_conflicting, o.drop_duplicate_instances, o.max_instances)


LANGUAGE_SAMPLE = 5000


def set_languages(tasks: list[Task], rules: Rules) -> None:
    """The languages records are judged against, where identification is on and none are configured: those
    of at least 10% of the set's instructions (with their first input), on a sample of 5,000."""
    inst = rules.instance
    if not inst.language_check or inst.language_method != "langid":
        return
    if inst.languages:
        rules.languages = set(inst.languages)
        return
    from pipeline.text.language import common_languages, identify

    step = max(1, len(tasks) // LANGUAGE_SAMPLE)  # an evenly spaced sample tells a set's languages
    rules.languages = common_languages(
        identify(f"{t.instruction}\n{t.instances[0].input if t.instances else ''}")[0] for t in tasks[::step]) or {"en"}


def filter_task(task: Task, o: Rules, reject) -> Task | None:
    """The task with its surviving instances, or None; ``reject(record, rule, reason)`` gets every drop.

    A task that had no instances to begin with (instructions only) is judged on its instruction alone.
    """
    first_input = task.instances[0].input if task.instances else ""
    hit = check_instruction(task.instruction, o.instruction, normalize_empty_input(first_input))
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
        hit = check_instance(task.instruction, inst, o.instance, task.is_classification, labels, o.languages)
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


def _log_rules(ctx: StageContext, rules: Rules) -> None:
    ctx.log.info("filter rules: %s profile%s", rules.profile,
                 f", languages {', '.join(sorted(rules.languages))}" if rules.languages else "")


def _finish(ctx: StageContext, rules: Rules, instances_in: int, instances_out: int) -> None:
    ctx.stats.metrics.update(rules=rules.profile, instances_in=instances_in, instances_out=instances_out)
    if rules.languages:
        ctx.stats.metrics["languages"] = sorted(rules.languages)


def judge(rules: Rules) -> Callable[[Task], tuple[Task | None, list[tuple], int]]:
    """One record's verdict as a Ray worker gives it: the task kept (or None), its drops in order (the arguments
    of ``ctx.reject``), and its instances before filtering."""

    def one(task: Task) -> tuple[Task | None, list[tuple], int]:
        drops: list[tuple] = []
        kept = filter_task(task, rules, lambda *drop: drops.append(drop))
        return kept, drops, len(task.instances)

    return one


def run_on_ray(ctx: StageContext, o: Options, rules: Rules) -> None:
    """The records judged on Ray workers and written here in input order, drops as they come (as :func:`run`
    does). The languages come from the same sample as in one process: every ``len // LANGUAGE_SAMPLE``-th
    record (:func:`set_languages` takes all of a sample that small)."""
    from pipeline.stages import on_ray

    source = ctx.previous().dir / RECORDS_FILE
    set_languages(on_ray.every(source, max(1, on_ray.count(source) // LANGUAGE_SAMPLE)), rules)
    _log_rules(ctx, rules)
    counts = [0, 0]  # instances in, out

    def kept(results):
        for task, drops, n in results:
            ctx.stats.rows_in += 1
            counts[0] += n
            for drop in drops:
                ctx.reject(*drop)
            if task is not None:
                counts[1] += len(task.instances)
                yield task

    with on_ray.session(o.ray) as rs:
        ctx.write_records(kept(on_ray.map_tasks(rs, o.ray, source, judge, (rules,))))
    _finish(ctx, rules, *counts)


def run(ctx: StageContext) -> None:
    o: Options = ctx.options
    rules = rules_for(o, generated=any(inp.kind == "generate" for inp in ctx.inputs))
    if o.executor == "ray":
        return run_on_ray(ctx, o, rules)
    tasks = list(ctx.read_records())
    set_languages(tasks, rules)
    _log_rules(ctx, rules)
    out = []
    for task in tasks:
        kept = filter_task(task, rules, ctx.reject)
        if kept is not None:
            out.append(kept)
    ctx.stats.rows_in = len(tasks)
    ctx.write_records(out)
    _finish(ctx, rules, sum(len(t.instances) for t in tasks), sum(len(t.instances) for t in out))
