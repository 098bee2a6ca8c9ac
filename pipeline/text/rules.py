"""Quality rules for instructions and instances. Pure functions; every rule named, configurable, reported.

Two profiles. ``self_instruct``: the instruction rules of Self-Instruct/Alpaca word for word (word count,
keyword blacklist, "Write a program", leading punctuation or non-ASCII), made to clean a model's own
generations, and instance rules that add the output-side checks the originals lacked (empty or placeholder
outputs, input equal to output, a trailing ':', URL or attachment inputs, merged items, length bounds, a
language check, classification labels). ``general``: for data sets written by others (math, code, tool use,
any language): the same output-side checks, but rules that judge the defect instead of a word
(:mod:`pipeline.text.defects`), language identification against the set's own languages
(:mod:`pipeline.text.language`), and length bounds that fit real data. Both normalise empty-input markers.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.records import Instance, Task
from pipeline.text import defects

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
# Code-aware: an answer that shows "Output:" (a program's output) or a line ending in ':' (a Python signature)
# is no merged item and no truncation; only another item's instruction header is.
MERGED_INSTRUCTION_RE = re.compile(r"(?:^|\n)\s*(?:\d+\s*[.)]\s*)?(?:###\s*)?instruction\s*:"
                                   r"|###\s*(?:instruction|input|response)\b", re.I)
MERGED_RE = re.compile(r"(?:^|\n)\s*(?:\d+\s*[.)]\s*)?(?:###\s*)?(?:instruction|input|output)\s*:"
                       r"|###\s*(?:instruction|input|output|response)\b", re.I)
STOPWORDS = {"the", "a", "an", "and", "or", "of", "to", "in", "is", "are", "for", "on", "with", "that", "this", "it",
             "be", "as", "by", "your", "you", "what", "how", "from", "at", "which", "give", "write", "each", "given"}


@dataclass(frozen=True)
class RuleHit:
    rule: str
    reason: str


class InstructionRules(BaseModel):
    """Instruction rules; the defaults are the ``self_instruct`` profile (:func:`profile` gives the others)."""

    model_config = ConfigDict(extra="forbid")

    min_words: int = 4  # the originals drop instructions of 3 words or fewer
    max_words: int | None = 150
    blacklist: list[str] = Field(default_factory=lambda: ORIGINAL_BLACKLIST + MULTIMEDIA_BLACKLIST)
    extra_blacklist: list[str] = Field(default_factory=list)
    reject_write_a_program: bool = True
    reject_leading_punctuation: bool = True
    reject_non_ascii_start: bool = True
    # general profile: the defect, not the word (pipeline.text.defects)
    artifact_request: bool = False
    missing_content: bool = False
    real_world_action: bool = False
    leading_fragment: bool = False
    repetition: bool = False  # one word eight times in a row: a model stuck in a loop
    # count words as ROUGE-L's tokens (each character of Chinese or Japanese is one), not spaces
    script_words: bool = False


class InstanceRules(BaseModel):
    """Instance rules; the defaults are the ``self_instruct`` profile (:func:`profile` gives the others)."""

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
    language_check: bool = True
    # stopwords: English, by the share of ASCII letters and common English words; langid: fastText's language
    # identification of each field's prose against ``languages`` (None: the set's own languages)
    language_method: Literal["stopwords", "langid"] = "stopwords"
    languages: list[str] | None = None
    classification_labels: bool = True  # an output not among the task's labels is dropped
    # general profile: in a programming task a trailing ':' is code, and only an instruction header marks a
    # merged item
    code_aware: bool = False
    repetition: bool = False  # one word eight times in a row in the input or output


Profile = Literal["self_instruct", "general"]

# Data written by others: the originals' blacklist and first-character rules drop valid math, code and
# non-English tasks, so the general profile judges defects instead; a long instruction, input or answer is no
# defect by itself (a 60-word tool description, a 300-word word problem, a long program).
GENERAL_INSTRUCTION_RULES = dict(min_words=2, max_words=None, blacklist=[], reject_write_a_program=False,
                                 reject_leading_punctuation=False, reject_non_ascii_start=False,
                                 artifact_request=True, missing_content=True, real_world_action=True,
                                 leading_fragment=True, repetition=True, script_words=True)
GENERAL_INSTANCE_RULES = dict(url_input=False, attachment_input=False, max_input_words=None,
                              max_output_words=None, language_method="langid", code_aware=True,
                              repetition=True)


def profile(name: Profile) -> tuple[InstructionRules, InstanceRules]:
    """The rules of a profile with its defaults."""
    if name == "self_instruct":
        return InstructionRules(), InstanceRules()
    return InstructionRules(**GENERAL_INSTRUCTION_RULES), InstanceRules(**GENERAL_INSTANCE_RULES)


def with_overrides(base: BaseModel, overrides: BaseModel) -> BaseModel:
    """``base`` with the fields the user set in ``overrides`` (only those: the rest keep the profile's)."""
    return base.model_copy(update={k: getattr(overrides, k) for k in overrides.model_fields_set})


@lru_cache(maxsize=64)
def _blacklist_re(words: tuple[str, ...]) -> re.Pattern | None:
    """One pattern per word list, built once (the filter checks every record against the same list)."""
    if not words:
        return None
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.I)


REPEATED_RE = re.compile(r"\b([^\W\d_]{2,})(?:\s+\1\b){7,}", re.I)


