"""``backend: openai`` — OpenAI and any OpenAI-compatible server (``vllm serve``, llama.cpp, Ollama, TGI).

An async client keeps ``max_concurrency`` requests in flight, each with a timeout; 429, 5xx, time-outs,
dropped connections and malformed answers are retried with exponential back-off and jitter, honouring
``Retry-After``; after ``max_attempts`` a request becomes a :class:`Failure` with its error and the stage goes on.
A fixed pool of workers pulls request indices from one iterator, so memory stays flat in the number of
requests. The event loop runs in the calling thread (``asyncio.run``) and results are reported from it, so the
sink (the journal's sqlite connection) is only ever used by the thread that owns it. The API key is read from
the environment variable named by ``api_key_env`` and is never stored, logged or part of the identity.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import random
import time
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.hashing import redact_secrets, strip_credentials
from pipeline.models.base import (BackendUnavailable, Completion, Failure, ModelRequest, ModelResult, ResultSink,
                                  Usage, cut_at_stop, error_line, first_line)

log = logging.getLogger(__name__)
DEFAULT_BASE_URL = "https://api.openai.com/v1"
MAX_STOP_SEQUENCES = 4  # OpenAI's limit; further stop strings are applied to the text here
CONNECTIONS_PER_CLIENT = 64
ERROR_CHARS = 500  # an error line kept from a server (whose error bodies can be whole HTML pages)


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
    # JSON output for requests that carry a schema (chat API): true = always ask (``response_format``);
    # "auto" = ask, and if the server rejects ``response_format`` (HTTP 400), stop asking; false = never.
    json_mode: bool | Literal["auto"] = "auto"
    # Guided decoding for vLLM servers: put the schema in the request body as ``structured_outputs``
    # (vLLM >= 0.12) or ``guided_json`` (older vLLM); works with both APIs.
    guided: Literal["none", "structured_outputs", "guided_json"] = "none"
    extra_body: dict[str, Any] = Field(default_factory=dict)  # server-specific fields (e.g. vLLM's top_k)


class _Retryable(Exception):
    def __init__(self, kind: str, error: str, retry_after: float | None = None):
        super().__init__(error)
        self.kind, self.error, self.retry_after = kind, error, retry_after


class _Fatal(Exception):
    """The request itself is wrong (4xx other than 408/429): retrying cannot help."""

    def __init__(self, kind: str, error: str):
        super().__init__(error)
        self.kind, self.error = kind, error


def retry_after_seconds(headers: Any) -> float | None:
    """``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date) -> seconds, else None."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None) -> float:
    """Exponential back-off with jitter (attempt counts from 1); a server's Retry-After is a floor."""
    delay = min(cap, base * 2 ** (attempt - 1)) * (0.5 + random.random())
    return max(delay, retry_after) if retry_after is not None else delay


def cause_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in chain and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def dropped_not_timed_out(exc: BaseException) -> bool:
    """True when a 'timeout' from the SDK is really a dropped connection.

    The aiohttp transport maps every ``aiohttp.ClientConnectionError`` (a server closing the connection
    included) to a connect *timeout*; the cause chain still holds the aiohttp error."""
    try:
        from aiohttp import ClientConnectionError
    except ImportError:
        return False
    return any(isinstance(c, ClientConnectionError) and not isinstance(c, TimeoutError) for c in cause_chain(exc))


def root_cause(exc: BaseException) -> str:
    """One short line naming the deepest cause of a client error (e.g. 'connection refused')."""
    chain = cause_chain(exc)
    for c in chain:
        if isinstance(c, ConnectionRefusedError):
            return "connection refused"
        if isinstance(c, (TimeoutError, asyncio.TimeoutError)):
            return "timed out"
    deepest = next((c for c in reversed(chain) if str(c).strip()), exc)
    return error_line(deepest, ERROR_CHARS)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


def aiohttp_transport() -> Any:
    """The SDK's aiohttp transport (``openai[aiohttp]``) where installed, else None (the SDK's default httpx).

    It needs about 40% less client CPU per request than the default transport, which is what keeps 64 requests in
    flight close to the ideal rate on a small machine (bench/api_throughput.py)."""
    try:
        from openai import DefaultAioHttpClient

        return DefaultAioHttpClient()
    except (ImportError, RuntimeError):  # an SDK without it, or aiohttp not installed
        return None


