"""Requests in flight at the public listener, and ending those that a new policy version refuses.

The public path registers each admitted request as it starts forwarding (one small object in a set;
no lock, since everything here runs on the event loop) and unregisters it when it ends. On every
policy snapshot swap that changed something, each registered request is decided again by the same
steps as admission, against the new snapshot: its API key (if it used one) must still be issued and
active, its countries are resolved again (``ip-ranges`` may have changed), then rows 2-8. A request
now refused is ended at once:

- before its response began (the model server has not answered yet), its task is cancelled where it
  waits for the model server and it is answered with the refusal admission would give now;
- once its response is being relayed, the refusal is raised into the response body being read, so
  the forwarder ends it as it ends a stream the model server broke off: an SSE stream gets a last
  ``event: error`` carrying the error body with the new code, any other response is cut. A caller
  that reads too slowly for that last event to be written is cut :data:`CUT_AFTER_S` later.

Either way the model server's request is closed. A JWT that expires mid-response is not a
revocation: the credential was valid when the request was admitted, and tokens are short-lived by
design. Only a new snapshot triggers the re-decision; an entry or key expiring with no new version
does not. A model's timeline does: when one of its entries is reached (a scheduled suspension begins,
a country set narrows), the watcher builds the snapshot again at its next poll, and every request in
flight is decided again under the model's new state, as after a write.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import GatewayError
from .policy.model import Decision, Snapshot
from .proxy import ProxyOutcome, StreamRevoked

if TYPE_CHECKING:
    from .admission import Admission
    from .identity import Identity

log = logging.getLogger("gateway.inflight")

# How long a revoked response may take to write its last event before its connection is cut anyway.
CUT_AFTER_S = 0.5


class InFlight:
    """One request being forwarded: what it was decided on, and how to end it."""

    __slots__ = (
        "authorization",
        "finished",
        "identity",
        "ip",
        "method",
        "model",
        "outcome",
        "path",
        "revoking",
        "task",
        "transport",
    )

    def __init__(
        self,
        identity: Identity,
        authorization: str | None,
        transport: asyncio.Transport | None,
        ip: str,
        model: str | None,
        method: str,
        path: str,
        outcome: ProxyOutcome,
        task: asyncio.Task[Any] | None = None,
    ) -> None:
        # Positional or by name: the public path passes them in order (half the cost of keywords), and
        # its own task, which it finds without asking the running loop (a getpid() each time).
        self.identity = identity
        # An API-key caller's credential, to look its key up again (None for a JWT, not looked up again).
        self.authorization = authorization
        self.transport = transport  # the caller's connection
        self.ip = ip
        self.model = model
        self.method = method
        self.path = path
        self.outcome = outcome
        self.task = task if task is not None else asyncio.current_task()
        self.revoking: Decision | None = None
        self.finished = False

    def end(self, decision: Decision) -> None:
        """End this request, refused by ``decision`` (once; later calls change nothing)."""
        if self.revoking is not None:
            return
        self.revoking = decision
        body = self.outcome.body
        if body is None:
            # Still waiting for the model server's answer: the forwarder turns the cancellation into
            # this refusal (proxy.py).
            self.outcome.revoked = decision
            if self.task is not None:
                self.task.cancel()
            return
        body.set_exception(StreamRevoked(decision))
        asyncio.get_running_loop().call_later(CUT_AFTER_S, self._cut)

    def _cut(self) -> None:
        """Not ended yet (a caller not reading blocks the last write): close the connection."""
        if self.finished:
            return
        if self.outcome.revoked is None:
            self.outcome.revoked = self.revoking
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.abort()


class InFlightRegistry:
    """The process's requests in flight; :meth:`policy_changed` is a policy watcher callback."""

    def __init__(self, admission: Admission, *, clock: Callable[[], float]) -> None:
        self.admission = admission
        self.clock = clock
        self.live: set[InFlight] = set()
        # What the requests now in flight were decided on: the policy enforced when the registry starts.
        self._decided_on: Snapshot | None = admission.policy.snapshot
        self.decided_total = 0  # requests decided again, over the process's life

    def add(self, entry: InFlight) -> None:
        self.live.add(entry)

    def discard(self, entry: InFlight) -> None:
        entry.finished = True
        self.live.discard(entry)

    def __len__(self) -> int:
        return len(self.live)

    def policy_changed(self, snapshot: Snapshot | None) -> None:
        """Decide every request in flight again under ``snapshot``; end those it refuses.

        No snapshot (the policy is gone or unreadable) ends nothing: there is no new version to decide
        on, and new requests are refused as stale already.
        """
        previous, self._decided_on = self._decided_on, snapshot
        if snapshot is None or not self.live or not _changed(previous, snapshot):
            return
        self.redecide(snapshot)

    def redecide(self, snapshot: Snapshot) -> list[InFlight]:
        """Decide each request in flight under ``snapshot``, end the refused ones and return them."""
        now = self.clock()
        ended: list[InFlight] = []
        live = tuple(self.live)
        self.decided_total += len(live)
        for entry in live:
            try:
                decision = self.decide(entry, snapshot, now)
            except Exception:  # one bad entry must not stop the others, nor the watcher
                log.exception("deciding an in-flight request again failed")
                continue
            if not decision.allowed:
                entry.end(decision)
                ended.append(entry)
        return ended

    def decide(self, entry: InFlight, snapshot: Snapshot, now: float) -> Decision:
        """The decision admission would make now for ``entry``'s request, under ``snapshot``."""
        admission = self.admission
        identity = entry.identity
        if entry.authorization is not None:
            try:
                identity = admission.identify(entry.authorization, snapshot)
            except GatewayError as err:  # the key was revoked or has expired
                return Decision(False, err.status, err.code, err.message, snapshot.version)
        caller = admission.caller(identity, entry.ip, snapshot)
        return admission.decide(snapshot, caller, entry.model, method=entry.method, path=entry.path, now=now)


def _changed(previous: Snapshot | None, snapshot: Snapshot) -> bool:
    """Whether ``snapshot`` may decide differently from ``previous``: another version or generation, or
    the same version with its ip-ranges derived again (an override expired) or built again because a
    model's timeline reached its next entry (a scheduled suspension begins, say)."""
    return (
        previous is None
        or snapshot.version != previous.version
        or snapshot.generation != previous.generation
        or snapshot.ip_ranges is not previous.ip_ranges
        or snapshot.next_change_at != previous.next_change_at
    )
