"""The console in a real browser: Debian's chromium, headless, driven by
Selenium through Debian's chromedriver, against the real ``triogate serve``.

Sign in (a bad key first), create a key and read it once, rotate it, revoke
it, find both in the audit log; a key_viewer sees no write buttons and its
forged writes are refused; no page breaks the Content-Security-Policy; the
admin keys never appear in a URL the browser visited, in the access log or
in the server's output.

Screenshots of the main pages are taken every run (into tmp_path); with
``TRIOGATE_CONSOLE_SCREENSHOTS=DIR`` they are also written to DIR (how
docs/console/*.png are made: see docs/console.md).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers_process import ServeProcess, serving, threaded_upstream

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_SECONDS = 15


def _require_browser() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} missing: install Debian's chromium and chromium-driver "
            "(sh tests/system/install.sh)"
        )
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.fail("selenium is missing: pip install -e '.[test]'")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    # Every request the browser makes (performance log) and its console.
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    # An explicit driver path: Selenium Manager never downloads anything.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT_SECONDS)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[ServeProcess, Path]]:
    access_log = tmp_path / "access.log"
    with threaded_upstream() as upstream:
        config = tmp_path / "triogate.toml"
        config.write_text(
            f"""
[server]
admin_listen = "127.0.0.1:0"
proxy_listen = "127.0.0.1:0"
data_dir = "{tmp_path / "data"}"
shutdown_grace_seconds = 5

[log]
access_log = "{access_log}"

[storage]
flush_interval_seconds = 0.1

[upstreams.orders]
targets = ["{upstream}"]

[[routes]]
name = "orders"
path = "/orders/{{rest:path}}"
upstream = "orders"

[routes.plugins]
key-auth = {{}}
"""
        )
        with serving(config) as sp:
            yield sp, access_log
            sp.stop()


class Console:
    """The browser on the console, with bounded waits."""

    def __init__(self, driver: Any, url: str, shots: list[Path], shot_dir: Path) -> None:
        self.driver = driver
        self.url = url
        self.shots = shots
        self.shot_dir = shot_dir
        self.visited: list[str] = []

    def go(self, path: str) -> None:
        self.driver.get(self.url + path)
        self.visited.append(self.driver.current_url)

    def find(self, css: str) -> Any:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, WAIT_SECONDS).until(
            ec.presence_of_element_located((By.CSS_SELECTOR, css))
        )

    def absent(self, css: str) -> bool:
        from selenium.webdriver.common.by import By

        return not self.driver.find_elements(By.CSS_SELECTOR, css)

    def submit(self, button_css: str) -> None:
        """Click a submit button and wait for the next page to have loaded."""
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.support import expected_conditions as ec
        from selenium.webdriver.support.ui import WebDriverWait

        # A mark on this page's window: the next page's window has none.
        self.driver.execute_script("window.__tgOldPage = true;")
        self.find(button_css).click()
        if button_css == "#revoke":  # it asks first (data-confirm)
            WebDriverWait(self.driver, WAIT_SECONDS).until(ec.alert_is_present())
            self.driver.switch_to.alert.accept()
        # Mid-navigation the driver may answer with errors: retried, bounded.
        WebDriverWait(self.driver, WAIT_SECONDS, ignored_exceptions=(WebDriverException,)).until(
            lambda d: d.execute_script(
                "return !window.__tgOldPage && document.readyState === 'complete';"
            )
        )
        self.visited.append(self.driver.current_url)

    def shot(self, name: str) -> None:
        path = self.shot_dir / f"{name}.png"
        assert self.driver.save_screenshot(str(path)), name
        self.shots.append(path)

    def fetch(self, path: str, form: dict[str, str]) -> tuple[int, str]:
        """POST a form from the page's own origin, as a forged request would."""
        result = self.driver.execute_async_script(
            """
            const [path, form, done] = arguments;
            fetch(path, {method: "POST", body: new URLSearchParams(form),
                         credentials: "same-origin", redirect: "manual"})
              .then(async r => done([r.status, await r.text()]),
                    e => done([0, String(e)]));
            """,
            path,
            form,
        )
        return int(result[0]), str(result[1])

    def requested_urls(self) -> list[str]:
        urls = []
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message.get("method") == "Network.requestWillBeSent":
                urls.append(message["params"]["request"]["url"])
        return urls

    def console_errors(self) -> list[str]:
        return [e["message"] for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]


