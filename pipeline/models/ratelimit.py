"""Pacing of requests to an HTTP model server: retry delays, and rate limits read from the server.

A server that announces its limits (``x-ratelimit-limit-*``, ``x-ratelimit-remaining-*`` and
``x-ratelimit-reset-*``, for requests and for tokens, as OpenAI, Azure, vLLM behind a gateway and others do) is
never sent more than it said it will take before its window resets: each answer's headers say how many requests
(tokens) remain, the requests still in flight are counted against that, and when nothing remains the next request
waits until the announced reset. What a reset frees differs between servers (a whole fixed window, the one slot
of a sliding window's oldest request, a continuous refill), so after it one request *probes* and the others wait
for its answer's headers. The announced request limit is also kept as a sliding window of the client's own:
never more than the limit answered within the longest reset announced (the window's length, as far as the client
can see) plus in flight. Until the first answer shows whether the server announces limits, one request is in flight at a
time (a burst of ``max_concurrency`` could already exceed a small limit). Optional client-side caps (``rpm``,
``tpm``) hold over any sliding minute. A 429 still comes back as a retryable error, with back-off (its
Retry-After a floor).

Everything runs in one event loop thread: the checks and the bookkeeping between two awaits are never interleaved.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import random
import re
import time
from collections import deque
from typing import Any

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(value: Any) -> float | None:
    """``"6m0s"``, ``"1.5s"``, ``"20ms"``, ``"2"`` (seconds) -> seconds; None if unreadable."""
    if value is None:
        return None
    text = str(value).strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(a + b for a, b in parts) != text.replace(" ", ""):
        return None
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(a) * scale[b] for a, b in parts)


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


POLL_S = 0.05  # how often a request waiting for another's answer looks again


class _Announced:
    """What the server last said about one limit (requests or tokens), and the client's own window of it."""

    def __init__(self) -> None:
        self.remaining: float | None = None  # left before reset_at, requests in flight already taken off
        self.reset_at = 0.0
        self.probing = False  # the reset has passed and one request is out to learn what it freed
        self.limit: float | None = None  # the announced limit, kept as a sliding window of our own ...
        self.window = 0.0  # ... over the longest reset announced
        self.answered: deque[tuple[float, float]] = deque()  # (arrival, amount) of answers inside the window
        self.answered_total = 0.0

    def update(self, limit: Any, remaining: Any, reset: Any, held: float, now: float) -> bool:
        try:
            left = float(remaining)
        except (TypeError, ValueError):
            return False
        with contextlib.suppress(TypeError, ValueError):
            self.limit = float(limit)
        wait = parse_duration(reset) or 0.0
        self.window = max(self.window, wait)
        self.probing = False
        if self.remaining is not None and now < self.reset_at:
            # The same window: answers arrive out of order, so an older, higher count never raises the estimate.
            self.remaining = min(self.remaining, left - held)
            self.reset_at = max(self.reset_at, now + wait)
        else:
            self.remaining, self.reset_at = left - held, now + wait
        return True

    def _exhausted(self, need: float) -> bool:
        return self.remaining is not None and self.remaining < need

    def wait(self, need: float, held: float, now: float) -> float:
        own = self._own_wait(need, held, now)
        if not self._exhausted(need):
            return own
        if now < self.reset_at:
            return max(own, self.reset_at - now)
        return max(own, POLL_S) if self.probing else own  # past the reset: one probe, the rest wait for it

    def take(self, need: float, now: float) -> bool:
        """Count a request being sent; True when it is the probe after a reset."""
        probe = self._exhausted(need) and now >= self.reset_at
        self.probing |= probe
        if self.remaining is not None:
            self.remaining -= need
        return probe

    def came_back(self, amount: float, now: float) -> None:
        """A request's answer arrived: it counts in the own window from now (the server counted it by then)."""
        if self.limit:
            self.answered.append((now, amount))
            self.answered_total += amount

    def _own_wait(self, need: float, held: float, now: float) -> float:
        if not self.limit or self.window <= 0:
            return 0.0
        while self.answered and self.answered[0][0] <= now - self.window:
            self.answered_total -= self.answered.popleft()[1]
        used = self.answered_total + held
        if used + need <= self.limit or used <= 0:  # a request larger than the limit still goes, alone
            return 0.0
        for t, n in self.answered:
            used -= n
            if used + need <= self.limit:
                return t + self.window - now
        return POLL_S  # what is in flight fills the window: wait for answers


