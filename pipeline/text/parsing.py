"""Parsing model completions into items, robustly.

Nothing here locks onto item numbers: items are split on any list number, so a malformed, skipped or
repeated number drops at most its own item. A completion cut by the length limit drops only its last item.
Case is never changed. Every dropped item comes back with a reason.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.text.rules import normalize_empty_input

ITEM_SPLIT = re.compile(r"\n\s*\d{1,3}\s*[.)]\s*")
EXAMPLE_SPLIT = re.compile(r"(?:^|\n)\s*(?:#+\s*)?Example\s*\d*\s*[:.]?\s*\n", re.I)
LABEL_SPLIT = re.compile(r"(?:^|\n)\s*(?:Class\s+)?label\s*:\s*", re.I)
INPUT_RE = re.compile(r"(?:^|\n)\s*Input\s*:\s*", re.I)
OUTPUT_RE = re.compile(r"(?:^|\n)\s*Output\s*:\s*", re.I)
HEADER_RE = re.compile(r"(?:^|\n)\s*(?:\d{1,3}\s*[.)]\s*)?(?:#+\s*)?(?:Instruction|Input|Output|Example\s*\d*|"
                       r"(?:Class\s+)?label)\s*:", re.I)
ALPACA_FIELD = re.compile(r"(?:^|\n)\s*(?:\d{1,3}\s*[.)]\s*)?(Instruction|Input|Output)\s*:\s*", re.I)


@dataclass
class Dropped:
    text: str
    rule: str
    reason: str


@dataclass
class Parsed:
    items: list = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)


class Item(BaseModel):
    model_config = ConfigDict(extra="ignore")

    instruction: str
    input: str = ""
    output: str = ""


# ---- numbered instruction lists (Self-Instruct bootstrap) ------------------------------------------------

def parse_instruction_list(completion: str, truncated: bool, first_line_only: bool = False) -> Parsed:
    """Instructions from a completion that continues a numbered list (the prompt ended on "N.")."""
    out = Parsed()
    pieces = ITEM_SPLIT.split("\n" + completion.lstrip(" \t") if completion.lstrip().startswith(tuple("0123456789"))
                              else completion)
    pieces = [p for p in pieces]
    if truncated and pieces:
        last = pieces.pop()
        if last.strip():
            out.dropped.append(Dropped(last.strip(), "truncated", "the completion hit the length limit inside this item"))
    for piece in pieces:
        text = piece.strip()
        if first_line_only:
            text = text.split("\n", 1)[0].strip()
        elif "\n\n" in text:
            text = text.split("\n\n", 1)[0].strip()
        if not text:
            continue
        if HEADER_RE.search("\n" + text):
            out.dropped.append(Dropped(text, "malformed_item", "the item carries an Input/Output header"))
            continue
        out.items.append(" ".join(text.split()))
    return out


# ---- instances --------------------------------------------------------------------------------------------

def _split_io(block: str) -> tuple[str | None, str | None]:
    o = OUTPUT_RE.search(block)
    if not o:
        return None, None
    before, output = block[: o.start()], block[o.end():]
    i = INPUT_RE.search(before)
    inp = before[i.end():] if i else ""
    return inp.strip(), output.strip()


def parse_input_first(completion: str, truncated: bool, max_instances: int = 5) -> Parsed:
    """``Example N / Input: / Output:`` blocks (or just ``Output:`` for tasks that need no input)."""
    out = Parsed()
    blocks = [b for b in EXAMPLE_SPLIT.split("\n" + completion) if b.strip()]
    if not blocks:
        return out
    if truncated:
        out.dropped.append(Dropped(blocks.pop().strip(), "truncated", "the completion hit the length limit"))
    for b in blocks:
        inp, output = _split_io(b)
        if output is None:
            out.dropped.append(Dropped(b.strip(), "malformed_item", "no 'Output:' in this example"))
            continue
        if HEADER_RE.search(output):
            out.dropped.append(Dropped(b.strip(), "merged_item", "the output carries another item's header"))
            continue
        out.items.append((normalize_empty_input(inp or ""), output))
    out.items = out.items[:max_instances]
    return out


def parse_output_first(completion: str, truncated: bool, max_instances: int = 5) -> Parsed:
    """``Class label: X / Input: ...`` blocks: the label is the output, then an input for it."""
    out = Parsed()
    blocks = [b for b in LABEL_SPLIT.split(completion) if b.strip()]
    if completion.strip() and not LABEL_SPLIT.match(completion) and blocks:
        first = blocks[0]
        if not INPUT_RE.search(first):
            blocks = blocks[1:]  # preamble before the first label
    if truncated and blocks:
        out.dropped.append(Dropped(blocks.pop().strip(), "truncated", "the completion hit the length limit"))
    for b in blocks:
        label, _, rest = b.partition("\n")
        label = label.strip()
        m = INPUT_RE.search("\n" + rest)
        if not label or m is None:
            out.dropped.append(Dropped(b.strip(), "malformed_item", "a label without an input"))
            continue
        inp = ("\n" + rest)[m.end():].strip()
        if HEADER_RE.search(inp):
            out.dropped.append(Dropped(b.strip(), "merged_item", "the input carries another item's header"))
            continue
        out.items.append((normalize_empty_input(inp), label))
    out.items = out.items[:max_instances]
    return out


# ---- Alpaca: instruction + input + output together ---------------------------------------------------

def parse_alpaca(completion: str, truncated: bool) -> Parsed:
    out = Parsed()
    blocks = [b for b in re.split(r"\n?\s*###\s*\n?", completion) if b.strip()]
    if truncated and blocks:
        out.dropped.append(Dropped(blocks.pop().strip(), "truncated", "the completion hit the length limit"))
    for i, b in enumerate(blocks):
        text = ("Instruction: " + b) if i == 0 and not ALPACA_FIELD.match(b) else b
        fields: dict[str, str] = {}
        matches = list(ALPACA_FIELD.finditer("\n" + text))
        dup = False
        for j, m in enumerate(matches):
            name = m.group(1).lower()
            end = matches[j + 1].start() if j + 1 < len(matches) else len(text) + 1
            if name in fields:
                dup = True
            fields[name] = ("\n" + text)[m.end():end].strip()
        if dup:
            out.dropped.append(Dropped(b.strip(), "merged_item", "the item repeats a field (two items merged)"))
            continue
        if not fields.get("instruction") or "output" not in fields:
            out.dropped.append(Dropped(b.strip(), "malformed_item", "missing Instruction or Output"))
            continue
        out.items.append(Item(instruction=" ".join(fields["instruction"].split()),
                              input=normalize_empty_input(fields.get("input", "")), output=fields["output"]))
    return out


# ---- JSON answers -------------------------------------------------------------------------------------------

def extract_json_list(text: str) -> list | None:
    """The first JSON list in ``text`` (markdown fences and trailing prose allowed)."""
    dec = json.JSONDecoder()
    for m in re.finditer(r"[\[{]", text):
        try:
            value, _ = dec.raw_decode(text[m.start():])
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            for v in value.values():
                if isinstance(v, list):
                    return v
            return [value]
        if isinstance(value, list):
            return value
    return None


def parse_json_items(text: str) -> Parsed | None:
    """Items from a JSON answer, each validated; None when no JSON list is there (use the text parser)."""
    data = extract_json_list(text)
    if data is None:
        return None
    out = Parsed()
    for raw in data:
        if isinstance(raw, str):
            raw = {"instruction": raw}
        try:
            item = Item.model_validate(raw)
        except ValidationError as e:
            out.dropped.append(Dropped(json.dumps(raw, ensure_ascii=False)[:500], "malformed_item",
                                       f"invalid item: {e.errors()[0]['msg']}"))
            continue
        if not item.instruction.strip():
            out.dropped.append(Dropped(json.dumps(raw, ensure_ascii=False)[:500], "malformed_item", "empty instruction"))
            continue
        if HEADER_RE.search(item.output):
            out.dropped.append(Dropped(item.output[:500], "merged_item", "the output carries another item's header"))
            continue
        out.items.append(item.model_copy(update={"instruction": " ".join(item.instruction.split()),
                                                 "input": normalize_empty_input(item.input)}))
    return out


def parse_yes_no(text: str) -> bool | None:
    m = re.match(r"\s*(yes|no)\b", text, re.I)
    return None if m is None else m.group(1).lower() == "yes"
