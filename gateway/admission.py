"""Admission: identity -> countries -> model -> decide -> rate, one component for every caller of it.

The public path runs these steps around reading the request (the body is read between countries and
model, so a refusal of the body still names the caller's countries in its audit record);
``POST /admin/v1/decide`` runs countries -> decide on a caller its body describes, with ``stale=``
instead of the public path's refusal and no rate step (it consumes no rate limit). An impact preview
or an authorization listener runs the same steps against a snapshot of its choosing.

The steps other than :meth:`Admission.enforced` and :meth:`Admission.rate` are pure over (snapshot,
request facts): they read no I/O and change nothing (the caller step keeps the callers it built, and
answers the same caller at the same address with the one it built before). Each is one call the public
path makes anyway (collaborators are resolved once, here), so the hot path gains no await, lookup or
allocation.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from .errors import GatewayError, error_for, policy_stale
from .geo import GeoResolver
from .identity import Authenticator, AuthError, Identity
from .policy.decide import Rules, blocking_rules, clip, decide, path_model
from .policy.model import Caller, Decision, Snapshot
from .ratelimit import RateLimiter, RateResult, RedisBudget

_NO_RANGES: dict[str, str] = {}
CALLER_CACHE_SIZE = 4096


class PolicyView(Protocol):
    """The process's enforced policy (the policy watcher is one)."""

    @property
    def snapshot(self) -> Snapshot | None: ...

    @property
    def version(self) -> int: ...

    def stale(self) -> bool: ...

    async def refresh(self) -> None: ...


class Admission:
    """The admission steps over a policy snapshot; the rate step only when given a limiter."""

    __slots__ = ("_authenticate", "_callers", "_clock", "_limiter", "_resolve", "policy", "rules")

    def __init__(
        self,
        *,
        policy: PolicyView,
        authenticator: Authenticator,
        geo: GeoResolver,
        rules: Rules,
        clock: Callable[[], float],
        limiter: RateLimiter | None = None,
    ) -> None:
        self.policy = policy
        self.rules = rules
        self._authenticate = authenticator.authenticate
        self._resolve = geo.resolve
        self._clock = clock
        self._limiter = limiter
        # (id(identity), ip) -> (identity, countries, the Caller): a caller that keeps calling from one
        # address is the same Caller each time (never changed once built); holding the identity keeps
        # its id from being reused while cached.
        self._callers: dict[tuple[int, str], tuple[Identity, tuple[str | None, str | None], Caller]] = {}

    def enforced(self) -> Snapshot:
        """The snapshot requests are decided on; 503 ``policy_stale`` (row 10) when it is not confirmed."""
        policy = self.policy
        snapshot = policy.snapshot
        if snapshot is None or policy.stale():
            raise policy_stale()
        return snapshot

    def identify(self, authorization: str | None, snapshot: Snapshot) -> Identity:
        """Row 1: the verified caller of an ``Authorization`` header (a JWT or one of the snapshot's API
        keys); 401 ``unauthenticated`` otherwise."""
        try:
            return self._authenticate(authorization, snapshot.api_keys)
        except AuthError as exc:
            err = error_for(exc)
            assert err is not None  # AuthError is in the error table
            raise err from exc

    def caller(self, identity: Identity, ip: str, snapshot: Snapshot | None) -> Caller:
        """The caller decided for: ``identity`` at address ``ip``, whose countries are the snapshot's
        ``ip-ranges`` (longest prefix) or else the geo database's."""
        codes = self._resolve(ip, snapshot.ip_ranges if snapshot is not None else _NO_RANGES)
        key = (id(identity), ip)
        cached = self._callers.get(key)
        if cached is not None and cached[0] is identity and cached[1] == codes:
            return cached[2]
        caller = identity.to_caller(ip, *codes)
        if len(self._callers) >= CALLER_CACHE_SIZE:
            self._callers.clear()
        self._callers[key] = (identity, codes, caller)
        return caller

    def model(self, named: str | None, method: str, path: str) -> str | None:
        """The model a request is about: the one its body or path pattern names, else the one a
        ``GET /v1/models/<name>`` names (row 3a)."""
        return named if named is not None else path_model(method, path, self.rules)

    def decide(
        self,
        snapshot: Snapshot | None,
        caller: Caller,
        model: str | None,
        *,
        method: str = "POST",
        path: str | None = None,
        stale: bool = False,
        now: float | None = None,
    ) -> Decision:
        """Rows 2-8 (and 10 with ``stale``) at ``now``, by default the clock's."""
        return decide(
            snapshot,
            caller,
            model,
            self._clock() if now is None else now,
            self.rules,
            stale=stale,
            method=method,
            path=path,
        )

    def explain(
        self, snapshot: Snapshot | None, caller: Caller, model: str | None, *, stale: bool = False
    ) -> list[Decision]:
        """Every rule of rows 2-8 (and 10 with ``stale``) that refuses ``caller`` now, in order."""
        if stale:
            return [decide(snapshot, caller, model, self._clock(), self.rules, stale=True)]
        return blocking_rules(snapshot, caller, model, self._clock(), self.rules)

    def rate(self, identity: Identity, model: str | None, budget: RedisBudget) -> Awaitable[RateResult]:
        """Row 9: the caller's request limit for ``model`` (the check and the charge share ``budget``).
        Returns the limiter's own awaitable, so the step adds no coroutine of its own."""
        limiter = self._limiter
        assert limiter is not None, "an Admission without a limiter has no rate step"
        return limiter.check(identity.subject, model, identity.tier, budget=budget)


def rate_refused(rate: RateResult, model: str | None, headers: tuple[tuple[str, str], ...]) -> GatewayError:
    """The 429 for a request over its limit, carrying ``headers`` (the limit it was counted under)."""
    return GatewayError(429, rate.code, _rate_message(rate, model), headers=headers)


def _rate_message(rate: RateResult, model: str | None) -> str:
    target = f"model '{clip(model)}'" if model else "this gateway"
    if rate.code == "token_rate_limited":
        return (
            f"Token budget for {target} is spent ({rate.token_limit} tokens per minute); "
            f"retry after {rate.retry_after_s} s."
        )
    return f"Rate limit for {target} reached ({rate.limit} requests per minute); retry after {rate.retry_after_s} s."