def base_url(options: Options) -> str:
    return (options.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")


# Client-side knobs that never change an answer.
_NOT_IDENTITY = {"base_url", "api_key_env", "max_concurrency", "timeout", "max_attempts", "backoff_base",
                 "backoff_max"}


def identity(options: Options) -> dict[str, Any]:
    """Static: every option that reaches the wire (the URL without credentials); never a secret."""
    ident = {"backend": "openai", **options.model_dump(mode="json", exclude=_NOT_IDENTITY),
             "base_url": strip_credentials(base_url(options))}
    return redact_secrets(ident)  # a key in extra_body changes no answer and is never written down


class OpenAIBackend:
    def __init__(self, options: Options):
        self.options = options
        self._json_supported = True  # cleared when json_mode is "auto" and the server rejects response_format

    @property
    def base_url(self) -> str:
        return (self.options.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")

    def identity(self) -> dict[str, Any]:
        return identity(self.options)

    def _client(self, timeout: float | None = None):
        from openai import AsyncOpenAI

        key = os.environ.get(self.options.api_key_env)
        if not key:
            if self.base_url == DEFAULT_BASE_URL:
                raise BackendUnavailable(
                    f"model '{self.options.model}' at {strip_credentials(self.base_url)}: the API key is not set "
                    f"(environment variable {self.options.api_key_env})")
            key = "EMPTY"  # local servers usually accept any key
        return AsyncOpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=timeout or self.options.timeout,
                           http_client=aiohttp_transport())

    def check(self) -> None:
        """GET /models with a short timeout; one line naming the model, the URL and the cause."""
        timeout = min(10.0, self.options.timeout)

        async def probe() -> list[str]:
            client = self._client(timeout)
            try:
                page = await asyncio.wait_for(client.models.list(), timeout=timeout)
                return [m.id for m in getattr(page, "data", None) or []]
            finally:
                await client.close()

        try:
            served = asyncio.run(probe())
        except BackendUnavailable:
            raise
        except Exception as e:  # noqa: BLE001 - one line for the user
            raise BackendUnavailable(f"model '{self.options.model}' at {strip_credentials(self.base_url)}: {root_cause(e)}") from None
        if served and self.options.model not in served:
            log.warning("model '%s' is not among the models %s lists (%s)", self.options.model, strip_credentials(self.base_url),
                        ", ".join(served[:5]) + (", ..." if len(served) > 5 else ""))

    # ---- one request --------------------------------------------------------------------------------------
    def _use_response_format(self, req: ModelRequest) -> bool:
        return (self.options.api == "chat" and req.params.json_schema is not None
                and self.options.json_mode is not False and self._json_supported)

    def _kwargs(self, req: ModelRequest) -> dict[str, Any]:
        p = req.params
        kw: dict[str, Any] = dict(model=self.options.model, temperature=p.temperature, top_p=p.top_p,
                                  max_tokens=p.max_tokens, n=p.n)
        if p.stop:
            kw["stop"] = p.stop[:MAX_STOP_SEQUENCES]
        if p.presence_penalty:
            kw["presence_penalty"] = p.presence_penalty
        if p.frequency_penalty:
            kw["frequency_penalty"] = p.frequency_penalty
        if p.seed is not None:
            kw["seed"] = p.seed
        extra = dict(self.options.extra_body)
        if p.json_schema is not None and self.options.guided == "structured_outputs":
            extra["structured_outputs"] = {"json": p.json_schema}
        elif p.json_schema is not None and self.options.guided == "guided_json":
            extra["guided_json"] = p.json_schema
        if extra:
            kw["extra_body"] = extra
        if self._use_response_format(req):
            # Structured outputs need an object at the root: the schema's value sits under "items".
            kw["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "answer", "schema": {"type": "object", "properties": {"items": req.params.json_schema},
                                             "required": ["items"]}}}
        return kw

    async def _send(self, client: Any, req: ModelRequest, kw: dict[str, Any]) -> Any:
        """POST the request and return the decoded JSON body.

        Goes through the SDK's generic ``post`` (same auth, timeouts and error types as ``create``) with the body
        built here: the typed ``create`` methods re-walk every body against their TypedDicts and build pydantic
        objects from every answer, which costs about a third of the client's CPU time per request."""
        body = dict(kw)
        body.update(body.pop("extra_body", None) or {})
        if self.options.api == "chat":
            body["messages"] = [m.model_dump() for m in req.messages] if req.messages else [
                {"role": "user", "content": req.prompt or ""}]
            path = "/chat/completions"
        else:
            body["prompt"] = req.prompt if req.prompt is not None else "\n\n".join(
                m.content for m in req.messages or [])
            path = "/completions"
        return await client.post(path, cast_to=dict, body=body, options={"security": {"bearer_auth": True}})

    async def _call(self, client: Any, req: ModelRequest) -> Completion:
        import openai

        kw = self._kwargs(req)
        try:
            data = await self._send(client, req, kw)
        except openai.APITimeoutError as e:
            if dropped_not_timed_out(e):
                raise _Retryable("connection", f"connection error: {root_cause(e)}") from None
            raise _Retryable("timeout", f"no answer within {self.options.timeout:g}s ({first_line(str(e), ERROR_CHARS)})") from None
        except openai.APIConnectionError as e:
            raise _Retryable("connection", f"connection error: {root_cause(e)}") from None
        except openai.APIStatusError as e:
            status, msg = e.status_code, first_line(str(e), ERROR_CHARS)
            if status == 429 or status == 408 or status >= 500:
                raise _Retryable(f"http_{status}", msg, retry_after_seconds(e.response.headers)) from None
            if status == 400 and "response_format" in kw and self.options.json_mode == "auto":
                log.warning("%s rejected response_format (%s); asking for JSON in the prompt only",
                            strip_credentials(self.base_url), msg)
                self._json_supported = False
                return await self._call(client, req)  # at once, without response_format
            raise _Fatal(f"http_{status}", msg) from None
        except (openai.APIResponseValidationError, ValueError, TypeError) as e:  # e.g. a body that is not JSON
            raise _Retryable("malformed", f"malformed response: {error_line(e, ERROR_CHARS)}") from None
        return self._completion(data, req)

    def _completion(self, data: Any, req: ModelRequest) -> Completion:
        """Texts, finish reasons and usage from a decoded answer; anything short of that is malformed."""
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices or not all(isinstance(c, dict) for c in choices):
            raise _Retryable("malformed", "malformed response: no choices in the answer")
        choices = sorted(choices, key=lambda c: c.get("index") if isinstance(c.get("index"), int) else 0)
        if self.options.api == "chat":
            texts = [(c.get("message") or {}).get("content") if isinstance(c.get("message"), dict) else None
                     for c in choices]
        else:
            texts = [c.get("text") for c in choices]
        if any(not isinstance(t, str) for t in texts):
            raise _Retryable("malformed", "malformed response: an answer without text")
        reasons = [str(c.get("finish_reason") or "stop") for c in choices]
        for k, t in enumerate(texts):  # stop strings beyond the API's limit
            cut = cut_at_stop(t, req.params.stop[MAX_STOP_SEQUENCES:])
            if cut is not None:
                texts[k], reasons[k] = cut, "stop"
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        return Completion(texts=texts, finish_reasons=reasons, usage=Usage(
            prompt_tokens=_int(usage.get("prompt_tokens")), completion_tokens=_int(usage.get("completion_tokens"))))

    async def _one(self, client: Any, req: ModelRequest) -> ModelResult:
        o = self.options
        last: _Retryable | None = None
        for attempt in range(1, o.max_attempts + 1):
            try:
                return await self._call(client, req)
            except _Fatal as e:
                return Failure(error=e.error or e.kind, kind=e.kind, attempts=attempt)
            except _Retryable as e:
                last = e
                if attempt == o.max_attempts:
                    break
                delay = backoff_delay(attempt, o.backoff_base, o.backoff_max, e.retry_after)
                log.info("retrying after %s in %.2fs (attempt %d/%d)", e.kind, delay, attempt, o.max_attempts)
                await asyncio.sleep(delay)
        assert last is not None
        return Failure(error=first_line(last.error, ERROR_CHARS) or last.kind, kind=last.kind, attempts=o.max_attempts)

    # ---- the batch ------------------------------------------------------------------------------------------
    async def _run(self, requests: Sequence[ModelRequest], on_result: ResultSink) -> None:
        workers = min(self.options.max_concurrency, len(requests))
        # One HTTP connection pool per CONNECTIONS_PER_CLIENT workers: a pool's cost per request grows with its size.
        clients = [self._client() for _ in range(-(-workers // CONNECTIONS_PER_CLIENT))]
        pending: Iterator[int] = iter(range(len(requests)))
        sink = _GroupingSink(on_result)

        async def worker(client: Any) -> None:
            for i in pending:  # shared iterator: each index goes to exactly one worker
                result = await self._one(client, requests[i])
                if not await sink.report(i, result):
                    return

        tasks = [asyncio.ensure_future(worker(clients[w % len(clients)])) for w in range(workers)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            # A sink error, a cancellation or Ctrl-C: stop every worker before anything else is reported.
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            for client in clients:
                await client.close()

    def generate(self, requests: Sequence[ModelRequest], on_result: ResultSink, store: Any = None) -> None:
        if requests:
            asyncio.run(self._run(requests, on_result))

    def close(self) -> None:
        return None


class _GroupingSink:
    """Reports results that finish in the same turn of the event loop as one group (one journal transaction).

    A worker awaits its group's report before it takes another request, so when the sink says "no more" (budget)
    nothing new starts; requests still in flight finish and are reported. After a sink error nothing more is
    reported (the requests not yet committed are sent again on the next run)."""

    def __init__(self, on_result: ResultSink):
        self.on_result = on_result
        self.group: list[tuple[int, ModelResult]] = []
        self.flushed: asyncio.Future[bool] | None = None
        self.more = True
        self.broken = False

    async def report(self, index: int, result: ModelResult) -> bool:
        if self.broken:
            return False
        self.group.append((index, result))
        if self.flushed is None:
            self.flushed = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_soon(self._flush)
        return await self.flushed

    def _flush(self) -> None:
        group, done = self.group, self.flushed
        self.group, self.flushed = [], None
        assert done is not None
        try:
            # Runs in the event loop's thread, which is the thread that called generate().
            if not self.broken and not self.on_result(group):
                self.more = False
        except BaseException as e:  # noqa: BLE001 - handed to every waiting worker
            self.broken = True
            done.set_exception(e)
            return
        done.set_result(self.more and not self.broken)


def create(options: Options) -> OpenAIBackend:
    return OpenAIBackend(options)
