"""The rate limit algorithm without Redis: the local limiter on a fake clock, keys and headers."""

from __future__ import annotations

import math
import random

import pytest

from gateway.ratelimit import LocalLimiter, RateResult, _format_duration, rate_keys
from gateway.settings import Tier

from .support.clock import FakeClock


def tier(rpm: int = 60, burst: int = 5, tpm: int | None = None) -> Tier:
    return Tier(requests_per_minute=rpm, burst=burst, tokens_per_minute=tpm)


def test_burst_then_steady_rate() -> None:
    clock = FakeClock(1000.0)
    limiter = LocalLimiter(clock=clock)
    limits = tier(rpm=60, burst=5)
    results = [limiter.check("alice", "m", limits) for _ in range(6)]
    assert [r.allowed for r in results] == [True] * 5 + [False]
    assert [r.remaining for r in results[:5]] == [4, 3, 2, 1, 0]
    blocked = results[5]
    assert blocked.code == "rate_limited"
    assert blocked.retry_after_s == 1
    # One request per second from now on, never a fresh burst.
    for _ in range(3):
        clock.advance(1.0)
        assert limiter.check("alice", "m", limits).allowed
        assert not limiter.check("alice", "m", limits).allowed
    # Idle long enough to refill the whole burst.
    clock.advance(5.0)
    assert sum(limiter.check("alice", "m", limits).allowed for _ in range(10)) == 5


def test_not_a_fixed_window() -> None:
    # A fixed window would hand out two bursts around a window edge.
    clock = FakeClock(start=59.9)
    limiter = LocalLimiter(clock=clock)
    limits = tier(rpm=60, burst=5)
    assert sum(limiter.check("a", None, limits).allowed for _ in range(5)) == 5
    clock.now = 60.1
    assert sum(limiter.check("a", None, limits).allowed for _ in range(5)) == 0


def test_retry_after_is_when_a_retry_passes() -> None:
    clock = FakeClock(1000.0)
    limiter = LocalLimiter(clock=clock)
    limits = tier(rpm=7, burst=1)  # 8.57 s between requests: Retry-After must round up
    assert limiter.check("a", "m", limits).allowed
    blocked = limiter.check("a", "m", limits)
    assert not blocked.allowed and blocked.retry_after_s == 9
    clock.advance(blocked.retry_after_s - 1)
    assert not limiter.check("a", "m", limits).allowed
    clock.advance(1)
    assert limiter.check("a", "m", limits).allowed


def test_reset_is_time_to_full_or_to_next_pass() -> None:
    clock = FakeClock(1000.0)
    limiter = LocalLimiter(clock=clock)
    limits = tier(rpm=60, burst=3)
    first = limiter.check("a", "m", limits)
    assert first.remaining == 2 and first.reset_s == pytest.approx(1.0)
    second = limiter.check("a", "m", limits)
    assert second.reset_s == pytest.approx(2.0)
    last = limiter.check("a", "m", limits)
    assert last.remaining == 0 and last.reset_s == pytest.approx(1.0)
    blocked = limiter.check("a", "m", limits)
    assert blocked.remaining == 0 and blocked.reset_s == pytest.approx(1.0)


def test_subjects_and_models_are_separate() -> None:
    limiter = LocalLimiter(clock=FakeClock(1000.0))
    limits = tier(rpm=1, burst=1)
    assert limiter.check("a", "m1", limits).allowed
    assert limiter.check("a", "m2", limits).allowed
    assert limiter.check("a", None, limits).allowed
    assert not limiter.check("a", "*", limits).allowed  # no model is the "*" bucket
    assert limiter.check("b", "m1", limits).allowed
    assert not limiter.check("a", "m1", limits).allowed


def test_token_budget_and_sliding_window() -> None:
    clock = FakeClock(start=1000.0)
    limiter = LocalLimiter(clock=clock)
    limits = tier(rpm=6000, burst=100, tpm=1000)
    first = limiter.check("a", "m", limits)
    assert first.token_limit == 1000 and first.tokens_remaining == 1000
    limiter.charge("a", "m", limits, 600)
    clock.advance(30)
    still = limiter.check("a", "m", limits)
    assert still.allowed and still.tokens_remaining == 400
    assert still.token_reset_s == pytest.approx(30.0)
    limiter.charge("a", "m", limits, 400)
    clock.advance(1)
    spent = limiter.check("a", "m", limits)
    assert not spent.allowed and spent.code == "token_rate_limited"
    assert spent.tokens_remaining == 0
    assert spent.remaining > 0  # the request budget was not the reason
    # The 600 charged at t=1000 leave the window at t=1060.
    assert spent.retry_after_s == 29
    clock.advance(28)
    assert not limiter.check("a", "m", limits).allowed
    clock.advance(1)
    reopened = limiter.check("a", "m", limits)
    assert reopened.allowed and reopened.tokens_remaining == 600
    clock.advance(31)
    assert limiter.check("a", "m", limits).tokens_remaining == 1000


