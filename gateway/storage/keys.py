"""The one Redis key schema: every key name and key builder the gateway uses.

Key schema (every policy key shares the hash tag ``{gw}`` so one transaction can
change several of them on Redis Cluster too):

==============================  =======  ==================================================
key                             type     holds
==============================  =======  ==================================================
``{gw}:version``                string   the policy version; bumped by every change
``{gw}:generation``             string   id of the policy generation (new after a restore)
``{gw}:list:<name>``            hash     list entry key -> JSON entry (four lists)
``{gw}:models``                 hash     model name -> JSON model
``{gw}:apikeys``                hash     key id -> JSON attributes incl. the key's hash
``{gw}:revoked``                hash     key id -> JSON revocation (hash, revoked_at, revoked_by): a
                                        revoked key id or hash is never written back into apikeys
``{gw}:screening``              string   JSON list of imported screening entries
``{gw}:screening_rev``          string   policy version at which screening last changed
``{gw}:revs``                   hash     part -> version of its last change; ``at`` -> version described;
                                        ``<list>:floor``, ``delta_at`` (see ``{gw}:touched:<list>``)
``{gw}:touched:<list>``         zset     entry key -> version of its last single-entry change; a reader
                                        whose copy of the list is at least ``<list>:floor`` reads only
                                        the entries changed since (``delta_at``: version these describe)
``{gw}:screening_hits``         string   JSON: API keys and partners whose names screen as a match,
                                        found by the last screening import (derived, not policy)
``{gw}:changes``                stream   change history (actor, time, before, after, version)
``{gw}:write:<id>``             string   version a write produced; read back to confirm it (TTL)
``{gw}:change-requests``        hash     change request id -> JSON request (who, when, status, what)
``{gw}:change-ops``             hash     change request id -> JSON plain operations it applies
``{gw}:change-retire``          zset     change request id -> when it may be pruned (closed_at, or
                                        expires_at while pending)
``gw:audit``                    stream   audit records of shard 0, a batch per entry (``n`` records, ``total``
                                        running count, ``id``: producer:first-last sequence, ``b``: JSON
                                        array); older single-record entries (``r``, ``id``) are read too
``gw:audit:<shard>``            stream   audit shard 1..``audit.shards``-1, the same records of other producers
``{gw:audit}:seq:<producer>``   string   highest audit sequence appended for one process (shard 0)
``{gw:audit:<shard>}:seq:<p>``  string   the same, for a producer of shard 1.. (in its shard's slot)
``{gw:audit}:records``          hash     shard 0's record counts: ``appended`` (running total), ``trimmed``,
                                        ``entries``; ``{gw:audit:<shard>}:records`` for shard 1.. (its slot)
``gw:audit-shards``             set      every ``audit.shards`` above 1 a gateway has appended with; readers
                                        and the archiver read as many shards as the largest says
``gw:rl:{<hash>}:r`` / ``:w``   string / hash   rate-limit state, always with a TTL
``gw:console:<digest>``         string   operator console session (actor, CSRF token, expiry); TTL
==============================  =======  ==================================================

Channel ``gw:policy`` announces each new version. README.md's key table is tested against
this module (tests/test_storage_keys.py), so the two cannot drift apart.
"""

from __future__ import annotations

import zlib

from ..policy.names import LIST_NAMES

