"""/docs and /redoc in a real browser: Debian's chromium, headless, driven by Selenium through
Debian's chromedriver (no browser download), against a real `usermgr serve`.

The pages must work with no internet: every request the browser makes is recorded (Chrome's
performance log) and none may leave 127.0.0.1. The Swagger page must list every route and
log in through its own OAuth2 password form, then call /users/me with the token.

Skipped when chromium or chromedriver is missing, except in CI (`.ci/run` installs both).
A screenshot of /docs is left in test-artifacts/docs.png (git-ignored) for a person to look at.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient

from tests.conftest import CONTRACT_ROUTES, HANG_TIMEOUT, PASSWORD, Runner, Served, create_user, serving
from usermgr import api

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
EMAIL = "swagger@example.com"

# The page must list every route of the running app's OpenAPI document (the expected list is
# read from it, so a new route is checked without an edit here), and that document must hold
# every route of the contract (conftest.CONTRACT_ROUTES).

pytestmark = [
    pytest.mark.browser,
    pytest.mark.e2e,
    pytest.mark.parametrize("backend", ["sqlite"], indirect=True),  # the page, not the database, is tested
]


def _require_browser() -> None:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if not missing:
        return
    reason = f"{' and '.join(missing)} not installed: apt-get install chromium chromium-driver (.ci/run does)"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless chromium with the flags that keep it off the network by itself (no
    background updates, sync or QUIC probes) and a performance log of every request."""
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="usermgr-chromium-")
    for flag in (
        "--headless=new",
        "--no-sandbox",  # as root (CI) chromium refuses to start with its sandbox
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,2400",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(HANG_TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def server(run: Runner, env: dict[str, str], tmp_path: Path) -> Iterator[Served]:
    create_user(run, EMAIL)
    with serving(env, tmp_path / "serve.log") as served:
        yield served


def _requested_urls(driver: Any) -> list[str]:
    """Every URL the page asked for since the last call (Network.requestWillBeSent), less
    those the browser itself refused to fetch because the page's Content-Security-Policy
    forbids them (Network.loadingFailed, blockedReason "csp"): those never leave it."""
    asked: dict[str, str] = {}
    refused: set[str] = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message["params"]
        if message["method"] == "Network.requestWillBeSent":
            asked[params["requestId"]] = params["request"]["url"]
        elif message["method"] == "Network.loadingFailed" and params.get("blockedReason") == "csp":
            refused.add(params["requestId"])
    return [url for request, url in asked.items() if request not in refused]


def _assert_only_this_host(urls: list[str], served: Served) -> None:
    """Every request that could reach a network (http, https, ws, wss) went to the server under
    test. Chromium's own pages (chrome://, its new-tab page at start) and data:/blob: URLs never do."""
    network = [url for url in urls if urlsplit(url).scheme in ("http", "https", "ws", "wss")]
    assert f"{served.base_url}{api.DOCS_ASSETS_PATH}/favicon.png" in network, (
        f"the log missed the page's requests: {urls}"
    )
    elsewhere = [url for url in network if (urlsplit(url).hostname, urlsplit(url).port) != ("127.0.0.1", served.port)]
    assert not elsewhere, f"requests to another host: {elsewhere}"


def _wait(driver: Any, condition: Any) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, HANG_TIMEOUT).until(condition)  # a hang guard, not a budget


def _rendered_operations(driver: Any) -> set[tuple[str, str]]:
    script = """
        return Array.from(document.querySelectorAll('.opblock')).map(block => [
            block.querySelector('.opblock-summary-method').textContent.trim().toUpperCase(),
            block.querySelector('.opblock-summary-path').getAttribute('data-path'),
        ]);
    """
    return {(method, path) for method, path in driver.execute_script(script)}


