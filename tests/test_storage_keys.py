"""README.md's Redis key table and gateway/storage/keys.py name the same keys, neither more nor less."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.storage import keys

README = Path(__file__).resolve().parent.parent / "README.md"

# The key builders and prefixes, each with the placeholder README writes for its variable part.
# A builder or prefix added to keys.py fails test_every_builder_is_placed until it is placed here.
BUILT = {
    "list_key": [keys.list_key("<name>")],
    "touched_key": [keys.touched_key("<list>")],
    "rate_state_keys": list(keys.rate_state_keys("<hash>")),
    "console_session_key": [keys.console_session_key("<digest>")],
    # Shard 0 keeps the names of the stream before shards; shard 7 stands for every other one.
    "audit_key": [keys.audit_key(0), keys.audit_key(7).replace("7", "<shard>")],
    "audit_counts_key": [keys.audit_counts_key(0), keys.audit_counts_key(7).replace("7", "<shard>")],
    "audit_mark_key": [
        keys.audit_mark_key(0, "<producer>"),
        keys.audit_mark_key(7, "<producer>").replace("7", "<shard>"),
    ],
}
PREFIXED = {
    "WRITE_MARK_PREFIX": keys.WRITE_MARK_PREFIX + "<id>",
}
# Not keys of their own: the policy keys' common prefix, the one the builders above use, a field name,
# the choice of an audit shard.
NOT_KEYS = {"PREFIX", "TOUCHED_PREFIX", "RATE_PREFIX", "CONSOLE_PREFIX", "floor_field", "audit_shard"}


def readme_keys() -> set[str]:
    """Every key named in the first column of README's "Redis key schema" table.

    A cell may name several keys (``a``, ``b``); one that starts with ``:`` (``:w``) is a sibling of
    the key before it, its last ``:part`` replaced.
    """
    section = README.read_text(encoding="utf-8").split("### Redis key schema", 1)[1]
    table = section[section.index("\n| key |") :]
    rows = table.strip().split("\n\n", 1)[0].splitlines()
    found: set[str] = set()
    for row in rows:
        if not row.startswith("| `"):
            continue
        previous = ""
        for name in re.findall(r"`([^`]+)`", row.split("|")[1]):
            if name.startswith(":"):
                name = previous.rsplit(":", 1)[0] + name
            found.add(name)
            previous = name
    return found


def module_keys() -> set[str]:
    constants = {value for name, value in vars(keys).items() if name.endswith("_KEY") and isinstance(value, str)}
    return constants | {key for built in BUILT.values() for key in built} | set(PREFIXED.values())


def test_readme_names_every_key_and_only_those() -> None:
    readme, module = readme_keys(), module_keys()
    assert readme, "README.md has no Redis key table"
    assert readme - module == set(), "in README.md's key table but not in gateway/storage/keys.py"
    assert module - readme == set(), "in gateway/storage/keys.py but not in README.md's key table"


def test_every_builder_is_placed() -> None:
    builders = {
        name
        for name, value in vars(keys).items()
        if callable(value) and getattr(value, "__module__", None) == keys.__name__
    }
    prefixes = {name for name in vars(keys) if name.endswith("PREFIX")}
    assert builders == set(BUILT) | {"floor_field", "audit_shard"}
    assert prefixes == set(PREFIXED) | (NOT_KEYS - {"floor_field", "audit_shard"})


def test_readme_names_the_policy_channel() -> None:
    assert f"channel `{keys.CHANNEL}`" in README.read_text(encoding="utf-8")
