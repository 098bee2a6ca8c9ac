"""Quality rules for instructions and instances. Pure functions; every rule named, configurable, reported.

Instruction rules follow Self-Instruct/Alpaca (word count, keyword blacklist, "Write a program", leading
punctuation or non-ASCII). Instance rules add the output-side checks the originals lacked (empty or
placeholder outputs, input equal to output, a trailing ':', URL or attachment inputs, merged items, length
bounds, a language check, classification labels) and normalise empty-input markers.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from pipeline.records import Instance, Task

ORIGINAL_BLACKLIST = ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
                      "draw", "plot", "go to"]
MULTIMEDIA_BLACKLIST = ["video", "audio", "music", "flowchart", "diagram"]
EMPTY_INPUT_MARKERS = {"", "<noinput>", "<no input>", "no input", "noinput", "no input.", "noinput.", "n/a", "n/a.",
                       "none", "none.", "(none)", "<none>", "null", "nil", "-", "<empty>", "empty", "not applicable",
                       "no input required", "no input needed", "<no_input>", "[no input]", "(no input)"}
PLACEHOLDER_OUTPUTS = {"", "n/a", "n/a.", "na", "none", "none.", "<nooutput>", "<no output>", "no output",
                       "no output.", "null", "nil", "-", "...", "tbd", "(none)", "<none>", "not applicable"}
URL_RE = re.compile(r"(https?://|www\.)\S+", re.I)
ATTACHMENT_RE = re.compile(
    r"\b(attached|attachment|see the (image|picture|photo|file|link)|(the|this|following) (image|picture|photo|"
    r"screenshot|video|audio|pdf|file|document) (below|above|attached))\b|\.(png|jpe?g|gif|pdf|mp3|mp4|wav)\b", re.I)
MERGED_RE = re.compile(r"(?:^|\n)\s*(?:\d+\s*[.)]\s*)?(?:###\s*)?(?:instruction|input|output)\s*:"
                       r"|###\s*(?:instruction|input|output|response)\b", re.I)
STOPWORDS = {"the", "a", "an", "and", "or", "of", "to", "in", "is", "are", "for", "on", "with", "that", "this", "it",
             "be", "as", "by", "your", "you", "what", "how", "from", "at", "which", "give", "write", "each", "given"}


@dataclass(frozen=True)
class RuleHit:
    rule: str
    reason: str


class InstructionRules(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_words: int = 4  # the originals drop instructions of 3 words or fewer
    max_words: int = 150
    blacklist: list[str] = Field(default_factory=lambda: ORIGINAL_BLACKLIST + MULTIMEDIA_BLACKLIST)
    extra_blacklist: list[str] = Field(default_factory=list)
    reject_write_a_program: bool = True
    reject_leading_punctuation: bool = True
    reject_non_ascii_start: bool = True


class InstanceRules(BaseModel):
    model_config = ConfigDict(extra="forbid")

    empty_output: bool = True
    placeholder_output: bool = True
    placeholder_outputs: list[str] = Field(default_factory=lambda: sorted(PLACEHOLDER_OUTPUTS - {""}))
    input_equals_output: bool = True
    trailing_colon: bool = True
    url_input: bool = True
    attachment_input: bool = True
    merged_item: bool = True
    max_input_words: int | None = 400
    max_output_words: int | None = 800
    language_check: bool = True  # English: enough ASCII letters and common English words
    classification_labels: bool = True  # an output not among the task's labels is dropped


def _blacklist_re(words: list[str]) -> re.Pattern | None:
    if not words:
        return None
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.I)


def check_instruction(text: str, rules: InstructionRules) -> RuleHit | None:
    stripped = text.strip()
    if not stripped:
        return RuleHit("too_short", "the instruction is empty")
    n = len(stripped.split())
    if n < rules.min_words:
        return RuleHit("too_short", f"{n} words (minimum {rules.min_words})")
    if n > rules.max_words:
        return RuleHit("too_long", f"{n} words (maximum {rules.max_words})")
    bl = _blacklist_re(rules.blacklist + rules.extra_blacklist)
    if bl is not None:
        m = bl.search(stripped)
        if m:
            return RuleHit("blacklist", f"contains '{m.group(0)}'")
    if rules.reject_write_a_program and stripped.lower().startswith("write a program"):
        return RuleHit("write_a_program", "starts with 'Write a program'")
    if rules.reject_leading_punctuation and stripped[0] in string.punctuation:
        return RuleHit("leading_punctuation", f"starts with '{stripped[0]}'")
    if rules.reject_non_ascii_start and not stripped[0].isascii():
        return RuleHit("non_ascii_start", f"starts with non-ASCII '{stripped[0]}'")
    return None


def normalize_empty_input(text: str) -> str:
    """``<noinput>``, "No input", "N/A", "(none)", "Noinput." ... mean an empty input: "" (others: stripped)."""
    return "" if text.strip().lower() in EMPTY_INPUT_MARKERS else text.strip()


def looks_english(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    if len(letters) < 20:
        return True  # too short to judge
    ascii_share = sum(c.isascii() for c in letters) / len(letters)
    words = re.findall(r"[a-z]+", text.lower())
    stop_share = sum(w in STOPWORDS for w in words) / max(1, len(words))
    return ascii_share >= 0.9 and (len(words) < 12 or stop_share >= 0.05)


def task_labels(task: Task) -> set[str]:
    return {i.output.strip().lower() for i in task.instances if i.output.strip()}


def check_instance(instruction: str, instance: Instance, rules: InstanceRules, is_classification: bool | None = None,
                   labels: set[str] | None = None) -> RuleHit | None:
    inp, out = instance.input.strip(), instance.output.strip()
    low = out.lower()
    if rules.empty_output and not out:
        return RuleHit("empty_output", "the output is empty")
    if rules.placeholder_output and out and low in {p.lower() for p in rules.placeholder_outputs}:
        return RuleHit("placeholder_output", f"the output is a placeholder ('{out}')")
    if rules.input_equals_output and inp and inp == out:
        return RuleHit("input_equals_output", "the input equals the output")
    if rules.trailing_colon and (inp.endswith(":") or out.endswith(":")):
        return RuleHit("trailing_colon", f"the {'input' if inp.endswith(':') else 'output'} ends with ':'")
    if rules.url_input and URL_RE.search(inp):
        return RuleHit("url_input", f"the input is or holds a URL ({URL_RE.search(inp).group(0)[:60]})")
    if rules.attachment_input and ATTACHMENT_RE.search(inp):
        return RuleHit("attachment_input", "the input refers to an attached image or file")
    if rules.merged_item and MERGED_RE.search(out):
        return RuleHit("merged_item", "the output carries the header of another item")
    if rules.max_input_words is not None and len(inp.split()) > rules.max_input_words:
        return RuleHit("input_too_long", f"input of {len(inp.split())} words (maximum {rules.max_input_words})")
    if rules.max_output_words is not None and len(out.split()) > rules.max_output_words:
        return RuleHit("output_too_long", f"output of {len(out.split())} words (maximum {rules.max_output_words})")
    if rules.language_check and not looks_english(f"{instruction} {inp} {out}"):
        return RuleHit("not_english", "the text does not look like English")
    if rules.classification_labels and is_classification and labels and low not in labels:
        return RuleHit("unknown_label", f"the output '{out[:40]}' is not one of the task's labels")
    return None


def conflicting_inputs(task: Task) -> str | None:
    """Self-Instruct drops a task whose instances share an input but differ in output."""
    seen: dict[str, str] = {}
    for inst in task.instances:
        key = inst.input.strip()
        if key in seen and seen[key] != inst.output.strip():
            return key
        seen.setdefault(key, inst.output.strip())
    return None
