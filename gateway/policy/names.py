"""The policy's vocabulary, in one place: list names, decision codes, stages, credential kinds.

Every module that names a list, a code or a stage imports it from here rather than spelling it
again. Nothing here imports anything of the gateway's, so settings, the operator CLI and the
metrics can use it without pulling in the rest of the policy.
"""

from __future__ import annotations

import time
from typing import Literal

DENY_COUNTRIES = "deny-countries"
DENY_ENTITIES = "deny-entities"
PARTNERS = "partners"
IP_RANGES = "ip-ranges"
COUNTRY_GROUPS = "country-groups"
LICENCES = "licences"
LIST_NAMES = (DENY_COUNTRIES, DENY_ENTITIES, PARTNERS, IP_RANGES, COUNTRY_GROUPS, LICENCES)
# Lists added after the first four: a whole-policy restore that leaves one out writes it empty. That is
# safe because every ``@GROUP`` reference must name a group the policy holds, and no licence is looser.
LATER_LISTS = frozenset({COUNTRY_GROUPS, LICENCES})
# How ``allowed_countries``, ``deny-countries`` keys and licence countries name a country group.
GROUP_PREFIX = "@"
# Lists that can hold hundreds of thousands of entries: kept as stored JSON until an entry is consulted.
LAZY_LISTS = frozenset({DENY_COUNTRIES, DENY_ENTITIES})

# A model's release stages, narrowest first (docs/contract.md §4 row 8).
STAGES = ("internal", "partners", "general")

# Decision codes (docs/contract.md §4).
ENTITY_DENIED = "entity_denied"
COUNTRY_DENIED = "country_denied"
MODEL_UNKNOWN = "model_unknown"
EXPORT_SUSPENDED = "export_suspended"
EXPORT_RESTRICTED = "export_restricted"
NOT_RELEASED = "not_released"
PARTNER_REQUIRED = "partner_required"
POLICY_STALE = "policy_stale"
MODEL_REQUIRED = "model_required"
AMBIGUOUS_REQUEST = "ambiguous_request"

# How a caller proved who it is: a bearer JWT or an issued API key.
CredentialKind = Literal["jwt", "api_key"]


def now_iso() -> str:
    """The current UTC time as the policy stamps writes with it (``added_at``, ``revoked_at``...)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
