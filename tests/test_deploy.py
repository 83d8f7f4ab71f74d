"""The deployment files (Dockerfile, .dockerignore, docker-compose.yml, etc/prometheus.yml, Grafana
provisioning, etc/csms.service), checked without a container engine (docs/deploy.md says how).

Whatever refers to a file of the checkout must find it; the image's entry point turns the
environment into the options it promises; the systemd unit passes ``systemd-analyze verify`` where
systemd is installed, and its stop timeout leaves room for the shutdown grace everywhere.
"""
from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys

import yaml

from csms.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments left out."""
    text = re.sub(r"\\\n\s*", " ", read("Dockerfile"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, arguments = line.partition(" ")
            out.append((instruction.upper(), arguments.strip()))
    return out


def shipped_grace() -> float:
    return load_config(os.path.join(ROOT, "etc", "csms.ini")).shutdown_grace


# -- Dockerfile ---------------------------------------------------------------------------------------


def test_dockerfile_copies_only_paths_that_exist_and_the_dockerignore_keeps():
    ignored = [line.strip() for line in read(".dockerignore").splitlines()
               if line.strip() and not line.startswith("#")]
    copies = [args for instruction, args in dockerfile_instructions()
              if instruction == "COPY" and not args.startswith("--from")]
    assert copies
    for args in copies:
        sources = [word for word in args.split() if not word.startswith("--")][:-1]
        for source in sources:
            assert os.path.exists(os.path.join(ROOT, source)), source
            assert source.split("/")[0] not in ignored, f"{source} is left out of the build context"


def test_dockerfile_runs_unprivileged_with_a_health_check_and_exposes_the_listeners():
    instructions = dockerfile_instructions()
    names = [instruction for instruction, _ in instructions]
    assert names.count("FROM") == 2 and all(args.startswith("python:3.11-slim")
                                            for instruction, args in instructions if instruction == "FROM")
    user = [args for instruction, args in instructions if instruction == "USER"]
    assert user == ["csms"] and names.index("USER") < names.index("ENTRYPOINT")
    (healthcheck,) = [args for instruction, args in instructions if instruction == "HEALTHCHECK"]
    assert "/healthz" in healthcheck
    (exposed,) = [args.split() for instruction, args in instructions if instruction == "EXPOSE"]
    config = load_config(os.path.join(ROOT, "etc", "csms.ini"))
    ports = {config.ocpp.endpoint.split(":")[1], config.api.endpoint.split(":")[1],
             config.plugin_settings["firmware"]["http_endpoint"].split(":")[1],
             config.plugin_settings["firmware"]["ftp_endpoint"].split(":")[1]}
    assert set(exposed) == ports


def test_image_entry_point_turns_the_environment_into_twistd_options(tmp_path):
    """The ENTRYPOINT's shell line, run with a stand-in twistd that prints its arguments."""
    (entrypoint,) = [json.loads(args) for instruction, args in dockerfile_instructions() if instruction == "ENTRYPOINT"]
    fake = tmp_path / "twistd"
    fake.write_text("#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\"; done\n")
    fake.chmod(0o755)

    def run(env: dict, *args: str) -> list[str]:
        environment = {"PATH": f"{tmp_path}:/usr/bin:/bin", **env}
        done = subprocess.run(entrypoint + list(args), env=environment, capture_output=True, text=True, check=True)
        return done.stdout.splitlines()

    base = ["--pidfile=", "--nodaemon", "csms", "--config"]
    assert run({}) == base + ["etc/csms.ini"]
    url = "postgresql+psycopg://csms:p w@db/csms"
    assert run({"CSMS_DATABASE_URL": url, "CSMS_API_ENDPOINT": "tcp:8080", "CSMS_CONFIG": "/x.ini"},
               "--log-level", "debug") == base + ["/x.ini", "--database", url, "--api-endpoint", "tcp:8080",
                                                  "--log-level", "debug"]


# -- docker-compose.yml, Prometheus, Grafana ------------------------------------------------------------


def test_compose_file_parses_and_mounts_files_that_exist():
    compose = yaml.safe_load(read("docker-compose.yml"))
    services = compose["services"]
    assert {"db", "csms", "prometheus", "grafana"} <= set(services)
    assert services["prometheus"]["profiles"] == services["grafana"]["profiles"] == ["monitoring"]
    assert "profiles" not in services["csms"] and "profiles" not in services["db"]
    assert services["csms"]["build"] == "." and os.path.exists(os.path.join(ROOT, "Dockerfile"))
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert os.path.exists(os.path.join(ROOT, source)), f"{name} mounts {source}"
            else:
                assert source in compose["volumes"], f"{name} mounts an undeclared volume {source}"
    assert "postgresql+psycopg://" in services["csms"]["environment"]["CSMS_DATABASE_URL"]
    grace = int(services["csms"]["stop_grace_period"].rstrip("s"))
    assert grace > shipped_grace()


def test_prometheus_scrapes_the_csms_metrics_and_grafana_reads_prometheus():
    prometheus = yaml.safe_load(read("etc/prometheus.yml"))
    (job,) = prometheus["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["csms:8080"]
    source = yaml.safe_load(read("etc/grafana/provisioning/datasources/prometheus.yml"))
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load(read("etc/grafana/provisioning/dashboards/csms.yml"))
    compose = yaml.safe_load(read("docker-compose.yml"))
    # Grafana's file provider loads every dashboard of its directory: the checkout's etc/ (the
    # dashboard there is etc/grafana-dashboard.json).
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["grafana"]["volumes"]}
    assert mounts[provider["providers"][0]["options"]["path"]] == "./etc"


# -- the systemd unit -----------------------------------------------------------------------------------


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(read("etc/csms.service"))
    return parser


def test_systemd_unit_runs_unprivileged_restarts_on_failure_and_outlasts_the_grace():
    service = unit()["Service"]
    assert service["User"] not in ("", "root") and service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM" and float(service["TimeoutStopSec"]) > shipped_grace()
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert "twistd --pidfile= --nodaemon csms --config" in service["ExecStart"]


def test_systemd_unit_passes_systemd_analyze_verify_where_systemd_is_installed(tmp_path):
    """Where systemd-analyze exists (this project's CI image has it), its verdict; the unit's
    ExecStart points at the install location, so the check points it at this venv's twistd."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        unit()  # parsed, at least (the other systemd test checks its values)
        return
    twistd = shutil.which("twistd") or os.path.join(os.path.dirname(sys.executable), "twistd")
    path = tmp_path / "csms.service"
    path.write_text(read("etc/csms.service").replace("/opt/csms/venv/bin/twistd", twistd))
    done = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr.strip() == "" and done.stdout.strip() == "", done.stderr
