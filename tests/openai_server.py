"""A real OpenAI-compatible HTTP server on 127.0.0.1 for tests and benchmarks.

Serves ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models`` with a fixed latency and injectable
faults, taken in order from ``faults`` (one per request received): ``"429"`` (with Retry-After), ``"500"``,
``"503"``, ``"400"``, ``"malformed"`` (invalid JSON with status 200), ``"drop"`` (the connection closes without an
answer), ``"slow"`` (answers after ``slow_s``), ``"empty"`` (200 with no choices). Every request body is
logged. Answers come from ``answer(body) -> str`` (default: derived from the prompt, deterministic).

Run standalone: ``python tests/openai_server.py --port 8000 --latency 0.2``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the default listen backlog (5) refuses bursts of concurrent connections


def default_answer(body: dict) -> str:
    text = body.get("prompt") or json.dumps(body.get("messages"))
    return "Answer " + hashlib.sha256(f"{text}|{body.get('seed')}".encode()).hexdigest()[:12]


class FakeOpenAI:
    def __init__(self, latency: float = 0.0, answer: Callable[[dict], str] = default_answer,
                 faults: list[str] | None = None, retry_after: float = 0.2, slow_s: float = 2.0):
        self.latency, self.answer, self.retry_after, self.slow_s = latency, answer, retry_after, slow_s
        self.faults: deque[str] = deque(faults or [])
        self.log: list[dict] = []
        self.times: list[float] = []
        self.lock = threading.Lock()
        self.httpd = _Server(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def bodies(self) -> list[str]:
        with self.lock:
            return [json.dumps(b, sort_keys=True) for b in self.log]

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

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

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, json.dumps({"object": "list", "data": [
                        {"id": "fake", "object": "model", "created": 0, "owned_by": "tests"}]}).encode())
                else:
                    self._send(404, b'{"error": {"message": "not found"}}')

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with server.lock:
                    server.log.append(body)
                    server.times.append(time.monotonic())
                    fault = server.faults.popleft() if server.faults else None
                if server.latency:
                    time.sleep(server.latency)
                err = lambda code, msg: json.dumps({"error": {"message": msg, "type": "test", "code": code}}).encode()  # noqa: E731
                if fault == "429":
                    return self._send(429, err(429, "rate limited"), {"Retry-After": str(server.retry_after)})
                if fault == "400":
                    return self._send(400, err(400, "bad request"))
                if fault in ("500", "503"):
                    return self._send(int(fault), err(int(fault), "server error"))
                if fault == "malformed":
                    return self._send(200, b'{"id": "x", "choices": [ {"text": "trunc')
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return None
                if fault == "slow":
                    time.sleep(server.slow_s)
                if fault == "empty":
                    return self._send(200, json.dumps({"id": "x", "object": "chat.completion", "created": 0,
                                                       "model": "fake", "choices": []}).encode())
                text = server.answer(body)
                n = int(body.get("n") or 1)
                usage = {"prompt_tokens": 10, "completion_tokens": len(text.split()), "total_tokens": 10 + len(text.split())}
                if self.path.endswith("/chat/completions"):
                    choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                               for i in range(n)]
                    obj = "chat.completion"
                else:
                    choices = [{"index": i, "text": text, "finish_reason": "stop", "logprobs": None} for i in range(n)]
                    obj = "text_completion"
                self._send(200, json.dumps({"id": "cmpl-1", "object": obj, "created": 0, "model": body.get("model"),
                                            "choices": choices, "usage": usage}).encode())

        return Handler


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--latency", type=float, default=0.0)
    args = ap.parse_args()
    srv = FakeOpenAI(latency=args.latency)
    srv.httpd.server_close()
    srv.httpd = _Server(("127.0.0.1", args.port), srv._handler())
    print(f"serving on http://127.0.0.1:{args.port}/v1", flush=True)
    srv.httpd.serve_forever()
