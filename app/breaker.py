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

    # The verdicts return True when they open or close the breaker, so its state is reported on change only.

    def succeeded(self, key: str) -> bool:
        return self._close(key)

    def failed(self, key: str) -> bool:
        state = self._states.setdefault(key, _State())
        state.failures += 1
        state.probing = False
        if state.failures >= self._threshold:
            state.open_until = time.monotonic() + self._open_s
        return state.failures == self._threshold

    def abandoned(self, key: str) -> None:
        """A call ended without a verdict (cancelled): if it was the probe, let the next call probe instead."""
        state = self._states.get(key)
        if state is not None:
            state.probing = False

    def neutral(self, key: str) -> bool:
        """The call ended in a way that says nothing about the account's health (e.g. a refused prompt)."""
        state = self._states.get(key)
        # The probe reached Kling and got a real answer: the account works.
        return state is not None and state.probing and self._close(key)

    def _close(self, key: str) -> bool:
        state = self._states.pop(key, None)
        return state is not None and state.failures >= self._threshold