@pytest.mark.parametrize("page", ["/docs", "/redoc", "/docs/oauth2-redirect"])
def test_the_doc_pages_name_no_other_host_and_forbid_the_browser_one(client: TestClient, page: str) -> None:
    """Without a browser: every URL in the page's HTML is a path on this host, the files it
    names are served, and its Content-Security-Policy allows only this host (and no other
    answer of the API carries that policy)."""
    response = client.get(page)
    assert response.status_code == 200
    html = response.text
    assert not re.findall(r"\b[a-z][a-z0-9+.-]*://", html.replace("window.location.origin", "")), html
    for url in re.findall(r'(?:src|href)="([^"]+)"', html):
        assert url.startswith(f"{api.DOCS_ASSETS_PATH}/"), url
        assert client.get(url).status_code == 200, url
    policy = dict(part.strip().split(" ", 1) for part in response.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'"
    for directive, sources in policy.items():
        assert all(source.startswith("'") or source in ("data:", "blob:") for source in sources.split()), directive
    assert "content-security-policy" not in client.get("/healthz").headers


def test_docs_lists_every_route_and_logs_in_through_its_oauth2_form(browser: Any, server: Served) -> None:
    from selenium.webdriver.common.by import By

    documented = {
        (method.upper(), path)
        for path, operations in server.client().get("/openapi.json").json()["paths"].items()
        for method in operations
    }
    missing_from_contract = CONTRACT_ROUTES - documented
    assert not missing_from_contract, f"contract routes the app lacks: {missing_from_contract}"

    line = f"usermgr: serving on {server.base_url} (docs: {server.base_url}/docs)\n"
    assert server.log.read_text().startswith(line), "serve says where the docs are"
    browser.get(f"{server.base_url}/docs")
    _wait(browser, lambda driver: len(_rendered_operations(driver)) >= len(documented))
    assert _rendered_operations(browser) == documented
    authorize = browser.find_element(By.CSS_SELECTOR, ".auth-wrapper .btn.authorize")
    assert authorize.text.strip() == "Authorize"

    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "docs.png"))

    # The Authorize dialog's OAuth2 password flow: username is the email.
    authorize.click()
    _wait(browser, lambda driver: driver.find_elements(By.ID, "oauth_username"))
    browser.find_element(By.ID, "oauth_username").send_keys(EMAIL)
    browser.find_element(By.ID, "oauth_password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, ".auth-btn-wrapper .btn.modal-btn.authorize").click()
    # Authorized: the dialog says so, and its button turns into Logout (an error would stay put).
    _wait(browser, lambda driver: driver.find_elements(By.XPATH, "//div[@class='modal-ux']//h6[.='Authorized']"))
    button = browser.find_element(By.CSS_SELECTOR, ".auth-btn-wrapper .btn.modal-btn.authorize")
    assert button.text.strip() == "Logout"
    browser.find_element(By.CSS_SELECTOR, ".auth-btn-wrapper .btn-done").click()

    # GET /users/me through "Try it out", with the token the dialog got.
    me = browser.find_element(By.CSS_SELECTOR, '.opblock-get .opblock-summary-path[data-path="/users/me"]')
    me.click()
    block = me.find_element(By.XPATH, "./ancestor::div[contains(concat(' ', @class, ' '), ' opblock ')][1]")
    _wait(browser, lambda _driver: block.find_elements(By.CSS_SELECTOR, ".try-out__btn"))
    block.find_element(By.CSS_SELECTOR, ".try-out__btn").click()
    _wait(browser, lambda _driver: block.find_elements(By.CSS_SELECTOR, ".btn.execute"))
    block.find_element(By.CSS_SELECTOR, ".btn.execute").click()
    answer = ".live-responses-table tr.response"
    status = _wait(browser, lambda _driver: block.find_elements(By.CSS_SELECTOR, f"{answer} .response-col_status"))
    assert status[0].text.strip().startswith("200"), status[0].text
    body = block.find_element(By.CSS_SELECTOR, f"{answer} .response-col_description pre").text
    assert json.loads(body)["email"] == EMAIL
    assert browser.save_screenshot(str(ARTIFACTS / "docs-users-me.png"))

    _assert_only_this_host(_requested_urls(browser), server)


def test_redoc_renders_every_route_with_no_request_elsewhere(browser: Any, server: Served) -> None:
    from selenium.webdriver.common.by import By

    operations = server.client().get("/openapi.json").json()["paths"]
    operation_ids = {operation["operationId"] for methods in operations.values() for operation in methods.values()}
    browser.get(f"{server.base_url}/redoc")
    _wait(
        browser,
        lambda driver: (
            len(driver.find_elements(By.CSS_SELECTOR, '[data-section-id^="operation/"]')) >= len(operation_ids)
        ),
    )
    rendered = {
        element.get_attribute("data-section-id").removeprefix("operation/")
        for element in browser.find_elements(By.CSS_SELECTOR, '[data-section-id^="operation/"]')
    }
    assert rendered == operation_ids
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "redoc.png"))
    _assert_only_this_host(_requested_urls(browser), server)
