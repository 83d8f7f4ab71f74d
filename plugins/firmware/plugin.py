"""The Firmware Management profile (OCPP 1.6 §4.4, §4.5, §5.8, §5.16).

* FirmwareStatusNotification / DiagnosticsStatusNotification: kept per station as a history, plus
  the station's current state (OCTT TC_044_x, TC_045_x).
* UpdateFirmware / GetDiagnostics: recorded as the station's current request when they are sent,
  whichever API route sent them (``csms_on_call_sending``), so that notifications a station sends
  before its answer are linked to them; a failed call is marked on its request (``csms_on_call_failed``).
* A file server for stations (firmware downloads, diagnostics uploads over HTTP) and an upload-only
  FTP server, as plugin services on their own endpoints.
"""
from __future__ import annotations

import os
import tempfile
from datetime import timedelta
from urllib.parse import quote

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from csms import ocpp16
from csms.config import ConfigError, Setting
from csms.hookspecs import hookimpl
from csms.interfaces import ICSMSPlugin
from csms.ocpp16 import parse_datetime
from csms.rpc import CallErrorReceived, CallTimeout, ResponseInvalid, StationOffline

from .files import remove_leftover_uploads
from .store import FirmwareStore
from .tables import metadata
from .uploads import DiagnosticsUploads

log = Logger(namespace="csms.firmware")

MiB = 1024 * 1024


class FirmwareDirectories(service.Service):
    """Prepares the plugin's directories as the Central System starts, before its file servers listen
    (:meth:`FirmwarePlugin.prepare_directories`); one that cannot be used fails start-up with its line.

    On the starting thread, before the reactor runs under twistd: start-up then fails with the process's
    exit status, and nothing is served yet for the blocking file-system calls to delay."""

    name = "firmware-directories"

    def __init__(self, plugin):
        self.plugin = plugin

    def startService(self):
        super().startService()
        from csms.service import StartupError

        try:
            self.plugin.prepare_directories()
        except ConfigError as exc:
            raise StartupError(str(exc)) from None


class FileServers(service.Service):
    """The station-facing listeners: HTTP file server and (unless disabled) the FTP upload server."""

    name = "firmware-file-servers"

    def __init__(self, plugin):
        self.plugin = plugin
        self.http_port = None
        self.ftp_port = None

    def startService(self):
        """Fires once both servers listen; the CSMS waits for it and does not start when it fails."""
        super().startService()
        return defer.ensureDeferred(self._listen())

    async def _listen(self):
        from csms.httplimits import limited_listener
        from csms.service import listen

        from .ftp import UploadFTPFactory
        from .http import FileServerSite

        plugin = self.plugin
        reactor = plugin.app.reactor
        if plugin.http_endpoint:
            site = FileServerSite(plugin.firmware_dir, plugin.uploads, plugin.http_limits, plugin.app.clock, reactor,
                                  max_ranges=plugin.max_ranges)
            factory = limited_listener(site, "Firmware file server")
            self.http_port = await listen(reactor, plugin.http_endpoint, factory, "[plugin:firmware] http_endpoint")
            log.info("Firmware/diagnostics file server listening on {where}", where=self.http_port.getHost())
        if plugin.ftp_endpoint:
            factory = UploadFTPFactory(plugin.uploads, passive_ports=plugin.ftp_passive_ports)
            self.ftp_port = await listen(reactor, plugin.ftp_endpoint, factory, "[plugin:firmware] ftp_endpoint")
            log.info("Diagnostics FTP upload server listening on {where}", where=self.ftp_port.getHost())

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


def call_error_text(error) -> str:
    """Why a call failed, in a few words that fit ``call_error``."""
    if isinstance(error, CallErrorReceived):
        code = error.code if error.code.isascii() and error.code.isalnum() and len(error.code) <= 40 else \
            "GenericError"  # a station's own code: kept only when it looks like one
        return f"CALLERROR {code}"
    if isinstance(error, CallTimeout):
        return "timeout"
    if isinstance(error, StationOffline):
        return "offline"
    if isinstance(error, ResponseInvalid):
        return "invalid response"
    return "failed"


