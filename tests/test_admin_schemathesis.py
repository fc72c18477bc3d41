"""Property-based fuzzing of the admin API from its own OpenAPI document: no input may end in a 5xx.

Schemathesis reads ``/admin/v1/openapi.json`` from a live gateway (with the admin
token) and its engine (what ``schemathesis run`` drives) sends explicit examples,
boundary values and random schema-valid and schema-invalid requests to every
operation. The gateway and its Redis are this module's own: the fuzzer rewrites the policy.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import schemathesis
from schemathesis.engine import Status, events

from .support.gateway_process import ADMIN_TOKEN, GatewayProcess, gateway_config, seeded_gateway
from .support.upstream import Upstream

# Per operation and phase; bounded so the run stays well under a minute.
MAX_EXAMPLES = 15
CHECKS = [
    "not_a_server_error",  # the point of this module
    "status_code_conformance",  # every status is one the document lists
    "content_type_conformance",
    "response_schema_conformance",
    "negative_data_rejection",  # what the schema forbids, the gateway refuses
    "unsupported_method",
    "ignored_auth",  # no operation answers without the admin token
]


@pytest.fixture(scope="module")
def fuzzed_gateway(upstream: Upstream) -> Iterator[GatewayProcess]:
    with seeded_gateway(gateway_config(upstream.url)) as process:
        yield process


def _failures(event: events.ScenarioFinished) -> list[str]:
    found = []
    for case_id, checks in event.recorder.checks.items():
        for check in checks:
            if check.status == Status.SUCCESS or check.failure_info is None:
                continue
            interaction = event.recorder.interactions.get(case_id)
            request = (
                (
                    f"{interaction.request.method} {interaction.request.uri[:300]} "
                    f"{(interaction.request.body or b'')[:300]!r}"
                )
                if interaction
                else "(no request)"
            )
            failure = check.failure_info.failure
            found.append(f"{event.label}: {check.name}: {failure.title}: {failure.message[:300]}\n    {request}")
    return found


def test_admin_api_never_answers_5xx(fuzzed_gateway: GatewayProcess) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    schema = schemathesis.openapi.from_url(fuzzed_gateway.admin_url + "/admin/v1/openapi.json", headers=headers)
    schema.config.update(base_url=fuzzed_gateway.admin_url, headers=headers, request_timeout=30)
    schema.config.checks.update(included_check_names=CHECKS)
    schema.config.phases.update(phases=["examples", "coverage", "fuzzing"])
    schema.config.generation.update(max_examples=MAX_EXAMPLES, database="none")

    failures: list[str] = []
    errors: list[str] = []
    statuses: Counter[int] = Counter()
    not_json: list[str] = []
    tested: set[str] = set()
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            tested.add(event.label or "")
            for interaction in event.recorder.interactions.values():
                if interaction.response is None:
                    continue
                statuses[interaction.response.status_code] += 1
                content_type = str(interaction.response.headers.get("content-type"))
                if "application/json" not in content_type:
                    not_json.append(f"{interaction.request.method} {interaction.request.uri[:200]}: {content_type}")
            if event.status not in (Status.SUCCESS, Status.SKIP):
                failures.extend(_failures(event) or [f"{event.label}: {event.status}"])
        elif isinstance(event, events.NonFatalError | events.FatalError):
            errors.append(repr(getattr(event, "value", None) or getattr(event, "exception", None)))

    assert not errors, errors
    assert not failures, "\n".join(failures[:20])
    assert not any(status >= 500 for status in statuses), statuses
    # Every answer is the gateway's JSON body: aiohttp's own error pages never leak.
    assert not not_json, not_json[:5]
    # The run really exercised the API: every operation (the fuzzer leaves out the document it was
    # read from), and both accepted and refused input.
    assert len({label for label in tested if label}) >= 18, ", ".join(sorted(tested))
    assert statuses[200] > 50 and statuses[400] > 100, statuses
