"""The Firmware Management profile (OCPP 1.6 §4.4, §4.5, §5.8, §5.16).

* FirmwareStatusNotification / DiagnosticsStatusNotification: kept per station as a history, plus
  the station's current state (OCTT TC_044_x, TC_045_x).
* UpdateFirmware / GetDiagnostics: recorded when a station accepts them, whichever API route sent
  them (``csms_on_call_completed``).
* A file server for stations (firmware downloads, diagnostics uploads over HTTP) and an upload-only
  FTP server, as plugin services on their own endpoints.
"""
from __future__ import annotations

import os
from datetime import timedelta
from urllib.parse import quote

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from zope.interface import implementer

from csms import ocpp16
from csms.config import ConfigError
from csms.hookspecs import hookimpl
from csms.interfaces import ICSMSPlugin
from csms.ocpp16 import parse_datetime

from .store import FirmwareStore
from .tables import metadata
from .uploads import DiagnosticsUploads

log = Logger(namespace="csms.firmware")

MiB = 1024 * 1024


class FileServers(service.Service):
    """The station-facing listeners: HTTP file server and (unless disabled) the FTP upload server."""

    name = "firmware-file-servers"

    def __init__(self, plugin):
        self.plugin = plugin
        self.http_port = None
        self.ftp_port = None
        self.ready: defer.Deferred = defer.Deferred()

    def startService(self):
        super().startService()
        d = defer.ensureDeferred(self._listen())
        d.addCallbacks(self.ready.callback, self._failed)

    async def _listen(self):
        from csms.httplimits import limited_listener

        from .ftp import UploadFTPFactory
        from .http import FileServerSite

        plugin = self.plugin
        reactor = plugin.app.reactor
        if plugin.http_endpoint:
            site = FileServerSite(plugin.firmware_dir, plugin.uploads, plugin.http_limits, plugin.app.clock)
            factory = limited_listener(site, "Firmware file server")
            self.http_port = await serverFromString(reactor, plugin.http_endpoint).listen(factory)
            log.info("Firmware/diagnostics file server listening on {where}", where=self.http_port.getHost())
        if plugin.ftp_endpoint:
            factory = UploadFTPFactory(plugin.uploads, passive_ports=plugin.ftp_passive_ports)
            self.ftp_port = await serverFromString(reactor, plugin.ftp_endpoint).listen(factory)
            log.info("Diagnostics FTP upload server listening on {where}", where=self.ftp_port.getHost())
        return self

    def _failed(self, failure):
        log.failure("The firmware file servers failed to start", failure)
        self.ready.errback(failure)

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        for attr in ("http_port", "ftp_port"):
            port = getattr(self, attr)
            if port is not None:
                setattr(self, attr, None)
                yield port.stopListening()


def _host_port(port) -> str:
    from .http import listening_url
    return listening_url(port)[len("http://"):]


