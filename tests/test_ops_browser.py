"""The ops page in a real browser (Debian's Chromium through chromedriver and selenium), against the real
daemon (`llama-supervisor run` in its own process) and the real llama-server.

A missing browser fails this test, never skips it: scripts/setup.sh installs chromium and chromium-driver.
Screenshots go to tmp/artifacts/ (or $OPS_ARTIFACTS).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from doubles.oom_llama_server import write_double

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("OPS_ARTIFACTS", ROOT / "tmp" / "artifacts"))
KEY = "sesame"
AUTH = {"Authorization": f"Bearer {KEY}"}
pytestmark = pytest.mark.timeout(240)


def _confirm(drv: Any, css: str) -> None:
    """Click a button that asks for confirmation, and accept the dialog. A card redrawn by the page's poll between
    the look-up and the click (or a click that lands under the sticky header) asks nothing: click it again, a few
    times at most, from the top of the page."""
    from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    for _ in range(5):
        drv.execute_script("window.scrollTo(0, 0)")
        with contextlib.suppress(StaleElementReferenceException):
            drv.find_element(By.CSS_SELECTOR, css).click()
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            try:
                drv.switch_to.alert.accept()
                return
            except NoAlertPresentException:
                time.sleep(0.05)
    raise AssertionError(f"no confirmation dialog after clicking {css}")


def _browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail("the browser test needs Debian's chromium and chromium-driver: run scripts/setup.sh as root "
                    f"(found chromium={chromium}, chromedriver={driver})")
    return chromium, driver


@contextlib.contextmanager
def _daemon(profile: Path, tmp: Path, **env_extra: str) -> Iterator[tuple[str, list[str]]]:
    """`llama-supervisor run` as its own process; yields its URL and its (JSON) log lines as they come."""
    env = {**os.environ, "LLAMA_SUPERVISOR_ADMIN_KEY": KEY, "LLAMA_SUPERVISOR_SAMPLE_INTERVAL_S": "1",
           "LLAMA_SUPERVISOR_BACKOFF_BASE_S": "0.05", "LLAMA_SUPERVISOR_CONFIG": str(tmp / "none.yaml"),
           **{f"LLAMA_SUPERVISOR_{k.upper()}": v for k, v in env_extra.items()}}
    (tmp / "none.yaml").write_text("{}\n")
    proc = subprocess.Popen([sys.executable, "-m", "supervisor", "run", "--profile", str(profile), "--port", "0",
                             "--state-dir", str(tmp / "state"), "--log-format", "json"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                            text=True, cwd=ROOT)
    lines: list[str] = []
    assert proc.stderr is not None
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        url = None
        deadline = time.monotonic() + 60
        while url is None:
            assert proc.poll() is None, f"the daemon exited: {lines[-20:]}"
            assert time.monotonic() < deadline, f"no 'listening' line: {lines[-20:]}"
            for ln in lines:
                with contextlib.suppress(ValueError):
                    rec = json.loads(ln)
                    if rec.get("event") == "listening":
                        url = rec["url"]
            time.sleep(0.05)
        yield url, lines
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def _chrome(tmp: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = _browser_paths()
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                f"--user-data-dir={tmp / 'chrome-profile'}", "--window-size=1400,1900", "--hide-scrollbars"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(options=opts, service=Service(driver_path))
    drv.set_page_load_timeout(30)
    try:
        yield drv
    finally:
        drv.quit()


def _until(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            last = check()
            if last:
                return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def _errors(drv: Any) -> list[str]:
    return [e["message"] for e in drv.get_log("browser") if e["level"] == "SEVERE"]


def _shot(drv: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    drv.save_screenshot(str(ARTIFACTS / name))


def test_ops_page_in_a_real_browser(tmp_path: Path, write_profile, llama_server: str) -> None:
    from selenium.webdriver.common.by import By

    # The first start runs out of GPU memory (the test double prints CUDA's lines and exits 1 for more than 2
    # layers; at 2 or fewer it execs the real llama-server), so the page has a ladder step to show.
    double = write_double(tmp_path / "llama-server", llama_server, limit=2, mode="load", record=tmp_path / "layers")
    profile = write_profile(binary=str(double), n_gpu_layers=4)
    with _daemon(profile, tmp_path) as (url, daemon_log), _chrome(tmp_path) as drv, \
            httpx.Client(base_url=url, timeout=30) as http:
        def status() -> dict[str, Any]:
            return http.get("/status", headers=AUTH).json()

        def text(css: str) -> str:
            return str(drv.find_element(By.CSS_SELECTOR, css).text)

        drv.get(url + "/ui")
        # The supervisor has an admin key: the page asks for it before it shows anything.
        _until("the key form", lambda: drv.find_element(By.ID, "key-form").is_displayed())
        drv.find_element(By.ID, "key-input").send_keys(KEY)
        drv.find_element(By.ID, "key-save").click()
        _until("state ready", lambda: text("#state-test") == "ready")
        drv.execute_script("window.__sameDocument = true")  # gone if the page reloads
        assert _errors(drv) == [], "console errors on load"

        # The ladder step: the adjusted setting is highlighted next to the profile's, with the reason in words,
        # and the timeline has the out-of-memory exit and the step.
        layers = drv.find_element(By.XPATH, '//tr[th[normalize-space()="GPU layers"]]')
        assert "adjusted" in (layers.get_attribute("class") or "") and layers.text.split()[2:4] == ["4", "2"]
        assert "after oom_load" in text('[data-model="test"] .adj-note')
        assert drv.find_element(By.CSS_SELECTOR, '#timeline li[data-kind="exit"][data-cause="oom_load"]')
        assert "n_gpu_layers: 4 → 2" in drv.find_element(By.CSS_SELECTOR, '#timeline li[data-kind="ladder"]') \
            .get_attribute("textContent")

        for _ in range(6):
            r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                        "max_tokens": 24, "ignore_eos": True})
            assert r.status_code == 200
        _until("points in the tokens/s chart",
               lambda: int(drv.find_element(By.ID, "chart-tokens").get_attribute("data-points") or 0) > 0)

        # A line llama-server printed, in the live log view.
        _until("a llama-server line in the log view", lambda: any(
            "llama-server" in el.text and "listening" in el.text
            for el in drv.find_elements(By.CSS_SELECTOR, "#logs .src-child")))

        # SIGKILL the child: the timeline shows the exit with its cause, the state comes back to ready.
        before = status()
        os.kill(before["child"]["pid"], signal.SIGKILL)
        after = _until("a new child", lambda: (s := status())["state"] == "ready" and s["child"]["pid"] !=
                       before["child"]["pid"] and s)
        cause = after["last_exit"]["cause"]
        exit_item = _until("the exit in the timeline", lambda: drv.find_element(
            By.CSS_SELECTOR, f'#timeline li[data-kind="exit"][data-cause="{cause}"]'))
        assert cause in exit_item.text and "SIGKILL" in exit_item.text
        exit_item.find_element(By.TAG_NAME, "summary").click()  # click: the detail opens
        assert exit_item.find_element(By.CLASS_NAME, "detail").is_displayed()
        _until("state ready again", lambda: text("#state-test") == "ready")
        _until("the card's last exit", lambda: cause in text('[data-model="test"] [data-role="last-exit"]'))
        assert drv.execute_script("return window.__sameDocument") is True, "the page was reloaded"
        for _ in range(4):  # a little more traffic, so the charts show the restart and the requests
            http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hello"}],
                                                    "max_tokens": 32, "ignore_eos": True})
        time.sleep(2.5)
        drv.set_window_size(1400, 2100)  # the whole page, logs included, for the README and docs/operations.md
        time.sleep(1.0)
        _shot(drv, "ops-page.png")
        drv.set_window_size(1400, 1900)
        assert _errors(drv) == [], "console errors while live"

        # Every control has an accessible name.
        unnamed = [f"{el.tag_name}#{el.get_attribute('id')}" for el in
                   drv.find_elements(By.CSS_SELECTOR, "button, select, input") if el.is_displayed() and
                   not (el.accessible_name or "").strip()]
        assert unnamed == [], "controls without an accessible name"

        # Logs: the level filter hides info lines; Pause holds new lines until Resume.
        level = drv.find_element(By.ID, "log-level")
        level.find_element(By.CSS_SELECTOR, 'option[value="error"]').click()
        info_line = drv.find_element(By.CSS_SELECTOR, "#logs .lv-info")
        assert not info_line.is_displayed()
        level.find_element(By.CSS_SELECTOR, 'option[value="info"]').click()
        assert info_line.is_displayed()
        pause = drv.find_element(By.ID, "log-pause")
        pause.click()
        assert pause.get_attribute("aria-pressed") == "true"
        shown = len(drv.find_elements(By.CSS_SELECTOR, "#logs .ln"))
        http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
        _until("lines held while paused", lambda: "held" in text("#log-state"))
        assert len(drv.find_elements(By.CSS_SELECTOR, "#logs .ln")) == shown
        pause.click()
        _until("held lines shown on resume", lambda: len(drv.find_elements(By.CSS_SELECTOR, "#logs .ln")) > shown)

        # Reload from the page: nothing changed in the profile, so nothing restarts; the timeline says so.
        # (Back to the top first: scrolled down to the logs, the card's buttons sit at the viewport's top edge,
        # under the sticky header, where a click lands on the header; a person would scroll up too.)
        drv.execute_script("window.scrollTo(0, 0)")
        _confirm(drv, '[data-model="test"] [data-act="reload"]')
        _until("the reload's toast", lambda: "Reload: nothing changed" in text("#toast"))
        _until("the reload in the timeline", lambda: drv.find_element(By.CSS_SELECTOR, '#timeline li[data-kind="reload"]'))

        # The dark scheme follows the system's.
        drv.execute_cdp_cmd("Emulation.setEmulatedMedia",
                            {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
        bg = drv.execute_script("return getComputedStyle(document.body).backgroundColor")
        assert bg == "rgb(15, 17, 21)", bg
        _shot(drv, "ops-page-dark.png")
        drv.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
        assert _errors(drv) == [], "console errors after the filters, pause, reload and scheme change"

        # Restart from the page, with the key.
        gen_before, pid_before = len(status()["transitions"]), status()["child"]["pid"]
        _confirm(drv, '[data-model="test"] [data-act="restart"]')
        _until("the toast", lambda: "Restart requested" in text("#toast"))
        _until("a restarted child", lambda: (s := status())["state"] == "ready" and s["child"]["pid"] != pid_before)
        assert len(status()["transitions"]) > gen_before
        assert any('"operator request"' in ln or "operator request" in ln for ln in daemon_log)

        # Without the key the same button is refused by the supervisor, and nothing restarts. Once the page's next
        # poll is refused too, the card no longer knows its child and disables the button: then the supervisor's
        # own refusal is checked without the page.
        drv.find_element(By.ID, "key-forget").click()
        pid_now, restarts_now = status()["child"]["pid"], status()["restarts"]
        restart = drv.find_element(By.CSS_SELECTOR, '[data-model="test"] [data-act="restart"]')
        if restart.is_enabled():
            drv.execute_script("window.scrollTo(0, 0)")
            restart.click()
        with contextlib.suppress(Exception):  # no dialog: the button was disabled by then
            drv.switch_to.alert.accept()
            _until("the refusal", lambda: "Refused (401)" in text("#toast"))
        assert http.post("/admin/restart").status_code == 401  # the same action without the key
        _shot(drv, "ops-page-refused.png")
        time.sleep(1.0)
        s = status()
        assert (s["child"]["pid"], s["restarts"]) == (pid_now, restarts_now)
        assert drv.find_element(By.ID, "key-form").is_displayed()
        unexpected = [e for e in _errors(drv) if "401" not in e]
        assert unexpected == [], "console errors other than the refused action"

        # Readable on a phone: the page lays out in one column without sideways scrolling.
        drv.set_window_size(390, 1600)
        time.sleep(0.5)
        wide = drv.execute_script(
            "return [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > "
            "window.innerWidth + 1).slice(0, 5).map(e => e.tagName + '.' + e.className + '#' + e.id)")
        assert drv.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1"), wide
        _shot(drv, "ops-page-phone.png")


def test_ops_page_with_several_models(tmp_path: Path, write_profile, llama_server: str) -> None:
    """profiles_dir with two models: both cards show (one loaded, one not), the page loads and unloads a model
    with its buttons, the timeline shows those swaps, and a restart from a card restarts that model only."""
    from selenium.webdriver.common.by import By

    profiles = tmp_path / "profiles"
    profiles.mkdir()
    for name in ("alpha", "beta"):
        write_profile(name).rename(profiles / f"{name}.yaml")
    with _daemon(profiles / "alpha.yaml", tmp_path, profiles_dir=str(profiles)) as (url, _), _chrome(tmp_path) as drv, \
            httpx.Client(base_url=url, timeout=30) as http:
        def models() -> dict[str, Any]:
            return dict(http.get("/status", headers=AUTH).json()["models"])

        def text(css: str) -> str:
            return str(drv.find_element(By.CSS_SELECTOR, css).text)

        def button(model: str, act: str) -> Any:
            return drv.find_element(By.CSS_SELECTOR, f'[data-model="{model}"] [data-act="{act}"]')

        def press(model: str, act: str) -> None:
            _confirm(drv, f'[data-model="{model}"] [data-act="{act}"]')

        drv.get(url + "/ui")
        _until("the key form", lambda: drv.find_element(By.ID, "key-form").is_displayed())
        drv.find_element(By.ID, "key-input").send_keys(KEY)
        drv.find_element(By.ID, "key-save").click()
        _until("alpha ready", lambda: text("#state-alpha") == "ready")
        # beta is listed though nothing runs it: its profile's settings, its estimate, a Load button.
        _until("beta's card", lambda: text("#state-beta") == "unloaded")
        assert "estimate" in text('[data-model="beta"] [data-role="body"]')
        assert button("beta", "load").is_enabled() and not button("beta", "unload").is_enabled()
        assert not button("beta", "restart").is_enabled() and not button("alpha", "load").is_enabled()
        assert _errors(drv) == [], "console errors on load"

        press("beta", "load")
        _until("the load's toast", lambda: "Load requested (beta)" in text("#toast"))
        _until("beta ready on its card", lambda: text("#state-beta") == "ready", timeout=60)
        assert models()["beta"]["state"] == "loaded"
        load = _until("the load in the timeline", lambda: drv.find_element(
            By.CSS_SELECTOR, '#timeline li[data-kind="swap"][data-action="load"][data-model="beta"]'))
        assert "load: admin" in load.text
        _until("beta's unload button", lambda: button("beta", "unload").is_enabled())

        # A restart from alpha's card restarts alpha, not beta (nor the default by accident).
        pids = {m: models()[m]["child"]["pid"] for m in ("alpha", "beta")}
        press("alpha", "restart")
        _until("alpha restarted", lambda: (m := models())["alpha"]["child"] and
               m["alpha"]["child"]["pid"] != pids["alpha"] and m["alpha"]["state"] == "loaded")
        assert models()["beta"]["child"]["pid"] == pids["beta"]

        press("beta", "unload")
        _until("the unload's toast", lambda: "Unload requested (beta)" in text("#toast"))
        _until("beta unloaded on its card", lambda: text("#state-beta") == "unloaded", timeout=60)
        assert "unloaded (admin)" in text('[data-model="beta"] .reason')
        for action in ("drain", "unload"):
            item = _until(f"the {action} in the timeline", lambda a=action: drv.find_element(
                By.CSS_SELECTOR, f'#timeline li[data-kind="swap"][data-action="{a}"][data-model="beta"]'))
            assert f"{action}: admin" in item.text
        assert models()["beta"]["state"] == "unloaded" and models()["beta"]["last_unload"]["reason"] == "admin"
        press("alpha", "reload")  # the folder is reloaded: nothing changed in it
        _until("the reload's toast", lambda: "Reload: nothing changed" in text("#toast"))
        time.sleep(1.5)
        _shot(drv, "ops-page-models.png")
        assert _errors(drv) == [], "console errors after load, restart and unload"


def test_activity_section_in_a_real_browser(tmp_path: Path, write_profile) -> None:
    """The Activity section: the table fills as requests come, filters, one request's detail (timing bar,
    what the supervisor did, its capture), the percentiles per model, and Replay with the admin key, the two
    records side by side."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, "ignore_eos": True}
    with _daemon(write_profile(), tmp_path, capture="all") as (url, _), _chrome(tmp_path) as drv, \
            httpx.Client(base_url=url, timeout=30) as http:
        def rows() -> list[Any]:
            return list(drv.find_elements(By.CSS_SELECTOR, "#act-rows tr[data-id]"))

        drv.get(url + "/ui")
        _until("the key form", lambda: drv.find_element(By.ID, "key-form").is_displayed())
        drv.find_element(By.ID, "key-input").send_keys(KEY)
        drv.find_element(By.ID, "key-save").click()
        _until("state ready", lambda: drv.find_element(By.ID, "state-test").text == "ready")
        assert http.post("/v1/chat/completions", json=chat).status_code == 200
        assert http.post("/v1/chat/completions", json={**chat, "stream": True}).status_code == 200
        assert http.post("/v1/chat/completions", json={"messages": "hi"}).status_code == 400
        # Live: the rows come without a reload, newest first, with their status and llama-server's numbers.
        _until("three rows", lambda: len(rows()) == 3)
        _until("the 400 first", lambda: (r := rows()[0]).find_elements(By.TAG_NAME, "td")[4].text == "400"
               and "messages" in r.text)
        _until("the stream's numbers", lambda: "stream" in (t := rows()[1].text) and "20 / 16" in t)
        assert "kept on disk" in drv.find_element(By.ID, "act-state").text
        _until("the percentiles over the three", lambda: drv.find_element(  # read every 10 s
            By.CSS_SELECTOR, '#act-stats tr[data-model="test"]').find_elements(By.TAG_NAME, "td")[0].text == "3")

        Select(drv.find_element(By.ID, "act-status")).select_by_value("error")
        _until("only the 400", lambda: len(rows()) == 1 and rows()[0].find_elements(By.TAG_NAME, "td")[4].text == "400")
        Select(drv.find_element(By.ID, "act-status")).select_by_value("2xx")
        _until("the two successes", lambda: len(rows()) == 2)
        Select(drv.find_element(By.ID, "act-slow")).select_by_value("30000")
        _until("nothing that slow", lambda: not rows() and "no requests" in drv.find_element(By.ID, "act-rows").text)
        Select(drv.find_element(By.ID, "act-slow")).select_by_value("")

        # One request: its timing bar (prompt and decode from llama-server's timings), its facts, its capture.
        rid = int(_until("a success row", lambda: rows()[-1].get_attribute("data-id")))
        _until("the row clicked", lambda: drv.find_element(By.CSS_SELECTOR, f'#act-rows tr[data-id="{rid}"]').click()
               or True)
        detail = _until("the detail", lambda: (d := drv.find_element(By.ID, "act-detail")).is_displayed() and d)
        assert f"Request {rid}" in detail.text
        assert detail.find_elements(By.CSS_SELECTOR, ".tbar .seg-prompt") and detail.find_elements(
            By.CSS_SELECTOR, ".tbar .seg-decode")
        assert "supervisor did" in detail.text and "16" in detail.text
        assert detail.find_element(By.CSS_SELECTOR, 'pre[data-role="text"]').get_attribute("textContent")

        # Replay, with the key: the new record links to the old, the two side by side.
        detail.find_element(By.CSS_SELECTOR, 'button[data-act="replay"]').click()
        _until("the replay's toast", lambda: f"Replayed {rid} as" in drv.find_element(By.ID, "toast").text)
        table = _until("the comparison", lambda: drv.find_element(By.ID, "act-compare-table"))
        assert f"request {rid}" in table.text and "replay" in table.text
        assert table.find_element(By.CSS_SELECTOR, 'td[data-key="completion_tokens"]').text == "16"
        new = int(table.find_elements(By.CSS_SELECTOR, "thead th")[2].text.split()[-1])
        assert http.get(f"/activity/{new}", headers=AUTH).json()["replay_of"] == rid
        _until("the replay in the table", lambda: any(f"replay of {rid}" in r.text for r in rows()))
        drv.execute_script("document.getElementById('h-activity').scrollIntoView()")
        time.sleep(0.3)
        _shot(drv, "ops-activity.png")
        assert _errors(drv) == [], "console errors in the Activity section"
        # Without the key the replay is refused by the supervisor (and the detail cannot even be read).
        assert http.post(f"/admin/activity/{rid}/replay").status_code == 401
        assert http.get(f"/activity/{rid}").status_code == 401
