"""The operator console in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``, driven by
Selenium), against real gateway processes and a real upstream: sign in; suspend a model and see a caller
abroad refused with 451 on the public listener; add and remove a deny entry; propose a loosening change as
one admin and approve it as another; find a blocked request in the audit page; sign out and see the session
refused. Each page is also loaded at 1280 px and at phone width, checked for labels, overflow and CSP
reports, and, with ``CONSOLE_SCREENSHOTS=1``, saved as a screenshot to docs/console/.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from gateway.redis_server import RedisServer

from .support.console import ALICE_TOKEN, BOB_TOKEN, console_config, tokens_file
from .support.gateway_process import BASE_POLICY, GatewayProcess, gateway_config, seed_policy
from .support.tokens import hs_token
from .support.upstream import Upstream
from .support.waiting import wait_until_blocking

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "docs" / "console"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
PHONE = (390, 844)
DESKTOP = (1280, 1200)

MODEL = {"stage": "general", "timeline": [], "allowed_countries": None, "export_suspended": False}
POLICY: dict[str, Any] = {
    **BASE_POLICY,
    "models": {
        "gpt-mock": MODEL,
        "frontier-x": {**MODEL, "stage": "general", "allowed_countries": ["US", "GB", "DE", "FR"]},
        "suspend-me": MODEL,
        "lift-me": {**MODEL, "export_suspended": True},
    },
}


def _browser_present() -> bool:
    return Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    if not _browser_present():
        if os.environ.get("CI") == "true":
            pytest.fail(
                "chromium and chromium-driver are needed for the console's browser tests (.ci/run installs them)"
            )
        pytest.skip("chromium or chromedriver is not installed (Debian packages chromium, chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # tests run as root here
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        "--lang=en-GB",
        f"--window-size={DESKTOP[0]},{DESKTOP[1]}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    browser.set_page_load_timeout(20)
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        seed_policy(server.url, POLICY)
        yield server


@pytest.fixture(scope="module")
def gateway(
    upstream: Upstream, redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """Writes apply at once here (no two-person rule)."""
    tokens = tokens_file(tmp_path_factory.mktemp("console-plain"))
    process = GatewayProcess(gateway_config(upstream.url, admin={"tokens_file": str(tokens)}), redis_url=redis.url)
    try:
        yield process.start()
    finally:
        process.stop()


@pytest.fixture(scope="module")
def guarded(
    upstream: Upstream, redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """The same policy, served by a gateway that holds loosening writes for a second admin."""
    tokens = tokens_file(tmp_path_factory.mktemp("console-guarded"))
    process = GatewayProcess(console_config(upstream.url, tokens), redis_url=redis.url)
    try:
        yield process.start()
    finally:
        process.stop()


@pytest.fixture(scope="module")
def upstream_models(upstream: Upstream) -> Upstream:
    upstream.model_ids = list(POLICY["models"])
    return upstream


# --- browser steps -------------------------------------------------------------------------------


def sign_in(driver: Any, gateway: GatewayProcess, token: str, actor: str) -> None:
    from selenium.webdriver.common.by import By

    driver.delete_all_cookies()
    driver.get(gateway.admin_url + "/console/signin")
    field = driver.find_element(By.ID, "token")
    field.send_keys(token)
    submit(driver, field.submit)
    wait_until_blocking(lambda: driver.current_url.endswith("/console/"), 10)
    assert driver.find_element(By.ID, "actor").text == actor


def click(driver: Any, css: str) -> None:
    """Click a button that submits its form, and wait until the answer's page has replaced this one."""
    from selenium.webdriver.common.by import By

    submit(driver, driver.find_element(By.CSS_SELECTOR, css).click)


