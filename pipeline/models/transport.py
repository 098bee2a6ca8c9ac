"""HTTP client plumbing of the openai backend: the transport, error kinds with one short line each, and the
grouping of results reported from the event loop."""

from __future__ import annotations

import asyncio
from typing import Any

from pipeline.hashing import strip_credentials_in_text
from pipeline.models.base import ResultSink, error_line

ERROR_CHARS = 500  # the part of a server's message kept (error bodies can be whole HTML pages)


def one_line(text: str) -> str:
    """``text`` with its line breaks and runs of blanks folded into single spaces."""
    return " ".join(str(text).split())


def server_message(e: Any) -> str:
    """The server's own message from an ``APIStatusError`` (the whole of it, on one line, cut at ERROR_CHARS).

    The SDK's ``str(e)`` is "Error code: 500 - {...}" with the body's repr, often over several lines; the body's
    ``message`` (or ``detail``, FastAPI's) is what says what is wrong."""
    body = getattr(e, "body", None)
    msg: Any = None
    if isinstance(body, dict):
        msg = body.get("message") or body.get("detail") or body.get("error")
        if isinstance(msg, dict):
            msg = msg.get("message") or msg
        if msg is not None and not isinstance(msg, str):
            import json

            msg = json.dumps(msg, ensure_ascii=False)
    elif isinstance(body, str):
        msg = body
    if not msg:
        response = getattr(e, "response", None)
        try:
            msg = response.text if response is not None else str(e)
        except Exception:  # noqa: BLE001 - a body that cannot be read
            msg = str(e)
    status = getattr(e, "status_code", None)
    text = one_line(strip_credentials_in_text(msg or type(e).__name__))
    return (f"HTTP {status}: {text}" if status else text)[:ERROR_CHARS]


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


def aiohttp_transport() -> Any:
    """The SDK's aiohttp transport (``openai[aiohttp]``) where installed, else None (the SDK's default httpx).

    It needs about 40% less client CPU per request than the default transport, which is what keeps 64 requests in
    flight close to the ideal rate on a small machine (bench/api_throughput.py)."""
    try:
        from openai import DefaultAioHttpClient

        return DefaultAioHttpClient()
    except (ImportError, RuntimeError):  # an SDK without it, or aiohttp not installed
        return None


class Retryable(Exception):
    def __init__(self, kind: str, error: str, retry_after: float | None = None):
        super().__init__(error)
        self.kind, self.error, self.retry_after = kind, error, retry_after


class Fatal(Exception):
    """The request itself is wrong, or has no answer to give: retrying cannot help."""

    def __init__(self, kind: str, error: str):
        super().__init__(error)
        self.kind, self.error = kind, error


class FormatRejected(Exception):
    """The server rejected the request's ``response_format``."""


def classify_status(status: int, message: str, had_response_format: bool) -> Exception:
    """An HTTP error answer -> FormatRejected | Retryable | Fatal (the server's message kept)."""
    if had_response_format and "response_format" in message:
        return FormatRejected(message)
    if status in (408, 409, 429) or status >= 500:
        return Retryable(f"http_{status}", message)
    return Fatal(f"http_{status}", message)


class GroupingSink:
    """Reports results that finish in the same turn of the event loop as one group (one journal transaction).

    A worker awaits its group's report before it takes another request, so when the sink says "no more" (budget)
    nothing new starts; requests still in flight finish and are reported. After a sink error nothing more is
    reported (the requests not yet committed are sent again on the next run)."""

    def __init__(self, on_result: ResultSink):
        self.on_result = on_result
        self.group: list[tuple] = []
        self.flushed: asyncio.Future[bool] | None = None
        self.more = True
        self.broken = False

    async def report(self, item: tuple) -> bool:
        if self.broken:
            return False
        self.group.append(item)
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
