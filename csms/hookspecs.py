"""Every hook of the Central System, in one module.

Three kinds:

* **Handlers** (``csms_handle_*``), one per inbound OCPP action: ``firstresult=True``. The first plugin
  that returns something other than None answers the CALL: a response payload dict, or a Deferred or
  coroutine of one. Raise :class:`csms.rpc.CallError` to answer with a CALLERROR.
* **Events** (``csms_on_*``): every plugin is told, through pluggy (wrappers and tracing see the call);
  results may be Deferreds, which the framework waits for before it sends the confirmation that caused
  the event. A failing listener is logged and never breaks the confirmation nor silences the others.
* **Plumbing**: tables, services, routes, configuration, admission, and lookups one plugin offers the others.

Arguments: handler hooks (and the lookups a handler asks) get ``station``, the station's
:class:`csms.session.StationSession`: ``station.station_id``, ``station.call(action, payload)`` (which
is ``app.call``), ``station.admission``; ``station.app`` is the :class:`csms.app.CentralSystem`. Events
about a station get its id as ``station_id``, a string (``csms_on_station_connected`` the session too).
"""
import pluggy

hookspec = pluggy.HookspecMarker("csms")
hookimpl = pluggy.HookimplMarker("csms")


# -- plumbing ----------------------------------------------------------------------------------


@hookspec
def csms_configure(app):
    """Called once, after every enabled plugin is registered and before tables are created.

    ``app`` is the :class:`csms.app.CentralSystem`: its ``config``, ``db``, ``clock`` and ``call()``.
    """


@hookspec
def csms_tables():
    """Return the SQLAlchemy ``MetaData`` holding this plugin's tables (names prefixed with the plugin).

    The plugin's migrations make them (its ``migrations`` attribute, docs/migrations.md); one that ships
    none gets them from this MetaData. A disabled plugin's tables are never created.
    """


@hookspec
def csms_services(app):
    """Return a list of ``twisted.application.service.IService`` (timers, listeners) to run with the CSMS.

    A service's ``startService`` may return a Deferred: start-up waits for it, and fails when it fails.
    """


@hookspec
def csms_api_routes(app, router):
    """Add this plugin's operator HTTP API routes to ``router`` (a :class:`csms.api.Router`)."""


@hookspec
def csms_web_resources(app):
    """Return ``{name: resource}``: ``twisted.web`` resources served beside ``/api/v1`` on the API's site,
    each under ``/<name>/`` (e.g. ``{"ui": DashboardResource(...)}``).

    A name is one path segment; ``api`` and a name another plugin mounts are refused at start-up. A
    resource reaches the API's routes in-process with ``app.api_resource.dispatch(...)``.
    """


@hookspec
def csms_retention(app):
    """Return the histories this plugin keeps that may be pruned: a list of :class:`csms.retention.Retention`
    (a name, the table, its timestamp column, a description, a default number of days), or None.

    Each name becomes a ``[retention]`` setting, in days (0: kept for ever); the framework deletes the
    older rows hourly, in bounded batches, on the cluster's leader (docs/retention.md).
    """


# -- admission -------------------------------------------------------------------------------------


@hookspec
def csms_admit_station(request):
    """A station asks to connect: admit, refuse or annotate its handshake.

    ``request`` is a :class:`csms.admission.AdmissionRequest` (``station_id``, ``username``,
    ``password``, ``peer``, ``address``, ``headers``, ``certificate``, ``annotations``). Return True (or
    a Deferred or coroutine of True) to admit the station, None to leave it to the others; raise
    :class:`csms.admission.AdmissionRefused` (or fail with it) to refuse. Every implementation is
    called (one raising at once ends the call there); the first refusal in call order wins, and
    without one the station is admitted only when at least one implementation answered True. The
    Core plugin implements it ``trylast`` (unknown stations, passwords); with Core disabled, stations
    are refused unless another plugin admits them.
    """


# -- inbound OCPP actions (CP -> CS) -----------------------------------------------------------


@hookspec(firstresult=True)
def csms_handle_authorize(station, payload):
    """Answer Authorize.req (OCPP 1.6 §4.2). Stops at first non-None result."""


@hookspec(firstresult=True)
def csms_handle_boot_notification(station, payload):
    """Answer BootNotification.req (OCPP 1.6 §4.2). Stops at first non-None result."""


@hookspec(firstresult=True)
def csms_handle_data_transfer(station, payload):
    """Answer DataTransfer.req (OCPP 1.6 §4.3) from a station.

    Vendor plugins answer for their own ``vendorId`` and return None for the others; the Core plugin
    answers last with UnknownVendorId. Stops at first non-None result.
    """


