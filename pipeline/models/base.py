"""The one interface every model backend implements, and the request/result types.

A stage builds :class:`ModelRequest` objects and hands a batch to its journaled client (given by the runner).
The client drops requests whose answer is already committed, sends the rest to a :class:`Backend`, and
commits each group of results the backend reports *before* the stage can rely on it.

Nothing here imports anything of seedtune above it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger(__name__)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class GenParams(BaseModel):
    """Generation parameters; backends map them onto their own API and ignore what they cannot honour."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: list[str] = Field(default_factory=list)
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    # JSON schema the answer must follow; used when the backend offers JSON / guided output.
    json_schema: dict[str, Any] | None = None
    # The wire form of a request with a schema, set by a backend's ``alternatives`` (None: the backend's default).
    output_format: Literal["json_schema", "json_object", "text"] | None = None


class ModelRequest(BaseModel):
    """A chat request (``messages``) or a raw completion request (``prompt``)."""

    model_config = ConfigDict(extra="forbid")

    messages: list[Message] | None = None
    prompt: str | None = None
    params: GenParams = Field(default_factory=GenParams)
    # Distinguishes otherwise identical requests (e.g. the i-th sample of one prompt). Part of the key.
    tag: str = ""

    @model_validator(mode="after")
    def _one_of(self) -> ModelRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a request has either messages or a prompt")
        return self

    def key(self, model_identity: dict[str, Any]) -> str:
        """Deterministic key: the model's identity and everything that shapes the answer."""
        payload = {"model": model_identity, "request": self.model_dump(mode="json")}
        blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class Usage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt_tokens: int = 0
    completion_tokens: int = 0


class Completion(BaseModel):
    """A successful answer: one text per requested sample."""

    model_config = ConfigDict(extra="forbid")

    status: Literal["ok"] = "ok"
    texts: list[str]
    finish_reasons: list[str]  # "stop" | "length" | backend-specific
    usage: Usage = Field(default_factory=Usage)


class Failure(BaseModel):
    """A request that produced no usable answer. Never stored as a result.

    Transient failures (429, 408, 5xx, time-outs, dropped connections, malformed answers, after
    ``max_attempts``) are retried by the next run. Permanent ones (another 4xx, a null answer, a prompt over
    the context) are terminal: kept with the server's reason and re-sent only with ``--retry-failed``."""

    model_config = ConfigDict(extra="forbid")

    status: Literal["failed"] = "failed"
    error: str
    kind: str = "error"  # e.g. "http_429", "http_500", "timeout", "connection", "malformed", "null_content"
    attempts: int = 1
    permanent: bool = False


ModelResult = Union[Completion, Failure]

# Called by a backend with a group of ``(request index, result)`` pairs that are committed together, or
# ``(request index, result, sent request)`` where the backend sent another wire form of the request (one of its
# ``alternatives``): the answer is then journaled under the key of the request actually sent. Returning False
# asks the backend to launch no further requests (e.g. the budget is spent); requests already in flight still
# finish and are reported.
ResultSink = Callable[[list[tuple]], bool]


class StateStore(Protocol):
    """Small persistent key/value state of one model (e.g. batch ids), committed at once, kept in the journal."""

    def get(self, key: str) -> str | None: ...

    def put(self, key: str, value: str) -> None: ...

    def delete(self, key: str) -> None: ...

    def items(self, prefix: str = "") -> list[tuple[str, str]]: ...


class Backend(Protocol):
    """A built backend. Its module also exposes ``identity(options)`` (static, no model loaded, no network),
    ``create(options)``, and optionally ``alternatives(options, request)``."""

    def generate(self, requests: Sequence[ModelRequest], on_result: ResultSink,
                 store: StateStore | None = None) -> None:
        """Answer ``requests``, reporting results through ``on_result`` as they arrive."""

    def check(self) -> None:
        """Raise :class:`BackendUnavailable` with one clear line if the model cannot be reached/loaded."""

    def close(self) -> None: ...


class BackendUnavailable(Exception):
    """The model cannot be reached or loaded (one line, naming the model and the cause)."""


class BudgetExceeded(Exception):
    """The stage reached its model budget; answers received so far are committed."""


def first_line(text: str, limit: int | None = None) -> str:
    """The first non-blank line of ``text`` (cut to ``limit`` characters), else ""."""
    lines = (text or "").strip().splitlines()
    return lines[0][:limit] if lines else ""


def error_line(exc: BaseException, limit: int | None = None) -> str:
    """One line for a failure: the exception's first message line, else its type's name."""
    return first_line(str(exc), limit) or type(exc).__name__


def cut_at_stop(text: str, stops: Sequence[str]) -> str | None:
    """``text`` up to the earliest stop string in it, else None."""
    hits = [text.find(s) for s in stops if s and s in text]
    return text[: min(hits)] if hits else None


def over_context(prompt_tokens: int, max_tokens: int, context: int) -> Failure | None:
    """A permanent failure when a prompt and its ``max_tokens`` do not fit the engine's context, else None."""
    if prompt_tokens + max_tokens <= context:
        return None
    return Failure(error=f"the prompt's {prompt_tokens} tokens + max_tokens {max_tokens} = "
                         f"{prompt_tokens + max_tokens} tokens exceed the model's context of {context} tokens",
                   kind="context_length", permanent=True)


def isolate(call: Callable[[list[int]], Sequence[ModelResult]], members: list[int]) -> dict[int, ModelResult]:
    """Answer ``members`` (request indices) with one ``call``; when the call raises, each half on its own, down
    to the request at fault, so that one bad request fails alone and the others are answered. Alone, a
    ValueError or TypeError (the engine rejecting the request) is a permanent failure; anything else (out of
    memory, a device error) is transient."""
    if not members:
        return {}
    try:
        results = list(call(members))
    except (ValueError, TypeError, RuntimeError) as e:
        if len(members) > 1:
            half = len(members) // 2
            return {**isolate(call, members[:half]), **isolate(call, members[half:])}
        error = error_line(e)
        log.warning("generation failed: %s", error)
        return {members[0]: Failure(error=error, kind="generation_error", permanent=not isinstance(e, RuntimeError))}
    if len(results) != len(members):
        raise RuntimeError(f"the engine answered {len(results)} of {len(members)} requests")
    return dict(zip(members, results))


def release_accelerator_memory() -> None:
    """After dropping a model: collect it and hand its cached GPU memory back (the next stage may train)."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