class _Cap:
    """A client-side cap over any sliding minute."""

    def __init__(self, per_minute: int | None):
        self.per_minute = per_minute
        self.sent: deque[tuple[float, float]] = deque()
        self.total = 0.0

    def wait(self, need: float, now: float) -> float:
        if not self.per_minute:
            return 0.0
        while self.sent and self.sent[0][0] <= now - 60.0:
            self.total -= self.sent.popleft()[1]
        if self.total + need <= self.per_minute or not self.sent:
            return 0.0
        # Wait until enough of the oldest sends leave the minute.
        total = self.total
        for t, n in self.sent:
            total -= n
            if total + need <= self.per_minute:
                return t + 60.0 - now
        return self.sent[-1][0] + 60.0 - now

    def take(self, need: float, now: float) -> None:
        if self.per_minute:
            self.sent.append((now, need))
            self.total += need


class RateLimiter:
    def __init__(self, rpm: int | None = None, tpm: int | None = None, follow_headers: bool = True):
        self.requests, self.tokens = _Announced(), _Announced()
        self.rpm, self.tpm = _Cap(rpm), _Cap(tpm)
        self.follow_headers = follow_headers
        self.known = not follow_headers  # whether an answer has shown if the server announces limits
        self.in_flight = 0
        self.tokens_in_flight = 0.0
        self.waited_s = 0.0  # total time requests spent waiting here (for benchmarks)

    async def acquire(self, tokens: float) -> bool:
        """Wait until a request estimated at ``tokens`` (prompt + max_tokens) may be sent, then count it; True
        when it probes what an announced reset freed (hand it back to :meth:`release`)."""
        while True:
            now = time.monotonic()
            if not self.known and self.in_flight > 0:
                wait = POLL_S  # the first answer is not back yet
            else:
                wait = max(self.requests.wait(1, self.in_flight, now),
                           self.tokens.wait(tokens, self.tokens_in_flight, now), self.rpm.wait(1, now),
                           self.tpm.wait(tokens, now))
            if wait <= 0:
                break
            wait = min(wait, 5.0)
            self.waited_s += wait
            await asyncio.sleep(wait)
        now = time.monotonic()
        self.rpm.take(1, now)
        self.tpm.take(tokens, now)
        probes = [self.requests.take(1, now), self.tokens.take(tokens, now)]
        self.in_flight += 1
        self.tokens_in_flight += tokens
        return any(probes)

    def release(self, tokens: float, headers: Any, limited: bool = False, probe: bool = False) -> None:
        """A request came back (``headers``: its answer's, or None); ``limited``: it was a 429; ``probe``: what
        :meth:`acquire` said."""
        self.in_flight -= 1
        self.tokens_in_flight -= tokens
        if not self.follow_headers:
            return
        now = time.monotonic()
        said = {"requests": False, "tokens": False}
        if headers is not None:
            said["requests"] = self.requests.update(
                headers.get("x-ratelimit-limit-requests"), headers.get("x-ratelimit-remaining-requests"),
                headers.get("x-ratelimit-reset-requests"), self.in_flight, now)
            # No own window for tokens: their reset is the time until the bucket is full again, which can be far
            # longer than the window (OpenAI shows "6m0s" on a per-minute limit), and a window that long would
            # hold the client far below the limit; the token counts sent are estimates anyway.
            said["tokens"] = self.tokens.update(
                None, headers.get("x-ratelimit-remaining-tokens"), headers.get("x-ratelimit-reset-tokens"),
                self.tokens_in_flight, now)
        self.requests.came_back(1, now)
        if probe:  # back, with news or without (then the next request probes again); one probe is out at a time
            self.requests.probing = self.tokens.probing = False
        if limited and not any(said.values()):  # a 429 without headers: nothing more until its Retry-After
            self.requests.remaining = 0
            self.requests.reset_at = now + (retry_after_seconds(headers) or 1.0)
        self.known = True