PREFIX = "{gw}:"
VERSION_KEY = PREFIX + "version"
GENERATION_KEY = PREFIX + "generation"
MODELS_KEY = PREFIX + "models"
APIKEYS_KEY = PREFIX + "apikeys"
REVOKED_KEY = PREFIX + "revoked"
SCREENING_KEY = PREFIX + "screening"
SCREENING_REV_KEY = PREFIX + "screening_rev"
CHANGES_KEY = PREFIX + "changes"
SCREENING_HITS_KEY = PREFIX + "screening_hits"
# The audit stream, sharded by producer (``audit.shards``): shard 0 is ``gw:audit`` itself, so a
# deployment with one shard (the default) and the data it already holds are unchanged.
AUDIT_KEY = "gw:audit"
AUDIT_SHARDS_MAX = 1024
# Every shard count above 1 that a gateway has appended with (a set; see audit_shard_count in
# storage/audit_stream.py): lowering ``audit.shards`` must not hide the records of the higher shards.
AUDIT_SHARDS_KEY = "gw:audit-shards"
AUDIT_MARK_TTL_S = 7 * 86400
# The archiver's consumer group on ``gw:audit`` and ``{gw}:changes`` (its acknowledgements say
# what is archived, so what may be trimmed).
ARCHIVE_GROUP = "archiver"
CHANNEL = "gw:policy"
RATE_PREFIX = "gw:rl:"
# Operator console sessions: apart from the policy's hash tag, since no transaction spans both.
CONSOLE_PREFIX = "gw:console:"
CHANGES_MAXLEN = 100_000
# Change requests held for a second admin's approval (the two-person rule), beside the policy so one
# transaction applies a request's operations and closes it.
CHANGE_REQUESTS_KEY = PREFIX + "change-requests"
CHANGE_OPS_KEY = PREFIX + "change-ops"
CHANGE_RETIRE_KEY = PREFIX + "change-retire"
# Closed (or expired) requests are kept this long, and at most this many requests in all.
CHANGE_REQUESTS_KEEP_S = 30 * 86400
CHANGE_REQUESTS_MAX = 10_000
# Set in each write's transaction and read back before the write counts (docs/hardening.md 23).
WRITE_MARK_PREFIX = PREFIX + "write:"
WRITE_MARK_TTL_S = 600
# Which version last changed each part of the policy, so a reload fetches only what changed.
REVS_KEY = PREFIX + "revs"
MODELS_PART, APIKEYS_PART = "models", "apikeys"
POLICY_PARTS = (*LIST_NAMES, MODELS_PART, APIKEYS_PART)
REVS_AT = "at"  # the version the revisions describe; any other value makes them unusable
# Entry-level changes: ``{gw}:touched:<list>`` scores each entry key with the version of its last
# single-entry write, so a reader holding the list as of version v reads only the entries scored
# above v. ``<list>:floor`` in the revisions: a reader whose copy predates it must read the list whole
# (a whole-list replace, a writer that kept no record, or records trimmed to TOUCHED_CAP).
# ``delta_at`` is the version the records describe; a writer that does not keep them leaves it behind.
TOUCHED_PREFIX = PREFIX + "touched:"
DELTA_AT = "delta_at"
FLOOR_SUFFIX = ":floor"
TOUCHED_CAP = 20_000


def list_key(name: str) -> str:
    return f"{PREFIX}list:{name}"


def touched_key(name: str) -> str:
    return f"{TOUCHED_PREFIX}{name}"


def floor_field(name: str) -> str:
    return name + FLOOR_SUFFIX


PART_KEYS = {**{name: list_key(name) for name in LIST_NAMES}, MODELS_PART: MODELS_KEY, APIKEYS_PART: APIKEYS_KEY}
PART_OF_KEY = {key: part for part, key in PART_KEYS.items()}


def audit_key(shard: int) -> str:
    """The audit stream of one shard: ``gw:audit`` for 0, ``gw:audit:<shard>`` for the others.

    Without braces the whole name is hashed, so ``gw:audit:<shard>`` lands in the same Cluster slot as
    the hash tag ``{gw:audit:<shard>}`` of its producers' marks.
    """
    return AUDIT_KEY if shard == 0 else f"{AUDIT_KEY}:{shard}"


def audit_mark_key(shard: int, producer: str) -> str:
    """A producer's high-water mark, in its shard's Cluster slot, so one script touches both."""
    return f"{{{audit_key(shard)}}}:seq:{producer}"


def audit_counts_key(shard: int) -> str:
    """A shard's record counts (appended, trimmed), in its slot: what trimming by records reads."""
    return f"{{{audit_key(shard)}}}:records"


def audit_shard(producer: str, shards: int) -> int:
    """The shard a producer appends to: a stable hash of its id (the same in every process, unlike
    Python's salted ``hash``), so whoever replays a stopped producer's spool picks the same shard."""
    return zlib.crc32(producer.encode()) % shards if shards > 1 else 0


def console_session_key(digest: str) -> str:
    """One operator console session, by the SHA-256 (hex) of its cookie value; always with a TTL."""
    return f"{CONSOLE_PREFIX}{digest}"


def rate_state_keys(digest: str) -> tuple[str, str]:
    """The request key (GCRA time) and the token key (window) of one caller's hashed (subject, model).

    The braces are a Cluster hash tag: both keys of a caller share a slot, as one script needs.
    """
    return f"{RATE_PREFIX}{{{digest}}}:r", f"{RATE_PREFIX}{{{digest}}}:w"
