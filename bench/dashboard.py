"""The dashboard's station list with 10,000 stations: server time per page, and the browser's time to show it.

    .venv/bin/python bench/dashboard.py                      # SQLite in a temporary directory
    .venv/bin/python bench/dashboard.py --stations 10000 --postgres postgresql+psycopg://...   # an empty database

It writes 10,000 stations (each with boot information and two connectors, one in twenty Faulted) straight
into a fresh database, starts ``twistd -n csms`` on it (loopback ports), signs in to /ui/ with a configured
token, and times each list view ``--repeat`` times: the first page, a page deep in the list, a search by id,
and the connector filters (server time: request sent to last byte received, over loopback). Then, when
Debian's chromium and chromedriver are installed, headless Chromium loads the first page and reports the
navigation timing (response end, DOMContentLoaded, load). Prints a Markdown table for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from http.cookiejar import CookieJar
from urllib.parse import urlencode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "bench-dashboard-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill(url: str, count: int) -> None:
    """``count`` stations with boot information and two connectors each, written in bulk."""
    sys.path.insert(0, ROOT)
    from sqlalchemy import create_engine, insert

    from csms.stations import stations
    from csms_plugins.core.tables import boot_info, connectors

    # The schema as the CSMS's own migrations make it (the server then finds it current).
    admin = os.path.join(ROOT, ".venv", "bin", "csms-admin")
    subprocess.run([admin, "--database", url, "--create", "db", "upgrade"], check=True, capture_output=True)
    engine = create_engine(url)
    now = datetime.now(timezone.utc)
    with engine.begin() as conn:
        ids = [f"CP-{n:05d}" for n in range(count)]
        conn.execute(insert(stations), [{"id": i, "registration_status": "Accepted", "created_at": now,
                                         "updated_at": now, "last_seen_at": now} for i in ids])
        conn.execute(insert(boot_info), [{"station_id": i, "charge_point_vendor": "Bench", "charge_point_model":
                                          "BM-22", "firmware_version": "1.0", "last_boot_at": now} for i in ids])
        conn.execute(insert(connectors), [
            {"station_id": i, "connector_id": c, "status": "Faulted" if (n % 20 == 0 and c == 1) else "Available",
             "error_code": "GroundFailure" if (n % 20 == 0 and c == 1) else "NoError", "status_timestamp": now,
             "updated_at": now} for n, i in enumerate(ids) for c in (0, 1, 2)])
    engine.dispose()


def start(workdir: str, url: str, api_port: int, ocpp_port: int) -> subprocess.Popen:
    config = os.path.join(workdir, "csms.ini")
    with open(config, "w") as f:
        f.write(f"[csms]\n[ocpp]\nendpoint = tcp:{ocpp_port}:interface=127.0.0.1\n"
                f"[database]\nurl = {url}\nauto_upgrade = true\n"
                f"[api]\nendpoint = tcp:{api_port}:interface=127.0.0.1\ntokens = {TOKEN}\n"
                "[plugins]\nenabled = core, remotetrigger, dashboard\n")
    command = [os.path.join(ROOT, ".venv", "bin", "twistd"), "-n", "--pidfile=", "csms", "--config", config]
    server = subprocess.Popen(command, cwd=workdir, stdout=open(os.path.join(workdir, "csms.log"), "w"),
                              stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{api_port}/ui/login", timeout=2).read()
            return server
        except OSError:
            if server.poll() is not None:
                sys.exit(f"the CSMS did not start: see {workdir}/csms.log")
            time.sleep(0.2)
    sys.exit("the CSMS did not answer within 60 s")


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def sign_in(base: str):
    jar = CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar), NoRedirect)
    page = opener.open(base + "/ui/login").read().decode()
    login_token = re.search(r'name="login_token" value="([^"]+)"', page).group(1)
    try:
        opener.open(base + "/ui/login", data=urlencode({"login_token": login_token, "token": TOKEN}).encode())
    except urllib.request.HTTPError as exc:
        if exc.code != 303:
            raise
    return opener, jar


def time_views(opener, base: str, repeat: int, count: int) -> list[tuple[str, float, float, int]]:
    pages = max(1, count // 50)
    deep, middle = max(1, pages * 3 // 4), f"CP-{count // 2:05d}"[:-1]  # 10 stations share that prefix
    views = [("first page", "/ui/stations"), (f"page {deep}", f"/ui/stations?page={deep}"),
             ("search by id", f"/ui/stations?search={middle}"), ("connector status Faulted",
                                                                 "/ui/stations?connector_status=Faulted"),
             (f"offline, page {max(1, pages // 10)}", f"/ui/stations?online=false&page={max(1, pages // 10)}")]
    rows = []
    for name, path in views:
        timings, size = [], 0
        for _ in range(repeat):
            started = time.perf_counter()
            body = opener.open(base + path).read()
            timings.append((time.perf_counter() - started) * 1000)
            size = len(body)
            assert b'data-station="' in body, (path, body[:300])
        rows.append((name, statistics.median(timings), max(timings), size))
    return rows


def browser_timing(base: str, jar) -> dict | None:
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        return None
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    try:
        driver.get(base + "/ui/login")
        for cookie in jar:
            driver.add_cookie({"name": cookie.name, "value": cookie.value, "path": "/ui/"})
        results = []
        for _ in range(5):
            driver.get(base + "/ui/stations")
            timing = driver.execute_script(
                "const n = performance.getEntriesByType('navigation')[0];"
                "return [n.responseEnd, n.domContentLoadedEventEnd, n.loadEventEnd];")
            results.append(timing)
        return {name: statistics.median(r[i] for r in results)
                for i, name in enumerate(("response end", "DOMContentLoaded", "load"))}
    finally:
        driver.quit()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stations", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--postgres", help="an empty PostgreSQL database URL (default: SQLite in a temp dir)")
    parser.add_argument("--no-browser", action="store_true", help="server times only")
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="csms-dashboard-bench-")
    url = args.postgres or f"sqlite:///{workdir}/csms.sqlite"
    fill(url, args.stations)
    api_port = free_port()
    server = start(workdir, url, api_port, free_port())
    try:
        base = f"http://127.0.0.1:{api_port}"
        opener, jar = sign_in(base)
        rows = time_views(opener, base, args.repeat, args.stations)
        browser = None if args.no_browser else browser_timing(base, jar)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    backend = "PostgreSQL" if args.postgres else "SQLite"
    print(f"Station list, {args.stations:,} stations ({backend}), {args.repeat} requests each, loopback:\n")
    print("| View | median ms | max ms | HTML bytes |\n|---|---:|---:|---:|")
    for name, median, worst, size in rows:
        print(f"| {name} | {median:.1f} | {worst:.1f} | {size:,} |")
    if browser:
        print("\nHeadless Chromium, first page, median of 5 loads (ms from navigation start): "
              + ", ".join(f"{k} {v:.0f}" for k, v in browser.items()))
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
