"""A real OpenAI-compatible HTTP server on 127.0.0.1 for tests and benchmarks (stdlib only).

Serves ``POST /v1/chat/completions``, ``POST /v1/completions`` and ``GET /v1/models`` with a fixed latency and
injectable faults. A fault is taken, per request received, from ``faults`` (a list consumed in order) or from
``fault_fn(body, seen)`` (``seen``: how many earlier requests had the same body), and is one of:

- ``"429"`` — rate limited, with ``Retry-After: <retry_after>``;
- ``"500"``, ``"503"``, ``"400"`` — an error status with an OpenAI-style error body;
- ``"malformed"`` — status 200 with a truncated JSON body; ``"empty"`` — status 200 with no choices;
- ``"drop"`` — the connection closes without an answer;
- ``"slow"`` — the answer comes after ``slow_s`` more seconds (longer than a client's timeout);
- ``"null"`` — status 200, the answer's content is null (finish_reason "length"), as a reasoning model out of tokens.

``reject_formats`` names the ``response_format`` types the server refuses (``True``: every one), answered with
``reject_status`` and a message naming ``response_format`` (llama.cpp's server answers json_schema with a 500).
``rate_limit=(R, window_s)`` announces ``x-ratelimit-*`` headers for R requests per fixed window and answers 429
beyond them (``limited`` counts those); with ``rate_mode="sliding"`` the window slides instead: at most R requests
in any ``window_s``, ``remaining`` is R less those of the last ``window_s``, and ``reset`` is when the oldest of them
leaves the window. ``usage=False`` leaves usage out of answers.

The Batch API: ``POST /v1/files`` (multipart), ``GET /v1/files/{id}/content``, ``POST /v1/batches``,
``GET /v1/batches[/{id}]``, ``POST /v1/batches/{id}/cancel``. A batch completes ``batch_delay`` seconds after it
was created; its items are answered as direct requests are (``batch_fault_fn(body, seen)`` may return "400" or
"500" for an item: it goes to the error file); the first ``expire_batches`` batches expire with only every other
item answered. ``batches_created`` counts batches, ``batch_items`` logs every item body.

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

FAULTS = ("429", "500", "503", "400", "malformed", "empty", "drop", "slow", "null")
REJECT_MESSAGE = ("1 validation error for CreateChatCompletionRequest\nresponse_format.type\n  Input should be "
                  "'text' or 'json_object' [type=literal_error, input_value='{kind}']")


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
                 reject_response_format: bool = False, reject_formats: set[str] | bool = (),
                 reject_status: int = 400, rate_limit: tuple[int, float] | None = None, rate_mode: str = "fixed",
                 usage: bool = True,
                 batch_delay: float = 0.3, batch_fault_fn: Callable[[dict, int], str | None] | None = None,
                 expire_batches: int = 0):
        for f in faults or []:
            if f not in FAULTS:
                raise ValueError(f"unknown fault {f!r} (one of {', '.join(FAULTS)})")
        self.latency, self.answer, self.retry_after, self.slow_s = latency, answer, retry_after, slow_s
        self.fault_fn, self.models = fault_fn, models
        self.reject_formats = True if reject_response_format else reject_formats
        self.reject_status, self.rate_limit, self.usage = reject_status, rate_limit, usage
        if rate_mode not in ("fixed", "sliding"):
            raise ValueError(f"unknown rate_mode {rate_mode!r} (fixed or sliding)")
        self.rate_mode = rate_mode
        self.window_start, self.window_count, self.limited = 0.0, 0, 0
        self.window_times: deque[float] = deque()  # sliding mode: when the requests of the last window were counted
        self.batch_delay, self.batch_fault_fn, self.expire_batches = batch_delay, batch_fault_fn, expire_batches
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.batches_created = 0
        self.batch_items: list[dict] = []
        self._batch_counts: Counter[str] = Counter()
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
        kind = (body.get("response_format") or {}).get("type")
        if fault is None and kind and (self.reject_formats is True or kind in self.reject_formats):
            fault = "reject"
        return fault

    def _rate(self) -> tuple[bool, dict]:
        """Count a request against the window: (over the limit?, the x-ratelimit-* headers)."""
        if self.rate_limit is None:
            return False, {}
        limit, window = self.rate_limit
        if self.rate_mode == "sliding":
            return self._slide(limit, window)
        with self.lock:
            now = time.monotonic()
            if now >= self.window_start + window:
                self.window_start, self.window_count = now, 0
            over = self.window_count >= limit
            if over:
                self.limited += 1
            else:
                self.window_count += 1
            reset = self.window_start + window - now
            return over, {"x-ratelimit-limit-requests": str(limit),
                          "x-ratelimit-remaining-requests": str(max(0, limit - self.window_count)),
                          "x-ratelimit-reset-requests": f"{reset:.3f}s"}

    def _slide(self, limit: int, window: float) -> tuple[bool, dict]:
        with self.lock:
            now = time.monotonic()
            while self.window_times and self.window_times[0] <= now - window:
                self.window_times.popleft()
            over = len(self.window_times) >= limit
            if over:
                self.limited += 1
            else:
                self.window_times.append(now)
            reset = self.window_times[0] + window - now if self.window_times else 0.0
            return over, {"x-ratelimit-limit-requests": str(limit),
                          "x-ratelimit-remaining-requests": str(limit - len(self.window_times)),
                          "x-ratelimit-reset-requests": f"{reset:.3f}s"}

    def _answer_payload(self, path: str, body: dict, null: bool = False) -> bytes:
        return json.dumps(self._answer(path, body, null)).encode()

    def _answer(self, path: str, body: dict, null: bool = False) -> dict:
        text = self.answer(body)
        n = int(body.get("n") or 1)
        prompt_tokens = len(json.dumps(body.get("prompt") or body.get("messages")).split())
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n * len(text.split()),
                 "total_tokens": prompt_tokens + n * len(text.split())}
        if path.endswith("/chat/completions"):
            choices = [{"index": i, "message": {"role": "assistant", "content": None if null else text},
                        "finish_reason": "length" if null else "stop"} for i in range(n)]
            obj = "chat.completion"
        else:
            choices = [{"index": i, "text": text, "finish_reason": "stop", "logprobs": None} for i in range(n)]
            obj = "text_completion"
        answer = {"id": "cmpl-1", "object": obj, "created": 0, "model": body.get("model"), "choices": choices}
        if self.usage:
            answer["usage"] = usage
        return answer

    # ---- the Batch API ------------------------------------------------------------------------------------
    def _new_file(self, data: bytes, purpose: str, filename: str) -> dict:
        with self.lock:
            fid = f"file-{len(self.files) + 1}"
            self.files[fid] = data
        return {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                "filename": filename, "purpose": purpose, "status": "processed"}

    def _create_batch(self, body: dict) -> dict:
        with self.lock:
            self.batches_created += 1
            bid = f"batch_{self.batches_created}"
            lines = [json.loads(x) for x in self.files[body["input_file_id"]].decode().splitlines() if x.strip()]
            batch = {"id": bid, "object": "batch", "endpoint": body["endpoint"], "errors": None,
                     "input_file_id": body["input_file_id"], "completion_window": body["completion_window"],
                     "status": "in_progress", "output_file_id": None, "error_file_id": None,
                     "created_at": int(time.time()), "metadata": body.get("metadata"),
                     "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
                     "_lines": lines, "_created": time.monotonic(), "_expire": self.batches_created <= self.expire_batches}
            self.batches[bid] = batch
        return batch

    def _advance(self, batch: dict) -> None:
        """Finish a batch whose time has come: answer its items into an output and an error file."""
        if batch["status"] != "in_progress" or time.monotonic() < batch["_created"] + self.batch_delay:
            return
        out, err = [], []
        for k, line in enumerate(batch["_lines"]):
            if batch["_expire"] and k % 2:
                continue
            body, url = line["body"], line["url"]
            with self.lock:
                seen = self._batch_counts[canonical(body)]
                self._batch_counts[canonical(body)] += 1
                self.batch_items.append(body)
            fault = self.batch_fault_fn(body, seen) if self.batch_fault_fn else None
            rid = f"req_{batch['id']}_{k}"
            if fault in ("400", "500"):
                err.append({"id": rid, "custom_id": line["custom_id"], "response": {
                    "status_code": int(fault), "request_id": rid, "body": {"error": {
                        "message": "bad request: max_tokens is too large" if fault == "400" else "server error",
                        "type": "test"}}}, "error": None})
            else:
                out.append({"id": rid, "custom_id": line["custom_id"], "response": {
                    "status_code": 200, "request_id": rid, "body": self._answer(url, body)}, "error": None})
        if out:
            batch["output_file_id"] = self._new_file(
                "".join(json.dumps(x) + "\n" for x in out).encode(), "batch_output", "out.jsonl")["id"]
        if err:
            batch["error_file_id"] = self._new_file(
                "".join(json.dumps(x) + "\n" for x in err).encode(), "batch_output", "err.jsonl")["id"]
        batch["status"] = "expired" if batch["_expire"] else "completed"
        batch["request_counts"] = {"total": len(batch["_lines"]), "completed": len(out), "failed": len(err)}

    def _batch_view(self, batch: dict) -> dict:
        self._advance(batch)
        return {k: v for k, v in batch.items() if not k.startswith("_")}

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
                path = self.path.split("?")[0].rstrip("/")
                parts = path.split("/")
                if "/files/" in path and path.endswith("/content") and parts[-2] in server.files:
                    data = server.files[parts[-2]]
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return None
                if path.endswith("/batches"):
                    return self._send(200, json.dumps({"object": "list", "has_more": False, "data": [
                        server._batch_view(b) for b in server.batches.values()]}).encode())
                if "/batches/" in path and parts[-1] in server.batches:
                    return self._send(200, json.dumps(server._batch_view(server.batches[parts[-1]])).encode())
                if path.endswith("/stats"):  # for benchmarks in other processes
                    return self._send(200, json.dumps({"requests": len(server.log), "distinct": len(server._counts),
                                                       "limited": server.limited,
                                                       "batches_created": server.batches_created,
                                                       "batch_items": len(server.batch_items)}).encode())
                if path.endswith("/models"):
                    self._send(200, json.dumps({"object": "list", "data": [
                        {"id": m, "object": "model", "created": 0, "owned_by": "tests"} for m in server.models]}).encode())
                else:
                    self._error(404, "not found")

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                path = self.path.split("?")[0].rstrip("/")
                if path.endswith("/files"):
                    return self._upload(raw)
                if path.endswith("/cancel") and path.split("/")[-2] in server.batches:
                    batch = server.batches[path.split("/")[-2]]
                    if batch["status"] == "in_progress":
                        batch["status"] = "cancelled"
                    return self._send(200, json.dumps(server._batch_view(batch)).encode())
                if path.endswith("/batches"):
                    return self._send(200, json.dumps(server._batch_view(server._create_batch(json.loads(raw)))).encode())
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

            def _upload(self, raw: bytes) -> None:
                from email import policy
                from email.parser import BytesParser

                msg = BytesParser(policy=policy.default).parsebytes(b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n"
                                               + raw)
                fields = {p.get_param("name", header="content-disposition"): p for p in msg.iter_parts()}
                data = fields["file"].get_payload(decode=True)
                purpose = fields["purpose"].get_payload(decode=True).decode()
                self._send(200, json.dumps(server._new_file(data, purpose, fields["file"].get_filename() or "f")).encode())

            def _reply(self, fault: str | None, body: dict) -> None:
                if server.latency:
                    time.sleep(server.latency)
                over, headers = server._rate()
                if over:
                    return self._error(429, "rate limit reached for requests", {**headers, "Retry-After": "0.05"})
                if fault == "reject":
                    kind = body["response_format"]["type"]
                    return self._error(server.reject_status, REJECT_MESSAGE.format(kind=kind), headers)
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
                self._send(200, server._answer_payload(self.path, body, null=fault == "null"), headers)

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
    ap.add_argument("--rate-limit", type=int, help="announce and enforce this many requests per --window seconds")
    ap.add_argument("--window", type=float, default=60.0)
    ap.add_argument("--batch-delay", type=float, default=0.3, help="seconds until a batch completes")
    args = ap.parse_args()
    srv = FakeOpenAI(latency=args.latency, faults=[f for f in args.faults.split(",") if f], port=args.port,
                     retry_after=args.retry_after, batch_delay=args.batch_delay,
                     rate_limit=(args.rate_limit, args.window) if args.rate_limit else None)
    print(f"serving on {srv.url}", flush=True)
    try:
        srv.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.httpd.server_close()


if __name__ == "__main__":
    main()
