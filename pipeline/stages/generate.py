"""``generate``: grow an instruction dataset from seed tasks with a model.

``mode: self_instruct`` runs Self-Instruct's steps, each with its own journaled requests:

1. bootstrap instructions — each prompt lists in-context instructions (6 seeds + 2 from the machine pool once
   it has two; all seeds before) and ends on the next list number (or, ``bootstrap_style: chat``, asks for a
   JSON list);
2. classify each new instruction (few-shot, the examples drawn from the seed tasks' own labels);
3. generate instances — output-first for classification tasks, input-first otherwise (or
   ``instances_style: answer``: the model simply answers the instruction, what a small instruct model does best).

``mode: alpaca`` writes instruction, input and output together, 3 seed tasks per prompt.

Generation continues until ``target`` instructions pass the instruction rules and the ROUGE-L near-duplicate
check against seeds plus everything kept so far (the same code as the filter and dedup stages), or until
``max_requests``. The in-context examples of request i come from the run seed and i alone, so the same seed
and the same answers give the same dataset across any number of resumes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.models.base import Completion, GenParams, Message, ModelRequest
from pipeline.records import Instance, Provenance, Task
from pipeline.stages.context import StageContext
from pipeline.text import parsing
from pipeline.text.rouge import NearDuplicateIndex
from pipeline.text.rules import InstructionRules, check_instruction
from pipeline.text.templates import render, template_file

RAW_FILE = "raw_completions.jsonl"


class Templates(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bootstrap: str = "self_instruct/bootstrap.j2"
    bootstrap_chat: str = "self_instruct/bootstrap_chat.j2"
    classify: str = "self_instruct/classify.j2"
    input_first: str = "self_instruct/instances_input_first.j2"
    output_first: str = "self_instruct/instances_output_first.j2"
    answer: str = "self_instruct/answer.j2"
    alpaca: str = "alpaca/generate.j2"
    alpaca_chat: str = "alpaca/generate_chat.j2"


def _params(**kw) -> GenParams:
    return GenParams(**kw)


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    mode: Literal["self_instruct", "alpaca"] = "self_instruct"
    target: int = Field(100, ge=1)  # instructions that pass the online filters
    max_requests: int = Field(1000, ge=1)  # bootstrap (or alpaca) requests at most
    batch_size: int = Field(8, ge=1)  # requests per round
    num_prompt_instructions: int = Field(8, ge=1)  # in-context instructions per bootstrap prompt
    num_machine_examples: int = Field(2, ge=0)  # of them from the machine pool once it holds this many
    bootstrap_style: Literal["completion", "chat"] = "completion"
    first_line_only: bool = False  # keep only the first line of each item (for small models)
    classify: bool = True  # false: every new task is treated as non-classification
    classify_examples: int = 12
    instances_style: Literal["input_first", "answer"] = "input_first"
    instance_examples: int = 2
    max_instances: int = Field(5, ge=1)
    alpaca_style: Literal["completion", "chat"] = "completion"
    alpaca_examples: int = 3
    alpaca_num_tasks: int = 20
    json_mode: bool = False  # ask the backend for JSON output in chat prompts
    templates: Templates = Field(default_factory=Templates)
    bootstrap_params: GenParams = Field(default_factory=lambda: _params(
        temperature=0.7, top_p=0.5, max_tokens=1024, presence_penalty=2.0, stop=["\n\n", "\n16."]))
    classify_params: GenParams = Field(default_factory=lambda: _params(temperature=0.0, max_tokens=3))
    instances_params: GenParams = Field(default_factory=lambda: _params(
        temperature=0.0, max_tokens=300, presence_penalty=1.5, stop=["\nTask:"]))
    alpaca_params: GenParams = Field(default_factory=lambda: _params(temperature=1.0, top_p=1.0, max_tokens=3072))
    instruction_rules: InstructionRules = Field(default_factory=InstructionRules)
    rouge_threshold: float = Field(0.7, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _examples_fit(self) -> Options:
        if self.num_machine_examples >= self.num_prompt_instructions:
            raise ValueError("num_machine_examples must be smaller than num_prompt_instructions")
        return self


def _used_templates(o: Options) -> list[str]:
    t = o.templates
    if o.mode == "alpaca":
        return [t.alpaca if o.alpaca_style == "completion" else t.alpaca_chat]
    used = [t.bootstrap if o.bootstrap_style == "completion" else t.bootstrap_chat]
    if o.classify:
        used.append(t.classify)
    used += [t.input_first, t.output_first] if o.instances_style == "input_first" else [t.answer]
    return used


def dependencies(options: Options) -> list[Path]:
    return [template_file(t) for t in _used_templates(options)]


SAMPLE_TASKS = [Task(id="s0", instruction="Name the capital of the given country.",
                     instances=[Instance(input="France", output="Paris")], is_classification=False),
                Task(id="s1", instruction="Is the review positive or negative?",
                     instances=[Instance(input="Great food.", output="Positive")], is_classification=True)]


def check(options: Options) -> None:
    ex = SAMPLE_TASKS
    for name in _used_templates(options):
        render(name, instructions=[t.instruction for t in ex], num_new=5, examples=_example_dicts(ex),
               instruction=ex[0].instruction, input="", num_tasks=5)


def _example_dicts(tasks: list[Task]) -> list[dict]:
    """Examples for templates: each task with its instances, plus its first instance's input/output."""
    out = []
    for t in tasks:
        first = t.instances[0] if t.instances else Instance()
        out.append({"instruction": t.instruction, "is_classification": bool(t.is_classification),
                    "instances": [i.model_dump() for i in t.instances], "input": first.input, "output": first.output})
    return out


