"""dedup's ``mode: exact`` greedy pass on tokens made beforehand: the same decisions wherever the tokens come from.

The caller turns each record into an :class:`Item` (its compared tokens and the keys that find an Evol
rewrite's parent) — in one process from the records it holds, on Ray from what the workers sent back — and
:func:`greedy` makes :class:`pipeline.text.rouge.NearDuplicateIndex`'s decisions over them in input order.
Nothing in the pass depends on where an item was made, so both paths write the same files.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from pipeline.text.rouge import Decision, NearDuplicateIndex, rouge_l_f1
from pipeline.text.shared import N as N_SHARED
from pipeline.text.shared import SharedText


@dataclass
class Item:
    """One record as the pass sees it."""

    id: str
    instruction: list[str]  # tokens of the instruction
    input: list[str] | None  # tokens of the first instance's input (only where inputs are compared)
    text: Hashable  # the normalised instruction, or a digest of it (an Evol rewrite's parent is found by it)
    parent: Hashable | None  # the same for the instruction it was evolved from (None: not an Evol rewrite)


def greedy(seeds: list[Item], tasks: list[Item], threshold: float, with_input: bool, shared_text: bool,
           exact_nearest: bool) -> tuple[list[Decision], dict[str, Any]]:
    """The decision for every task (seeds are the initial pool) and the ``shared_text`` metric ({} when none
    was left out). Tokens are looked up by id, as the items' keys in the index are their ids."""
    index = NearDuplicateIndex(threshold)
    ins = {x.id: x.instruction for x in seeds + tasks}
    shared_ins = SharedText.find([ins[x.id] for x in tasks]) if shared_text else SharedText()
    inp: dict[str, list[str]] = {x.id: x.input or [] for x in seeds + tasks} if with_input else {}
    shared_inp = SharedText.find([inp[x.id] for x in tasks]) if with_input and shared_text else SharedText()
    if with_input:
        inp = {k: shared_inp.strip(v) for k, v in inp.items()}
    by_text: dict[Hashable, list[str]] = {}  # normalised instruction -> ids in the pool (an Evol rewrite's parent)
    evolved = any(x.parent is not None for x in tasks)
    for seed in seeds:
        index.add("", seed.id, tokens=shared_ins.strip(ins[seed.id]))
        if evolved:
            by_text.setdefault(seed.text, []).append(seed.id)
    out = []
    for task in tasks:
        accept = _acceptor(task, inp, by_text, threshold) if (with_input or task.parent is not None) else None
        d = index.check_and_add("", task.id, exact_nearest=exact_nearest, accept=accept,
                                tokens=shared_ins.strip(ins[task.id]))
        if d.kept and evolved:
            by_text.setdefault(task.text, []).append(task.id)
        out.append(d)
    metrics: dict[str, Any] = {}
    if shared_ins.records or shared_inp.records:
        metrics = {
            "ngram_tokens": N_SHARED, "instruction_ngrams": len(shared_ins.ngrams) + len(shared_ins.long_ngrams),
            "input_ngrams": len(shared_inp.ngrams) + len(shared_inp.long_ngrams),
            "records": shared_ins.records + shared_inp.records,
            "tokens_left_out": shared_ins.tokens + shared_inp.tokens,
            "examples": shared_ins.examples() + shared_inp.examples()}
    return out, metrics


def _acceptor(task: Item, inp: dict[str, list[str]], by_text: dict[Hashable, list[str]],
              t: float) -> Callable[[str], bool]:
    """Whether a kept item close in instruction makes ``task`` a duplicate: not its Evol parent; with inputs
    compared, only when the inputs are near too (or both empty)."""
    parents = set(by_text.get(task.parent, [])) if task.parent is not None else set()
    mine = inp.get(task.id)

    def accept(key: str) -> bool:
        if key in parents:
            return False
        if mine is None:
            return True
        theirs = inp[key]
        if not mine or not theirs:
            return not mine and not theirs
        return rouge_l_f1(mine, theirs) > t

    return accept
