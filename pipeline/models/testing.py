"""A deterministic in-process backend for tests and dry runs (``backend: test``).

It answers from a hash of the request, so the same request always gets the same answer. A prompt that
ends on a list number (``"9."``) gets a continuation of numbered, made-up instructions; anything else
gets a short made-up sentence (or a JSON list when the request asks for JSON). It can count the requests
it receives in a file (shared across processes), sleep per request, and fail some requests on purpose.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipeline.models.base import Completion, Failure, ModelRequest, ModelResult, ResultSink, Usage

VERBS = [
    "Summarize", "Classify", "Translate", "Explain", "Rewrite", "Describe", "Compare", "List", "Suggest",
    "Identify", "Generate", "Convert", "Evaluate", "Outline", "Predict", "Recommend", "Estimate", "Detect",
]
NOUNS = [
    "paragraph", "recipe", "email", "poem", "headline", "argument", "schedule", "product review",
    "news story", "dialogue", "math problem", "tweet", "letter", "budget", "travel plan", "movie plot",
    "job posting", "essay", "joke", "riddle", "complaint", "contract clause", "lab report", "song lyric",
]
MODS = [
    "for a child", "in one sentence", "formally", "with three examples", "for a beginner", "politely",
    "as a list", "in under fifty words", "for a busy manager", "with a surprising twist", "step by step",
    "using simple words", "from the point of view of a cat", "for a history class", "with a catchy title",
]


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = "test-model"
    items_per_list: int = 5  # numbered items written after a prompt that ends on a number
    delay_s: float = 0.0  # sleep per request (lets tests kill a process mid-stage)
    count_file: str | None = None  # append each received request's key here (one line per request)
    fail_every: int = 0  # a transient failure for the request whose hash is divisible by this (0: never)
    fail_permanent_every: int = 0  # a permanent failure (as a 400 or a refusal) likewise, on another hash
    fail_steps: list[str] = Field(default_factory=list)  # only requests whose tag starts with one of these fail (empty: any request)
    batch_size: int = 1  # results are reported in groups of this size
    report_usage: bool = True  # false: answers carry no token usage (as some servers send them)


def _rng_words(seed: bytes, n: int) -> list[int]:
    out: list[int] = []
    h = seed
    while len(out) < n:
        h = hashlib.sha256(h).digest()
        out.extend(h)
    return out[:n]


def _instruction(rnd: list[int]) -> str:
    verb = VERBS[rnd[0] % len(VERBS)]
    noun = NOUNS[rnd[1] % len(NOUNS)]
    mod = MODS[rnd[2] % len(MODS)]
    mod2 = MODS[rnd[3] % len(MODS)]
    return f"{verb} the given {noun} {mod}, {mod2}."


def answer(request: ModelRequest, options: Options) -> str:
    text = request.prompt if request.prompt is not None else "\n".join(m.content for m in request.messages or [])
    seed = json.dumps([text, request.tag, request.params.seed, request.params.temperature]).encode()
    rnd = _rng_words(seed, 64)
    if request.params.json_schema is not None:
        items = [{"instruction": _instruction(rnd[4 * i : 4 * i + 4]), "input": "", "output": "Done."}
                 for i in range(3)]
        return json.dumps(items)
    if re.search(r"Classification task:\s*$", text):
        return " Yes" if rnd[5] % 4 == 0 else " No"
    if re.search(r"Class label:\s*$", text):
        labels = ["Positive", "Negative", "Neutral"]
        return "".join(f"{'' if i == 0 else 'Class label:'} {labels[i]}\nInput: {_instruction(rnd[4 * i:4 * i + 4])}\n"
                       for i in range(2))
    if re.search(r"Example 1\s*$", text):
        return (f"Input: {_instruction(rnd[8:12])}\nOutput: {_instruction(rnd[12:16])}\n\n"
                f"Example 2\nInput: {_instruction(rnd[16:20])}\nOutput: {_instruction(rnd[20:24])}\n")
    m = re.search(r"(\d+)\.\s*$", text)
    if m:
        start = int(m.group(1))
        lines = []
        for i in range(options.items_per_list):
            instr = _instruction(rnd[4 * i : 4 * i + 4])
            lines.append(instr if i == 0 else f"{start + i}. {instr}")
        return " " + "\n".join(lines)
    return _instruction(rnd[:4]).replace("the given", "this")


class TestBackend:
    def __init__(self, options: Options):
        self.options = options

    def identity(self) -> dict[str, Any]:
        return identity(self.options)

    def check(self) -> None:
        return None

    def _count(self, request: ModelRequest) -> None:
        if self.options.count_file:
            line = request.key(self.identity()) + "\n"
            fd = os.open(self.options.count_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)

    def _one(self, request: ModelRequest) -> ModelResult:
        self._count(request)
        if self.options.delay_s:
            time.sleep(self.options.delay_s)
        key = request.key(self.identity())
        o = self.options
        if not o.fail_steps or any(request.tag.startswith(s) for s in o.fail_steps):
            if o.fail_every and int(key[:8], 16) % o.fail_every == 0:
                return Failure(error="injected failure", kind="injected")
            if o.fail_permanent_every and int(key[8:16], 16) % o.fail_permanent_every == 0:
                return Failure(error="injected permanent failure", kind="injected_permanent", permanent=True)
        texts = [answer(request if i == 0 else request.model_copy(update={"tag": f"{request.tag}#{i}"}),
                        self.options) for i in range(request.params.n)]
        usage = Usage(prompt_tokens=len((request.prompt or "").split()) or 1,
                      completion_tokens=sum(len(t.split()) for t in texts)) if o.report_usage else Usage()
        return Completion(texts=texts, finish_reasons=["stop"] * len(texts), usage=usage)

    def generate(self, requests: Sequence[ModelRequest], on_result: ResultSink, store: Any = None) -> None:
        bs = max(1, self.options.batch_size)
        for start in range(0, len(requests), bs):
            group = [(i, self._one(requests[i])) for i in range(start, min(start + bs, len(requests)))]
            if not on_result(group):
                return

    def close(self) -> None:
        return None


def identity(options: Options) -> dict[str, Any]:
    """What shapes the answers; delays, counting and injected failures do not."""
    return {"backend": "test", "model": options.model, "items_per_list": options.items_per_list}


def capacity(options: Options) -> int:
    """A small round, as a test wants it."""
    return 8


def create(options: Options) -> TestBackend:
    return TestBackend(options)
