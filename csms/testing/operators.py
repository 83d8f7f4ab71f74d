"""Playing the operator in tests: the same CSMS-initiated call through the Python API or the HTTP API."""
from __future__ import annotations


class PythonOperator:
    """Drives CSMS-initiated calls through the Python API (``CentralSystem.call``)."""

    kind = "python"

    def __init__(self, csms):
        self.csms = csms

    def call(self, station_id: str, action: str, payload: dict):
        return self.csms.app.call(station_id, action, payload)


class HttpOperatorError(Exception):
    """The operator API answered a call with something other than 200 (``status``, JSON ``error`` body)."""

    def __init__(self, status: int, error: dict | None):
        super().__init__(f"HTTP {status}: {error}")
        self.status = status
        self.error = error or {}


class HttpOperator:
    """Drives CSMS-initiated calls through the operator HTTP API (``POST /stations/{id}/calls/{action}``).

    Same interface as :class:`PythonOperator`. A non-200 answer raises the exception the Python API
    raises for the same outcome (so a test expecting e.g. CallErrorReceived works with both), or
    :class:`HttpOperatorError` for anything else.
    """

    kind = "http"

    def __init__(self, csms):
        self.csms = csms

    async def call(self, station_id: str, action: str, payload: dict):
        from urllib.parse import quote

        from csms.app import ActionUnavailable
        from csms.rpc import CallErrorReceived, CallTimeout, RequestInvalid, ResponseInvalid, StationOffline

        status, body, _ = await self.csms.api("POST", f"/stations/{quote(station_id, safe='')}/calls/{action}",
                                              json=payload)
        if status == 200:
            return body
        error = (body or {}).get("error") or {}
        details = error.get("details") or {}
        code = error.get("code")
        if code == "station_call_error":
            raise CallErrorReceived(details.get("code"), details.get("description", ""), details.get("details"))
        if code == "station_invalid_response":
            raise ResponseInvalid(action, details.get("code"), error.get("message", ""), details.get("response"))
        if code == "station_timeout":
            raise CallTimeout(error.get("message"))
        if code == "station_offline":
            raise StationOffline(error.get("message"))
        if code == "invalid_ocpp_payload":
            raise RequestInvalid(action, details.get("ocpp_error_code"), error.get("message", ""))
        if code == "action_unavailable":
            raise ActionUnavailable(error.get("message"))
        if status == 422 and code != "validation_failed":
            from csms.app import CallRefused  # a csms_before_call listener said no

            raise CallRefused(error.get("message", ""), code, details)
        raise HttpOperatorError(status, error)


#: The ``operator`` fixture's parameter -> the class playing the operator that way.
OPERATORS = {"python": PythonOperator, "http": HttpOperator}
