"""``backend: openai`` — OpenAI and any OpenAI-compatible server (``vllm serve``, llama.cpp, Ollama, TGI).

An async client keeps ``max_concurrency`` requests in flight, each with a timeout, paced by the rate limits the
server announces and the optional ``rpm``/``tpm`` caps (:mod:`pipeline.models.ratelimit`). 429, 408, 409, 5xx,
time-outs, dropped connections and malformed answers are retried with exponential back-off and jitter, honouring
``Retry-After``; after ``max_attempts`` a request becomes a transient :class:`Failure`. Other 4xx (a prompt over
the context, a bad parameter) and an answer without content (a refusal, a reasoning model out of tokens) are
permanent failures at once. A failure keeps the server's own message (up to ``ERROR_CHARS``).

Structured output (chat API, requests with a schema) is sent in the first form the server accepts, in the order
of :func:`alternatives`: ``json_schema`` (OpenAI, vLLM), ``json_object`` with the schema (llama.cpp's server), plain
text (the stage's parser reads it). A form is dropped for the rest of the run only when the server's error names
``response_format``; the answer is reported with the request actually sent, so it is journaled under its key.

``batch: true`` sends requests through the Batch API instead (:mod:`pipeline.models.openai_batch`). The event loop
runs in the calling thread (``asyncio.run``) and results are reported from it, so the sink (the journal's sqlite
connection) is only ever used by the thread that owns it. The API key is read from the environment variable named
by ``api_key_env`` and is never stored, logged or part of the identity.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pipeline.errors import UserError
from pipeline.hashing import strip_credentials
from pipeline.models.base import (BackendUnavailable, Completion, Failure, GenParams, Message, ModelRequest,
                                  ModelResult, ResultSink, Usage, cut_at_stop, error_line)
from pipeline.models.openai_wire import (DEFAULT_BASE_URL, MAX_STOP_SEQUENCES, Options, alternatives,  # noqa: F401
                                         base_url, identity, wire)
from pipeline.models.ratelimit import RateLimiter, backoff_delay, retry_after_seconds  # noqa: F401 - re-exported
from pipeline.models.transport import (ERROR_CHARS, Fatal, FormatRejected, GroupingSink, Retryable,  # noqa: F401
                                       aiohttp_transport, cause_chain, classify_status, dropped_not_timed_out,
                                       one_line, root_cause, server_message)

log = logging.getLogger(__name__)
CONNECTIONS_PER_CLIENT = 64
_RAW = {"X-Stainless-Raw-Response": "true"}  # the SDK hands back the response, headers included


def _int(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


class OpenAIBackend:
    def __init__(self, options: Options):
        self.options = options
        self.rejected: dict[str, str] = {}  # output formats the server rejected this run -> its message
        self.limiter = RateLimiter(options.rpm, options.tpm)
        self._tokenizer: Any = None
        # Set by the client: whether a batch of this worst case (prompt, completion tokens) fits the budget.
        self.fits: Callable[[int, int], bool] | None = None

    @property
    def base_url(self) -> str:
        return base_url(self.options)

    @property
    def cost_factor(self) -> float:
        """The share of the list price this backend's answers cost (the Batch API's discount)."""
        return self.options.batch_discount if self.options.batch else 1.0

    def identity(self) -> dict[str, Any]:
        return identity(self.options)

    def _key(self) -> str:
        key = os.environ.get(self.options.api_key_env)
        if not key:
            if self.base_url == DEFAULT_BASE_URL:
                raise BackendUnavailable(
                    f"model '{self.options.model}' at {strip_credentials(self.base_url)}: the API key is not set "
                    f"(environment variable {self.options.api_key_env})")
            key = "EMPTY"  # local servers usually accept any key
        return key

    def _client(self, timeout: float | None = None):
        from openai import AsyncOpenAI

        return AsyncOpenAI(base_url=self.base_url, api_key=self._key(), max_retries=0,
                           timeout=timeout or self.options.timeout, http_client=aiohttp_transport())

    def sync_client(self):
        from openai import OpenAI

        return OpenAI(base_url=self.base_url, api_key=self._key(), max_retries=2, timeout=self.options.timeout)

    def _where(self) -> str:
        return f"model '{self.options.model}' at {strip_credentials(self.base_url)}"

    def check(self) -> None:
        """GET /models with a short timeout; with ``json_mode: true``, a probe of the structured output forms."""
        timeout = min(10.0, self.options.timeout)

        async def models() -> list[str]:
            client = self._client(timeout)
            try:
                page = await asyncio.wait_for(client.models.list(), timeout=timeout)
                return [m.id for m in getattr(page, "data", None) or []]
            finally:
                await client.close()

        try:
            served = asyncio.run(models())
        except BackendUnavailable:
            raise
        except Exception as e:  # noqa: BLE001 - one line for the user
            raise BackendUnavailable(f"{self._where()}: {root_cause(e)}") from None
        if served and self.options.model not in served:
            log.warning("model '%s' is not among the models %s lists (%s)", self.options.model,
                        strip_credentials(self.base_url),
                        ", ".join(served[:5]) + (", ..." if len(served) > 5 else ""))
        if self.options.json_mode is True and self.options.api == "chat" and not self.options.batch:
            try:
                self.probe()
            except UserError as e:
                raise BackendUnavailable(str(e)) from None

    def probe(self) -> dict[str, Any]:
        """One small request (with a schema where structured output may be used): its latency, and the
        output format the server accepted."""
        schema = {"type": "array", "items": {"type": "string"}} if self.options.json_mode is not False else None
        req = ModelRequest(messages=[Message(role="user", content="Reply with a JSON list of two colours.")],
                           params=GenParams(max_tokens=16, temperature=0.0, json_schema=schema))
        got: list[tuple] = []
        start = time.monotonic()
        self.generate([req], lambda group: got.extend(group) or True)
        sent = got[0][2] if got and len(got[0]) > 2 else req
        return {"latency_s": time.monotonic() - start, "result": got[0][1] if got else None,
                "output_format": sent.params.output_format}

    # ---- one request --------------------------------------------------------------------------------------
    def _form(self, req: ModelRequest) -> ModelRequest:
        forms = [f for f in alternatives(self.options, req) if f.params.output_format not in self.rejected]
        if not forms:
            tried = "; ".join(f"{k}: {v}" for k, v in self.rejected.items())
            raise UserError(f"{self._where()}: json_mode is true but the server accepts no structured output "
                            f"({tried}); set json_mode: auto to use plain text")
        return forms[0]

    def reject_format(self, fmt: str | None, message: str) -> None:
        if fmt not in self.rejected:
            log.warning("%s rejected response_format %s (%s); using the next form", strip_credentials(self.base_url),
                        fmt, message)
            self.rejected[str(fmt)] = message

    async def _send(self, client: Any, req: ModelRequest) -> tuple[Any, Any]:
        """POST the request; the decoded JSON body and the response headers.

        Goes through the SDK's generic ``post`` (same auth, timeouts and error types as ``create``) with the body
        built here: the typed ``create`` methods re-walk every body against their TypedDicts and build pydantic
        objects from every answer, which costs about a third of the client's CPU time per request."""
        path, body = wire(self.options, req)
        raw = await client.post(path, cast_to=dict, body=body,
                                options={"security": {"bearer_auth": True}, "headers": _RAW})
        return raw.parse(), raw.headers

    async def _call(self, client: Any, req: ModelRequest) -> Completion:
        import openai

        tokens = len(req.model_dump_json()) / 4 + req.params.max_tokens * req.params.n
        probe = await self.limiter.acquire(tokens)
        headers, limited = None, False
        try:
            data, headers = await self._send(client, req)
        except openai.APITimeoutError as e:
            if dropped_not_timed_out(e):
                raise Retryable("connection", f"connection error: {root_cause(e)}") from None
            raise Retryable("timeout", f"no answer within {self.options.timeout:g}s") from None
        except openai.APIConnectionError as e:
            raise Retryable("connection", f"connection error: {root_cause(e)}") from None
        except openai.APIStatusError as e:
            headers, limited = e.response.headers, e.status_code == 429
            err = classify_status(e.status_code, server_message(e), "response_format" in wire(self.options, req)[1])
            if isinstance(err, Retryable):
                err.retry_after = retry_after_seconds(headers)
            raise err from None
        except (openai.APIResponseValidationError, ValueError, TypeError) as e:  # e.g. a body that is not JSON
            raise Retryable("malformed", f"malformed response: {error_line(e, ERROR_CHARS)}") from None
        finally:
            self.limiter.release(tokens, headers, limited, probe)
        return self.completion(data, req)

    def completion(self, data: Any, req: ModelRequest) -> Completion:
        """Texts, finish reasons and usage from a decoded answer; anything short of that is malformed."""
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices or not all(isinstance(c, dict) for c in choices):
            raise Retryable("malformed", "malformed response: no choices in the answer")
        choices = sorted(choices, key=lambda c: c.get("index") if isinstance(c.get("index"), int) else 0)
        if self.options.api == "chat":
            texts = [c["message"].get("content") if isinstance(c.get("message"), dict) else False for c in choices]
        else:
            texts = [c.get("text", False) for c in choices]
        reasons = [str(c.get("finish_reason") or "stop") for c in choices]
        if any(t is None for t in texts):
            why = next(r for t, r in zip(texts, reasons) if t is None)
            refusal = next((c["message"].get("refusal") for c in choices if isinstance(c.get("message"), dict)
                            and c["message"].get("refusal")), None)
            raise Fatal("null_content", f"the answer has no content (finish_reason {why})"
                        + (f": {one_line(str(refusal))[:ERROR_CHARS]}" if refusal else ""))
        if any(not isinstance(t, str) for t in texts):
            raise Retryable("malformed", "malformed response: an answer without text")
        for k, t in enumerate(texts):  # stop strings beyond the API's limit
            cut = cut_at_stop(t, req.params.stop[MAX_STOP_SEQUENCES:])
            if cut is not None:
                texts[k], reasons[k] = cut, "stop"
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        counted = Usage(prompt_tokens=_int(usage.get("prompt_tokens")),
                        completion_tokens=_int(usage.get("completion_tokens")))
        if not (counted.prompt_tokens or counted.completion_tokens) and self.options.tokenizer:
            counted = self.count_tokens(req, texts)
        return Completion(texts=texts, finish_reasons=reasons, usage=counted)

    def count_tokens(self, req: ModelRequest, texts: Sequence[str] = ()) -> Usage:
        """Token counts with the model's own tokenizer (``tokenizer:``), for servers that report no usage."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.options.tokenizer)
            except (OSError, ValueError) as e:
                raise UserError(f"{self._where()}: tokenizer '{self.options.tokenizer}' cannot be loaded: "
                                f"{error_line(e, 300)}") from None
        tok = self._tokenizer
        if req.messages and getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([m.model_dump() for m in req.messages], add_generation_prompt=True,
                                          tokenize=True)
            prompt = len(ids["input_ids"] if isinstance(ids, dict) else ids)
        else:
            text = req.prompt if req.prompt is not None else "\n\n".join(m.content for m in req.messages or [])
            prompt = len(tok.encode(text))
        return Usage(prompt_tokens=prompt,
                     completion_tokens=sum(len(tok.encode(t, add_special_tokens=False)) for t in texts))

    async def _one(self, client: Any, req: ModelRequest) -> tuple[ModelResult, ModelRequest]:
        o = self.options
        last: Retryable | None = None
        attempt = 0
        while attempt < o.max_attempts:
            attempt += 1
            form = self._form(req)
            try:
                return await self._call(client, form), form
            except FormatRejected as e:
                self.reject_format(form.params.output_format, str(e))
                attempt -= 1  # the next form at once: not an attempt of this one
            except Fatal as e:
                return Failure(error=e.error or e.kind, kind=e.kind, attempts=attempt, permanent=True), form
            except Retryable as e:
                last = e
                if attempt == o.max_attempts:
                    break
                delay = backoff_delay(attempt, o.backoff_base, o.backoff_max, e.retry_after)
                log.info("retrying after %s in %.2fs (attempt %d/%d)", e.kind, delay, attempt, o.max_attempts)
                await asyncio.sleep(delay)
        assert last is not None
        return Failure(error=last.error or last.kind, kind=last.kind, attempts=o.max_attempts), form

    # ---- the batch ------------------------------------------------------------------------------------------
    async def _run(self, requests: Sequence[ModelRequest], on_result: ResultSink) -> None:
        workers = min(self.options.max_concurrency, len(requests))
        # One HTTP connection pool per CONNECTIONS_PER_CLIENT workers: a pool's cost per request grows with its size.
        clients = [self._client() for _ in range(-(-workers // CONNECTIONS_PER_CLIENT))]
        pending: Iterator[int] = iter(range(len(requests)))
        sink = GroupingSink(on_result)

        async def worker(client: Any) -> None:
            for i in pending:  # shared iterator: each index goes to exactly one worker
                result, sent = await self._one(client, requests[i])
                if not await sink.report((i, result) if sent is requests[i] else (i, result, sent)):
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
        if not requests:
            return
        if self.options.batch:
            from pipeline.models.openai_batch import MemoryStore, run_batches

            run_batches(self, requests, on_result, store if store is not None else MemoryStore())
        else:
            asyncio.run(self._run(requests, on_result))

    def close(self) -> None:
        return None


def capacity(options: Options) -> int:
    """Requests in flight at once: the client's concurrency."""
    return options.max_concurrency


def create(options: Options) -> OpenAIBackend:
    return OpenAIBackend(options)

