"""gateway.policy stays pure: none of its modules pulls in aiohttp or Redis, and its vocabulary is the one copy."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from typing import get_args

import pytest

import gateway.policy
from gateway.policy.names import STAGES
from gateway.settings import Stage

POLICY_MODULES = sorted(m.name for m in pkgutil.iter_modules(gateway.policy.__path__, "gateway.policy."))


def test_the_package_holds_the_six_modules() -> None:
    assert POLICY_MODULES == [
        f"gateway.policy.{name}" for name in ("decide", "effect", "model", "names", "validate", "wire")
    ]


@pytest.mark.parametrize("module", POLICY_MODULES)
def test_policy_module_imports_neither_aiohttp_nor_redis(module: str) -> None:
    # A fresh interpreter: in this one the test session has long imported both.
    probe = f"import sys, {module}; print(','.join(sorted(m for m in ('aiohttp', 'redis') if m in sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "", f"{module} pulls in {result.stdout.strip()}"


def test_settings_stage_type_spells_the_policy_stages() -> None:
    # settings keeps a Literal for pydantic; it must name the stages the policy knows, in order.
    assert get_args(Stage) == STAGES