def submit(driver: Any, action: Any) -> None:
    """Run ``action`` (a click or a submit) and wait until the page it was on is gone and the next loaded."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    page = driver.find_element(By.TAG_NAME, "html")
    action()

    def replaced() -> bool:
        try:
            page.is_enabled()  # any call on an element of a page that is gone fails
        except WebDriverException:  # stale, or the inspector's "does not belong to the document"
            return bool(driver.execute_script("return document.readyState") == "complete")
        return False

    wait_until_blocking(replaced, 10)


def notice(driver: Any) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.ID, "notice").text)


def chat(gateway: GatewayProcess, token: str, model: str) -> int:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
    request = urllib.request.Request(
        gateway.url + "/v1/chat/completions",
        data=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def shot(driver: Any, name: str) -> None:
    """With CONSOLE_SCREENSHOTS=1, the page as a PNG in docs/console/ (make test leaves the tree alone)."""
    if os.environ.get("CONSOLE_SCREENSHOTS") == "1":
        SHOTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(SHOTS / f"{name}.png"))


def csp_reports(driver: Any) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if "Content Security Policy" in entry["message"]]


# --- the acceptance list -------------------------------------------------------------------------


def test_sign_in_with_an_admin_token_shows_the_overview_as_that_actor(driver: Any, gateway: GatewayProcess) -> None:
    from selenium.webdriver.common.by import By

    driver.delete_all_cookies()
    driver.get(gateway.admin_url + "/console/models")
    assert "/console/signin" in driver.current_url  # no session: the sign-in page
    field = driver.find_element(By.ID, "token")
    field.send_keys("not-a-token")
    submit(driver, field.submit)
    assert "not accepted" in driver.find_element(By.ID, "signin-error").text
    sign_in(driver, gateway, ALICE_TOKEN, "alice")
    assert driver.find_element(By.TAG_NAME, "h1").text == "Overview"
    assert driver.find_element(By.ID, "stored-version").text.isdigit()


def test_suspend_a_model_and_a_caller_abroad_gets_451_on_the_public_listener(
    driver: Any, gateway: GatewayProcess, upstream_models: Upstream
) -> None:
    caller = hs_token("browser-abroad", country="DE", org="abroad-gmbh")
    assert chat(gateway, caller, "suspend-me") == 200
    sign_in(driver, gateway, ALICE_TOKEN, "alice")
    driver.get(gateway.admin_url + "/console/models/suspend-me")
    click(driver, "#suspend")
    assert "Done: policy version" in notice(driver)
    assert driver.find_element("id", "export-state").text == "suspended"
    wait_until_blocking(lambda: chat(gateway, caller, "suspend-me") == 451, 3)


def test_add_and_remove_a_deny_entry(driver: Any, gateway: GatewayProcess, upstream_models: Upstream) -> None:
    from selenium.webdriver.common.by import By

    caller = hs_token("browser-entity", country="US", org="shady-trading")
    assert chat(gateway, caller, "gpt-mock") == 200
    sign_in(driver, gateway, ALICE_TOKEN, "alice")
    driver.get(gateway.admin_url + "/console/lists/deny-entities")
    driver.find_element(By.ID, "add-key").send_keys("shady-trading")
    driver.find_element(By.ID, "add-reason").send_keys("Entity List addition")
    driver.find_element(By.ID, "add-source").send_keys("BIS")
    click(driver, "#add-submit")
    assert "Done: policy version" in notice(driver)
    row = driver.find_element(By.CSS_SELECTOR, 'tr[data-key="shady-trading"]')
    assert "Entity List addition" in row.text
    wait_until_blocking(lambda: chat(gateway, caller, "gpt-mock") == 451, 3)

    row.find_element(By.TAG_NAME, "summary").click()
    submit(driver, row.find_element(By.CSS_SELECTOR, 'button[value="remove"]').click)
    assert "Done: policy version" in notice(driver)
    assert not driver.find_elements(By.CSS_SELECTOR, 'tr[data-key="shady-trading"]')
    wait_until_blocking(lambda: chat(gateway, caller, "gpt-mock") == 200, 3)


def test_a_loosening_change_proposed_by_one_admin_is_applied_only_once_another_approves(
    driver: Any, guarded: GatewayProcess, upstream_models: Upstream
) -> None:
    from selenium.webdriver.common.by import By

    caller = hs_token("browser-lift", country="FR", org="lift-sa")
    assert chat(guarded, caller, "lift-me") == 451
    sign_in(driver, guarded, ALICE_TOKEN, "alice")
    driver.get(guarded.admin_url + "/console/models/lift-me")
    click(driver, "#lift")
    assert "Held for approval" in notice(driver)
    submit(driver, driver.find_element(By.CSS_SELECTOR, "#notice a").click)
    assert driver.find_element(By.ID, "cr-status").text == "pending"
    assert "alice" in driver.find_element(By.ID, "cr-proposer").text
    assert driver.find_element(By.ID, "impact-summary").text.startswith("Over the last")
    shot(driver, "change-request")
    request_url = driver.current_url
    assert chat(guarded, caller, "lift-me") == 451  # nothing changed yet

    click(driver, "#approve")  # the proposer cannot approve their own change
    assert "approval_self" in notice(driver) or "another admin" in notice(driver).lower()
    assert driver.find_element(By.ID, "cr-status").text == "pending"

    sign_in(driver, guarded, BOB_TOKEN, "bob")
    driver.get(request_url)
    click(driver, "#approve")
    assert "Approved and applied" in notice(driver)
    assert driver.find_element(By.ID, "cr-status").text == "applied"
    assert "bob" in driver.find_element(By.ID, "cr-approver").text
    wait_until_blocking(lambda: chat(guarded, caller, "lift-me") == 200, 3)
    driver.get(guarded.admin_url + "/console/changes")
    history = driver.find_element(By.ID, "changes").text
    assert "models/lift-me" in history and "proposed by alice" in history


def test_find_a_blocked_request_in_the_audit_page(driver: Any, gateway: GatewayProcess) -> None:
    from selenium.webdriver.common.by import By

    subject = "browser-audit-ir"
    assert chat(gateway, hs_token(subject, country="IR"), "gpt-mock") == 451
    sign_in(driver, gateway, ALICE_TOKEN, "alice")

    def found() -> bool:
        driver.get(gateway.admin_url + "/console/audit")
        driver.find_element(By.ID, "f-subject").send_keys(subject)
        driver.find_element(By.ID, "f-decision").send_keys("block")
        submit(driver, driver.find_element(By.ID, "f-subject").submit)
        return "country_denied" in driver.find_element(By.ID, "audit").text

    wait_until_blocking(found, 5)
    rows = driver.find_elements(By.CSS_SELECTOR, "#audit tbody tr.blocked")
    assert rows and all(subject in row.text for row in rows)
    assert f"subject={subject}" in driver.find_element(By.ID, "csv").get_attribute("href")


def test_sign_out_ends_the_session_and_its_cookie_is_refused(driver: Any, gateway: GatewayProcess) -> None:
    from selenium.webdriver.common.by import By

    sign_in(driver, gateway, BOB_TOKEN, "bob")
    old = driver.get_cookie("gw_console")
    assert old is not None and old["httpOnly"] and old["sameSite"] == "Strict"
    click(driver, ".signout button")
    assert "/console/signin" in driver.current_url
    driver.get(gateway.admin_url + "/console/keys")
    assert "/console/signin" in driver.current_url
    # The old cookie put back by hand names no session any more: Redis no longer holds it.
    driver.add_cookie({"name": "gw_console", "value": old["value"], "path": "/console"})
    driver.get(gateway.admin_url + "/console/keys")
    assert "/console/signin" in driver.current_url
    assert driver.find_elements(By.ID, "token")


# --- every page, at both widths ------------------------------------------------------------------

PAGES = {
    "overview": "/console/",
    "models": "/console/models",
    "model": "/console/models/frontier-x",
    "list-deny-countries": "/console/lists/deny-countries",
    "list-partners": "/console/lists/partners",
    "keys": "/console/keys",
    "screening": "/console/screening?name=" + quote("Example Trading"),
    "change-requests": "/console/change-requests?status=all",
    "changes": "/console/changes",
    "audit": "/console/audit",
    "decide": "/console/decide",
}

UNLABELLED = """
return Array.from(document.querySelectorAll('input:not([type=hidden]), select'))
  .filter(e => !e.getAttribute('aria-label') && !(e.id && document.querySelector('label[for="' + e.id + '"]')))
  .map(e => e.outerHTML);