@hookspec(firstresult=True)
def csms_handle_heartbeat(station, payload):
    """Answer Heartbeat.req (OCPP 1.6 §4.6). Stops at first non-None result."""


@hookspec(firstresult=True)
def csms_handle_meter_values(station, payload):
    """Answer MeterValues.req (OCPP 1.6 §4.7). Stops at first non-None result."""


@hookspec(firstresult=True)
def csms_handle_start_transaction(station, payload):
    """Answer StartTransaction.req (OCPP 1.6 §4.8). Stops at first non-None result."""


@hookspec(firstresult=True)
def csms_handle_status_notification(station, payload):
    """Answer StatusNotification.req (OCPP 1.6 §4.9). Stops at first non-None result."""


@hookspec(firstresult=True)
def csms_handle_stop_transaction(station, payload):
    """Answer StopTransaction.req (OCPP 1.6 §4.10). Stops at first non-None result."""


@hookspec(firstresult=True)
def csms_handle_diagnostics_status_notification(station, payload):
    """Answer DiagnosticsStatusNotification.req (OCPP 1.6 §4.4). Stops at first non-None result."""


@hookspec(firstresult=True)
def csms_handle_firmware_status_notification(station, payload):
    """Answer FirmwareStatusNotification.req (OCPP 1.6 §4.5). Stops at first non-None result."""


@hookspec(firstresult=True)
def csms_handle_call(station, action, payload):
    """Answer a CALL whose action is not an OCPP 1.6 CP->CS action (e.g. a vendor or security extension).

    Nobody answering means NotImplemented. Stops at first non-None result.
    """


# -- lookups one plugin offers the others --------------------------------------------------------


@hookspec(firstresult=True)
def csms_authorize_id_tag(station, id_tag, purpose):
    """Return (a Deferred of) the OCPP ``idTagInfo`` dict for ``id_tag`` presented at ``station``.

    ``purpose`` is the action asking: ``Authorize``, ``StartTransaction`` or ``StopTransaction``
    (ConcurrentTx only makes sense for the first two).

    The Core plugin answers from its id tag table, last; a roaming or vendor plugin may answer first.
    Stops at first non-None result.
    """


@hookspec(firstresult=True)
def csms_active_transactions(station_id):
    """Return (a Deferred of) a list of the station's open transactions as dicts
    (``transaction_id``, ``connector_id``, ``id_tag``, ``started_at``, ``meter_start``). Stops at first non-None result.
    """


@hookspec(firstresult=True)
def csms_connector_ids(station_id):
    """Return (a Deferred of) the sorted connector ids (>= 1) the station has reported. Stops at first non-None result."""


@hookspec(firstresult=True)
def csms_stations_with_connectors(status, error):
    """Return (a Deferred of) the ids of the stations having a connector in ``status`` (None: any) that,
    when ``error`` is true, reports an error code other than NoError (when false, reports none).
    Stops at first non-None result."""


@hookspec(firstresult=True)
def csms_id_tags(id_tags):
    """Return (a Deferred of) the id tags the CSMS holds, as dicts (``id_tag``, ``status``,
    ``expiry_date``, ``parent_id_tag``); all of them when ``id_tags`` is None, else those named.
    The Core plugin answers. Stops at first non-None result.
    """


@hookspec(firstresult=True)
def csms_station_configuration(station_id):
    """Return (a Deferred of) ``{key: value}``: the station's configuration as last read back or
    changed (e.g. ChargeProfileMaxStackLevel, SendLocalListMaxLength). The Core plugin answers.
    Stops at first non-None result.
    """


@hookspec
def csms_station_details(station_ids):
    """Return (a Deferred of) ``{station_id: {field: value}}`` to add to the API's station views
    (the Core plugin adds boot info and connectors). Called once per page of stations.
    """


@hookspec(firstresult=True)
def csms_offer_firmware(firmware_id):
    """Return (a Deferred of) the hosted firmware file ``firmware_id`` as a dict (``id``, ``name``, ``size``,
    ``sha256``, ``url``: where stations download it, None while no file server runs), or a Deferred of
    None when there is no such file. The Firmware plugin answers. Stops at first non-None result.
    """


@hookspec(firstresult=True)
def csms_upload_location(station_id, purpose, protocol):
    """Return (a Deferred of) a one-time location where ``station_id`` may upload one file: a dict
    (``upload_id``, ``location`` with its secret, ``shown_location`` with it masked, ``protocol``,
    ``expires_at``), or a Deferred of None when no server for ``protocol`` ("ftp", "http"; None: the
    default) runs. ``purpose`` names the call it is for (e.g. "GetLog"). The Firmware plugin answers.
    Stops at first non-None result.
    """


