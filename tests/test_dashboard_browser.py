"""The dashboard in a real headless Chromium (Debian's chromium and chromium-driver, driven by Selenium).

One browser for the module. Selenium's calls block, so every browser step runs in a thread
(``browse``) while the reactor serves the pages, the event stream and the simulated station; waits are
WebDriverWait conditions, never sleeps. Screenshots go to the test's tmp_path (and, with
CSMS_DASHBOARD_SCREENSHOTS=dir, there too: docs/dashboard-*.png were made that way).
"""
from __future__ import annotations

import os
import shutil
from datetime import timedelta

import pytest
import pytest_twisted
from conftest import clock_now, station_time
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait
from twisted.internet import threads

from csms.testing.pytest_plugin import TEST_API_TOKEN


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
WAIT = 20


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,900", "--disable-extensions"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def browse(function, *args):
    """Run a blocking browser step off the reactor thread."""
    return threads.deferToThread(function, *args)


class Page:
    """The browser, pointed at one CSMS, with the waits the tests use."""

    def __init__(self, driver, csms, shots):
        self.driver = driver
        self.base = f"http://127.0.0.1:{csms.api_port}"
        self.shots = shots

    def open(self, path: str):
        self.driver.get(self.base + path)

    def wait(self, condition):
        return WebDriverWait(self.driver, WAIT).until(condition)

    def css(self, selector: str):
        return self.wait(EC.presence_of_element_located((By.CSS_SELECTOR, selector)))

    def click(self, selector: str):
        self.wait(EC.element_to_be_clickable((By.CSS_SELECTOR, selector))).click()

    def text_in(self, selector: str, text: str):
        self.wait(EC.text_to_be_present_in_element((By.CSS_SELECTOR, selector), text))

    def attribute_is(self, selector: str, name: str, value: str):
        self.wait(lambda d: d.find_element(By.CSS_SELECTOR, selector).get_attribute(name) == value)

    def live(self):
        self.attribute_is("#live", "data-state", "live")

    def shot(self, name: str):
        self.driver.save_screenshot(str(self.shots / f"dashboard-{name}.png"))
        extra = os.environ.get("CSMS_DASHBOARD_SCREENSHOTS")
        if extra:
            self.driver.save_screenshot(os.path.join(extra, f"dashboard-{name}.png"))

    def element_shot(self, selector: str, name: str):
        section = self.css(selector).find_element(By.XPATH, "..")
        section.screenshot(str(self.shots / f"dashboard-{name}.png"))
        extra = os.environ.get("CSMS_DASHBOARD_SCREENSHOTS")
        if extra:
            section.screenshot(os.path.join(extra, f"dashboard-{name}.png"))

    def phone_shot(self, name: str):
        size = self.driver.get_window_size()
        self.driver.set_window_size(390, 844)
        try:
            self.shot(name)
            # Nothing wider than the phone's screen: the page scrolls down, not sideways.
            assert self.driver.execute_script(
                "return document.documentElement.scrollWidth <= document.documentElement.clientWidth")
        finally:
            self.driver.set_window_size(size["width"], size["height"])

    def sign_in(self, token: str = TEST_API_TOKEN):
        self.driver.delete_all_cookies()
        self.open("/ui/login")
        self.css("#token").send_keys(token)
        self.click("#sign-in")
        self.css("table#stations")


