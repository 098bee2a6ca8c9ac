"""A real OpenAI-compatible HTTP server on 127.0.0.1 for tests and benchmarks (stdlib only).

Serves ``POST /v1/chat/completions``, ``POST /v1/completions`` and ``GET /v1/models`` with a fixed latency and
injectable faults. A fault is taken, per request received, from ``faults`` (a list consumed in order) or from
``fault_fn(body, seen)`` (``seen``: how many earlier requests had the same body), and is one of:

- ``"429"`` — rate limited, with ``Retry-After: <retry_after>``;
- ``"500"``, ``"503"``, ``"400"`` — an error status with an OpenAI-style error body;
- ``"malformed"`` — status 200 with a truncated JSON body; ``"empty"`` — status 200 with no choices;
- ``"drop"`` — the connection closes without an answer;
- ``"slow"`` — the answer comes after ``slow_s`` more seconds (longer than a client's timeout).

Answers come from ``answer(body) -> str`` (default: derived deterministically from the prompt and seed). Every
request is logged (thread-safe): ``log`` (bodies in arrival order), ``times`` (monotonic arrival times),
``counts()`` (how many times each distinct body arrived), ``count(body)``, ``max_in_flight``.

In tests: ``with FakeOpenAI(latency=0.1, faults=["429"]) as srv: ... srv.url ...``, or the ``openai_server``
pytest fixture (import it into the test module). Standalone, for benchmarks and other processes:
``python tests/openai_server.py --port 8000 --latency 0.2`` (prints the URL once it is listening).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("429", "500", "503", "400", "malformed", "empty", "drop", "slow")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the default listen backlog (5) refuses bursts of concurrent connections

    def handle_error(self, request, client_address) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):  # a client gave up: normal
            super().handle_error(request, client_address)


def canonical(body: dict) -> str:
    return json.dumps(body, sort_keys=True, ensure_ascii=False)


def default_answer(body: dict) -> str:
    text = body.get("prompt") or json.dumps(body.get("messages"), sort_keys=True)
    return "Answer " + hashlib.sha256(f"{text}|{body.get('seed')}".encode()).hexdigest()[:12]


class FakeOpenAI:
    def __init__(self, latency: float = 0.0, answer: Callable[[dict], str] = default_answer,
                 faults: list[str] | None = None, fault_fn: Callable[[dict, int], str | None] | None = None,
                 retry_after: float = 0.2, slow_s: float = 2.0, port: int = 0, models: tuple[str, ...] = ("fake",),
                 reject_response_format: bool = False):
        for f in faults or []:
            if f not in FAULTS:
                raise ValueError(f"unknown fault {f!r} (one of {', '.join(FAULTS)})")
        self.latency, self.answer, self.retry_after, self.slow_s = latency, answer, retry_after, slow_s
        self.fault_fn, self.models, self.reject_response_format = fault_fn, models, reject_response_format
        self.faults: deque[str] = deque(faults or [])
        self.log: list[dict] = []
        self.times: list[float] = []
        self.paths: list[str] = []
        self.auth: list[str | None] = []  # the Authorization header of each request
        self._counts: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0  # the most POST requests being handled at once
        self.lock = threading.Lock()
        self.httpd = _Server(("127.0.0.1", port), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def bodies(self) -> list[str]:
        with self.lock:
            return [canonical(b) for b in self.log]

    def counts(self) -> Counter[str]:
        """How many times each distinct request body (canonical JSON) arrived."""
        with self.lock:
            return Counter(self._counts)

    def count(self, body: dict) -> int:
        with self.lock:
            return self._counts[canonical(body)]

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _receive(self, path: str, body: dict, auth: str | None = None) -> str | None:
        """Log a request; return its fault (or None)."""
        key = canonical(body)
        with self.lock:
            seen = self._counts[key]
            self._counts[key] += 1
            self.log.append(body)
            self.times.append(time.monotonic())
            self.paths.append(path)
            self.auth.append(auth)
            fault = self.faults.popleft() if self.faults else None
        if fault is None and self.fault_fn is not None:
            fault = self.fault_fn(body, seen)
        if fault is None and self.reject_response_format and "response_format" in body:
            fault = "400"
        return fault

    def _answer_payload(self, path: str, body: dict) -> bytes:
        text = self.answer(body)
        n = int(body.get("n") or 1)
        prompt_tokens = len(json.dumps(body.get("prompt") or body.get("messages")).split())
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n * len(text.split()),
                 "total_tokens": prompt_tokens + n * len(text.split())}
        if path.endswith("/chat/completions"):
            choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                       for i in range(n)]
            obj = "chat.completion"
        else:
            choices = [{"index": i, "text": text, "finish_reason": "stop", "logprobs": None} for i in range(n)]
            obj = "text_completion"
        return json.dumps({"id": "cmpl-1", "object": obj, "created": 0, "model": body.get("model"),
                           "choices": choices, "usage": usage}).encode()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in separate writes

            def log_message(self, *args):  # quiet
                return

            def _send(self, status: int, payload: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload)

            def _error(self, status: int, msg: str, headers: dict | None = None) -> None:
                self._send(status, json.dumps({"error": {"message": msg, "type": "test", "code": status}}).encode(),
                           headers)

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, json.dumps({"object": "list", "data": [
                        {"id": m, "object": "model", "created": 0, "owned_by": "tests"} for m in server.models]}).encode())
                else:
                    self._error(404, "not found")

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    return self._error(400, "the request body is not JSON")
                if not self.path.rstrip("/").endswith(("/chat/completions", "/completions")):
                    return self._error(404, "not found")
                fault = server._receive(self.path, body, self.headers.get("Authorization"))
                with server.lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._reply(fault, body)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _reply(self, fault: str | None, body: dict) -> None:
                if server.latency:
                    time.sleep(server.latency)
                if fault == "429":
                    return self._error(429, "rate limited", {"Retry-After": f"{server.retry_after:g}"})
                if fault in ("400", "500", "503"):
                    return self._error(int(fault), "bad request" if fault == "400" else "server error")
                if fault == "malformed":
                    return self._send(200, b'{"id": "x", "choices": [ {"text": "trunc')
                if fault == "empty":
                    return self._send(200, json.dumps({"id": "x", "object": "chat.completion", "created": 0,
                                                       "model": "fake", "choices": []}).encode())
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return None
                if fault == "slow":
                    time.sleep(server.slow_s)
                self._send(200, server._answer_payload(self.path, body))

        return Handler


try:  # the pytest fixture (pytest is only needed when the tests use it)
    import pytest

    @pytest.fixture
    def openai_server() -> Iterator[FakeOpenAI]:
        with FakeOpenAI() as srv:
            yield srv
except ImportError:  # pragma: no cover
    pass


def main() -> None:
    ap = argparse.ArgumentParser(description="A local OpenAI-compatible server for tests and benchmarks.")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    ap.add_argument("--faults", default="", help=f"comma-separated faults for the first requests ({', '.join(FAULTS)})")
    ap.add_argument("--retry-after", type=float, default=0.2)
    args = ap.parse_args()
    srv = FakeOpenAI(latency=args.latency, faults=[f for f in args.faults.split(",") if f], port=args.port,
                     retry_after=args.retry_after)
    print(f"serving on {srv.url}", flush=True)
    try:
        srv.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.httpd.server_close()


if __name__ == "__main__":
    main()
