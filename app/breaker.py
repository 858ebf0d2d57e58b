"""Circuit breakers, one per Kling credential (per replica).

When an account keeps failing (Kling down, credentials rejected, account blocked), further calls fail at
once with 503 for a while instead of each waiting out timeouts and retries; then one probe call is let
through, and its outcome closes the breaker again or keeps it open. Request-specific refusals (bad
parameters, content policy) and "busy" answers (1302/1303, which the governor handles) never trip it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class _State:
    failures: int = 0
    open_until: float = 0.0
    probing: bool = False


class CircuitOpen(Exception):
    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"circuit open for {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


class Breakers:
    def __init__(self, *, failure_threshold: int = 5, open_s: float = 10.0) -> None:
        self._threshold = failure_threshold
        self._open_s = open_s
        self._states: dict[str, _State] = {}

    def before_call(self, key: str) -> None:
        """Raises CircuitOpen while the breaker for `key` is open; lets one probe through when it may close."""
        state = self._states.get(key)
        if state is None or state.failures < self._threshold:
            return
        now = time.monotonic()
        if now < state.open_until or state.probing:
            raise CircuitOpen(max(1.0, state.open_until - now))
        state.probing = True  # half-open: this call is the probe

    def is_open(self, key: str) -> bool:
        """Open or half-open: calls for `key` fail fast, but for one probe."""
        state = self._states.get(key)
        return state is not None and state.failures >= self._threshold

    def succeeded(self, key: str) -> None:
        self._states.pop(key, None)

    def failed(self, key: str) -> None:
        state = self._states.setdefault(key, _State())
        state.failures += 1
        state.probing = False
        if state.failures >= self._threshold:
            state.open_until = time.monotonic() + self._open_s

    def abandoned(self, key: str) -> None:
        """A call ended without a verdict (cancelled): if it was the probe, let the next call probe instead."""
        state = self._states.get(key)
        if state is not None:
            state.probing = False

    def neutral(self, key: str) -> None:
        """The call ended in a way that says nothing about the account's health (e.g. a refused prompt)."""
        state = self._states.get(key)
        if state is not None and state.probing:
            self._states.pop(key, None)  # the probe reached Kling and got a real answer: the account works