def _repeated(text: str) -> str | None:
    m = REPEATED_RE.search(text)
    return m.group(1) if m else None


def _defect(instruction: str, inp: str, rules: InstructionRules) -> RuleHit | None:
    if rules.repetition and (m := _repeated(instruction)):
        return RuleHit("repetition", f"'{m}' eight or more times in a row")
    if rules.leading_fragment and (m := defects.leading_fragment(instruction)):
        return RuleHit("leading_fragment", f"starts mid-sentence with '{m}'")
    if rules.artifact_request and (m := defects.artifact_request(instruction, inp)):
        return RuleHit("artifact_request", f"asks for a non-text artifact ('{m}')")
    if rules.missing_content and (m := defects.missing_content(instruction, inp)):
        return RuleHit("missing_content", f"points at content the record does not hold ('{m}')")
    if rules.real_world_action and (m := defects.real_world_action(instruction)):
        return RuleHit("real_world_action", f"asks for an action in the world ('{m}')")
    return None


def check_instruction(text: str, rules: InstructionRules, inp: str = "") -> RuleHit | None:
    """The first instruction rule that ``text`` breaks; ``inp``: the task's first input, where the general
    profile's rules need it (a pointer to content is no defect when the input holds the content)."""
    stripped = text.strip()
    if not stripped:
        return RuleHit("too_short", "the instruction is empty")
    n = len(stripped.split())
    if rules.script_words and not stripped.isascii():
        from pipeline.text.rouge import tokenize

        n = max(n, len(tokenize(stripped)))
    if n < rules.min_words:
        return RuleHit("too_short", f"{n} words (minimum {rules.min_words})")
    if rules.max_words is not None and n > rules.max_words:
        return RuleHit("too_long", f"{n} words (maximum {rules.max_words})")
    bl = _blacklist_re(tuple(rules.blacklist + rules.extra_blacklist))
    if bl is not None:
        m = bl.search(stripped)
        if m:
            return RuleHit("blacklist", f"contains '{m.group(0)}'")
    hit = _defect(stripped, inp, rules)
    if hit:
        return hit
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


def check_language(instruction: str, inp: str, out: str, rules: InstanceRules,
                   languages: set[str] | None = None) -> RuleHit | None:
    """The record's prose is not in the expected languages (``languages``, else ``rules.languages``, else
    English). With langid, each field is identified on its own; an input or output in another language is
    fine when the task involves other languages (a translation)."""
    if rules.language_method == "stopwords":
        if not looks_english(f"{instruction} {inp} {out}"):
            return RuleHit("not_english", "the text does not look like English")
        return None
    from pipeline.text.language import asks_for_another_language, identify

    allowed = languages or set(rules.languages or ["en"])
    fields = [("instruction", instruction)]
    # code is no language, and a translation task's input or output is in another one
    if not asks_for_another_language(instruction) and not defects.is_code_task(instruction, inp):
        fields += [("input", inp), ("output", out)]
    for name, text in fields:
        lang, prob = identify(text)
        if lang is not None and lang not in allowed:
            return RuleHit("other_language", f"the {name} is in '{lang}' (p={prob:.2f}), not in the set's "
                                             f"languages ({', '.join(sorted(allowed))})")
    return None


def check_instance(instruction: str, instance: Instance, rules: InstanceRules, is_classification: bool | None = None,
                   labels: set[str] | None = None, languages: set[str] | None = None) -> RuleHit | None:
    inp, out = instance.input.strip(), instance.output.strip()
    low = out.lower()
    if rules.empty_output and not out:
        return RuleHit("empty_output", "the output is empty")
    if rules.placeholder_output and out and low in {p.lower() for p in rules.placeholder_outputs}:
        return RuleHit("placeholder_output", f"the output is a placeholder ('{out}')")
    if rules.input_equals_output and inp and inp == out:
        return RuleHit("input_equals_output", "the input equals the output")
    code = rules.code_aware and defects.is_code_task(instruction, inp)
    if rules.trailing_colon and (inp.endswith(":") or out.endswith(":")) and not code:
        return RuleHit("trailing_colon", f"the {'input' if inp.endswith(':') else 'output'} ends with ':'")
    if rules.url_input and URL_RE.search(inp):
        return RuleHit("url_input", f"the input is or holds a URL ({URL_RE.search(inp).group(0)[:60]})")
    if rules.attachment_input and ATTACHMENT_RE.search(inp):
        return RuleHit("attachment_input", "the input refers to an attached image or file")
    if rules.merged_item and (MERGED_INSTRUCTION_RE if rules.code_aware else MERGED_RE).search(out):
        return RuleHit("merged_item", "the output carries the header of another item")
    if rules.max_input_words is not None and len(inp.split()) > rules.max_input_words:
        return RuleHit("input_too_long", f"input of {len(inp.split())} words (maximum {rules.max_input_words})")
    if rules.max_output_words is not None and len(out.split()) > rules.max_output_words:
        return RuleHit("output_too_long", f"output of {len(out.split())} words (maximum {rules.max_output_words})")
    if rules.repetition and (m := _repeated(inp) or _repeated(out)):
        return RuleHit("repetition", f"'{m}' eight or more times in a row")
    if rules.language_check and (hit := check_language(instruction, inp, out, rules, languages)):
        return hit
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
