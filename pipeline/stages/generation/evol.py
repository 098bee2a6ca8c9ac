"""Evol-Instruct: rewrite instructions into harder (in-depth) or new (in-breadth) ones, round after round.

Round 1 evolves every seed instruction; round r evolves what round r-1 produced (a lineage whose evolution was
eliminated goes on from its last good instruction). Each instruction of a round gets one operation, drawn from
the run seed, the round and the lineage alone: in-depth (``evol/depth.j2``: add a constraint, deepen,
concretize, more reasoning steps, a richer input) or in-breadth (``evol/breadth.j2``: a new task of the same
kind). A round is one batch of journaled requests, so its prompts depend only on the answers of the rounds
before it and a re-run replays them from the journal; rounds run through
:func:`pipeline.stages.generation.pool.run_rounds`, so a request that failed and answers on a later run joins
the pool at the first round never sent before (its lineage has moved on) and no paid answer is orphaned.

Elimination (each in ``rejected.jsonl`` with its rule): ``evol_no_change`` (the same instruction, normalised),
``evol_copied_prompt`` (the answer repeats the prompt's own words, e.g. "the new task"), ``evol_refusal``,
``evol_too_short`` (fewer than ``evol_min_words`` words), ``evol_request_failed``. Survivors go through the
shared online filter (instruction rules, ROUGE-L against seeds and everything kept), then get instances like
Self-Instruct's (``instances_style``), until ``target`` instructions are kept or the rounds are done.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from pipeline.models.base import Completion, Failure
from pipeline.stages.generation import self_instruct
from pipeline.stages.generation.pool import Generation, Item, run_rounds
from pipeline.text.templates import render

DEPTH = ("add_constraints", "deepen", "concretize", "reasoning", "complicate_input")
BREADTH = "breadth"
# Words of the evolution prompts that never belong in an evolved instruction.
PROMPT_WORDS = re.compile(r"\b(?:the (?:new|original|given|above) task|new task:|rewritten (?:task|prompt|instruction)"
                          r"|write only the new task)\b", re.I)
REFUSAL = re.compile(r"^\W*(?:i'?m sorry|sorry\b|i can(?:no|')t\b|i cannot\b|i am unable|i'?m unable|as an ai\b"
                     r"|i won'?t\b)", re.I)
LEAD = re.compile(r"^\W*(?:new task|task|instruction|rewritten)\s*:\s*", re.I)


@dataclass
class Lineage:
    root: str  # the seed's id
    instruction: str
    input: str
    depth: int = 0  # successful evolutions so far
    built: int = 0  # the last round that asked to evolve it


def _normalised(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def eliminated(parent: str, evolved: str, min_words: int) -> tuple[str, str] | None:
    """(rule, reason) when an evolution fails, else None."""
    if REFUSAL.search(evolved):
        return "evol_refusal", "the model refused to evolve the instruction"
    if _normalised(evolved) == _normalised(parent):
        return "evol_no_change", "the evolved instruction is the instruction it came from"
    if PROMPT_WORDS.search(evolved):
        return "evol_copied_prompt", "the evolved instruction repeats the evolution prompt's own words"
    if len(evolved.split()) < min_words:
        return "evol_too_short", f"fewer than {min_words} words"
    return None


def clean(text: str) -> str:
    """The evolved instruction: the answer without a leading label or quotes."""
    text = LEAD.sub("", (text or "").strip())
    return text.strip().strip('"').strip()


def operation(seed: int, rnd: int, root: str, breadth_share: float) -> str:
    rng = random.Random(f"{seed}:evol:{rnd}:{root}")
    return BREADTH if rng.random() < breadth_share else rng.choice(DEPTH)


def run(g: Generation) -> None:
    o = g.o
    tpl = {"depth": o.templates.evol_depth, "breadth": o.templates.evol_breadth}
    lineages = [Lineage(t.id, t.instruction, t.instances[0].input if t.instances else "") for t in g.seeds]
    lineage_of: dict[str, Lineage] = {}  # request key -> the lineage it evolves

    def build_round(r: int) -> list[Item]:
        rnd = r + 1
        if rnd > o.evol_rounds:
            return []
        items = []
        for ln in lineages[: max(0, o.max_requests - g.requests)]:
            op = operation(g.ctx.seed, rnd, ln.root, o.evol_breadth_share)
            name = tpl["breadth"] if op == BREADTH else tpl["depth"]
            text = render(name, operation=op, instruction=ln.instruction, input=ln.input)
            req = g.request(text, o.evol_params, True, tag=f"evol:{rnd}:{ln.root}", seed=g.ctx.seed * 1_000_003 + rnd)
            it = g.item(req, name, [ln.root])
            it.provenance.extra.update(evol_round=rnd, evol_operation=op, evol_parent=ln.instruction)
            ln.built = rnd
            lineage_of[it.key] = ln
            items.append(it)
        g.requests += len(items)
        return items

    def record(it: Item) -> dict:
        x = it.provenance.extra
        return {"root": lineage_of[it.key].root, "parent": x["evol_parent"], "operation": x["evol_operation"],
                "round": x["evol_round"], "provenance": it.provenance.model_dump()}

    def absorb(it: Item, res: Completion) -> None:
        ln, x = lineage_of[it.key], it.provenance.extra
        evolved = clean(res.texts[0])
        why = eliminated(x["evol_parent"], evolved, o.evol_min_words)
        if why is not None:
            g.ctx.reject({**record(it), "text": evolved}, *why)
            return
        if ln.built == x["evol_round"]:  # a late answer (a retried failure) joins the pool; its lineage moved on
            ln.instruction, ln.depth = evolved, ln.depth + 1
            ln.input = "" if x["evol_operation"] == BREADTH else ln.input
        g.consider(evolved, it.provenance)  # consider keeps its own copy

    def failed(it: Item, res: Failure) -> None:
        g.ctx.reject(record(it), "evol_request_failed", f"the evolution request failed ({res.kind})")

    run_rounds(g, "evol", build_round, absorb, failed)
    self_instruct.classify(g)
    self_instruct.instances(g)