@hookspec(firstresult=True)
def csms_withdraw_upload_location(upload_id):
    """The location ``upload_id`` will not be used (its call was not sent, failed or was refused):
    unused, it is forgotten; used, its credentials expire and its file stays. Return (a Deferred of)
    True when it existed. Stops at first non-None result.
    """


@hookspec(firstresult=True)
def csms_uploaded_files(upload_id):
    """Return (a Deferred of) the files uploaded to location ``upload_id``, oldest first, as dicts
    (``id``, ``name``, ``size``, ``sha256``, ``via``, ``uploaded_at``, ``path`` on this host).
    Stops at first non-None result.
    """


# -- checks before a CSMS-initiated call ---------------------------------------------------------


@hookspec
def csms_before_call(station_id, action, payload):
    """A CSMS-initiated call is about to be sent: every plugin may check it first.

    ``payload`` already matches the action's schema. Raise :class:`csms.app.CallRefused` (or return a
    Deferred failing with it) to refuse the call: nothing is sent, :meth:`CentralSystem.call` fails with
    that error and the operator API answers 422. Return None (or a Deferred of None) to let it go.
    """


# -- events --------------------------------------------------------------------------------------


@hookspec
def csms_on_station_connected(station_id, station):
    """A station completed the WebSocket handshake and is ready for OCPP messages; ``station`` is its
    :class:`csms.session.StationSession`."""


@hookspec
def csms_on_station_disconnected(station_id, reason):
    """A station's connection closed; ``reason`` says who closed it and how (a close code, none (1005), the
    TCP connection lost (1006)), or 'replaced' when a newer one took over."""


@hookspec
def csms_on_presence_changed(station_id, node, previous_node):
    """Which node holds a station changed (docs/cluster.md): ``node`` is the name of the node it is now
    connected to, None when it is connected nowhere; ``previous_node`` the one before (or None). Told on
    every node of a cluster; on a single node, alongside the connected and disconnected events."""


@hookspec
def csms_on_boot(station_id, request, status):
    """A BootNotification was stored and will be answered with ``status`` (Accepted, Pending, Rejected)."""


@hookspec
def csms_on_status_changed(station_id, connector_id, status, error_code, previous_status, request):
    """A StatusNotification was stored; ``previous_status`` is None for a connector seen the first time."""


@hookspec
def csms_on_transaction_started(station_id, transaction, request):
    """A new transaction was committed (``transaction`` dict with ``transaction_id``, ``connector_id``,
    ``id_tag``, ``reservation_id``, ``id_tag_status`` ...). Not fired for a retransmitted StartTransaction."""


@hookspec
def csms_on_transaction_stopped(station_id, transaction, request):
    """A transaction was closed (by the station, or by an operator for a stuck transaction)."""


@hookspec
def csms_on_meter_values(station_id, connector_id, transaction_id, meter_values):
    """MeterValues were committed (``meter_values`` is the request's list)."""


@hookspec
def csms_on_call_sending(station_id, action, request):
    """A CSMS-initiated call passed its checks and is about to be sent: it goes out once every
    listener's Deferred fired. Exactly one of ``csms_on_call_completed`` or ``csms_on_call_failed``
    follows, with the same ``request`` object."""


@hookspec
def csms_on_call_completed(station_id, action, request, response):
    """A CSMS-initiated call was answered with a valid CALLRESULT ``response``."""


@hookspec
def csms_on_call_failed(station_id, action, request, error):
    """A CSMS-initiated call announced by ``csms_on_call_sending`` got no valid answer: ``error`` is the
    exception :meth:`csms.app.CentralSystem.call` fails with (StationOffline, CallErrorReceived,
    ResponseInvalid or CallTimeout)."""


@hookspec
def csms_on_id_tag_changed(id_tag, before, after):
    """An id tag was created (``before`` is None), changed, or deleted (``after`` is None);
    ``before``/``after`` are id tag dicts as ``csms_id_tags`` returns them."""


@hookspec
def csms_on_station_deleted(station_id):
    """An operator deleted a station: remove what this plugin keeps about it."""


@hookspec
def csms_on_security_event(station_id, event):
    """A security event about a station was stored: one the station reported (SecurityEventNotification,
    OCPP 1.6 security whitepaper) or one the Central System found (a rejected certificate signing request).
    ``event`` is a dict (``id``, ``origin``, ``type``, ``timestamp``, ``tech_info``, ``critical``, ``received_at``)."""