@pytest_twisted.ensureDeferred
async def test_an_operator_watches_a_station_commands_it_and_reads_a_session_chart(csms, browser, tmp_path):
    page = Page(browser, csms, tmp_path)
    for number in range(1, 4):
        assert (await csms.api("POST", "/stations", json={"id": f"CP-{number}"}))[0] == 201
    assert (await csms.api("POST", "/id-tags", json={"id_tag": "DRIVER-1"}))[0] == 201

    await browse(page.sign_in)
    await browse(page.live)
    # A station connects and boots: its row turns online and its connector appears, without a reload.
    station = await csms.connect("CP-2")
    await browse(page.attribute_is, 'tr[data-station="CP-2"] .badge', "data-online", "true")
    await station.boot(connectors=2)
    await browse(page.css, 'tr[data-station="CP-2"] [data-connector="2"][data-status="Available"]')
    await browse(page.text_in, 'tr[data-station="CP-2"] td.boot', "TestVendor TestModel")
    await browse(page.shot, "stations")
    # One this page does not list (it registers itself on connecting): a notice links to it.
    await csms.connect("CP-NEW")
    await browse(page.text_in, "#live-notice", "CP-NEW connected")

    # Its page: Reset, and the station's answer shown. (A charging profile first, for the schedule's chart.)
    assert (await csms.api("POST", "/stations/CP-2/charging-profiles", json={"connector_id": 1, "charging_profile": {
        "chargingProfileId": 3, "stackLevel": 0, "chargingProfilePurpose": "TxDefaultProfile",
        "chargingProfileKind": "Absolute", "chargingSchedule": {"chargingRateUnit": "A", "chargingSchedulePeriod": [
            {"startPeriod": 0, "limit": 32}, {"startPeriod": 6 * 3600, "limit": 16},
            {"startPeriod": 18 * 3600, "limit": 24}]}}}))[0] == 200
    await browse(page.open, "/ui/stations/CP-2")
    await browse(page.attribute_is, "#schedule-chart", "data-points", "4")
    await browse(page.live)
    await browse(page.text_in, "#connectors", "Available")
    await station.status(1, "Faulted", "GroundFailure")
    await browse(page.attribute_is, '#connectors tr[data-connector="1"]', "data-status", "Faulted")
    await browse(page.text_in, '#connectors tr[data-connector="1"] .error-code', "GroundFailure")
    await browse(page.click, "#cmd-reset")
    await browse(page.text_in, ".flash.ok", "Reset: answered")
    await browse(page.text_in, ".flash.ok .answer", '"status": "Accepted"')
    assert station.received_calls[-1][2:] == ["Reset", {"type": "Soft"}]
    await browse(page.shot, "station")
    await browse(page.phone_shot, "station-phone")
    await browse(page.element_shot, "#h-smart", "schedule")

    # Remote start for an id tag; the station starts, meters, and the session's chart grows live.
    await station.status(1, "Available")
    await browse(page.css("#start-id-tag").send_keys, "DRIVER-1")
    await browse(page.click, "#cmd-remote-start")
    await browse(page.text_in, ".flash.ok", "Remote start: answered")
    assert station.received_calls[-1][2:] == ["RemoteStartTransaction", {"idTag": "DRIVER-1"}]
    start = clock_now(csms)
    started = await station.call("StartTransaction", {"connectorId": 1, "idTag": "DRIVER-1", "meterStart": 1000,
                                                      "timestamp": station_time(start)})
    transaction_id = started["transactionId"]
    await browse(page.text_in, f'#station-transactions tr[data-transaction="{transaction_id}"] .stopped', "active")
    await browse(page.text_in, "#status-history li:first-child", "connector 1 · Available")
    await browse(page.open, f"/ui/transactions/{transaction_id}")
    await browse(page.live)
    await browse(page.attribute_is, "#energy-chart", "data-points", "0")
    for minute, (energy, power) in enumerate(((1500, 7200), (2100, 7400), (2600, 6800)), start=1):
        await station.call("MeterValues", {"connectorId": 1, "transactionId": transaction_id, "meterValue": [{
            "timestamp": station_time(start + timedelta(minutes=minute)), "sampledValue": [
                {"value": str(energy), "measurand": "Energy.Active.Import.Register", "unit": "Wh"},
                {"value": str(power / 1000), "measurand": "Power.Active.Import", "unit": "kW"}]}]})
        await browse(page.attribute_is, "#energy-chart", "data-points", str(minute))
        await browse(page.attribute_is, "#power-chart", "data-points", str(minute))
    label = await browse(lambda: page.css("#power-chart").get_attribute("aria-label"))
    assert label.endswith("3 readings, last 6800 W")
    await browse(page.shot, "transaction")
    # Updates the page missed (another node of a cluster had more to relay than it may send) are owned up to.
    csms.app.pm.get_plugin("dashboard").broker.publish("missed", {"node": "B", "events": 3})
    await browse(page.attribute_is, "#live", "data-state", "stale")
    await browse(page.text_in, "#live", "reload for missed updates")

    # Block the id tag; then sign out.
    await browse(page.open, "/ui/id-tags?search=driver")
    await browse(page.click, 'tr[data-id-tag="DRIVER-1"] button.block')
    await browse(page.text_in, 'tr[data-id-tag="DRIVER-1"] .status', "Blocked")
    assert (await csms.api("GET", "/id-tags/DRIVER-1"))[1]["status"] == "Blocked"
    await browse(page.shot, "id-tags")
    await browse(page.click, "#sign-out")
    await browse(page.css, "#token")
    await browse(page.open, "/ui/stations")
    await browse(page.css, "#token")  # signed out: the sign-in page again


@pytest_twisted.ensureDeferred
async def test_a_station_naming_itself_with_markup_is_shown_as_text(csms, browser, tmp_path):
    page = Page(browser, csms, tmp_path)
    station = await csms.connect("CP-X")
    await station.call("BootNotification", {"chargePointVendor": "<img src=x onerror=", "chargePointModel":
                                            "<script>pwn()</script>"[:20]})
    await browse(page.sign_in)
    await browse(page.text_in, 'tr[data-station="CP-X"] .vendor', "<img src=x onerror=")
    await browse(page.open, "/ui/stations/CP-X")
    await browse(page.text_in, "#boot .vendor", "<img src=x onerror=")
    # The keyboard reaches the skip link first, and it leads to the content.
    first = await browse(lambda: (browser.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB),
                                  browser.switch_to.active_element.text)[1])
    assert first == "Skip to content"
    images = await browse(lambda: browser.find_elements(By.CSS_SELECTOR, "main img"))
    scripts = await browse(lambda: [(s.get_attribute("src").split("?")[0], s.get_attribute("type"))
                                    for s in browser.find_elements(By.TAG_NAME, "script")])
    # The one script that runs is the dashboard's own; the rest is JSON data for the charts.
    assert images == [] and [src for src, kind in scripts if kind != "application/json"] == [
        page.base + "/ui/static/dashboard.js"]