"""
OVERFLOW = "return document.documentElement.scrollWidth - window.innerWidth;"


def test_every_page_has_labelled_fields_no_csp_report_and_fits_1280_px_and_a_phone(
    driver: Any, gateway: GatewayProcess
) -> None:
    from selenium.webdriver.common.by import By

    driver.get(gateway.admin_url + "/console/signin")
    shot(driver, "signin")
    sign_in(driver, gateway, ALICE_TOKEN, "alice")
    driver.get_log("browser")  # start from an empty log
    try:
        for width, height in (DESKTOP, PHONE):
            driver.set_window_size(width, height)
            for name, path in PAGES.items():
                driver.get(gateway.admin_url + path)
                assert driver.find_element(By.TAG_NAME, "h1").text, name
                assert driver.execute_script(UNLABELLED) == [], name
                assert driver.execute_script(OVERFLOW) <= 0, f"{name} scrolls sideways at {width} px"
                shot(driver, name if width == DESKTOP[0] else f"{name}-phone")
        assert csp_reports(driver) == []
    finally:
        driver.set_window_size(*DESKTOP)


def test_the_first_tab_reaches_the_skip_link_and_it_moves_focus_to_the_content(
    driver: Any, gateway: GatewayProcess
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    sign_in(driver, gateway, ALICE_TOKEN, "alice")
    driver.get(gateway.admin_url + "/console/models")
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
    active = driver.switch_to.active_element
    assert active.get_attribute("class") == "skip"
    active.send_keys(Keys.ENTER)
    assert driver.switch_to.active_element.get_attribute("id") == "main"
