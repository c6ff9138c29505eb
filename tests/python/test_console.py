"""The console in a real browser: Debian's chromium, headless, driven through chromedriver by
selenium, against the same `gateway demo` as the SDK tests (conftest.py).

Each person logs in by pasting their token; the operator sees the demo's rigs, creates and
revokes a key, uploads a plugin and rolls it back; a rig named like an HTML tag stays text;
the app developer sees their usage and streams a chat answer in the playground. No page may
run inline script or trip the Content-Security-Policy. Screenshots of each page go to
`$GARAGE_CONSOLE_SCREENSHOTS` when it is set (docs/console/ holds the committed ones).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import (
    NoAlertPresentException,
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select, WebDriverWait

from conftest import ADMIN_TOKEN, API_KEY, CHAT_MODELS, REPO_ROOT

HOSTILE_NAME = "<img src=x onerror=alert(1)>"
WAIT_S = 20
# A form post reloads the page: an element found just before the reload goes stale under the
# wait's condition, which is then asked again (as for one not there yet).
PAGE_CHANGES = (NoSuchElementException, StaleElementReferenceException)


def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not browser or not Path(driver).exists():
        pytest.fail(
            "chromium and chromedriver are needed (Debian: apt-get install chromium "
            "chromium-driver; scripts/test.sh installs them)"
        )
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    binary, driver_path = _chromium()
    options = Options()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1366,900", "--disable-gpu"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def _shot(driver, name: str) -> None:
    folder = os.environ.get("GARAGE_CONSOLE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / f"{name}.png"))


def _no_alert_and_no_csp_violation(driver) -> None:
    try:
        alert = driver.switch_to.alert
        text = alert.text
        alert.dismiss()
        pytest.fail(f"a script ran an alert: {text!r}")
    except NoAlertPresentException:
        pass
    # Script errors and policy violations; not the statuses of pages a test asked for on
    # purpose (a 403 for the wrong kind of account is the point).
    errors = [
        entry["message"]
        for entry in driver.get_log("browser")
        if "Content Security Policy" in entry["message"]
        or (entry["level"] == "SEVERE" and entry.get("source") != "network")
    ]
    assert not errors, errors


def _login(driver, base: str, token: str) -> None:
    driver.delete_all_cookies()
    driver.get(f"{base}/console")
    WebDriverWait(driver, WAIT_S, ignored_exceptions=PAGE_CHANGES).until(EC.presence_of_element_located((By.ID, "token")))
    _shot(driver, "login")
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    WebDriverWait(driver, WAIT_S, ignored_exceptions=PAGE_CHANGES).until(EC.presence_of_element_located((By.CSS_SELECTOR, "header.top")))


def _admin(base: str):
    return httpx.Client(base_url=base, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)


def test_the_operator_console(browser, gateway_url: str) -> None:
    base = gateway_url
    admin = _admin(base)
    # A rig whose owner named it like an HTML tag.
    token = admin.post("/admin/enrollment-tokens", json={"operator": "mallory"}).json()["token"]
    enrolled = httpx.post(f"{base}/node/v1/enroll", json={"token": token, "name": HOSTILE_NAME})
    assert enrolled.status_code == 200, enrolled.text

    # Some traffic for the overview to show.
    for _ in range(8):
        answered = httpx.post(
            f"{base}/v1/chat/completions",
            headers={"authorization": f"Bearer {API_KEY}"},
            json={"model": CHAT_MODELS[0], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
            timeout=30,
        )
        assert answered.status_code == 200, answered.text

    _login(browser, base, ADMIN_TOKEN)
    assert browser.find_element(By.TAG_NAME, "h1").text == "Overview"
    # The script fills the rates in from /console/live.
    WebDriverWait(browser, WAIT_S, ignored_exceptions=PAGE_CHANGES).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "[data-rate=requests]").text not in ("", "–")
    )
    _shot(browser, "overview")
    _no_alert_and_no_csp_violation(browser)

    browser.get(f"{base}/console/rigs")
    names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "table.rigs strong.name")]
    assert "sim-rig-1" in names and "sim-rig-2" in names, names
    assert HOSTILE_NAME in names, names
    assert not browser.find_elements(By.CSS_SELECTOR, "table.rigs img"), "markup from a rig's name"
    assert "NVIDIA GeForce RTX" in browser.find_element(By.CSS_SELECTOR, "table.rigs").text
    _shot(browser, "rigs")
    _no_alert_and_no_csp_violation(browser)

    browser.get(f"{base}/console/models")
    assert CHAT_MODELS[0] in browser.find_element(By.TAG_NAME, "table").text
    _shot(browser, "models")

    # A key, created with its secret shown once, then revoked.
    browser.get(f"{base}/console/keys")
    browser.find_element(By.ID, "name").send_keys("made-in-the-console")
    browser.find_element(By.CSS_SELECTOR, "form[action='/console/keys'] button").click()
    secret = WebDriverWait(browser, WAIT_S, ignored_exceptions=PAGE_CHANGES).until(
        EC.presence_of_element_located((By.CSS_SELECTOR, "[data-secret]"))
    ).text
    assert secret.startswith("sk-garage-"), secret
    assert httpx.get(f"{base}/v1/models", headers={"authorization": f"Bearer {secret}"}).status_code == 200
    _shot(browser, "keys")
    row = browser.find_element(By.XPATH, "//tr[td[contains(., 'made-in-the-console')]]")
    key_id = row.get_attribute("data-key")
    row.find_element(By.CSS_SELECTOR, "button.danger").click()
    WebDriverWait(browser, WAIT_S, ignored_exceptions=PAGE_CHANGES).until(
        lambda d: "revoked" in d.find_element(By.CSS_SELECTOR, f"tr[data-key='{key_id}']").text
    )
    assert admin.get(f"/admin/keys/{key_id}").json()["revoked_at"] is not None
    refused = httpx.get(f"{base}/v1/models", headers={"authorization": f"Bearer {secret}"})
    assert refused.status_code == 403, refused.text

    # A router uploaded, then rolled back (with the confirmation ticked).
    before = admin.get("/admin/plugins").json()["data"]
    router_before = next(s for s in before if s["slot"] == "router")["active"]
    browser.get(f"{base}/console/plugins")
    wasm = REPO_ROOT / "target" / "wasm-plugins" / "wasm32-wasip2" / "release" / "router_round_robin.wasm"
    assert wasm.exists(), f"{wasm} (cargo build builds it)"
    slot = browser.find_element(By.CSS_SELECTOR, "section[data-slot=router]")
    slot.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(wasm))
    slot.find_element(By.XPATH, ".//form[contains(@action, '/upload')]//button").click()
    # The form posts, then the browser lands on the plugins page again: a fresh section.
    WebDriverWait(browser, WAIT_S, ignored_exceptions=PAGE_CHANGES).until(EC.staleness_of(slot))
    router = lambda: next(s for s in admin.get("/admin/plugins").json()["data"] if s["slot"] == "router")
    assert router()["active"]["activated_by"] == "console", router()
    slot = browser.find_element(By.CSS_SELECTOR, "section[data-slot=router]")
    slot.find_element(By.CSS_SELECTOR, "input[name=confirm]").click()
    slot.find_element(By.XPATH, ".//form[contains(@action, '/rollback')]//button").click()
    WebDriverWait(browser, WAIT_S, ignored_exceptions=PAGE_CHANGES).until(EC.staleness_of(slot))
    assert router()["active"]["sha256"] == (router_before or {}).get("sha256"), router()
    _shot(browser, "plugins")

    browser.get(f"{base}/console/usage")
    assert "credits over" in browser.find_element(By.TAG_NAME, "main").text
    _shot(browser, "usage")
    browser.get(f"{base}/console/rewards")
    _shot(browser, "rewards")
    browser.get(f"{base}/console/batches")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Batches"
    browser.get(f"{base}/console/operators")
    assert "demo-operator" in browser.find_element(By.TAG_NAME, "table").text
    _shot(browser, "operators")
    _no_alert_and_no_csp_violation(browser)

    # Logged out, the pages send the browser back to the login.
    browser.find_element(By.CSS_SELECTOR, "form[action='/console/logout'] button").click()
    WebDriverWait(browser, WAIT_S, ignored_exceptions=PAGE_CHANGES).until(EC.presence_of_element_located((By.ID, "token")))
    browser.get(f"{base}/console/keys")
    assert browser.current_url.endswith("/console/login")


def test_the_rig_owner_console(browser, gateway_url: str) -> None:
    base = gateway_url
    admin = _admin(base)
    created = admin.post("/admin/operators", json={"name": "rig-owner"})
    assert created.status_code == 201, created.text
    token = admin.post("/admin/enrollment-tokens", json={"operator": "rig-owner"}).json()["token"]
    enrolled = httpx.post(f"{base}/node/v1/enroll", json={"token": token, "name": "owners-rig"})
    assert enrolled.status_code == 200, enrolled.text

    _login(browser, base, created.json()["token"])
    assert browser.current_url.endswith("/console/operator")
    names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "table.rigs strong.name")]
    assert names == ["owners-rig"], names
    assert browser.find_elements(By.CSS_SELECTOR, "svg.chart rect"), "no earnings chart"
    browser.find_element(By.CSS_SELECTOR, "form[action='/console/operator/enroll'] button").click()
    command = WebDriverWait(browser, WAIT_S, ignored_exceptions=PAGE_CHANGES).until(
        EC.presence_of_element_located((By.CSS_SELECTOR, "[data-secret]"))
    ).text
    assert command.startswith("node-runner run --gateway-url"), command
    _shot(browser, "rig-owner")
    browser.find_element(By.PARTIAL_LINK_TEXT, "Statement of owners-rig").click()
    WebDriverWait(browser, WAIT_S, ignored_exceptions=PAGE_CHANGES).until(EC.title_contains("Statement"))
    _no_alert_and_no_csp_violation(browser)


def test_the_app_developer_console(browser, gateway_url: str) -> None:
    base = gateway_url
    _login(browser, base, API_KEY)
    assert browser.current_url.endswith("/console/app")
    assert "spent" in browser.find_element(By.TAG_NAME, "main").text.lower()
    _shot(browser, "app-usage")
    # Not the operator's pages.
    browser.get(f"{base}/console/rigs")
    assert "another kind of account" in browser.find_element(By.TAG_NAME, "main").text

    browser.get(f"{base}/console/app/playground")
    browser.find_element(By.ID, "pg-key").send_keys(API_KEY)
    Select(browser.find_element(By.ID, "pg-model")).select_by_value(CHAT_MODELS[0])
    browser.find_element(By.CSS_SELECTOR, "#playground button").click()
    WebDriverWait(browser, WAIT_S, ignored_exceptions=PAGE_CHANGES).until(
        lambda d: d.find_element(By.ID, "pg-status").text.startswith("Done")
    )
    answer = browser.find_element(By.ID, "pg-answer").text
    assert len(answer.split()) >= 3, answer
    _shot(browser, "playground")
    _no_alert_and_no_csp_violation(browser)

    browser.get(f"{base}/console/app/batches")
    _shot(browser, "app-batches")


def test_console_requests_without_a_session_or_token_are_refused(gateway_url: str) -> None:
    base = gateway_url
    with httpx.Client(base_url=base, follow_redirects=False, timeout=30) as client:
        page = client.get("/console/keys")
        assert page.status_code == 303 and page.headers["location"] == "/console/login"
        assert "script-src 'self'" in page.headers["content-security-policy"]
        bad = client.post("/console/login", data={"token": "sk-garage-not-a-key"})
        assert bad.status_code == 401
        assert "set-cookie" not in bad.headers
        # Logged in: a form posted without the session's CSRF token does nothing.
        ok = client.post("/console/login", data={"token": ADMIN_TOKEN})
        assert ok.status_code == 303
        forged = client.post("/console/keys", data={"name": "forged"})
        assert forged.status_code == 403, forged.text
        cross_site = client.post(
            "/console/keys", data={"name": "forged"}, headers={"origin": "https://evil.example"}
        )
        assert cross_site.status_code == 403
        names = [k["name"] for k in _admin(base).get("/admin/keys").json()["data"]]
        assert "forged" not in names
        # The live numbers are the operator's only.
        assert client.get("/console/live").status_code == 200
        client.cookies.clear()
        assert client.get("/console/live").status_code == 303