def test_the_console_in_a_browser(
    browser: Any, gateway: tuple[ServeProcess, Path], tmp_path: Path
) -> None:
    sp, access_log = gateway
    admin = httpx.Client(base_url=sp.url, timeout=10)
    root_key = admin.post("/setup", json={"name": "root", "email": "root@example.com"}).json()[
        "key"
    ]
    root = {"Authorization": f"Bearer {root_key}"}
    r = admin.post(
        "/admins",
        json={"name": "viewer", "email": "v@example.com", "role": "key_viewer"},
        headers=root,
    )
    viewer_key = r.json()["key"]
    shot_dir = tmp_path / "shots"
    shot_dir.mkdir()
    shots: list[Path] = []
    ui = Console(browser, sp.url, shots, shot_dir)

    # Not signed in: the sign-in page. A bad key: an error, and no session.
    ui.go("/ui/keys")
    assert browser.current_url == sp.url + "/ui/login"
    wrong = root_key[:-3] + ("AAA" if not root_key.endswith("AAA") else "BBB")
    ui.find("#admin-key").send_keys(wrong)
    ui.submit("#sign-in")
    assert "admin key" in ui.find("#login-error").text  # unknown or malformed
    # No session; only the sign-in form's own token cookie (login CSRF).
    assert [c["name"] for c in browser.get_cookies()] == ["tg_console_login"]

    ui.find("#admin-key").send_keys(root_key)
    ui.submit("#sign-in")
    assert browser.current_url == sp.url + "/ui/keys"
    (cookie,) = browser.get_cookies()
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/ui" and root_key not in cookie["value"]

    # Create a key: shown once, with a copy button.
    ui.find("#create-key-card summary").click()
    ui.find("#new-name").send_keys("checkout")
    ui.find("#new-owner").send_keys("acme")
    ui.find("#new-limits").send_keys("minute 8 60")
    ui.find("#new-credits").send_keys("5000")
    ui.submit("#create")
    plaintext = ui.find("#new-key").text
    assert plaintext.startswith("tg_")
    key_url = browser.current_url
    key_id = key_url.rsplit("/", 1)[1]
    ui.find("#copy-key").click()
    assert ui.find("#copy-key").text == "Copied"

    # Some traffic for the chart; then the page again: the key is not shown.
    with httpx.Client(base_url=sp.proxy_url, timeout=10) as proxy:
        statuses = [
            proxy.get("/orders/1", headers={"Authorization": f"Bearer {plaintext}"}).status_code
            for _ in range(12)
        ]
    assert statuses == [200] * 8 + [429] * 4
    wait_for_history(admin, key_id, root, total=12)
    ui.go(f"/ui/keys/{key_id}?granularity=minute")
    assert ui.absent("#new-key") and plaintext not in browser.page_source
    chart = ui.find("#usage-chart[data-ready='1']")
    assert chart.get_attribute("data-points") != "0"
    assert chart.find_elements("css selector", "canvas")
    assert ui.find("#usage-credits").text == "4992"  # 5000, less the 8 let through
    browser.set_window_size(1280, 1400)
    ui.shot("key")
    browser.set_window_size(1280, 1000)
    ui.go("/ui/keys")
    ui.shot("keys")

    # Rotate, then revoke the new key.
    ui.go(f"/ui/keys/{key_id}")
    ui.submit("#rotate")
    rotated = ui.find("#new-key").text
    assert rotated.startswith("tg_") and rotated != plaintext
    new_id = browser.current_url.rsplit("/", 1)[1]
    assert new_id != key_id
    ui.submit("#revoke")
    assert "revoked" in ui.find("#flash").text
    assert ui.absent("#rotate") and ui.absent("#revoke")

    ui.go("/ui/audit")
    actions = [
        row.get_attribute("data-action")
        for row in browser.find_elements("css selector", "tr.audit-entry")
    ]
    assert actions[:3] == ["key.revoke", "key.rotate", "key.create"]
    ui.shot("audit")
    ui.find("#action-filter").send_keys("key.rotate")
    ui.submit("#filter")
    actions = [
        row.get_attribute("data-action")
        for row in browser.find_elements("css selector", "tr.audit-entry")
    ]
    assert actions == ["key.rotate"]
    for page in ("/ui/routes", "/ui/upstreams", "/ui/admins", "/ui/config"):
        ui.go(page)
        assert ui.absent("#page-error"), page
    ui.submit("#sign-out")
    assert browser.current_url == sp.url + "/ui/login"

    # A key_viewer: no write buttons; forged writes refused.
    ui.find("#admin-key").send_keys(viewer_key)
    ui.submit("#sign-in")
    assert ui.absent("#create-key")
    ui.go(f"/ui/keys/{key_id}")
    for button in ("#rotate", "#revoke", "#save", "#credits"):
        assert ui.absent(button), button
    token = ui.find("input[name=csrf]").get_attribute("value")
    for form in ({"name": "x", "owner": "y"}, {"name": "x", "owner": "y", "csrf": token}):
        status, body = ui.fetch("/ui/keys", form)
        assert status == 403, body
        assert json.loads(body)["code"] == "FORBIDDEN"
    status, body = ui.fetch(f"/ui/keys/{key_id}/revoke", {"csrf": token})
    assert status == 403, body
    ui.go("/ui/audit")
    assert "admin:audit:read" in ui.find("#page-error").text or "FORBIDDEN" in browser.page_source

    # What the browser saw and what the server wrote never hold an admin key.
    ui.visited += ui.requested_urls()
    assert len(ui.visited) > 20
    for url in ui.visited:
        assert root_key not in url and viewer_key not in url, url
    assert not [e for e in ui.console_errors() if "Content Security Policy" in e]
    sp.stop()
    written = access_log.read_text()
    assert "/orders/1" in written  # the proxy's lines at least: the check below sees a log
    output = "\n".join(sp.stdout_lines) + sp.stderr()
    for text in (written, output):
        assert root_key not in text and viewer_key not in text
    assert all(p.stat().st_size > 10_000 for p in shots)
    target = os.environ.get("TRIOGATE_CONSOLE_SCREENSHOTS")
    if target:
        for path in shots:
            shutil.copy(path, Path(target) / path.name)


def wait_for_history(
    admin: httpx.Client, key_id: str, headers: dict[str, str], *, total: int
) -> None:
    """Usage is flushed every 0.1 s here: wait (bounded) until the key's
    usage history counts ``total`` requests."""
    deadline = time.monotonic() + WAIT_SECONDS
    counted = -1
    while time.monotonic() < deadline:
        history = admin.get(
            f"/keys/{key_id}/usage/history", params={"granularity": "minute"}, headers=headers
        ).json()
        counted = sum(item["total"] for item in history["items"])
        if counted >= total:
            return
        time.sleep(0.1)
    raise AssertionError(f"the key's usage history counted {counted} of {total} requests")