class _Gen:
    """State of one generation run."""

    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        self.o: Options = ctx.options
        seeds_in = ctx.find_input("seeds") or ctx.previous()
        self.seeds = list(ctx.read_records(seeds_in))
        if not self.seeds:
            raise ValueError("no seed tasks to learn from")
        self.client = ctx.model(self.o.model)
        self.identity = self.client.identity()
        self.index = NearDuplicateIndex(self.o.rouge_threshold)
        for t in self.seeds:
            self.index.add(t.instruction, t.id)
        self.kept: list[Task] = []
        self.requests = 0
        self.raw = open(ctx.out_dir / RAW_FILE, "w", encoding="utf-8")
        self.m = ctx.stats.metrics
        self.m.update(requests=0, failed_requests=0, items_parsed=0, instructions_kept=0)

    def log_raw(self, step: str, req: ModelRequest, res) -> None:
        rec = {"step": step, "key": req.key(self.identity), "tag": req.tag}
        if isinstance(res, Completion):
            rec.update(texts=res.texts, finish_reasons=res.finish_reasons)
        else:
            rec.update(failure=res.error, kind=res.kind)
        self.raw.write(json.dumps(rec, ensure_ascii=False) + "\n")

    def call(self, step: str, reqs: list[ModelRequest]):
        results = self.client.generate(reqs, desc=step)
        self.requests += len(reqs) if step in ("bootstrap", "alpaca") else 0
        self.m["requests"] += len(reqs)
        for r, res in zip(reqs, results):
            self.log_raw(step, r, res)
            if not isinstance(res, Completion):
                self.m["failed_requests"] += 1
        return results

    def request(self, text: str, params: GenParams, chat: bool, tag: str, seed: int | None = None) -> ModelRequest:
        p = params.model_copy(update={"seed": seed}) if seed is not None else params
        if chat:
            return ModelRequest(messages=[Message(role="user", content=text)], params=p, tag=tag)
        return ModelRequest(prompt=text, params=p, tag=tag)

    # ---- online filter, shared by both modes
    def consider(self, instruction: str, prov: Provenance, instances: list[Instance] | None = None) -> Task | None:
        self.m["items_parsed"] += 1
        cand = Task(id=f"gen_{self.m['items_parsed'] - 1:06d}", instruction=instruction,
                    instances=instances or [], source="generated", provenance=prov.model_copy(deep=True))
        if len(self.kept) >= self.o.target:
            self.ctx.reject(cand, "target_reached", f"the target of {self.o.target} instructions was reached")
            return None
        hit = check_instruction(instruction, self.o.instruction_rules)
        if hit:
            self.ctx.reject(cand, hit.rule, hit.reason)
            return None
        d = self.index.check_and_add(instruction, cand.id)
        cand.meta.update(rouge_nearest=d.nearest, rouge_score=round(d.score, 6))
        if not d.kept:
            self.ctx.reject(cand, "rouge_near_duplicate", f"ROUGE-L {d.score:.3f} with {d.nearest}")
            return None
        self.kept.append(cand)
        self.m["instructions_kept"] = len(self.kept)
        return cand

    def reject_dropped(self, parsed: parsing.Parsed, prov: Provenance) -> None:
        for dr in parsed.dropped:
            self.m["items_parsed"] += 1
            self.ctx.reject({"text": dr.text, "provenance": prov.model_dump()}, dr.rule, dr.reason)

    def done(self) -> bool:
        return len(self.kept) >= self.o.target or self.requests >= self.o.max_requests


