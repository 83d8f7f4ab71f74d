"""The connected station as plugins see it: the ``station`` of handler hooks and of
``csms_on_station_connected``."""
from __future__ import annotations

from twisted.internet import defer

from csms.rpc import OCPPSession


class StationSession(OCPPSession):
    """One station's OCPP-J session on its current connection, with what admission learnt about it.

    ``station_id``; ``app`` (the :class:`csms.app.CentralSystem`); ``peer`` (as connection events
    record it); ``admission`` (the annotations ``csms_admit_station`` implementations made);
    :meth:`call`. The RPC layer's raw send is :meth:`_send_call`, for :meth:`CentralSystem.call` alone.
    """

    def __init__(self, app, station_id: str, dispatch, send, peer: str, protocol, admission: dict):
        super().__init__(station_id, dispatch, send, app.clock, app.config.ocpp.response_timeout,
                         handler_timeout=app.config.ocpp.handler_timeout)
        self.app = app
        self.schemas = app.schemas
        self._metrics = app.metrics.ocpp
        self.peer = peer
        self.protocol = protocol
        #: What the plugins noted while admitting the station (``registration_status`` from Core).
        self.admission = admission

    def call(self, action: str, payload: dict) -> defer.Deferred:
        """Send a CSMS-initiated call to this station: exactly ``app.call(station.station_id, action,
        payload)``, with its checks (``csms_before_call``) and events (``csms_on_call_sending``, then
        ``csms_on_call_completed`` or ``csms_on_call_failed``).

        The call goes to the station over whichever connection it has when the call is sent: after a
        reconnection, an older session's ``call`` reaches the station on its new connection.
        """
        return self.app.call(self.station_id, action, payload)

    def _send_call(self, action: str, payload: dict) -> defer.Deferred:
        """Queue the call on this connection, with no checks and no events (the RPC layer's own call)."""
        return OCPPSession.call(self, action, payload)
