"""Parsing model completions into items, robustly.

Nothing here locks onto item numbers: items are split on any list number (or bullet, in chat answers), so a
malformed, skipped or repeated number drops at most its own item. A completion cut by the length limit drops
only its last item (JSON answers included: every complete element before the cut is kept). Case is never
changed. Every dropped item comes back with a rule and a reason. Pure functions; nothing above ``text``/``records``
is imported.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.text.rules import normalize_empty_input

# A list number at the start of a line: "10.", "10)", "10 ." -- but not a decimal such as "3.5".
ITEM_SPLIT = re.compile(r"\n[ \t]*\d{1,3}[ \t]*[.)](?!\d)[ \t]*")
# Chat answers also use bullets.
CHAT_ITEM_SPLIT = re.compile(r"\n[ \t]*(?:\d{1,3}[ \t]*[.)](?!\d)|[-*\u2022](?!\*))[ \t]*")
EXAMPLE_SPLIT = re.compile(r"(?:^|\n)\s*(?:#+\s*)?Example\s*\d*\s*[:.]?\s*\n", re.I)
LABEL_SPLIT = re.compile(r"(?:^|\n)\s*(?:Class\s+)?label\s*:\s*", re.I)
INPUT_RE = re.compile(r"(?:^|\n)\s*Input\s*:\s*", re.I)
OUTPUT_RE = re.compile(r"(?:^|\n)\s*Output\s*:\s*", re.I)
# The model began the next task of a few-shot instance prompt: the completion ends there.
NEXT_TASK_RE = re.compile(r"\n\s*Task\s*:", re.I)
HEADER_RE = re.compile(r"(?:^|\n)\s*(?:\d{1,3}\s*[.)]\s*)?(?:#+\s*)?\**\s*(?:Instruction|Input|Output|Example\s*\d*|"
                       r"(?:Class\s+)?label)\s*\**\s*:", re.I)
# A field header; it never consumes the line break after the colon (an empty field must not hide the next one).
ALPACA_FIELD = re.compile(r"(?:^|\n)\s*(?:\d{1,3}[ \t]*[.)][ \t]*)?\**[ \t]*(Instruction|Input|Output)[ \t]*\**[ \t]*:"
                          r"[ \t]*\**[ \t]*", re.I)
ALPACA_ITEM_START = re.compile(r"(?:^|\n)(?=\s*(?:\d{1,3}\s*[.)]\s*)?\**\s*Instruction\s*\**\s*:)", re.I)
BOLD = re.compile(r"\*\*(.+?)\*\*")


@dataclass
class Dropped:
    text: str
    rule: str  # truncated | malformed_item | merged_item | over_limit
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


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _cut_at_blank_line(completion: str, truncated: bool) -> tuple[str, bool]:
    """Emulate a line-anchored "blank line" stop: what follows the first blank line is not part of the list."""
    head, sep, _ = completion.partition("\n\n")
    if sep and head.strip():
        return head, False
    return completion, truncated


# ---- numbered instruction lists (Self-Instruct bootstrap) ------------------------------------------------

def parse_instruction_list(completion: str, truncated: bool, first_line_only: bool = False,
                           leading_item: bool = True) -> Parsed:
    """Instructions from a numbered list.

    ``leading_item``: the completion continues a prompt that ended on a list number (a base model), so the
    text before the first number is an item. Otherwise (a chat answer) it is a preamble, bullets count as
    item markers, markdown bold is unwrapped, and a list without any marker is read one item per line.
    """
    out = Parsed()
    if leading_item:
        completion, truncated = _cut_at_blank_line(completion, truncated)
        body = completion.lstrip(" \t")
        pieces = ITEM_SPLIT.split("\n" + body if body[:1].isdigit() else completion)
    else:
        pieces = CHAT_ITEM_SPLIT.split("\n" + completion.strip())
        if len(pieces) > 1:
            pieces = pieces[1:]  # the preamble ("Here are five tasks:")
        else:
            pieces = [ln for ln in completion.split("\n") if not ln.rstrip().endswith(":")]
    if truncated and pieces:
        last = pieces.pop()
        if last.strip():
            out.dropped.append(Dropped(last.strip(), "truncated",
                                       "the completion hit the length limit inside this item"))
    for piece in pieces:
        text = piece.strip()
        text = text.split("\n", 1)[0].strip() if first_line_only else text.split("\n\n", 1)[0].strip()
        if not leading_item:
            text = BOLD.sub(r"\1", text).strip()
        if not text:
            continue
        if HEADER_RE.search("\n" + text):
            out.dropped.append(Dropped(text, "malformed_item", "the item carries an Input/Output header"))
            continue
        out.items.append(_one_line(text))
    return out


# ---- instances --------------------------------------------------------------------------------------------

def _cut_at_next_task(completion: str, truncated: bool) -> tuple[str, bool]:
    """The model went on to write the next ``Task:`` of the few-shot prompt: that part is not an answer."""
    m = NEXT_TASK_RE.search(completion)
    return (completion[: m.start()], False) if m else (completion, truncated)


def _limit(parsed: Parsed, max_instances: int) -> Parsed:
    """Keep the first ``max_instances`` items; the others are dropped with a reason, like every dropped item."""
    for inp, output in parsed.items[max_instances:]:
        parsed.dropped.append(Dropped(f"Input: {inp}\nOutput: {output}", "over_limit",
                                      f"more than {max_instances} instances for one task"))
    parsed.items = parsed.items[:max_instances]
    return parsed


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
    completion, truncated = _cut_at_next_task(completion, truncated)
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
    return _limit(out, max_instances)


def parse_output_first(completion: str, truncated: bool, max_instances: int = 5) -> Parsed:
    """``Class label: X / Input: ...`` blocks: the label is the output, then an input for it."""
    out = Parsed()
    completion, truncated = _cut_at_next_task(completion, truncated)
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
    return _limit(out, max_instances)


def parse_answer(completion: str, truncated: bool) -> Parsed:
    """A chat answer to one instruction: the whole text is the output (dropped when cut by the length limit)."""
    text = completion.strip()
    if truncated:
        return Parsed(dropped=[Dropped(text, "truncated", "the answer hit the length limit")] if text else [])
    return Parsed(items=[("", text)] if text else [])


# ---- Alpaca: instruction + input + output together ---------------------------------------------------

def _alpaca_blocks(completion: str, chat: bool) -> list[str]:
    if chat and "###" not in completion:
        # A chat answer without separators: each "Instruction:" header starts an item; before the first one
        # is a preamble.
        parts = ALPACA_ITEM_START.split(completion)
        return [p for p in parts[1:] if p.strip()] if len(parts) > 1 else []
    return [b for b in re.split(r"\n?\s*###\s*\n?", completion) if b.strip()]


def parse_alpaca(completion: str, truncated: bool, chat: bool = False) -> Parsed:
    """``N. Instruction: / N. Input: / N. Output:`` items separated by ``###`` (the prompt ended on the
    first item's ``Instruction:``, unless ``chat``)."""
    out = Parsed()
    blocks = _alpaca_blocks(completion, chat)
    if truncated and blocks:
        out.dropped.append(Dropped(blocks.pop().strip(), "truncated", "the completion hit the length limit"))
    for i, b in enumerate(blocks):
        text = ("Instruction: " + b) if i == 0 and not chat and not ALPACA_FIELD.match(b) else b
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
        out.items.append(Item(instruction=_one_line(fields["instruction"]),
                              input=normalize_empty_input(fields.get("input", "")), output=fields["output"]))
    return out


