"""Rate limits per subject and model: requests by GCRA, tokens by a sliding minute.

The algorithm lives here and in ``gateway/lua/``; Redis is reached only through
an injected :class:`ScriptBackend` (the store), so this module never imports a
Redis client (only its key names, from the key schema in ``gateway.storage.keys``).
When the backend is unavailable, a :class:`LocalLimiter` with the same limits
decides in-process: degraded, never unlimited.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, NamedTuple, Protocol

from gateway.errors import BackendUnavailable
from gateway.settings import Tier
from gateway.storage.keys import rate_state_keys

__all__ = [
    "CHARGE_SCRIPT",
    "CHECK_SCRIPT",
    "RELEASE_SCRIPT",
    "SYNC_SCRIPT",
    "BackendUnavailable",
    "LocalLimiter",
    "RateLimiter",
    "RateResult",
    "RedisBudget",
    "ScriptBackend",
    "rate_keys",
]

log = logging.getLogger(__name__)

CHECK_SCRIPT = "ratelimit"  # gateway/lua/ratelimit.lua
CHARGE_SCRIPT = "charge"  # gateway/lua/charge.lua
SYNC_SCRIPT = "sync"  # gateway/lua/sync.lua: what the local limiter admitted, charged to Redis
RELEASE_SCRIPT = "release"  # gateway/lua/release.lua: a lapsed lease's unused units given back
MAX_LEASE = 1024  # the most units one process asks for at once for one caller
TOKEN_SHARE = 8  # a lease decides on tokens locally until its process has charged 1/8 of what was left
ANY_MODEL = "*"
WINDOW_S = 60
_US = 1_000_000

Code = Literal["", "rate_limited", "token_rate_limited"]
_CODES: tuple[Code, Code, Code] = ("", "rate_limited", "token_rate_limited")


class ScriptBackend(Protocol):
    """Runs ``gateway/lua/<name>.lua`` atomically (EVALSHA), bounded by ``redis.timeout_s``.

    ``timeout_s`` (passed only when shorter): what is left of the calling request's wait.
    """

    async def run_script(
        self, name: str, keys: Sequence[str], args: Sequence[str | int | float], *, timeout_s: float | None = None
    ) -> Any: ...


class RedisBudget:
    """What is left of one request's wait on Redis: ``redis.timeout_s`` in total, however many
    calls the request makes (docs/contract.md §5). Each call may wait only for what is left and
    spends what it waited; once it is spent, the local limiter decides."""

    __slots__ = ("left_s",)

    def __init__(self, seconds: float) -> None:
        self.left_s = seconds


@lru_cache(maxsize=65_536)
def rate_keys(subject: str, model: str) -> tuple[str, str]:
    """The request key and the token key of one (subject, model).

    Subjects may hold any character and any length, so both are hashed; the
    length prefix keeps ("a|b", "c") and ("a", "b|c") apart. The braces are a
    Cluster hash tag: both keys of a caller share a slot, as one script needs.
    """
    digest = hashlib.blake2b(
        f"{len(subject)}:{subject}|{model}".encode(errors="surrogatepass"), digest_size=16
    ).hexdigest()
    # ":w", the token window with a running sum (token_window.lua); ":t" held the older layout, which
    # gateways of an earlier release may still write during a rolling upgrade, so it is left alone.
    return rate_state_keys(digest)


def _format_duration(seconds: float) -> str:
    """OpenAI-style durations: "20ms", "1.5s", "6m0s", "1h0m0s"."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return _MILLISECONDS[math.ceil(seconds * 1000)]
    if seconds < 60:
        return _TENTHS[math.ceil(seconds * 10)]
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes}m{secs}s" if hours else f"{minutes}m{secs}s"


# Every duration under a minute has one of these spellings, so each is formatted once, here.
_MILLISECONDS = tuple(f"{ms}ms" for ms in range(1001))  # index: milliseconds, rounded up
_TENTHS = tuple(f"{tenths / 10:g}s" for tenths in range(601))  # index: tenths of a second, rounded up


