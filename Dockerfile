# The Central System as a container image: `docker build -t csms .` (see docs/deploy.md).
#
# Two stages: wheels are built in the first (with pip's build tools), the second holds only Python,
# the installed wheels and the configuration, and runs as an unprivileged user.

FROM python:3.11-slim AS build
WORKDIR /src
COPY setup.cfg pyproject.toml README.md ./
COPY csms ./csms
COPY plugins ./plugins
COPY twisted ./twisted
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[postgresql]'

FROM python:3.11-slim
RUN useradd --system --uid 10001 --user-group --home-dir /srv/csms --create-home csms
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels 'csms[postgresql]' && rm -rf /wheels
WORKDIR /srv/csms
# The shipped configuration; mount your own over /srv/csms/etc (read-only is enough).
COPY etc/csms.ini ./etc/csms.ini
# SQLite database, firmware and diagnostics files (relative paths of etc/csms.ini live under var/).
RUN mkdir var && chown csms:csms var
VOLUME ["/srv/csms/var"]
USER csms
ENV PYTHONUNBUFFERED=1 \
    CSMS_API_ENDPOINT=tcp:8080
# OCPP WebSocket, operator API (with /healthz, /readyz and /metrics), firmware HTTP, diagnostics FTP.
EXPOSE 9000 8080 8090 8021
# Liveness; load balancers should ask /readyz (database reachable, listeners up, migrations current).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('CSMS_HEALTH_URL', 'http://127.0.0.1:8080/healthz'), timeout=4)"]
# SIGTERM: graceful stop within [csms] shutdown_grace, exit status 0. Give the runtime's stop timeout more.
STOPSIGNAL SIGTERM
# exec: twistd is PID 1 and receives the signal itself. The environment overrides the config file:
# CSMS_CONFIG (the file), CSMS_DATABASE_URL (--database), CSMS_API_ENDPOINT (--api-endpoint; the API
# must listen beyond the container's own loopback to be reachable through a published port).
ENTRYPOINT ["/bin/sh", "-c", "exec twistd --pidfile= --nodaemon csms --config \"${CSMS_CONFIG:-etc/csms.ini}\" ${CSMS_DATABASE_URL:+--database \"$CSMS_DATABASE_URL\"} ${CSMS_API_ENDPOINT:+--api-endpoint \"$CSMS_API_ENDPOINT\"} \"$@\"", "csms"]