def _bootstrap(g: _Gen) -> None:
    o = g.o
    bar = g.ctx.progress(o.target, "instructions kept")
    while not g.done():
        n = min(o.batch_size, o.max_requests - g.requests)
        reqs, provs = [], []
        machine = [t for t in g.kept]
        for b in range(n):
            i = g.requests + b
            rng = random.Random(f"{g.ctx.seed}:bootstrap:{i}")
            k_machine = min(o.num_machine_examples, len(machine)) if len(machine) >= o.num_machine_examples else 0
            chosen = rng.sample(g.seeds, min(len(g.seeds), o.num_prompt_instructions - k_machine))
            chosen += rng.sample(machine, k_machine)
            rng.shuffle(chosen)
            instrs = [t.instruction for t in chosen]
            chat = o.bootstrap_style == "chat"
            tpl = o.templates.bootstrap_chat if chat else o.templates.bootstrap
            text = render(tpl, instructions=instrs, num_new=o.num_prompt_instructions)
            params = o.bootstrap_params.model_copy(update={"json_schema": {"type": "array", "items": {"type": "string"}}}) \
                if chat and o.json_mode else o.bootstrap_params
            req = g.request(text, params, chat, tag=f"bootstrap:{i}", seed=g.ctx.seed * 1_000_003 + i)
            reqs.append(req)
            provs.append(Provenance(request_key=req.key(g.identity), model=g.identity, template=tpl,
                                    examples=[t.id for t in chosen]))
        before = len(g.kept)
        for req, prov, res in zip(reqs, provs, g.call("bootstrap", reqs)):
            if not isinstance(res, Completion):
                continue
            text, truncated = res.texts[0], res.finish_reasons[0] == "length"
            chat = o.bootstrap_style == "chat"
            parsed = parsing.parse_json_items(text, truncated) if chat else None
            if parsed is not None:
                items = [it.instruction for it in parsed.items]
            else:  # a base model's continuation, or a chat answer that is not JSON
                parsed = parsing.parse_instruction_list(text, truncated, o.first_line_only, leading_item=not chat)
                items = parsed.items
            g.reject_dropped(parsed, prov)
            for instruction in items:
                g.consider(instruction, prov)
        bar.update(len(g.kept) - before)
    bar.close()


def _classify(g: _Gen) -> None:
    o = g.o
    if not o.classify:
        for t in g.kept:
            t.is_classification = False
        return
    labelled = [t for t in g.seeds if t.is_classification is not None]
    reqs = []
    for n, t in enumerate(g.kept):
        rng = random.Random(f"{g.ctx.seed}:classify:{t.id}")
        yes = [s for s in labelled if s.is_classification]
        no = [s for s in labelled if not s.is_classification]
        k = o.classify_examples // 2
        ex = rng.sample(yes, min(k, len(yes))) + rng.sample(no, min(k, len(no)))
        rng.shuffle(ex)
        text = render(o.templates.classify, examples=_example_dicts(ex), instruction=t.instruction)
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


