"""A fake clock for tests: the time stands still until the test moves it."""

from __future__ import annotations


class FakeClock:
    """A clock that moves only when told to; call it for the time (the gateway's ``clock`` callables)."""

    def __init__(self, start: float = 1_750_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