def _sf_string(value: str) -> str:
    """A structured-field string (RFC 8941): quotes and backslashes escaped."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True, slots=True)
class _TierStrings:
    policy: str
    request_item: str
    token_item: str
    limit: str
    token_limit: str


@lru_cache(maxsize=256)
def _tier_strings(tier_name: str, limit: int, token_limit: int | None) -> _TierStrings:
    # Constant per tier: built once, not on every request.
    name = _sf_string(tier_name)
    token_name = _sf_string(f"{tier_name}-tokens")
    policy = f"{name};q={limit};w={WINDOW_S}"
    if token_limit is not None:
        policy += f", {token_name};q={token_limit};w={WINDOW_S}"
    return _TierStrings(
        policy=policy,
        request_item=f"{name};r=",
        token_item=f"{token_name};r=",
        limit=str(limit),
        token_limit=str(token_limit),
    )


class RateResult(NamedTuple):
    """One decision. Times are seconds; ``retry_after_s`` is 0 unless blocked.

    A named tuple: immutable, and built on every request at a fraction of a frozen dataclass's cost.
    """

    allowed: bool
    code: Code
    limit: int
    remaining: int
    reset_s: float
    retry_after_s: int
    token_limit: int | None
    tokens_remaining: int | None
    token_reset_s: float | None
    fallback: bool = False

    def headers(self, tier_name: str) -> list[tuple[str, str]]:
        """IETF ``RateLimit``/``RateLimit-Policy``, OpenAI ``x-ratelimit-*`` and, on a block, Retry-After."""
        strings = _tier_strings(tier_name, self.limit, self.token_limit)
        remaining = str(self.remaining)
        reset_s = self.reset_s
        state = f"{strings.request_item}{remaining};t={math.ceil(reset_s)}"
        if self.token_limit is None:
            out = [
                ("RateLimit-Policy", strings.policy),
                ("RateLimit", state),
                ("x-ratelimit-limit-requests", strings.limit),
                ("x-ratelimit-remaining-requests", remaining),
                ("x-ratelimit-reset-requests", _format_duration(reset_s)),
            ]
        else:
            tokens_remaining = str(self.tokens_remaining or 0)
            token_reset = self.token_reset_s or 0.0
            out = [
                ("RateLimit-Policy", strings.policy),
                ("RateLimit", f"{state}, {strings.token_item}{tokens_remaining};t={math.ceil(token_reset)}"),
                ("x-ratelimit-limit-requests", strings.limit),
                ("x-ratelimit-remaining-requests", remaining),
                ("x-ratelimit-reset-requests", _format_duration(reset_s)),
                ("x-ratelimit-limit-tokens", strings.token_limit),
                ("x-ratelimit-remaining-tokens", tokens_remaining),
                ("x-ratelimit-reset-tokens", _format_duration(token_reset)),
            ]
        if not self.allowed:
            out.append(("Retry-After", str(self.retry_after_s)))
        return out


def _interval_us(tier: Tier) -> int:
    # Whole microseconds keep Lua (doubles) and Python (ints) bit-identical.
    return max(1, round(WINDOW_S * _US / tier.requests_per_minute))


def _result(tier: Tier, reply: Sequence[Any], *, fallback: bool) -> RateResult:
    """A RateResult from the script's reply (the LocalLimiter builds the same tuple)."""
    allowed, code, remaining, reset_us, retry_us, used, token_reset_us = (int(v) for v in reply[:7])
    tpm = tier.tokens_per_minute
    return RateResult(
        allowed=allowed == 1,
        code=_CODES[code],
        limit=tier.requests_per_minute,
        remaining=max(0, remaining),
        reset_s=max(0, reset_us) / _US,
        # Ceil, so a caller who waits exactly Retry-After does pass.
        retry_after_s=0 if allowed == 1 else max(1, -(-retry_us // _US)),
        token_limit=tpm,
        tokens_remaining=None if tpm is None else max(0, tpm - max(0, used)),
        token_reset_s=None if tpm is None else max(0, token_reset_us) / _US,
        fallback=fallback,
    )


class _LocalState:
    __slots__ = ("buckets", "tat", "unsynced_tokens", "unsynced_us")

    def __init__(self) -> None:
        self.tat = 0
        self.buckets: dict[int, int] = {}
        # Spend Redis has not seen yet: emission intervals admitted here, tokens charged here.
        self.unsynced_us = 0
        self.unsynced_tokens = 0


class LocalLimiter:
    """The same GCRA and token window as the Lua scripts, in-process, for Redis outages.

    Memory is bounded: at most ``max_keys`` callers, least recently seen evicted
    first (an evicted idle caller loses nothing: its bucket was full anyway).
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000) -> None:
        self._clock = clock
        self._max_keys = max_keys
        self._states: OrderedDict[tuple[str, str], _LocalState] = OrderedDict()

    def __len__(self) -> int:
        return len(self._states)

    def _state(self, subject: str, model: str) -> _LocalState:
        key = (subject, model)
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = _LocalState()
            if len(self._states) > self._max_keys:
                self._states.popitem(last=False)
        else:
            self._states.move_to_end(key)
        return state

    def _now_us(self) -> int:
        return round(self._clock() * _US)

    def check(self, subject: str, model: str | None, tier: Tier) -> RateResult:
        now = self._now_us()
        state = self._state(subject, model or ANY_MODEL)
        interval = _interval_us(tier)
        capacity = interval * tier.burst
        tat = max(state.tat, now)
        new_tat = tat + interval
        rate_ok = new_tat - now <= capacity

        tpm = tier.tokens_per_minute or 0
        used, token_reset, token_retry = -1, 0, 0
        if tpm > 0:
            used, token_reset, token_retry = self._window(state, now, tpm)
        tokens_ok = tpm <= 0 or used < tpm

        reply: tuple[int, ...]
        if rate_ok and tokens_ok:
            state.tat = new_tat
            state.unsynced_us += interval
            remaining = (capacity - (new_tat - now)) // interval
            reset = new_tat - now if remaining else new_tat - now - capacity + interval
            reply = (1, 0, remaining, reset, 0, used, token_reset)
        elif not rate_ok:
            retry = max(token_retry, new_tat - now - capacity)
            reply = (0, 1, 0, retry, retry, used, token_reset)
        else:
            remaining = (capacity - (tat - now)) // interval
            reply = (0, 2, remaining, tat - now, token_retry, used, token_reset)
        return _result(tier, reply, fallback=True)

    @staticmethod
    def _window(state: _LocalState, now: int, tpm: int) -> tuple[int, int, int]:
        """(tokens used in the window, µs until it is empty, µs until the budget reopens)."""
        oldest = now // _US - (WINDOW_S - 1)
        buckets = state.buckets
        for second in [s for s in buckets if s < oldest]:
            del buckets[second]
        if not buckets:
            return 0, 0, 0
        used = sum(buckets.values())
        token_reset = (max(buckets) + WINDOW_S) * _US - now
        token_retry = 0
        if used >= tpm:
            left = used
            for second in sorted(buckets):
                left -= buckets[second]
                if left < tpm:
                    token_retry = (second + WINDOW_S) * _US - now
                    break
        return used, token_reset, token_retry

    def charge(self, subject: str, model: str | None, tier: Tier, tokens: int) -> None:
        if tokens <= 0 or tier.tokens_per_minute is None:
            return
        second = self._now_us() // _US
        state = self._state(subject, model or ANY_MODEL)
        state.buckets[second] = state.buckets.get(second, 0) + tokens
        state.unsynced_tokens += tokens
        if len(state.buckets) > WINDOW_S + 4:
            oldest = second - (WINDOW_S - 1)
            for old in [s for s in state.buckets if s < oldest]:
                del state.buckets[old]

    def take_unsynced(self, subject: str, model: str) -> tuple[int, int]:
        """(µs of request spend, tokens) admitted here that Redis has not seen, and forget them.

        The request spend is what is left of it now: the emission intervals admitted here,
        less what the bucket has drained since (GCRA forgets spend as time passes, so an
        outage long ago owes nothing). Tokens are owed whole (they count for a minute).
        """
        state = self._states.get((subject, model))
        if state is None:
            return 0, 0
        debt = min(state.unsynced_us, max(0, state.tat - self._now_us()))
        tokens = state.unsynced_tokens
        state.unsynced_us = state.unsynced_tokens = 0
        return debt, tokens

    def give_back(self, subject: str, model: str, debt_us: int, tokens: int) -> None:
        """Redis did not take what :meth:`take_unsynced` returned: owe it again."""
        state = self._state(subject, model)
        state.unsynced_us += debt_us
        state.unsynced_tokens += tokens


class _Lease:
    """Units of one caller's request limit that this process reserved in Redis, decided on here.

    ``left`` units may be admitted until ``expires`` (local monotonic seconds); the last ``tail`` of
    them are the newest grant's, which end at ``end_us`` (the TAT it left in Redis) and are the only
    ones that can be given back (release.lua). The token view is Redis's at the grant plus what this
    process charged since; it decides locally until that reaches ``token_allowance``.
    """

    __slots__ = (
        "end_us",
        "expires",
        "granted",
        "interval",
        "left",
        "remaining",
        "reset_s",
        "started",
        "tail",
        "token_allowance",
        "token_reset_s",
        "tokens_since",
        "tokens_used",
    )

    def __init__(self, reply: Sequence[Any], *, now: float, lease_s: float, tpm: int | None, interval: str) -> None:
        granted = int(reply[7])
        self.interval = interval  # µs, as the scripts take it
        self.granted = granted
        self.left = self.tail = granted - 1  # one is the request that asked for them
        self.end_us = int(reply[8])
        self.started = now
        self.expires = now + lease_s
        self.remaining = max(0, int(reply[2]))
        self.reset_s = max(0, int(reply[3])) / _US
        used = max(0, int(reply[5]))
        self.tokens_used = used
        self.tokens_since = 0
        self.token_reset_s = max(0, int(reply[6])) / _US
        self.token_allowance = math.inf if tpm is None else (tpm - used) // TOKEN_SHARE

    def take(self) -> None:
        """One unit admitted: the older grants' units first (only the tail can be given back)."""
        self.left -= 1
        if self.tail > self.left:
            self.tail = self.left

    def merge(self, older: _Lease) -> None:
        """A grant that arrived while ``older`` was live: its units stay usable, but not returnable."""
        self.left += older.left
        self.granted += older.granted
        self.tokens_since += older.tokens_since

    def want(self) -> int:
        """Units to ask for next: twice what was used if all was used, else what was used."""
        used = self.granted - self.left
        return max(1, min(MAX_LEASE, used * 2 if self.left <= 0 else used))

    def result(self, tier: Tier, now: float) -> RateResult:
        tpm = tier.tokens_per_minute
        elapsed = now - self.started
        remaining, reset_s = self.remaining + self.left, max(0.0, self.reset_s - elapsed)
        # Positional (allowed, code, limit, remaining, reset_s, retry_after_s, token_limit,
        # tokens_remaining, token_reset_s): half the cost of keywords, on every request a lease decides.
        if tpm is None:
            return RateResult(True, "", tier.requests_per_minute, remaining, reset_s, 0, None, None, None)
        tokens_remaining = max(0, tpm - self.tokens_used - self.tokens_since)
        token_reset_s = max(0.0, self.token_reset_s - elapsed)
        return RateResult(
            True, "", tier.requests_per_minute, remaining, reset_s, 0, tpm, tokens_remaining, token_reset_s
        )


class RateLimiter:
    """Request and token limits shared by every process through Redis, local when Redis is away.

    Each check is one script call, or none while this process holds a lease for the caller
    (``lease_s`` > 0, docs/contract.md §5): a check that finds no live lease asks Redis for
    units in the same script call (a share of what remains, one alone near the limit), and
    later checks spend them here until they run out or the lease lapses; a lapsed lease's
    unused units are given back. Token charges (``charge_flush_s`` set) are counted here at
    once and sent to Redis in batches within ``charge_flush_s``, at once when the caller's
    lease has spent its share of the token budget; a caller's next script call carries its
    unsent charges too.

    A request waits on Redis at most ``timeout_s`` in
    total: pass one :class:`RedisBudget` (``budget()``) to its check and its charge, and
    once it is spent the local limiter decides. After a failed call Redis is skipped for
    a back-off that starts at ``timeout_s`` and doubles with each further failure up to
    ``backoff_s``: a blackholed Redis costs one timeout per back-off, not one per request,
    and a single late reply sends a tenth of a second of traffic to the local limiter,
    not a whole second. ``on_fallback`` is called once for every check decided by the
    local limiter (a charge that falls back is kept locally but not counted: it decides
    nothing).

    What the local limiter admitted and charged is written back when Redis answers again
    (docs/contract.md §5): a caller's next check carries its own debt in the same script
    call, and a background task writes back everyone else's, one script call per caller.
    """

    def __init__(
        self,
        backend: ScriptBackend,
        tiers: Mapping[str, Tier],
        *,
        clock: Callable[[], float] = time.monotonic,
        on_fallback: Callable[[], None] | None = None,
        backoff_s: float = 1.0,
        timeout_s: float = 0.1,
        local_max_keys: int = 100_000,
        script_now: Callable[[], float] | None = None,
        lease_s: float = 0.0,
        charge_flush_s: float | None = None,
    ) -> None:
        # script_now (tests only): wall seconds sent to the scripts instead of Redis TIME.
        self._backend = backend
        self._tiers = dict(tiers)
        self._clock = clock
        self._on_fallback = on_fallback
        self._backoff_s = backoff_s
        self._timeout_s = timeout_s
        self._failures = 0  # consecutive failed calls: the back-off doubles with each
        self._script_now = script_now
        self._skip_until = -math.inf
        self.local = LocalLimiter(clock=clock, max_keys=local_max_keys)
        self._local_max_keys = local_max_keys
        self._check_args = {
            name: (str(_interval_us(t)), str(t.burst), str(t.tokens_per_minute or 0)) for name, t in self._tiers.items()
        }
        # (subject, model) the local limiter admitted or charged that Redis has not seen yet.
        self._unsynced: dict[tuple[str, str], None] = {}
        self._writing_back: asyncio.Task[None] | None = None
        self._lease_s = lease_s
        self._leases: dict[tuple[str, str], _Lease] = {}
        # Renewals in flight, by caller: a request finding its caller's lease spent while one is out
        # waits for it and takes from the new lease, instead of asking Redis itself (at 32 requests
        # in flight, every renewal was otherwise asked for up to 32 times).
        self._renewals: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._flush_s = charge_flush_s
        # Charges counted here and not sent yet: (subject, model) -> [tokens, tier].
        self._pending: dict[tuple[str, str], list[Any]] = {}
        self._flush_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    def budget(self) -> RedisBudget:
        """A new request's wait on Redis: ``redis.timeout_s`` for all its calls together."""
        return RedisBudget(self._timeout_s)

    def _tier(self, name: str) -> Tier:
        try:
            return self._tiers[name]
        except KeyError:
            raise KeyError(f"unknown tier {name!r}") from None

    async def check_blocked(self, key: str, tier: str | None) -> RateResult:
        """Count one refused (401/403/451) answer against ``key``'s ``blocked_per_minute``.

        ``key`` names the caller: its subject, or its client address when no credential held (then
        ``tier`` is None and the strictest tier's limit applies). The same GCRA as :meth:`check`, with a
        burst of a whole minute's allowance, on keys of their own (``gw:rb:``) that expire within a
        minute, so refused callers can neither spend an allowed caller's budget nor grow Redis.
        """
        tiers = self._tiers
        name = tier if tier in tiers else min(tiers, key=lambda t: tiers[t].blocked_limit)
        per_minute = tiers[name].blocked_limit
        limits = Tier(requests_per_minute=per_minute, burst=per_minute)
        digest = hashlib.blake2b(key.encode(errors="surrogatepass"), digest_size=16).hexdigest()
        keys = (f"gw:rb:{{{digest}}}:r", f"gw:rb:{{{digest}}}:w")  # ":w" is never written (no token limit)
        reply = await self._run(CHECK_SCRIPT, keys, (str(_interval_us(limits)), str(per_minute), "0", self._now_arg()))
        if reply is not None:
            return _result(limits, reply, fallback=False)
        self._fell_back()
        return self.local.check(key, "\x00blocked", limits)  # a model name no request can carry

    def _now_arg(self) -> str:
        return "" if self._script_now is None else repr(self._script_now() * 1000)

    async def _run(
        self, name: str, keys: Sequence[str], args: Sequence[str], budget: RedisBudget | None = None
    ) -> Any | None:
        """The script's reply, or None when Redis must be skipped (fallback)."""
        if self._clock() < self._skip_until:
            return None
        backend = self._backend
        if budget is None:
            call = backend.run_script(name, keys, args)
        else:
            left = budget.left_s
            if left <= 0:
                return None  # this request has waited its share; Redis itself may be fine
            # The connection bounds a call by timeout_s by itself; a timer only for less.
            call = (
                backend.run_script(name, keys, args)
                if left >= self._timeout_s
                else backend.run_script(name, keys, args, timeout_s=left)
            )
            started = time.monotonic()
        try:
            reply = await call
        except BackendUnavailable:
            reply = None
        except Exception:
            # Quotas degrade rather than fail: an unexpected Redis reply (OOM,
            # READONLY during failover) also falls back, but is worth a log line.
            log.warning("rate limit script %s failed; limiting locally", name, exc_info=True)
            reply = None
        finally:
            if budget is not None:
                budget.left_s -= time.monotonic() - started
        if reply is None:
            now = self._clock()
            # Calls that fail together (a dropped connection fails every call on it) are one
            # failure: only the first after a skip ends lengthens the next one.
            if now >= self._skip_until:
                self._failures += 1
                backoff = min(self._backoff_s, self._timeout_s * (1 << min(self._failures - 1, 16)))
                self._skip_until = now + backoff
            return None
        self._failures = 0
        if self._unsynced and self._writing_back is None:
            self._writing_back = asyncio.get_running_loop().create_task(self._write_back())
        return reply

    def _fell_back(self) -> None:
        if self._on_fallback is not None:
            self._on_fallback()

    async def check(
        self, subject: str, model: str | None, tier: str, *, budget: RedisBudget | None = None
    ) -> RateResult:
        """Admit or refuse one request now; an admitted request consumes one unit."""
        limits = self._tiers.get(tier) or self._tier(tier)  # the latter raises, naming the tier
        model = model or ANY_MODEL
        key = (subject, model)
        want, back_end, back_units = 1, 0, 0
        if self._lease_s > 0:
            if key in self._renewals and key not in self._leases:
                await asyncio.shield(self._renewals[key])  # ended (granted or failed) within its budget
            lease = self._leases.get(key)
            if lease is not None:
                taken = self._from_lease(key, lease, limits)
                if isinstance(taken, RateResult):
                    return taken
                want, back_end, back_units = taken
        request_key, token_key = rate_keys(subject, model)
        args: tuple[str, ...] = (*self._check_args[tier], self._now_arg())
        owed = (0, 0)
        if self._unsynced and key in self._unsynced:
            # Spent here while Redis was away: charged in the same call, before the decision.
            del self._unsynced[key]
            owed = self.local.take_unsynced(subject, model)
        pending = self._pending.pop(key, None)
        unsent = 0 if pending is None else int(pending[0])
        if want > 1 or back_units or owed != (0, 0) or unsent:
            args = (*args, str(owed[0]), str(owed[1] + unsent), str(want), str(back_end), str(back_units))
        renewal: asyncio.Future[None] | None = None
        if want > 1 and key not in self._renewals:
            # Near the limit (one unit at a time) every request asks for itself, so the boundary stays exact.
            renewal = self._renewals[key] = asyncio.get_running_loop().create_future()
        try:
            reply = await self._run(CHECK_SCRIPT, (request_key, token_key), args, budget)
        finally:
            if renewal is not None:
                del self._renewals[key]
                renewal.set_result(None)
        if reply is not None:
            result = _result(limits, reply, fallback=False)
            if self._lease_s > 0 and result.allowed:
                left = self._lease_granted(key, tier, reply)
                if left:  # what this process holds for the caller is left too
                    result = result._replace(remaining=result.remaining + left)
            return result
        if owed != (0, 0):
            self.local.give_back(subject, model, *owed)
        if unsent:
            self.local.charge(subject, model, limits, unsent)
            self._owe(key)
        self._fell_back()
        result = self.local.check(subject, model, limits)
        if result.allowed or owed != (0, 0):
            self._owe(key)
        return result

    def _from_lease(self, key: tuple[str, str], lease: _Lease, limits: Tier) -> RateResult | tuple[int, int, int]:
        """The decision from ``lease`` while it holds a unit; else (units to ask for, and the end and
        number of units to give back), the spent lease forgotten."""
        now = self._clock()
        if lease.left > 0 and now < lease.expires and lease.tokens_since < lease.token_allowance:
            lease.take()
            return lease.result(limits, now)
        # Spent, lapsed, or its token share charged: ask again, giving back its returnable units.
        del self._leases[key]
        want = lease.want() if lease.tokens_since < lease.token_allowance else 1
        return (want, lease.end_us, lease.tail) if lease.tail > 0 else (want, 0, 0)

    def _lease_granted(self, key: tuple[str, str], tier: str, reply: Sequence[Any]) -> int:
        """Keep the units granted beyond the asking request's one; how many the lease now holds."""
        now = self._clock()
        interval = self._check_args[tier][0]
        lease = _Lease(
            reply, now=now, lease_s=self._lease_s, tpm=self._tiers[tier].tokens_per_minute, interval=interval
        )
        pending = self._pending.get(key)
        if pending is not None:  # charged here while the call was out
            lease.tokens_since = int(pending[0])
        older = self._leases.get(key)
        if older is not None and older.left > 0 and now < older.expires:
            lease.merge(older)  # a concurrent request's grant, answered just before this one
        self._leases[key] = lease
        if len(self._leases) > self._local_max_keys:
            self._leases.pop(next(iter(self._leases)))  # the oldest; its units are not given back
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        return lease.left

    async def _sweep(self) -> None:
        """Every lease interval: give back the unused units of lapsed leases, and forget them."""
        try:
            while self._leases:
                await asyncio.sleep(self._lease_s)
                await self.release_lapsed()
        finally:
            self._sweeper = None

    async def release_lapsed(self, *, all_leases: bool = False) -> int:
        """Give back the returnable units of every lapsed lease (every lease with ``all_leases``); the
        number of script calls made (pipelined on one connection)."""
        now = self._clock()
        lapsed = [key for key, lease in self._leases.items() if all_leases or now >= lease.expires]
        calls = []
        for key in lapsed:
            lease = self._leases.pop(key)
            if lease.tail <= 0:
                continue
            calls.append(self._release(key, lease))
        if calls:
            await asyncio.gather(*calls)
        return len(calls)

    async def _release(self, key: tuple[str, str], lease: _Lease) -> None:
        request_key, _ = rate_keys(*key)
        args = (lease.interval, str(lease.end_us), str(lease.tail), self._now_arg())
        await self._run(RELEASE_SCRIPT, (request_key,), args)

    async def charge(
        self, subject: str, model: str | None, tier: str, tokens: int, *, budget: RedisBudget | None = None
    ) -> None:
        """Charge the tokens a response used; a tier without a token limit charges nothing.

        With ``charge_flush_s`` the charge is counted here at once and sent within ``charge_flush_s``
        without waiting, unless the caller's lease has spent its share of the budget (or there is no
        lease): then it is sent before this returns, so every process's next decision sees it.
        """
        limits = self._tiers.get(tier) or self._tier(tier)  # the latter raises, naming the tier
        if tokens <= 0 or limits.tokens_per_minute is None:
            return
        model = model or ANY_MODEL
        key = (subject, model)
        if self._flush_s is None:
            _, token_key = rate_keys(subject, model)
            reply = await self._run(CHARGE_SCRIPT, (token_key,), (str(int(tokens)), self._now_arg()), budget)
            if reply is None:
                self.local.charge(subject, model, limits, tokens)
                self._owe(key)
            return
        tokens = int(tokens)
        entry = self._pending.get(key)
        if entry is None:
            self._pending[key] = [tokens, tier]
        else:
            entry[0] += tokens
        lease = self._leases.get(key)
        if lease is not None:
            lease.tokens_since += tokens
            send_now = lease.tokens_since >= lease.token_allowance
        else:
            # No lease: sent now, unless a renewal far from the budget (more than one unit asked
            # for) is out; this charge then rides the batch like one made under a lease.
            send_now = key not in self._renewals
        if send_now:
            # Near the caller's budget (or no lease to decide on): sent now, before the response's
            # last byte, so the next decision anywhere sees it (the boundary stays exact).
            tokens, _ = self._pending.pop(key)
            await self._send_one(key, tokens, tier, budget)
        elif self._flush_timer is None:
            self._flush_timer = asyncio.get_running_loop().call_later(self._flush_s, self._flush_due)

    def _flush_due(self) -> None:
        self._flush_timer = None
        batch, self._pending = self._pending, {}
        self._spawn(self._send(list(batch.items())))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple[tuple[str, str], list[Any]]]) -> None:
        """Charge each caller's counted tokens, one script call each, all at once (they share a pipeline)."""
        if batch:
            await asyncio.gather(*(self._send_one(key, int(tokens), tier) for key, (tokens, tier) in batch))

    async def _send_one(self, key: tuple[str, str], tokens: int, tier: str, budget: RedisBudget | None = None) -> None:
        subject, model = key
        _, token_key = rate_keys(subject, model)
        reply = await self._run(CHARGE_SCRIPT, (token_key,), (str(tokens), self._now_arg()), budget)
        if reply is None:  # held here: the local limiter sees them, the write-back sends them later
            self.local.charge(subject, model, self._tier(tier), tokens)
            self._owe(key)

    async def flush(self) -> None:
        """Send every counted charge now (and wait for the sends in progress)."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        batch, self._pending = self._pending, {}
        await self._send(list(batch.items()))
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _owe(self, key: tuple[str, str]) -> None:
        """Remember a caller with spend Redis has not seen; as many as the local limiter keeps."""
        unsynced = self._unsynced
        unsynced[key] = None
        if len(unsynced) > self._local_max_keys:
            del unsynced[next(iter(unsynced))]  # the oldest; its local state is the first evicted too

    async def _write_back(self) -> None:
        """Charge Redis with what the local limiter admitted while it was away, one call per caller."""
        try:
            while self._unsynced:
                subject, model = key = next(iter(self._unsynced))
                del self._unsynced[key]
                owed = self.local.take_unsynced(subject, model)
                if owed == (0, 0):
                    continue
                request_key, token_key = rate_keys(subject, model)
                try:
                    await self._backend.run_script(
                        SYNC_SCRIPT, (request_key, token_key), (str(owed[0]), str(owed[1]), self._now_arg())
                    )
                except Exception as exc:  # Redis went away again: owed until it answers next
                    self.local.give_back(subject, model, *owed)
                    self._unsynced[key] = None
                    log.debug("rate-limit write-back paused: %s", exc)
                    return
        finally:
            self._writing_back = None

    async def close(self) -> None:
        """Send the counted charges and give back the leases' unused units (a process stopping on
        SIGTERM loses no charge Redis can take), then stop a write-back in progress (what it had not
        written stays owed in this process only)."""
        sweeper = self._sweeper
        if sweeper is not None:
            sweeper.cancel()
            try:
                await sweeper
            except (asyncio.CancelledError, Exception):
                pass
        await self.flush()
        await self.release_lapsed(all_leases=True)
        if self._unsynced and self._writing_back is None and self._clock() >= self._skip_until:
            await self._write_back()  # what Redis did not take while it was away: one more try
        task = self._writing_back
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