# ---- JSON answers -------------------------------------------------------------------------------------------

def _usable(value: object) -> list | None:
    """The item list inside a decoded JSON value: a list of objects/strings, or such a list inside an object."""
    if isinstance(value, list):
        return value if not value or any(isinstance(v, (dict, str)) for v in value) else None
    if isinstance(value, dict):
        for v in value.values():
            if isinstance(v, list) and _usable(v) is not None:
                return v
        return [value] if "instruction" in value else None
    return None


def _salvage_list(text: str, start: int) -> tuple[list, str]:
    """The complete elements of a JSON list that starts at ``start`` but never closes, and the rest."""
    dec = json.JSONDecoder()
    pos, values = start + 1, []
    ws = re.compile(r"[\s,]*")
    while True:
        pos = ws.match(text, pos).end()
        if pos >= len(text) or text[pos] == "]":
            return values, ""
        try:
            value, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError:
            return values, text[pos:]
        values.append(value)
        pos = end


def extract_json_list(text: str) -> tuple[list | None, str]:
    """The first usable JSON list in ``text`` (markdown fences, leading and trailing prose allowed), and the
    unparsable rest of a list that never closes (a cut answer): ``(None, "")`` when there is no JSON list."""
    dec = json.JSONDecoder()
    for m in re.finditer(r"[\[{]", text):
        try:
            value, _ = dec.raw_decode(text, m.start())
        except json.JSONDecodeError:
            if m.group() == "[":
                values, rest = _salvage_list(text, m.start())
                if values and _usable(values) is not None:
                    return values, rest.strip().removesuffix("```").strip()
            continue
        items = _usable(value)
        if items is not None:
            return items, ""
    return None, ""


def parse_json_items(text: str, truncated: bool = False, required: Sequence[str] = ("instruction",)) -> Parsed | None:
    """Items from a JSON answer, each validated by pydantic; ``None`` when there is no JSON list (use the text
    parser). ``required``: keys every item must carry (a plain string counts as an instruction)."""
    data, rest = extract_json_list(text)
    if data is None:
        return None
    out = Parsed()
    for raw in data:
        shown = json.dumps(raw, ensure_ascii=False)[:500]
        if isinstance(raw, str):
            raw = {"instruction": raw}
        missing = [k for k in required if not isinstance(raw, dict) or k not in raw]
        if missing:
            out.dropped.append(Dropped(shown, "malformed_item", f"missing key(s): {', '.join(missing)}"))
            continue
        try:
            item = Item.model_validate(raw)
        except ValidationError as e:
            out.dropped.append(Dropped(shown, "malformed_item", f"invalid item: {e.errors()[0]['msg']}"))
            continue
        if not item.instruction.strip():
            out.dropped.append(Dropped(shown, "malformed_item", "empty instruction"))
            continue
        if HEADER_RE.search(item.output):
            out.dropped.append(Dropped(item.output[:500], "merged_item", "the output carries another item's header"))
            continue
        out.items.append(item.model_copy(update={"instruction": _one_line(item.instruction),
                                                 "input": normalize_empty_input(item.input)}))
    if rest:
        rule, why = (("truncated", "the answer hit the length limit inside this item") if truncated else
                     ("malformed_item", "invalid JSON"))
        out.dropped.append(Dropped(rest[:500], rule, why))
    return out


def parse_yes_no(text: str) -> bool | None:
    m = re.match(r"[\s*\"'`]*(yes|no)\b", text, re.I)
    return None if m is None else m.group(1).lower() == "yes"


def json_objects(text: str):
    """Every JSON object in ``text`` (a fenced block, or surrounded by prose), outermost first."""
    decoder = json.JSONDecoder()
    pos = text.find("{")
    while pos >= 0:
        try:
            value, end = decoder.raw_decode(text, pos)
        except ValueError:
            pos = text.find("{", pos + 1)
            continue
        if isinstance(value, dict):
            yield value
        pos = text.find("{", end)
