"""Typed records that flow between stages, and their JSONL storage.

Data flows as tasks (an instruction with its instances) from the ``seeds`` stage through generation,
filtering, deduplication and decontamination; the ``template`` stage flattens them into one
:class:`TrainingExample` per instance. Every file is written atomically (temporary file + rename), so a
crash never leaves a half-written output behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field


class Instance(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str = ""
    output: str = ""


class Provenance(BaseModel):
    """Where a generated record came from."""

    model_config = ConfigDict(extra="forbid")

    request_key: str | None = None
    model: dict[str, Any] | None = None
    template: str | None = None
    examples: list[str] = Field(default_factory=list)  # ids of the in-context examples
    extra: dict[str, Any] = Field(default_factory=dict)


class Task(BaseModel):
    """A seed task or a generated one: an instruction and its instances."""

    model_config = ConfigDict(extra="forbid")

    id: str
    instruction: str
    instances: list[Instance] = Field(default_factory=list)
    is_classification: bool | None = None
    source: str = ""  # e.g. "seed:data/seed_tasks.jsonl" or "generated"
    name: str | None = None
    provenance: Provenance | None = None
    meta: dict[str, Any] = Field(default_factory=dict)  # e.g. nearest kept instruction and its ROUGE-L


class TrainingExample(BaseModel):
    """One instance rendered into a training format by the ``template`` stage."""

    model_config = ConfigDict(extra="forbid")

    id: str
    task_id: str
    instruction: str
    input: str = ""
    output: str = ""
    is_classification: bool | None = None
    format: str
    prompt: str | None = None  # prompt text (alpaca / custom templates), ends on a token boundary
    response: str | None = None  # the text the model learns to produce (without EOS)
    messages: list[dict[str, str]] | None = None  # chat: [{"role", "content"}]
    conversations: list[dict[str, str]] | None = None  # sharegpt: [{"from", "value"}]


class Rejection(BaseModel):
    """A record a stage dropped, with the rule that dropped it."""

    model_config = ConfigDict(extra="forbid")

    stage: str
    rule: str
    reason: str
    record: dict[str, Any]


R = TypeVar("R", bound=BaseModel)


# json.dumps with these options builds a new encoder on every call; one reused encoder writes the same bytes.
_JSON_LINE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def dumps(record: BaseModel | dict[str, Any] | str) -> str:
    """One canonical JSON line (stable key order as declared, no ASCII escaping, no spaces). A model is written
    by pydantic's own serializer, three times faster than ``json.dumps`` of its dump and the same bytes but
    for the spelling of very small floats (``0.00001`` for ``1e-05``)."""
    if isinstance(record, BaseModel):
        return record.model_dump_json()
    return _JSON_LINE.encode(record)


def write_jsonl(path: Path, records: Iterable[BaseModel | dict[str, Any]]) -> int:
    """Write records atomically; returns the number written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(f"{dumps(rec)}\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


def read_jsonl(path: Path, model: type[R]) -> Iterator[R]:
    """The records of a file this project wrote (pydantic parses the UTF-8 bytes itself, without a decoded copy)."""
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                yield model.model_validate_json(line)


def write_json(path: Path, data: Any) -> None:
    """Write a JSON document atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
