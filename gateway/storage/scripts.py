"""The Lua scripts (``gateway/lua/<name>.lua``) and the two transports that run them.

One protocol, :class:`ScriptTransport`, with two implementations, chosen inside the store:

- :class:`WireTransport`, the lean RESP connection (:mod:`gateway.storage.wire`), for a standalone
  Redis (``redis://``, ``rediss://``, ``unix://``) when the store was asked for it: about a tenth of
  redis-py's CPU per call on the hot path.
- :class:`RedisPyTransport`, redis-py auto-pipelined (every call made in one loop tick shares one
  pipeline), for everything else (Sentinel, Cluster) and wherever the lean wire is not asked for.

Timeout semantics, the same for both: a call waits at most ``redis.timeout_s`` (the store's
``timeout_s``), or ``timeout_s`` when the caller passes a shorter one (what is left of the calling
request's wait on Redis, docs/contract.md §5: one deadline per request, however many calls). A
NOSCRIPT reply (Redis restarted or flushed its script cache) loads the script and retries once,
within the same deadline. Every failure - no reply within the deadline, a lost connection, an error
reply - raises :class:`StoreUnavailable`. How each keeps the deadline differs: redis-py's waiter
times out under ``asyncio.timeout`` and its batch's reply is dropped when it comes; the wire's
connection answers every call within its own deadline (``redis.timeout_s``, plus a quarter), so it
arms a timer only for a shortened one, and drops a connection that stops answering.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Sequence
from importlib import resources
from typing import Any, Protocol

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisError

from .clients import RedisAccess, StoreUnavailable
from .wire import ReplyError, RespConnection, WireError, pack


def lua_source(name: str) -> str:
    """``gateway/lua/<name>.lua``, with each ``-- @include <other>`` line replaced by that file."""
    source = resources.files("gateway").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")
    return _INCLUDE.sub(lambda match: lua_source(match.group(1)), source)


_INCLUDE = re.compile(r"^-- @include (\w+)$", re.MULTILINE)


class ScriptTransport(Protocol):
    """Runs one script call (EVALSHA, loading the script on NOSCRIPT) with the semantics in the module docstring."""

    async def run(self, name: str, keys: Sequence[str], args: Sequence[Any], timeout_s: float | None) -> Any: ...

    async def close(self) -> None: ...


class WireTransport:
    """Script calls over the lean RESP connection."""

    def __init__(self, wire: RespConnection, owner: Scripts) -> None:
        self.wire = wire
        self.owner = owner

    async def run(self, name: str, keys: Sequence[str], args: Sequence[Any], timeout_s: float | None) -> Any:
        wire, owner = self.wire, self.owner
        source, sha = owner._script(name)
        payload = pack("EVALSHA", sha, len(keys), *keys, *args)
        # A timer only for a shortened deadline: otherwise the connection answers every call
        # within its own deadline (redis.timeout_s).
        started = asyncio.get_running_loop().time()
        deadline = None if timeout_s is None else started + timeout_s
        try:
            try:
                return await wire.call(payload, deadline=deadline)
            except ReplyError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise
                # Redis restarted or flushed its script cache: load once and retry, all three
                # calls within the one deadline.
                deadline = started + (owner.timeout_s if timeout_s is None else timeout_s)
                await wire.call(pack("SCRIPT", "LOAD", source), deadline=deadline)
                return await wire.call(payload, deadline=deadline)
        except ReplyError as exc:
            # Redis answered with an error (a Lua error, OOM, READONLY): never a slow network, so
            # counted apart and always worth a line.
            owner.on_error("script_error")
            owner._note_failure(f"redis script {name} answered an error: {exc}")
            raise StoreUnavailable(f"redis script {name}: {exc}") from exc
        except WireError as exc:
            owner.on_error("script")
            owner._note_failure(f"redis script {name}: {type(exc).__name__}: {exc}")
            raise StoreUnavailable(f"redis script {name}: {exc}") from exc

    async def close(self) -> None:
        await self.wire.close()


class RedisPyTransport:
    """Script calls over redis-py, auto-pipelined: calls made in the same loop tick share one write."""

    def __init__(self, owner: Scripts) -> None:
        self.owner = owner
        self._batch: list[tuple[str, Sequence[str], Sequence[Any], asyncio.Future[Any]]] = []
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[Any]] = set()

    async def run(self, name: str, keys: Sequence[str], args: Sequence[Any], timeout_s: float | None) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._batch.append((name, keys, args, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        owner = self.owner
        try:
            async with asyncio.timeout(owner.timeout_s if timeout_s is None else min(timeout_s, owner.timeout_s)):
                return await asyncio.shield(future)
        except TimeoutError as exc:
            owner.on_error("script")
            raise StoreUnavailable(f"redis script {name}: timed out") from exc

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._batch = self._batch, []
        task = asyncio.get_running_loop().create_task(self._execute(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(self, batch: list[tuple[str, Sequence[str], Sequence[Any], asyncio.Future[Any]]]) -> None:
        try:
            results = await self._pipeline_scripts(batch)
        except Exception as exc:  # every waiter must learn the outcome
            error = exc if isinstance(exc, StoreUnavailable) else StoreUnavailable(str(exc))
            if not isinstance(exc, StoreUnavailable):
                self.owner.on_error("script")
            for *_rest, future in batch:
                if not future.done():
                    future.set_exception(error)
                    future.exception()  # a caller that timed out will never read it
            return
        for (*_rest, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                self.owner.on_error("script_error")
                self.owner._note_failure(f"redis script answered an error: {result}")
                future.set_exception(StoreUnavailable(str(result)))
                future.exception()
            else:
                future.set_result(result)

    async def _pipeline_scripts(self, batch: Sequence[tuple[str, Sequence[str], Sequence[Any], Any]]) -> list[Any]:
        owner = self.owner
        for attempt in range(2):
            pipe = owner.client.pipeline(transaction=False)
            for name, keys, args, _future in batch:
                _source, sha = owner._script(name)
                # execute_command, not pipe.evalsha: redis-py's Cluster pipeline blocks the
                # method, yet routes the raw command by its first key and splits per node.
                pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
            try:
                results = list(await pipe.execute(raise_on_error=False))
            except (RedisError, OSError, RuntimeError) as exc:
                raise StoreUnavailable(f"redis script: {type(exc).__name__}: {exc}") from exc
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in results):
                # Redis restarted or flushed its script cache: load once, then replay the batch.
                for name in {item[0] for item in batch}:
                    source, _sha = owner._script(name)
                    await owner._load_script(source)
                continue
            return results
        return results


class Scripts(RedisAccess):
    """The store's script calls; the transport is chosen here, once, from whether a lean wire was given."""

    def __init__(
        self,
        client: Any,
        *,
        timeout_s: float,
        load_timeout_s: float | None = None,
        policy_timeout_s: float = 2.0,
        wire: RespConnection | None = None,
    ) -> None:
        super().__init__(client, timeout_s=timeout_s, load_timeout_s=load_timeout_s, policy_timeout_s=policy_timeout_s)
        self._scripts: dict[str, tuple[str, str]] = {}
        # The lean connection, when the script calls use it (standalone Redis only).
        self.wire = wire
        self._transport: ScriptTransport = WireTransport(wire, self) if wire is not None else RedisPyTransport(self)

    async def run_script(
        self, name: str, keys: Sequence[str], args: Sequence[Any], *, timeout_s: float | None = None
    ) -> Any:
        """EVALSHA of ``gateway/lua/<name>.lua``; calls made in the same loop tick share one write.

        ``timeout_s``: what is left of the calling request's wait on Redis, when less than
        ``redis.timeout_s`` (docs/contract.md §5: one deadline per request, however many calls).
        """
        return await self._transport.run(name, keys, args, timeout_s)

    async def close(self) -> None:
        await self._transport.close()
        await super().close()

    def _script(self, name: str) -> tuple[str, str]:
        cached = self._scripts.get(name)
        if cached is None:
            source = lua_source(name)
            cached = (source, hashlib.sha1(source.encode()).hexdigest())
            self._scripts[name] = cached
        return cached

    async def _load_script(self, source: str) -> None:
        if self.is_cluster:
            # Every primary: each serves EVALSHA for its own slots and has its own script cache.
            await self.client.execute_command("SCRIPT LOAD", source, target_nodes=RedisCluster.PRIMARIES)
        else:
            await self.client.script_load(source)