@implementer(ICSMSPlugin)
class FirmwarePlugin:
    """Handlers are thin: read the request, call the store, build the reply."""

    name = "firmware"
    #: Its Alembic migration history (docs/migrations.md).
    migrations = os.path.join(os.path.dirname(__file__), "migrations")
    profile = ocpp16.FIRMWARE
    inbound_actions = ocpp16.inbound_of(ocpp16.FIRMWARE)
    outbound_actions = ocpp16.outbound_of(ocpp16.FIRMWARE)
    settings = (
        Setting("firmware_dir", str, "var/firmware",
                "Directory of the firmware files served to stations (relative to the working directory; "
                "created at start-up)."),
        Setting("diagnostics_dir", str, "var/diagnostics", "Directory diagnostics uploads are stored in."),
        Setting("max_firmware_size", int, 256 * MiB, "Largest firmware file an operator may upload, in bytes."),
        Setting("max_diagnostics_size", int, 32 * MiB, "Largest diagnostics upload a station may send, in bytes."),
        Setting("http_endpoint", str, "tcp:8090",
                "Endpoint of the station-facing HTTP file server (firmware downloads, diagnostics uploads); "
                "empty disables it."),
        Setting("public_url", str, "",
                "Base URL stations are given for the HTTP file server; empty: built from the listening address."),
        Setting("ftp_endpoint", str, "tcp:8021", "Endpoint of the diagnostics FTP upload server; empty disables it."),
        Setting("ftp_public_address", str, "",
                "host:port stations are given in ftp:// locations; empty: the listening address."),
        Setting("ftp_passive_ports", str, "", "Passive-mode data ports, e.g. 30000-30099; empty: any free port."),
        Setting("diagnostics_protocol", str, "ftp",
                "How stations upload diagnostics when the operator gives no location.", choices=("ftp", "http")),
        Setting("upload_expiry", int, 86400, "Seconds a diagnostics upload location stays valid."),
        Setting("history_limit", int, 100, "Entries shown in a station's firmware and diagnostics history."),
        Setting("max_ranges", int, 8, "Most byte ranges one firmware download request may ask for; more and the "
                "Range header is ignored (the whole file is sent once)."),
        # The HTTP file server's limits against slow and piled-up clients (the [api] settings of the same names).
        Setting("http_request_header_timeout", float, 20.0,
                "Seconds a client has to send a request's headers, however slowly the bytes trickle in."),
        Setting("http_request_body_timeout", float, 20.0,
                "Seconds a request body may take, plus one second per http_request_body_min_rate bytes received."),
        Setting("http_request_body_min_rate", int, 500,
                "Bytes per second that earn a body one more second (0: the body timeout is a total)."),
        Setting("http_max_connections", int, 256, "Most open connections to the file server (0: no limit)."),
        Setting("http_max_connections_per_address", int, 32,
                "Most open connections from one address (0: no limit); stations behind one NAT share it."),
    )
    #: The test fixtures bind these on loopback ephemeral ports and point these at a temporary directory.
    loopback_settings = ("http_endpoint", "ftp_endpoint")
    directory_settings = ("firmware_dir", "diagnostics_dir")

    app = None
    store: FirmwareStore | None = None
    servers: FileServers | None = None

    @hookimpl
    def csms_configure(self, app):
        settings = app.config.plugin(self.name)
        self.app = app
        self.firmware_dir = os.path.abspath(settings["firmware_dir"])
        self.diagnostics_dir = os.path.abspath(settings["diagnostics_dir"])
        self.max_firmware_size = settings["max_firmware_size"]
        self.max_diagnostics_size = settings["max_diagnostics_size"]
        self.http_endpoint = settings["http_endpoint"]
        self.public_url = settings["public_url"].rstrip("/")
        self.ftp_endpoint = settings["ftp_endpoint"]
        self.ftp_public_address = settings["ftp_public_address"]
        self.upload_protocol = settings["diagnostics_protocol"]
        self.upload_expiry = settings["upload_expiry"]
        self.history_limit = settings["history_limit"]
        self.max_ranges = settings["max_ranges"]
        # The file server's slow-client limits: [plugin:firmware] http_ + the [api] setting's name.
        from csms.httplimits import HTTPLimits

        self.http_limits = HTTPLimits.read(lambda name, _default: settings["http_" + name]).check(
            "plugin:firmware", "http_")
        from .ftp import parse_port_range
        try:
            self.ftp_passive_ports = parse_port_range(settings["ftp_passive_ports"])
        except ValueError:
            raise ConfigError("[plugin:firmware] ftp_passive_ports must look like 30000-30099") from None
        if self.max_firmware_size <= 0 or self.max_diagnostics_size <= 0 or self.upload_expiry <= 0:
            raise ConfigError("[plugin:firmware] sizes and upload_expiry must be positive")
        if self.max_ranges <= 0:
            raise ConfigError("[plugin:firmware] max_ranges must be positive")
        app.outbox.register("firmware.status", "A FirmwareStatusNotification was stored.",
                            {"station_id": "CP-1", "status": "Installed", "update_id": 7}, owner=self.name)
        app.outbox.register("diagnostics.status", "A DiagnosticsStatusNotification was stored.",
                            {"station_id": "CP-1", "status": "Uploaded", "request_id": 3}, owner=self.name)
        self.store = FirmwareStore(app.db, app.outbox)
        self.uploads = DiagnosticsUploads(app, self.store, self.diagnostics_dir, self.max_diagnostics_size)
        self.firmware_uploads = app.metrics.counter("csms_firmware_files_uploaded",
                                                    "Firmware files operators uploaded (stored)")
        #: CSMS-hosted GetDiagnostics location -> its pre-created request id, until the call is sent.
        self.pending_diagnostics: dict[tuple[str, str], int] = {}
        #: id(request payload) -> (the payload, its update or diagnostics request id), from
        #: csms_on_call_sending to the csms_on_call_completed / _failed that follows with the same object
        #: (holding the payload keeps its id from being reused meanwhile).
        self._in_flight: dict[int, tuple[dict, int]] = {}

    def prepare_directories(self) -> None:
        """Create ``firmware_dir`` and ``diagnostics_dir``, check that the CSMS can write in them and remove
        the uploads a crash left unfinished; ConfigError, in one line naming the setting, when one cannot
        be used. At start-up only (:class:`FirmwareDirectories`): while a CSMS serves, such a file may be an
        upload in progress, and csms-admin, which configures the plugin too, must leave the server's files be."""
        for key, directory in (("firmware_dir", self.firmware_dir), ("diagnostics_dir", self.diagnostics_dir)):
            try:
                os.makedirs(directory, exist_ok=True)
                leftovers = remove_leftover_uploads(directory)
            except OSError as exc:
                raise ConfigError(f"[plugin:firmware] {key}: cannot create {directory} "
                                  f"({(exc.strerror or str(exc)).lower()})") from None
            try:
                # Uploads spool into it: a directory the CSMS cannot write in would be a 500 at the first.
                with tempfile.TemporaryFile(dir=directory):
                    pass
            except OSError as exc:
                raise ConfigError(f"[plugin:firmware] {key}: cannot write in {directory} "
                                  f"({(exc.strerror or str(exc)).lower()})") from None
            if leftovers:
                log.warn("Removed {count} unfinished upload(s) from {directory}", count=len(leftovers),
                         directory=directory)

    @hookimpl
    def csms_tables(self):
        return metadata

    @hookimpl
    def csms_retention(self, app):
        # Imported here: one hunk beside csms_tables, for easy merges with the handlers' changes.
        from csms.retention import Retention

        from .tables import status_history

        return [Retention("firmware_status_history", status_history, "received_at",
                          "Days the firmware and diagnostics status history (every FirmwareStatusNotification and "
                          "DiagnosticsStatusNotification) is kept; each station's current status and the requests are kept "
                          "regardless.")]

    @hookimpl
    def csms_services(self, app):
        # The directories first: the file servers serve and store in them.
        self.servers = FileServers(self)
        return [FirmwareDirectories(self), self.servers]

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

    # -- CSMS-initiated calls: current from the moment they are sent ---------------------------------

    @hookimpl
    def csms_on_call_sending(self, station_id, action, request):
        # OCPP-J lets a station send notifications about a call before it answers it: the request
        # must be the station's current one before the call goes out.
        if action not in ("UpdateFirmware", "GetDiagnostics"):
            return None

        def remember(row_id):
            self._in_flight[id(request)] = (request, row_id)
        return self._record_sending(station_id, action, request).addCallback(remember)

    def _record_sending(self, station_id, action, request):
        now = self.app.now()
        if action == "UpdateFirmware":
            return self.store.record_update(station_id, request, self.firmware_name_of(request["location"]), now,
                                            parse_datetime(request["retrieveDate"]))
        times = {key: parse_datetime(request[field]) for key, field in
                 (("start_time", "startTime"), ("stop_time", "stopTime")) if request.get(field)}
        request_id = self.pending_diagnostics.pop((station_id, request["location"]), None)
        return self.store.record_diagnostics_sending(station_id, request, now, times, request_id=request_id)

    @defer.inlineCallbacks
    def _row_of(self, station_id, action, request):
        """The row ``csms_on_call_sending`` recorded for this call; recorded now if that failed."""
        entry = self._in_flight.pop(id(request), None)
        if entry is not None:
            return entry[1]
        return (yield self._record_sending(station_id, action, request))

    @hookimpl
    def csms_on_call_completed(self, station_id, action, request, response):
        if action == "UpdateFirmware":
            return self._row_of(station_id, action, request)
        if action == "GetDiagnostics":
            d = self._row_of(station_id, action, request)
            return d.addCallback(self.store.record_diagnostics_answer, response.get("fileName"))
        return None

    @hookimpl
    def csms_on_call_failed(self, station_id, action, request, error):
        entry = self._in_flight.pop(id(request), None)
        if entry is None or action not in ("UpdateFirmware", "GetDiagnostics"):
            return None
        record = self.store.record_update_failed if action == "UpdateFirmware" else \
            self.store.record_diagnostics_failed
        return record(station_id, entry[1], call_error_text(error), self.app.now())

    def upload_expires_at(self):
        return self.app.now() + timedelta(seconds=self.upload_expiry)

    # -- what other plugins use through hooks: hosted firmware, upload locations ----------------------

    @hookimpl
    def csms_offer_firmware(self, firmware_id):
        def offer(row):
            if row is None:
                return None
            return {key: row[key] for key in ("id", "name", "size", "sha256")} | {"url": self.firmware_url(row["name"])}
        return self.store.get_firmware_file(file_id=firmware_id).addCallback(offer)

    @hookimpl
    def csms_upload_location(self, station_id, purpose, protocol):
        from .uploads import new_credentials

        protocol = protocol or self.upload_protocol
        user, secret = new_credentials()
        locations = self.upload_location(protocol, user, secret) if protocol in ("ftp", "http") else None
        if locations is None:
            return defer.succeed(None)
        location, shown = locations
        expires_at = self.upload_expires_at()
        d = self.store.create_upload_location(station_id, purpose, shown, protocol, user, secret, self.app.now(),
                                              expires_at)
        return d.addCallback(lambda upload_id: {"upload_id": upload_id, "location": location,
                                                "shown_location": shown, "protocol": protocol,
                                                "expires_at": expires_at})

    @hookimpl
    def csms_withdraw_upload_location(self, upload_id):
        return self.store.withdraw_upload_location(upload_id, self.app.now())

    @hookimpl
    def csms_uploaded_files(self, upload_id):
        def with_paths(rows):
            return [dict(row, path=self.uploads.path_of(row.pop("stored_path"))) for row in rows]
        return self.store.uploaded_files(upload_id).addCallback(with_paths)

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

