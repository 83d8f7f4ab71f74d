"""The Local Auth List Management profile (OCPP 1.6 §3.5, §5.9, §5.14): keeps each station's local
authorization list in step with the CSMS's id tags.

Id tags come from whichever plugin answers ``csms_id_tags`` (the Core plugin) and their changes arrive
as ``csms_on_id_tag_changed``; this plugin never imports another. Every answered SendLocalList and
GetLocalListVersion is recorded through ``csms_on_call_completed``, so a list sent through the generic
calls endpoint counts exactly like one sent by a sync.
"""
from __future__ import annotations

import os

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from csms import ocpp16
from csms.app import as_deferred
from csms.config import Setting
from csms.hookspecs import hookimpl
from csms.interfaces import ICSMSPlugin

from .lists import (DIFFERENTIAL, FULL, changes, desired_list, differential_entries, full_entries, next_version,
                    parse_limit, plan_requests)
from .store import LocalAuthStore
from .tables import metadata

log = Logger(namespace="csms.localauth")

#: The cluster topic of an id tag change, for the nodes whose stations an automatic sync must reach:
#: ``{"id_tag"}``. Each node syncs the stations connected to it, so a station's syncs stay on one node.
ID_TAG_TOPIC = "localauth.id_tag"

MAX_LIST_KEY = "LocalAuthListMaxLength"
MAX_SEND_KEY = "SendLocalListMaxLength"


class LocalListError(Exception):
    """A sync that cannot be sent; ``code`` names the reason for the operator API."""

    code = "local_list_error"

    def __init__(self, message: str, **details):
        super().__init__(message)
        self.message = message
        self.details = details


class NothingToSend(LocalListError):
    code = "local_list_up_to_date"


class ListTooLong(LocalListError):
    code = "local_list_too_long"


class IdTagsUnavailable(LocalListError):
    code = "id_tags_unavailable"


def describe_error(exc: Exception) -> str:
    message = getattr(exc, "message", None) or str(exc)
    return f"{type(exc).__name__}: {message}"