def test_token_block_consumes_no_request() -> None:
    clock = FakeClock(1000.0)
    limiter = LocalLimiter(clock=clock)
    limits = tier(rpm=1, burst=2, tpm=10)
    assert limiter.check("a", "m", limits).remaining == 1
    limiter.charge("a", "m", limits, 10)
    for _ in range(5):
        assert limiter.check("a", "m", limits).code == "token_rate_limited"
    clock.advance(60)
    assert limiter.check("a", "m", limits).allowed


def test_no_token_limit_means_no_token_fields() -> None:
    limiter = LocalLimiter(clock=FakeClock(1000.0))
    limits = tier(tpm=None)
    limiter.charge("a", "m", limits, 10**9)
    result = limiter.check("a", "m", limits)
    assert result.allowed
    assert result.token_limit is None and result.tokens_remaining is None and result.token_reset_s is None
    assert not any(name.endswith("-tokens") for name, _ in result.headers("internal"))


def test_memory_is_bounded_and_recent_callers_kept() -> None:
    clock = FakeClock(1000.0)
    limiter = LocalLimiter(clock=clock, max_keys=100)
    limits = tier(rpm=1, burst=1)
    assert limiter.check("busy", "m", limits).allowed
    for i in range(1000):
        limiter.check(f"caller-{i}", "m", limits)
        if i % 50 == 0:
            # A caller who keeps calling stays known, so stays limited.
            assert not limiter.check("busy", "m", limits).allowed
    assert len(limiter) <= 100


def test_keys_share_a_slot_and_are_bounded() -> None:
    request_key, token_key = rate_keys("x" * 10_000 + "{}|\n\0", "gpt|4")
    assert len(request_key) < 64
    tag = request_key[request_key.index("{") : request_key.index("}") + 1]
    assert token_key.startswith(f"gw:rl:{tag}")
    assert request_key.endswith(":r") and token_key.endswith(":w")
    # A separator inside a subject cannot make two callers share a key.
    assert rate_keys("a|b", "c") != rate_keys("a", "b|c")


def _result(**overrides: object) -> RateResult:
    fields: dict[str, object] = dict(
        allowed=True,
        code="",
        limit=60,
        remaining=9,
        reset_s=1.2,
        retry_after_s=0,
        token_limit=100_000,
        tokens_remaining=99_000,
        token_reset_s=42.5,
        fallback=False,
    )
    fields.update(overrides)
    return RateResult(**fields)  # type: ignore[arg-type]


def test_headers_allowed() -> None:
    headers = dict(_result().headers("public"))
    assert headers["RateLimit-Policy"] == '"public";q=60;w=60, "public-tokens";q=100000;w=60'
    assert headers["RateLimit"] == '"public";r=9;t=2, "public-tokens";r=99000;t=43'
    assert headers["x-ratelimit-limit-requests"] == "60"
    assert headers["x-ratelimit-remaining-requests"] == "9"
    assert headers["x-ratelimit-reset-requests"] == "1.2s"
    assert headers["x-ratelimit-limit-tokens"] == "100000"
    assert headers["x-ratelimit-remaining-tokens"] == "99000"
    assert headers["x-ratelimit-reset-tokens"] == "42.5s"
    assert "Retry-After" not in headers


def test_headers_blocked_without_token_limit() -> None:
    result = _result(
        allowed=False,
        code="rate_limited",
        remaining=0,
        reset_s=7.5,
        retry_after_s=8,
        token_limit=None,
        tokens_remaining=None,
        token_reset_s=None,
    )
    headers = result.headers("partner")
    names = [name for name, _ in headers]
    assert len(names) == len(set(names))
    values = dict(headers)
    assert values["RateLimit-Policy"] == '"partner";q=60;w=60'
    assert values["RateLimit"] == '"partner";r=0;t=8'
    assert values["Retry-After"] == "8"
    assert values["x-ratelimit-reset-requests"] == "7.5s"


def test_tier_name_is_escaped_in_structured_fields() -> None:
    values = dict(_result(token_limit=None).headers('we"ird\\'))
    assert values["RateLimit-Policy"] == '"we\\"ird\\\\";q=60;w=60'


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.02, "20ms"),
        (0.5, "500ms"),
        (1, "1s"),
        (1.25, "1.3s"),
        (12, "12s"),
        (59.99, "60s"),
        (60, "1m0s"),
        (360, "6m0s"),
        (3725, "1h2m5s"),
    ],
)
def test_duration_format(seconds: float, text: str) -> None:
    assert _format_duration(seconds) == text


def test_duration_spellings_under_a_minute_are_the_formatted_ones() -> None:
    """Durations under a minute come from tables built ahead; each is the spelling formatting gives."""

    def formatted(seconds: float) -> str:
        if seconds < 1:
            return f"{math.ceil(seconds * 1000)}ms"
        return f"{math.ceil(seconds * 10) / 10:g}s"

    chosen = random.Random(19)
    edges = [1e-300, 0.0005, 0.001, 0.0010001, 0.999, 0.9999, math.nextafter(1.0, 0.0), 1.0, 1.05, 9.95]
    edges += [59.9, 59.95, math.nextafter(60.0, 0.0)]
    samples = edges + [chosen.uniform(0, 60) for _ in range(20_000)] + [chosen.uniform(0, 1) for _ in range(20_000)]
    for seconds in samples:
        if 0 < seconds < 60:
            assert _format_duration(seconds) == formatted(seconds), seconds
