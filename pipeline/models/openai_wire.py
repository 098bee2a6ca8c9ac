"""The OpenAI-compatible request on the wire: the ``openai`` backend's options, its identity (every option that
changes an answer), the forms a structured request can take, and the endpoint and JSON body of a request.
Shared by the live client (:mod:`pipeline.models.openai_backend`) and the Batch API
(:mod:`pipeline.models.openai_batch`), which send the same bodies.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.hashing import redact_secrets, strip_credentials
from pipeline.models.base import ModelRequest

DEFAULT_BASE_URL = "https://api.openai.com/v1"
MAX_STOP_SEQUENCES = 4  # OpenAI's limit; further stop strings are applied to the text here
STRUCTURED = ("json_schema", "json_object")


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    api: Literal["chat", "completions"] = "chat"
    base_url: str | None = None  # default: $OPENAI_BASE_URL, else OpenAI
    api_key_env: str = "OPENAI_API_KEY"  # the NAME of the variable holding the key, never the key
    max_concurrency: int = Field(8, ge=1)
    timeout: float = Field(60.0, gt=0)  # seconds per attempt
    max_attempts: int = Field(5, ge=1)
    backoff_base: float = Field(1.0, ge=0)  # first retry waits about this long, doubling each time (with jitter)
    backoff_max: float = Field(60.0, ge=0)
    # Structured output for requests that carry a schema (chat API): "auto" = the best form the server accepts,
    # plain text as the last resort; true = structured output required (json_schema or json_object with the
    # schema); false = plain text (the stage's parser).
    json_mode: bool | Literal["auto"] = "auto"
    # Guided decoding for vLLM servers: put the schema in the request body as ``structured_outputs``
    # (vLLM >= 0.12) or ``guided_json`` (older vLLM); works with both APIs.
    guided: Literal["none", "structured_outputs", "guided_json"] = "none"
    extra_body: dict[str, Any] = Field(default_factory=dict)  # server-specific fields (e.g. vLLM's top_k)
    # Client-side caps over any sliding minute, on top of the limits the server announces.
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    # A local tokenizer folder or Hub id: counts tokens where the server reports no usage (priced models).
    tokenizer: str | None = None
    # The Batch API (OpenAI and servers that offer /v1/batches): half price, answers within the window.
    batch: bool = False
    batch_discount: float = Field(0.5, ge=0, le=1)  # the price factor of batched requests
    batch_poll_s: float = Field(30.0, gt=0)
    batch_max_requests: int = Field(50_000, ge=1, le=50_000)  # per batch (the API's limit)
    batch_max_bytes: int = Field(190_000_000, ge=1_000, le=200_000_000)  # per input file (the API's: 200 MB)
    batch_window: Literal["24h"] = "24h"


# Client-side knobs that never change an answer (a batched request is the same request at another price). The
# tokenizer stays in: it fills in the usage journaled with answers from a server that reports none.
_NOT_IDENTITY = {"base_url", "api_key_env", "max_concurrency", "timeout", "max_attempts", "backoff_base",
                 "backoff_max", "rpm", "tpm", "batch", "batch_discount", "batch_poll_s",
                 "batch_max_requests", "batch_max_bytes", "batch_window"}


def base_url(options: Options) -> str:
    return (options.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")


def identity(options: Options) -> dict[str, Any]:
    """Static: every option that reaches the wire (the URL without credentials); never a secret."""
    ident = {"backend": "openai", **options.model_dump(mode="json", exclude=_NOT_IDENTITY),
             "base_url": strip_credentials(base_url(options))}
    return redact_secrets(ident)  # a key in extra_body changes no answer and is never written down


def output_formats(options: Options, request: ModelRequest) -> list[str | None]:
    """The wire forms, in preference order, of a request with a schema (``[None]``: the one plain form)."""
    if options.api != "chat" or request.params.json_schema is None or options.guided != "none":
        return [None]
    if options.json_mode == "auto":
        return [*STRUCTURED, "text"]
    return list(STRUCTURED) if options.json_mode else ["text"]


def with_format(request: ModelRequest, fmt: str | None) -> ModelRequest:
    return request.model_copy(update={"params": request.params.model_copy(update={"output_format": fmt})})


def alternatives(options: Options, request: ModelRequest) -> list[ModelRequest]:
    """The request in each wire form this backend may send it, the preferred first (each has its own key)."""
    fmts = output_formats(options, request)
    return [request] if fmts == [None] else [with_format(request, f) for f in fmts]


def wire(options: Options, req: ModelRequest) -> tuple[str, dict[str, Any]]:
    """The endpoint path and JSON body of a request (in the form ``req.params.output_format`` names)."""
    p = req.params
    body: dict[str, Any] = dict(model=options.model, temperature=p.temperature, top_p=p.top_p,
                                max_tokens=p.max_tokens, n=p.n)
    if p.stop:
        body["stop"] = p.stop[:MAX_STOP_SEQUENCES]
    if p.presence_penalty:
        body["presence_penalty"] = p.presence_penalty
    if p.frequency_penalty:
        body["frequency_penalty"] = p.frequency_penalty
    if p.seed is not None:
        body["seed"] = p.seed
    body.update(options.extra_body)
    if p.json_schema is not None and options.guided == "structured_outputs":
        body["structured_outputs"] = {"json": p.json_schema}
    elif p.json_schema is not None and options.guided == "guided_json":
        body["guided_json"] = p.json_schema
    fmt = p.output_format
    if p.json_schema is not None and options.api == "chat" and fmt in STRUCTURED:
        # Structured outputs need an object at the root: the schema's value sits under "items".
        schema = {"type": "object", "properties": {"items": p.json_schema}, "required": ["items"]}
        body["response_format"] = ({"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
                                   if fmt == "json_schema" else {"type": "json_object", "schema": schema})
    if options.api == "chat":
        body["messages"] = [m.model_dump() for m in req.messages] if req.messages else [
            {"role": "user", "content": req.prompt or ""}]
        return "/chat/completions", body
    body["prompt"] = req.prompt if req.prompt is not None else "\n\n".join(m.content for m in req.messages or [])
    return "/completions", body
