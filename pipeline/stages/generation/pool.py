"""What every generation algorithm shares: the seeds, the model, the online filter, and rounds that never re-key.

The online filter is the same for every mode: the instruction rules, then the ROUGE-L near-duplicate check
against the seeds and everything kept so far (the code the filter and dedup stages use).

Rounds: a prompt of round r shows only what rounds before r kept, so the requests of a round are fixed once
the rounds before it are. A request that failed transiently in an earlier run is never re-sent inside its own
round when later rounds were already paid for (its answer would change their prompts and orphan their
answers): it waits for the first round that has requests never sent — the frontier — or for the end, and its
answer joins the pool there. Where it joined is kept in the stage's journal state, so every later run replays
the same order and the same prompts.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.models.base import Completion, Failure, GenParams, Message, ModelRequest, ModelResult
from pipeline.records import Instance, Provenance, Task
from pipeline.stages.context import StageContext
from pipeline.stages.generation.options import Options
from pipeline.text import parsing
from pipeline.text.rouge import NearDuplicateIndex
from pipeline.text.rules import check_instruction

RAW_FILE = "raw_completions.jsonl"
ROUND = 8  # requests per round for options built outside a config (a config resolves batch_size to the model's)
LATE = "late:"  # journal state: request key -> the round its late answer joined


@dataclass
class Item:
    """One request of a round and where its answer's records come from."""

    request: ModelRequest
    provenance: Provenance
    key: str


class Generation:
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

    def close(self) -> None:
        self.raw.close()

    def log_raw(self, step: str, req: ModelRequest, res: ModelResult) -> None:
        rec = {"step": step, "key": self.client.key(req), "tag": req.tag}
        if isinstance(res, Completion):
            rec.update(texts=res.texts, finish_reasons=res.finish_reasons)
        else:
            rec.update(failure=res.error, kind=res.kind, permanent=res.permanent)
        self.raw.write(json.dumps(rec, ensure_ascii=False) + "\n")

    def call(self, step: str, reqs: list[ModelRequest]) -> list[ModelResult]:
        results = self.client.generate(reqs, desc=step) if reqs else []
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

    def item(self, req: ModelRequest, template: str, examples: list[str]) -> Item:
        key = self.client.key(req)
        return Item(req, Provenance(request_key=key, model=self.identity, template=template, examples=examples), key)

    # ---- the online filter, shared by every mode
    def consider(self, instruction: str, prov: Provenance, instances: list[Instance] | None = None) -> Task | None:
        self.m["items_parsed"] += 1
        cand = Task(id=f"gen_{self.m['items_parsed'] - 1:06d}", instruction=instruction,
                    instances=instances or [], source="generated",
                    provenance=prov.model_copy(update={"extra": dict(prov.extra)}))  # only extra is ever changed
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
        if not parsed.items and not parsed.dropped:  # an answer is never left without a trace
            self.ctx.reject({"text": "", "provenance": prov.model_dump()}, "no_items", "the answer held no item")

    def done(self) -> bool:
        return len(self.kept) >= self.o.target or self.requests >= self.o.max_requests


Absorb = Callable[[Item, Completion], None]
Prompt = Callable[[random.Random], tuple[str, list[Task]]]


def next_round(g: Generation, step: str, template: str, params: GenParams, chat: bool, prompt: Prompt) -> list[Item]:
    """The next round's requests: up to ``batch_size`` until ``max_requests``. Request i's prompt (its text and
    the tasks it shows) is drawn by ``prompt`` from a generator seeded by the run seed, the step and i alone."""
    n = max(0, min(g.o.batch_size or ROUND, g.o.max_requests - g.requests))
    items = []
    for i in range(g.requests, g.requests + n):
        text, shown = prompt(random.Random(f"{g.ctx.seed}:{step}:{i}"))
        req = g.request(text, params, chat, tag=f"{step}:{i}", seed=g.ctx.seed * 1_000_003 + i)
        items.append(g.item(req, template, [t.id for t in shown]))
    g.requests += n
    return items


def run_rounds(g: Generation, step: str, build_round: Callable[[int], list[Item]], absorb: Absorb,
               failed: Callable[[Item, Failure], None] | None = None) -> None:
    """Rounds of requests until ``g.done()`` or an empty round; each answer is absorbed in an order every later
    run replays. ``failed`` hears of each request that failed in its round (it is retried on the next run)."""
    store = g.ctx.store
    placed = {k[len(LATE):]: int(v) for k, v in store.items(LATE)} if store is not None else {}
    held: dict[int, list[Item]] = {}  # answers placed at a later round than their own
    deferred: list[Item] = []  # transient failures of replayed rounds, waiting for the frontier
    bar = g.ctx.progress(g.o.target, "instructions kept")
    r = 0

    def place(items: list[Item], at: int) -> None:
        for it in items:
            placed[it.key] = at
            if store is not None:
                store.put(LATE + it.key, str(at))

    def play(members: list[Item], states: list[str] | None) -> None:
        """A round: every member sent (``states`` None: the frontier, or the end), or a replayed round
        (``states`` from the journal), which re-reads its answers and permanent failures while its transient
        failures wait for the frontier."""
        before = len(g.kept)
        send = members if states is None else [it for it, s in zip(members, states) if s in ("answered", "terminal")]
        results = dict(zip((id(it) for it in send), g.call(step, [it.request for it in send])))
        for i, it in enumerate(members):
            res = results.get(id(it))
            if isinstance(res, Completion):
                it.provenance.request_key = g.client.key(it.request)  # the form that answered
                absorb(it, res)
            elif states is not None and states[i] == "failed":
                deferred.append(it)
            elif isinstance(res, Failure) and failed is not None:
                failed(it, res)
        bar.update(len(g.kept) - before)

    while not g.done():
        own = build_round(r)
        if not own and not held:
            break
        for it in own:
            if placed.get(it.key, r) != r:
                held.setdefault(placed[it.key], []).append(it)
        members = [it for it in own if placed.get(it.key, r) == r] + held.pop(r, [])
        states = g.client.lookup([it.request for it in members])
        if "new" not in states:
            play(members, states)
        else:  # the frontier: the first round never sent before, where deferred answers join
            place(deferred, r)
            members, deferred[:] = members + deferred, []
            play(members, None)
        r += 1
    late = [it for at in sorted(held) for it in held[at]]
    if deferred:
        place(deferred, r)
        late, deferred[:] = late + deferred, []
    if late:
        play(late, None)
    bar.close()