@implementer(ICSMSPlugin)
class FirmwarePlugin:
    """Handlers are thin: read the request, call the store, build the reply."""

    name = "firmware"
    profile = ocpp16.FIRMWARE
    inbound_actions = ocpp16.inbound_of(ocpp16.FIRMWARE)
    outbound_actions = ocpp16.outbound_of(ocpp16.FIRMWARE)
    #: The test fixtures bind these on loopback ephemeral ports and point these at a temporary directory.
    loopback_settings = ("http_endpoint", "ftp_endpoint")
    directory_settings = ("firmware_dir", "diagnostics_dir")

    app = None
    store: FirmwareStore | None = None
    servers: FileServers | None = None

    @hookimpl
    def csms_configure(self, app):
        settings = app.config.plugin("firmware")
        self.app = app
        self.firmware_dir = os.path.abspath(settings.get("firmware_dir", "var/firmware"))
        self.diagnostics_dir = os.path.abspath(settings.get("diagnostics_dir", "var/diagnostics"))
        self.max_firmware_size = settings.getint("max_firmware_size", 256 * MiB)
        self.max_diagnostics_size = settings.getint("max_diagnostics_size", 32 * MiB)
        self.http_endpoint = settings.get("http_endpoint", "tcp:8090").strip()
        self.public_url = settings.get("public_url", "").strip().rstrip("/")
        self.ftp_endpoint = settings.get("ftp_endpoint", "tcp:8021").strip()
        self.ftp_public_address = settings.get("ftp_public_address", "").strip()
        self.upload_protocol = settings.get("diagnostics_protocol", "ftp").strip().lower()
        self.upload_expiry = settings.getint("upload_expiry", 86400)
        self.history_limit = settings.getint("history_limit", 100)
        # The file server's slow-client limits: [plugin:firmware] http_ + the [api] setting's name.
        from csms.httplimits import HTTPLimits

        def http_limit(name, default):
            read = settings.getfloat if isinstance(default, float) else settings.getint
            return read("http_" + name, default)
        self.http_limits = HTTPLimits.read(http_limit).check("plugin:firmware", "http_")
        from .ftp import parse_port_range
        try:
            self.ftp_passive_ports = parse_port_range(settings.get("ftp_passive_ports", ""))
        except ValueError:
            raise ConfigError("[plugin:firmware] ftp_passive_ports must look like 30000-30099") from None
        if self.upload_protocol not in ("ftp", "http"):
            raise ConfigError("[plugin:firmware] diagnostics_protocol must be ftp or http")
        if self.max_firmware_size <= 0 or self.max_diagnostics_size <= 0 or self.upload_expiry <= 0:
            raise ConfigError("[plugin:firmware] sizes and upload_expiry must be positive")
        for directory in (self.firmware_dir, self.diagnostics_dir):
            os.makedirs(directory, exist_ok=True)
        self.store = FirmwareStore(app.db)
        self.uploads = DiagnosticsUploads(app, self.store, self.diagnostics_dir, self.max_diagnostics_size)
        #: CSMS-hosted GetDiagnostics location -> its pre-created request id, while the call is under way.
        self.pending_diagnostics: dict[tuple[str, str], int] = {}

    @hookimpl
    def csms_tables(self):
        return metadata

    @hookimpl
    def csms_services(self, app):
        self.servers = FileServers(self)
        return [self.servers]

    @hookimpl
    def csms_api_routes(self, app, router):
        from .api import add_routes
        add_routes(self, app, router)

    # -- where stations find the CSMS's files -------------------------------------------------------

    def http_base_url(self) -> str | None:
        if self.public_url:
            return self.public_url
        if self.servers is not None and self.servers.http_port is not None:
            from .http import listening_url
            return listening_url(self.servers.http_port)
        return None

    def firmware_url(self, name: str) -> str | None:
        base = self.http_base_url()
        return None if base is None else f"{base}/firmware/{quote(name)}"

    def firmware_name_of(self, location: str) -> str | None:
        """The hosted firmware file an UpdateFirmware location points at, if it is one of ours."""
        base = self.http_base_url()
        if base is None or not location.startswith(base + "/firmware/"):
            return None
        from urllib.parse import unquote
        return unquote(location[len(base + "/firmware/"):]) or None

    def ftp_address(self) -> str | None:
        if self.ftp_public_address:
            return self.ftp_public_address
        if self.servers is not None and self.servers.ftp_port is not None:
            return _host_port(self.servers.ftp_port)
        return None

    def upload_location(self, protocol: str, user: str, secret: str) -> tuple[str, str] | None:
        """(location for the station, the same with the secret masked), or None if that server is off."""
        if protocol == "ftp":
            address = self.ftp_address()
            if address is None:
                return None
            return f"ftp://{user}:{secret}@{address}/", f"ftp://{user}:***@{address}/"
        base = self.http_base_url()
        if base is None:
            return None
        return f"{base}/diagnostics/{user}-{secret}/", f"{base}/diagnostics/{user}-***/"

    # -- inbound -------------------------------------------------------------------------------------

    @hookimpl
    def csms_handle_firmware_status_notification(self, station, payload):
        # OCTT TC_044_1/2/3: every status is kept; the station's current update follows it.
        d = self.store.record_firmware_status(station.station_id, payload["status"], self.app.now())
        return d.addCallback(lambda _: {})

    @hookimpl
    def csms_handle_diagnostics_status_notification(self, station, payload):
        # OCTT TC_045_1/2
        d = self.store.record_diagnostics_status(station.station_id, payload["status"], self.app.now())
        return d.addCallback(lambda _: {})

    # -- results of CSMS-initiated calls ------------------------------------------------------------

    @hookimpl
    def csms_on_call_completed(self, station_id, action, request, response):
        now = self.app.now()
        if action == "UpdateFirmware":
            return self.store.record_update(station_id, request, self.firmware_name_of(request["location"]), now,
                                            parse_datetime(request["retrieveDate"]))
        if action == "GetDiagnostics":
            times = {key: parse_datetime(request[field]) for key, field in
                     (("start_time", "startTime"), ("stop_time", "stopTime")) if request.get(field)}
            request_id = self.pending_diagnostics.pop((station_id, request["location"]), None)
            return self.store.record_diagnostics_sent(station_id, request, response.get("fileName"), now, times,
                                                      request_id=request_id)
        return None

    def upload_expires_at(self):
        return self.app.now() + timedelta(seconds=self.upload_expiry)

    # -- other plugins and the station views -----------------------------------------------------------

    @hookimpl
    def csms_station_details(self, station_ids):
        def thd(conn):
            from sqlalchemy import select

            from .tables import station_state
            rows = conn.execute(select(station_state).where(station_state.c.station_id.in_(station_ids))).all()
            return {row.station_id: {"firmware_status": row.firmware_status,
                                     "diagnostics_status": row.diagnostics_status} for row in rows}
        return self.app.db.run(thd, desc="firmware_station_details")

    @hookimpl
    def csms_on_station_deleted(self, station_id):
        return self.store.delete_station(station_id)

