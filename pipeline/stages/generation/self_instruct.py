"""Self-Instruct: bootstrap instructions in rounds, classify each, then write its instances.

1. bootstrap — each prompt lists in-context instructions (seeds, plus ``num_machine_examples`` from the machine
   pool once it holds that many) and ends on the next list number (or, ``bootstrap_style: chat``, asks for a
   JSON list); the in-context examples of request i come from the run seed and i alone;
2. classify — few-shot, the examples drawn from the seed tasks' own labels;
3. instances — output-first for classification tasks, input-first otherwise (or ``instances_style: answer``:
   the model simply answers the instruction, what a small instruct model does best).
"""

from __future__ import annotations

import random

from pipeline.models.base import Completion
from pipeline.records import Instance, Task
from pipeline.stages.generation.pool import Generation, Item, next_round, run_rounds
from pipeline.stages.generation.prompts import example_dicts
from pipeline.text import parsing
from pipeline.text.templates import render

LIST_SCHEMA = {"type": "array", "items": {"type": "string"}}


def run(g: Generation) -> None:
    bootstrap(g)
    classify(g)
    instances(g)


def bootstrap(g: Generation) -> None:
    o = g.o
    chat = o.bootstrap_style == "chat"
    tpl = o.templates.bootstrap_chat if chat else o.templates.bootstrap
    params = o.bootstrap_params.model_copy(update={"json_schema": LIST_SCHEMA}) if chat and o.json_mode \
        else o.bootstrap_params

    def build_round(r: int) -> list[Item]:
        machine = list(g.kept)  # what the rounds before this one kept

        def prompt(rng: random.Random) -> tuple[str, list[Task]]:
            k_machine = min(o.num_machine_examples, len(machine)) if len(machine) >= o.num_machine_examples else 0
            chosen = rng.sample(g.seeds, min(len(g.seeds), o.num_prompt_instructions - k_machine))
            chosen += rng.sample(machine, k_machine)
            rng.shuffle(chosen)
            return render(tpl, instructions=[t.instruction for t in chosen], num_new=o.num_prompt_instructions), chosen

        return next_round(g, "bootstrap", tpl, params, chat, prompt)

    def absorb(it: Item, res: Completion) -> None:
        text, truncated = res.texts[0], res.finish_reasons[0] == "length"
        parsed = parsing.parse_json_items(text, truncated) if chat else None
        if parsed is not None:
            items = [x.instruction for x in parsed.items]
        else:  # a base model's continuation, or a chat answer that is not JSON
            parsed = parsing.parse_instruction_list(text, truncated, o.first_line_only, leading_item=not chat)
            items = parsed.items
        g.reject_dropped(parsed, it.provenance)
        for instruction in items:
            g.consider(instruction, it.provenance)

    run_rounds(g, "bootstrap", build_round, absorb)


def classify(g: Generation) -> None:
    o = g.o
    if not o.classify:
        for t in g.kept:
            t.is_classification = False
        return
    labelled = [t for t in g.seeds if t.is_classification is not None]
    yes = [s for s in labelled if s.is_classification]
    no = [s for s in labelled if not s.is_classification]
    reqs = []
    for t in g.kept:
        rng = random.Random(f"{g.ctx.seed}:classify:{t.id}")
        k = o.classify_examples // 2
        ex = rng.sample(yes, min(k, len(yes))) + rng.sample(no, min(k, len(no)))
        rng.shuffle(ex)
        text = render(o.templates.classify, examples=example_dicts(ex), instruction=t.instruction)
        reqs.append(g.request(text, o.classify_params, False, tag=f"classify:{t.id}"))
    kept = []
    for t, res in zip(g.kept, g.call("classify", reqs)):
        if not isinstance(res, Completion):  # never guess a label: the task waits for the next run
            g.ctx.reject(t, "classify_request_failed", "the classification request failed; retried on the next run")
            continue
        answer = parsing.parse_yes_no(res.texts[0])
        t.is_classification = bool(answer)
        if answer is None:
            t.meta["classify_unparsed"] = True
            g.m["classify_unparsed"] = g.m.get("classify_unparsed", 0) + 1
        kept.append(t)
    g.kept = kept


def instances(g: Generation) -> None:
    o = g.o
    reqs, tpls = [], []
    for t in g.kept:
        rng = random.Random(f"{g.ctx.seed}:instances:{t.id}")
        if o.instances_style == "answer":
            tpl, chat = o.templates.answer, True
            text = render(tpl, instruction=t.instruction, input="")
        else:
            cls = bool(t.is_classification)
            pool = [s for s in g.seeds if bool(s.is_classification) == cls and s.instances] or g.seeds
            ex = rng.sample(pool, min(o.instance_examples, len(pool)))
            tpl, chat = (o.templates.output_first if cls else o.templates.input_first), False
            text = render(tpl, examples=example_dicts(ex), instruction=t.instruction)
        reqs.append(g.request(text, o.instances_params, chat, tag=f"instances:{t.id}", seed=g.ctx.seed))
        tpls.append(tpl)
    kept = []
    for t, req, tpl, res in zip(g.kept, reqs, tpls, g.call("instances", reqs)):
        if not isinstance(res, Completion):
            g.ctx.reject(t, "instances_request_failed", "the instance request failed; retried on the next run")
            continue
        text, truncated = res.texts[0], res.finish_reasons[0] == "length"
        if o.instances_style == "answer":
            parsed = parsing.parse_answer(text, truncated)
        elif t.is_classification:
            parsed = parsing.parse_output_first(text, truncated, o.max_instances)
        else:
            parsed = parsing.parse_input_first(text, truncated, o.max_instances)
        t.instances = [Instance(input=i, output=out) for i, out in parsed.items]
        g.m["instances_generated"] = g.m.get("instances_generated", 0) + len(t.instances)
        t.provenance.extra["instances_request_key"] = g.client.key(req)
        t.provenance.extra["instances_template"] = tpl
        for dr in parsed.dropped:
            g.m["instances_dropped"] = g.m.get("instances_dropped", 0) + 1
            g.ctx.reject({"task_id": t.id, "text": dr.text}, f"instance_{dr.rule}", dr.reason)
        if not t.instances:
            g.ctx.reject(t, "no_instances", "no usable instance was generated for this instruction")
            continue
        kept.append(t)
    g.kept = kept