def _instances(g: _Gen) -> None:
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
            text = render(tpl, examples=_example_dicts(ex), instruction=t.instruction)
        reqs.append(g.request(text, o.instances_params, chat, tag=f"instances:{t.id}", seed=g.ctx.seed))
        tpls.append(tpl)
    results = g.call("instances", reqs)
    kept = []
    for t, req, tpl, res in zip(g.kept, reqs, tpls, results):
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
        t.provenance.extra["instances_request_key"] = req.key(g.identity)
        t.provenance.extra["instances_template"] = tpl
        for dr in parsed.dropped:
            g.ctx.stats.metrics["instances_dropped"] = g.ctx.stats.metrics.get("instances_dropped", 0) + 1
            g.ctx.reject({"task_id": t.id, "text": dr.text}, f"instance_{dr.rule}", dr.reason)
        if not t.instances:
            g.ctx.reject(t, "no_instances", "no usable instance was generated for this instruction")
            continue
        kept.append(t)
    g.kept = kept


def _alpaca(g: _Gen) -> None:
    o = g.o
    bar = g.ctx.progress(o.target, "instructions kept")
    while not g.done():
        n = min(o.batch_size, o.max_requests - g.requests)
        reqs, provs = [], []
        for b in range(n):
            i = g.requests + b
            rng = random.Random(f"{g.ctx.seed}:alpaca:{i}")
            ex = rng.sample(g.seeds, min(o.alpaca_examples, len(g.seeds)))
            chat = o.alpaca_style == "chat"
            tpl = o.templates.alpaca_chat if chat else o.templates.alpaca
            text = render(tpl, examples=_example_dicts(ex), num_tasks=o.alpaca_num_tasks)
            params = o.alpaca_params
            if chat and o.json_mode:
                params = params.model_copy(update={"json_schema": {"type": "array", "items": {
                    "type": "object", "properties": {k: {"type": "string"} for k in ("instruction", "input", "output")},
                    "required": ["instruction", "input", "output"]}}})
            req = g.request(text, params, chat, tag=f"alpaca:{i}", seed=g.ctx.seed * 1_000_003 + i)
            reqs.append(req)
            provs.append(Provenance(request_key=req.key(g.identity), model=g.identity, template=tpl,
                                    examples=[t.id for t in ex]))
        before = len(g.kept)
        for prov, res in zip(provs, g.call("alpaca", reqs)):
            if not isinstance(res, Completion):
                continue
            text, truncated = res.texts[0], res.finish_reasons[0] == "length"
            chat = o.alpaca_style == "chat"
            parsed = parsing.parse_json_items(text, truncated, required=("instruction", "output")) if chat else None
            if parsed is None:
                parsed = parsing.parse_alpaca(text, truncated, chat=chat)
            g.reject_dropped(parsed, prov)
            for it in parsed.items:
                g.consider(it.instruction, prov, [Instance(input=it.input, output=it.output)])
        bar.update(len(g.kept) - before)
    bar.close()
    for t in g.kept:
        t.is_classification = None


def run(ctx: StageContext) -> None:
    g = _Gen(ctx)
    try:
        ctx.stats.rows_in = len(g.seeds)
        if g.o.mode == "alpaca":
            _alpaca(g)
        else:
            _bootstrap(g)
            _classify(g)
            _instances(g)
        ctx.write_records(g.kept)
        if g.o.mode == "alpaca":
            ctx.stats.metrics["instances_generated"] = sum(len(t.instances) for t in g.kept)
        ctx.stats.metrics.update(tasks_out=len(g.kept), instances_out=sum(len(t.instances) for t in g.kept),
                                 classification=sum(1 for t in g.kept if t.is_classification))
    finally:
        g.raw.close()
