"""``backend: openai`` — OpenAI and any OpenAI-compatible server (``vllm serve``, llama.cpp, Ollama, TGI).

An async client keeps ``max_concurrency`` requests in flight, each with a timeout; 429, 5xx, time-outs,
dropped connections and malformed answers are retried with exponential back-off and jitter, honouring
``Retry-After``; after ``max_attempts`` a request becomes a :class:`Failure` with its error and the stage goes on.
Workers pull requests from one iterator, so memory stays flat in the number of requests. Results are reported
from the calling thread's event loop as they arrive. The API key is read from the environment variable named by
``api_key_env`` and never stored.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.models.base import (BackendUnavailable, Completion, Failure, ModelRequest, ModelResult, ResultSink,
                                  Usage)

log = logging.getLogger(__name__)
DEFAULT_BASE_URL = "https://api.openai.com/v1"


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    api: Literal["chat", "completions"] = "chat"
    base_url: str | None = None  # default: $OPENAI_BASE_URL, else OpenAI
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = Field(8, ge=1)
    timeout: float = 60.0  # seconds per attempt
    max_attempts: int = Field(5, ge=1)
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    json_mode: bool = True  # use response_format json_schema when a request carries a schema
    extra_body: dict[str, Any] = Field(default_factory=dict)  # server-specific fields (e.g. vLLM's top_k)


class _Retryable(Exception):
    def __init__(self, kind: str, error: str, retry_after: float | None = None):
        super().__init__(error)
        self.kind, self.error, self.retry_after = kind, error, retry_after


def _retry_after(headers: Any) -> float | None:
    value = headers.get("retry-after") if headers is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class OpenAIBackend:
    def __init__(self, options: Options):
        self.options = options

    @property
    def base_url(self) -> str:
        return (self.options.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")

    def identity(self) -> dict[str, Any]:
        return {"backend": "openai", "model": self.options.model, "base_url": self.base_url, "api": self.options.api}

    def _client(self):
        from openai import AsyncOpenAI

        key = os.environ.get(self.options.api_key_env)
        if not key:
            if self.base_url == DEFAULT_BASE_URL:
                raise BackendUnavailable(f"model '{self.options.model}': set the API key in ${self.options.api_key_env}")
            key = "EMPTY"  # local servers usually accept any key
        return AsyncOpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=self.options.timeout)

    def check(self) -> None:
        async def probe() -> None:
            client = self._client()
            try:
                await asyncio.wait_for(client.models.list(), timeout=min(10.0, self.options.timeout))
            finally:
                await client.close()

        try:
            asyncio.run(probe())
        except BackendUnavailable:
            raise
        except Exception as e:  # noqa: BLE001 - one line for the user
            cause = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise BackendUnavailable(f"model '{self.options.model}' at {self.base_url}: {cause}") from None

    # ---- one request --------------------------------------------------------------------------------------
    def _kwargs(self, req: ModelRequest) -> dict[str, Any]:
        p = req.params
        kw: dict[str, Any] = dict(model=self.options.model, temperature=p.temperature, top_p=p.top_p,
                                  max_tokens=p.max_tokens, n=p.n)
        if p.stop:
            kw["stop"] = p.stop[:4]
        if p.presence_penalty:
            kw["presence_penalty"] = p.presence_penalty
        if p.frequency_penalty:
            kw["frequency_penalty"] = p.frequency_penalty
        if p.seed is not None:
            kw["seed"] = p.seed
        if self.options.extra_body:
            kw["extra_body"] = dict(self.options.extra_body)
        return kw

    async def _call(self, client: Any, req: ModelRequest) -> Completion:
        import openai

        kw = self._kwargs(req)
        try:
            if self.options.api == "chat":
                messages = [m.model_dump() for m in req.messages] if req.messages else [
                    {"role": "user", "content": req.prompt or ""}]
                if req.params.json_schema is not None and self.options.json_mode:
                    kw["response_format"] = {"type": "json_schema", "json_schema": {
                        "name": "answer", "schema": {"type": "object", "properties": {"items": req.params.json_schema},
                                                     "required": ["items"]}}}
                resp = await client.chat.completions.create(messages=messages, **kw)
                texts = [c.message.content for c in resp.choices]
            else:
                prompt = req.prompt if req.prompt is not None else "\n\n".join(m.content for m in req.messages or [])
                resp = await client.completions.create(prompt=prompt, **kw)
                texts = [c.text for c in resp.choices]
        except openai.RateLimitError as e:
            raise _Retryable("http_429", str(e), _retry_after(e.response.headers)) from None
        except openai.APITimeoutError as e:
            raise _Retryable("timeout", str(e) or "timed out") from None
        except openai.APIConnectionError as e:
            raise _Retryable("connection", str(e) or "connection error") from None
        except openai.APIStatusError as e:
            if e.status_code >= 500 or e.status_code == 408:
                raise _Retryable(f"http_{e.status_code}", str(e), _retry_after(e.response.headers)) from None
            raise  # 4xx: the request itself is wrong; retrying cannot help
        except (openai.APIResponseValidationError, ValueError, TypeError, AttributeError) as e:
            raise _Retryable("malformed", f"malformed response: {e}") from None
        reasons = [c.finish_reason or "stop" for c in resp.choices]
        if not texts or any(not isinstance(t, str) for t in texts):
            raise _Retryable("malformed", "the response has no text")
        usage = getattr(resp, "usage", None)
        return Completion(texts=texts, finish_reasons=reasons, usage=Usage(
            prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
            completion_tokens=getattr(usage, "completion_tokens", 0) or 0))

    async def _one(self, client: Any, req: ModelRequest) -> ModelResult:
        import openai

        o = self.options
        last: _Retryable | None = None
        for attempt in range(1, o.max_attempts + 1):
            try:
                return await self._call(client, req)
            except _Retryable as e:
                last = e
                if attempt == o.max_attempts:
                    break
                delay = min(o.backoff_max, o.backoff_base * 2 ** (attempt - 1)) * (0.5 + random.random())
                if e.retry_after is not None:
                    delay = max(delay, e.retry_after)
                log.info("retrying after %s (%.2fs, attempt %d/%d)", e.kind, delay, attempt, o.max_attempts)
                await asyncio.sleep(delay)
            except openai.APIStatusError as e:
                return Failure(error=str(e).splitlines()[0][:500], kind=f"http_{e.status_code}", attempts=attempt)
        assert last is not None
        return Failure(error=last.error.splitlines()[0][:500] if last.error else last.kind, kind=last.kind,
                       attempts=o.max_attempts)

    # ---- the batch ------------------------------------------------------------------------------------------
    async def _run(self, requests: Sequence[ModelRequest], on_result: ResultSink) -> None:
        client = self._client()
        pending = iter(range(len(requests)))
        stop = False

        async def worker() -> None:
            nonlocal stop
            for i in pending:
                if stop:
                    return
                result = await self._one(client, requests[i])
                if not on_result([(i, result)]):
                    stop = True

        try:
            await asyncio.gather(*(worker() for _ in range(min(self.options.max_concurrency, len(requests)))))
        finally:
            await client.close()

    def generate(self, requests: Sequence[ModelRequest], on_result: ResultSink) -> None:
        if requests:
            asyncio.run(self._run(requests, on_result))

    def close(self) -> None:
        return None


def create(options: Options) -> OpenAIBackend:
    return OpenAIBackend(options)