@implementer(ICSMSPlugin)
class LocalAuthListPlugin:
    name = "localauth"
    #: Its Alembic migration history (docs/migrations.md).
    migrations = os.path.join(os.path.dirname(__file__), "migrations")
    profile = ocpp16.LOCAL_AUTH
    inbound_actions = ocpp16.inbound_of(ocpp16.LOCAL_AUTH)
    outbound_actions = ocpp16.outbound_of(ocpp16.LOCAL_AUTH)
    # Both syncs are off by default: during OCTT runs the CSMS must send no call a test case did not ask for.
    settings = (
        Setting("auto_sync_on_change", bool, False, "Send a Differential SendLocalList to every connected station "
                                                    "when an id tag changes."),
        Setting("auto_sync_on_boot", bool, False, "After an Accepted BootNotification, read GetLocalListVersion "
                                                  "back and send what the station lacks."),
        Setting("boot_sync_delay", float, 2.0, "Seconds to wait after the BootNotification before calling the "
                                               "station."),
    )

    app = None
    store: LocalAuthStore | None = None

    @hookimpl
    def csms_configure(self, app):
        settings = app.config.plugin(self.name)
        self.app = app
        self.store = LocalAuthStore(app.db, app.clock)
        self.auto_sync_on_change = settings["auto_sync_on_change"]
        self.auto_sync_on_boot = settings["auto_sync_on_boot"]
        # The BootNotification.conf goes out after csms_on_boot: wait before calling the station.
        self.boot_sync_delay = settings["boot_sync_delay"]
        self._locks: dict[str, defer.DeferredLock] = {}
        self._boot_timers: dict = {}
        self._background: set = set()
        app.cluster.subscribe(ID_TAG_TOPIC, self._id_tag_changed_elsewhere)

    @hookimpl
    def csms_tables(self):
        return metadata

    @hookimpl
    def csms_retention(self, app):
        # Imported here: one hunk beside csms_tables, for easy merges with the handlers' changes.
        from csms.retention import Retention

        from .tables import updates

        return [Retention("localauth_updates", updates, "answered_at",
                          "Days the record of answered SendLocalList calls is kept; the lists and their versions are kept "
                          "regardless.")]

    @hookimpl
    def csms_api_routes(self, app, router):
        from .api import add_routes
        add_routes(self, app, router)

    # -- what the list should hold -----------------------------------------------------------------

    async def desired(self, state: dict) -> dict:
        """``{id_tag: idTagInfo}`` for the station: every id tag, or its chosen set."""
        if state["selection"] == "chosen":
            if not state["chosen"]:
                return {}
            tags = await self.app.lookup("csms_id_tags", default=None, id_tags=state["chosen"])
        else:
            tags = await self.app.lookup("csms_id_tags", default=None, id_tags=None)
        if tags is None:
            raise IdTagsUnavailable("No enabled plugin provides id tags (csms_id_tags)")
        return desired_list(tags, self.app.now())

    async def limits(self, station_id: str) -> dict:
        """The station's list limits from its configuration as last read back (None: unknown)."""
        config = await self.app.lookup("csms_station_configuration", default={}, station_id=station_id) or {}
        return {MAX_LIST_KEY: parse_limit(config.get(MAX_LIST_KEY)),
                MAX_SEND_KEY: parse_limit(config.get(MAX_SEND_KEY))}

    async def pending_changes(self, station_id: str, state: dict | None = None) -> dict:
        if state is None:
            state = await self.store.state(station_id)
        return changes(state["entries"], await self.desired(state))

    # -- sync --------------------------------------------------------------------------------------

    def sync(self, station_id: str, update_type: str, call=None) -> defer.Deferred:
        """Send the station's list as a Full or Differential update; fires with a report dict.

        ``call(station_id, action, payload)`` sends one OCPP call (default: ``app.call``; the API passes
        its own to map failures to HTTP answers). Syncs of one station never overlap. Fails with
        NothingToSend (a Differential with no change), ListTooLong, IdTagsUnavailable or the call's error.
        """
        if update_type not in (FULL, DIFFERENTIAL):
            raise ValueError(f"unknown update type {update_type!r}")
        lock = self._locks.setdefault(station_id, defer.DeferredLock())
        return lock.run(lambda: defer.ensureDeferred(self._sync(station_id, update_type, call or self.app.call)))

    async def _sync(self, station_id: str, update_type: str, call) -> dict:
        state = await self.store.state(station_id)
        desired = await self.desired(state)
        limits = await self.limits(station_id)
        if limits[MAX_LIST_KEY] is not None and len(desired) > limits[MAX_LIST_KEY]:
            raise ListTooLong(f"The list has {len(desired)} id tags; station {station_id!r} holds at most "
                              f"{limits[MAX_LIST_KEY]} ({MAX_LIST_KEY})",
                              entries=len(desired), max_length=limits[MAX_LIST_KEY])
        report = {"station_id": station_id, "requested_update_type": update_type, "fallback_to_full": False,
                  "requests": []}
        if update_type == DIFFERENTIAL:
            entries = differential_entries(state["entries"], desired)
            if not entries:
                raise NothingToSend(f"Station {station_id!r}'s acknowledged list (version "
                                    f"{state['acknowledged_version']}) already matches its id tags",
                                    acknowledged_version=state["acknowledged_version"])
            report["changes"] = changes(state["entries"], desired)
        else:
            entries = full_entries(desired)
        status = await self._send(station_id, update_type, entries, state, limits, call, report)
        if status == "VersionMismatch" and update_type == DIFFERENTIAL:
            # The station's list is not the one the differential was computed against: replace it whole.
            log.info("{station} answered VersionMismatch to a Differential; sending a Full list",
                     station=station_id)
            report["fallback_to_full"] = True
            state = await self.store.state(station_id)
            status = await self._send(station_id, FULL, full_entries(desired), state, limits, call, report)
        state = await self.store.state(station_id)
        report.update(status=status, update_type=report["requests"][-1]["update_type"],
                      list_version=report["requests"][-1]["list_version"],
                      acknowledged_version=state["acknowledged_version"], entries=len(desired))
        return report

    async def _send(self, station_id, update_type, entries, state, limits, call, report) -> str:
        version = next_version(state["sent_version"], state["acknowledged_version"], state["reported_version"])
        for payload in plan_requests(update_type, entries, version, limits[MAX_SEND_KEY]):
            await self.store.mark_sent(station_id, payload["listVersion"], payload["updateType"])
            try:
                response = await as_deferred(call(station_id, "SendLocalList", payload))
            except Exception as exc:
                await self.store.record_error(station_id, describe_error(exc))
                raise
            status = response["status"]
            report["requests"].append({"list_version": payload["listVersion"], "update_type": payload["updateType"],
                                       "entries": len(payload["localAuthorizationList"]), "status": status})
            if status != "Accepted":
                # Failed, NotSupported, VersionMismatch: stop here; NotSupported is recorded and not retried.
                return status
        return "Accepted"

    async def read_version(self, station_id: str, call=None) -> dict:
        """GetLocalListVersion, recorded (by csms_on_call_completed) and compared with the acknowledged version."""
        response = await as_deferred((call or self.app.call)(station_id, "GetLocalListVersion", {}))
        state = await self.store.state(station_id)
        return {"station_id": station_id, "list_version": response["listVersion"],
                "acknowledged_version": state["acknowledged_version"], "sent_version": state["sent_version"],
                "version_matches": version_matches(state)}

    # -- automatic syncs (off by default) -------------------------------------------------------------

    def _spawn(self, coroutine) -> defer.Deferred:
        d = defer.ensureDeferred(coroutine)
        self._background.add(d)
        d.addErrback(lambda failure: log.failure("Automatic local list sync failed", failure))
        d.addBoth(lambda _: self._background.discard(d))
        return d

    def idle(self) -> defer.Deferred:
        """Fires once every automatic sync started so far has finished (for tests and shutdown)."""
        return defer.DeferredList(list(self._background))

    async def _auto_sync(self, station_id: str, reason: str, id_tag: str | None = None) -> None:
        state = await self.store.state(station_id)
        if state["not_supported"] or state["reported_version"] == -1:
            return  # the station said it has no local list: do not ask again and again
        if id_tag is not None and state["selection"] == "chosen" and id_tag not in (state["chosen"] or ()) \
                and id_tag not in state["entries"]:
            return
        update_type = FULL if state["acknowledged_version"] is None else DIFFERENTIAL
        if reason == "boot":
            response = await self.app.call(station_id, "GetLocalListVersion", {})
            if response["listVersion"] == -1:
                return
            if response["listVersion"] != state["acknowledged_version"]:
                update_type = FULL
        try:
            report = await self.sync(station_id, update_type)
        except NothingToSend:
            return
        except ListTooLong as exc:
            log.warn("Automatic local list sync of {station} refused: {reason}", station=station_id,
                     reason=exc.message)
            return
        log.info("Local list of {station} synced after {reason}: {status} (version {version})",
                 station=station_id, reason=reason, status=report["status"], version=report["list_version"])

    @hookimpl
    def csms_on_id_tag_changed(self, id_tag, before, after):
        if not self.auto_sync_on_change:
            return None
        self._sync_connected_here(id_tag)
        if self.app.cluster.enabled:
            self.app.cluster.broadcast(ID_TAG_TOPIC, {"id_tag": id_tag}).addErrback(
                lambda failure: log.failure("Telling the other nodes of id tag {tag}'s change failed", failure,
                                            tag=id_tag))
        return None  # the change itself does not wait for the stations

    def _id_tag_changed_elsewhere(self, data: dict, origin: str) -> None:
        if self.auto_sync_on_change:
            self._sync_connected_here(data["id_tag"])

    def _sync_connected_here(self, id_tag: str) -> None:
        for station_id in sorted(self.app.sessions):
            self._spawn(self._auto_sync(station_id, "id tag change", id_tag))

    @hookimpl
    def csms_on_boot(self, station_id, request, status):
        if not self.auto_sync_on_boot or status != "Accepted":
            return None
        previous = self._boot_timers.pop(station_id, None)
        if previous is not None and previous.active():
            previous.cancel()
        self._boot_timers[station_id] = self.app.clock.callLater(self.boot_sync_delay, self._boot_sync, station_id)
        return None

    def _boot_sync(self, station_id: str) -> None:
        self._boot_timers.pop(station_id, None)
        if station_id in self.app.sessions:  # a station's automatic syncs belong to the node holding it
            self._spawn(self._auto_sync(station_id, "boot"))

    @hookimpl
    def csms_on_station_disconnected(self, station_id, reason):
        self._cancel_boot_sync(station_id)

    @hookimpl
    def csms_on_presence_changed(self, station_id, node, previous_node):
        # The station's syncs belong to the node holding it: a boot sync waiting here is that node's now.
        if node != self.app.cluster.node:
            self._cancel_boot_sync(station_id)

    def _cancel_boot_sync(self, station_id: str) -> None:
        timer = self._boot_timers.pop(station_id, None)
        if timer is not None and timer.active():
            timer.cancel()

    # -- recording every answer, whoever sent the call --------------------------------------------

    @hookimpl
    def csms_on_call_completed(self, station_id, action, request, response):
        if action == "SendLocalList":
            return self.store.record_send_result(station_id, request, response["status"])
        if action == "GetLocalListVersion":
            return self.store.record_version(station_id, response["listVersion"])
        return None

    @hookimpl
    def csms_on_station_deleted(self, station_id):
        self._locks.pop(station_id, None)
        return self.store.delete_station(station_id)


def version_matches(state: dict) -> bool | None:
    """Whether the version read back is the one the station acknowledged (no list yet counts as 0)."""
    if state["reported_version"] is None:
        return None
    expected = state["acknowledged_version"] if state["acknowledged_version"] is not None else 0
    return state["reported_version"] == expected
