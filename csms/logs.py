"""Log lines: text or JSON (``[csms] log_format``), secrets redacted, and the per-station OCPP trace.

Everything logs through :mod:`twisted.logger`; this module only decides how an event is written.
``twistd csms`` logs to the file twistd's options name (stdout with ``-n``, else ``twistd.log``,
rotated on SIGUSR1) through :class:`CSMSLogObserver`, from twistd's first line on. Every line, in either format, goes through
:func:`redact`, so a password, token, Authorization header or private key that reached a log event
(a handshake dump, an exception message, a payload echoed in an error) is not written.

The trace (``[ocpp] trace_stations``) logs every frame of the listed stations at debug level in the
``csms.trace`` namespace, which the level filter always lets through: one station's traffic without
debug logging for everything.
"""
from __future__ import annotations

import json
import re
import signal
import sys
from collections import Counter
from datetime import datetime, timezone

import orjson
from twisted.logger import (FileLogObserver, FilteringLogObserver, LogLevel, LogLevelFilterPredicate, Logger,
                            formatEvent, formatEventAsClassicLogText, formatTime)
from twisted.python.logfile import LogFile

TRACE_NAMESPACE = "csms.trace"
#: Longest frame a trace line shows, in characters; the rest is cut and counted.
TRACE_LIMIT = 2000
REDACTED = "[redacted]"
#: Keys (compared in lower case, without ``_`` and ``-``) whose values are secrets wherever they appear.
SECRET_KEYS = frozenset(("password", "authorization", "authorizationkey", "proxyauthorization", "token",
                         "secret", "privatekey", "apikey"))

trace_log = Logger(namespace=TRACE_NAMESPACE)

_QUOTED_OR_BARE = r"(?:\"[^\"]*\"|'[^']*'|[^\s,;&}\]\)]+)"
_PATTERNS = (
    # A PEM private key, whole or cut short.
    (re.compile(r"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)", re.S),
     "-----BEGIN \\1PRIVATE KEY----- " + REDACTED),
    # An Authorization header as a header line, a dict item or a JSON member: its whole value.
    (re.compile(r"(?i)(\b(?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?)[^\"'\r\n]+"), "\\1" + REDACTED),
    # Credentials of a scheme anywhere else (base64 or token characters, with a digit or a symbol in them).
    (re.compile(r"(?i)\b(basic|bearer)\s+(?=[\w.~+/=-]*[\d.~+/=_-])[\w.~+/=-]{6,}"), "\\1 " + REDACTED),
    # ChangeConfiguration's AuthorizationKey (OCPP 1.6 security whitepaper): {"key": ..., "value": ...}.
    (re.compile(r"(?i)([\"']key[\"']\s*:\s*[\"']authorizationkey[\"']\s*,\s*[\"']value[\"']\s*:\s*)"
                r"(?:\"[^\"]*\"|'[^']*')"), "\\1\"" + REDACTED + "\""),
    (re.compile(r"(?i)([\"']value[\"']\s*:\s*)(?:\"[^\"]*\"|'[^']*')(\s*,\s*[\"']key[\"']\s*:\s*"
                r"[\"']authorizationkey[\"'])"), "\\1\"" + REDACTED + "\"\\2"),
    # password=..., "token": "...", 'authorizationKey': '...'
    (re.compile(r"(?i)([\"']?\b(?:password|passwd|authorization_?key|secret|token|private_?key|api_?key)"
                r"[\"']?\s*[:=]\s*)" + _QUOTED_OR_BARE), "\\1\"" + REDACTED + "\""),
    # user:password@ in a URL.
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^:/@\s'\"]*:)[^@\s'\"/]+@"), "\\1***@"),
)


class SummedUp:
    """Occurrences a stranger can repeat at will (refused connections, failed handshakes) logged at a
    bounded rate: the first at once, the later ones counted and summed up once per ``interval`` seconds
    while they go on.

    ``occurred(key)`` says whether to log this one now (True) or counts it under ``key`` (False);
    ``summarise(counts)`` is called with the keys' counts at the end of an interval that had any.
    """

    def __init__(self, clock, interval: float, summarise):
        self.clock = clock
        self.interval = interval
        self._summarise = summarise
        self._unreported: Counter = Counter()
        self._call = None

    def occurred(self, key=None) -> bool:
        if self._call is not None:
            self._unreported[key] += 1
            return False
        self._call = self.clock.callLater(self.interval, self._interval_ended)
        return True

    def _interval_ended(self) -> None:
        self._call = None
        if not self._unreported:
            return
        counts, self._unreported = self._unreported, Counter()
        self._call = self.clock.callLater(self.interval, self._interval_ended)
        self._summarise(counts)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


def redact(text: str) -> str:
    """``text`` with every secret it shows replaced (see the patterns above)."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _secret_key(key) -> bool:
    return isinstance(key, str) and key.lower().replace("_", "").replace("-", "") in SECRET_KEYS


def redact_value(value):
    """A copy of a JSON-like value (an OCPP payload, headers) with the secrets in it replaced."""
    if isinstance(value, dict):
        configuration_key = value.get("key")
        is_secret_setting = _secret_key(configuration_key)
        return {key: REDACTED if _secret_key(key) or (is_secret_setting and key == "value")
                else redact_value(item) for key, item in value.items()}
    if isinstance(value, list):
        return [redact_value(item) for item in value]
    if isinstance(value, str):
        return redact(value)
    return value


def frame_for_trace(text) -> tuple[str, str | None]:
    """One OCPP-J frame as a trace line shows it (secrets redacted, at most :data:`TRACE_LIMIT`
    characters), and its action when it is a CALL."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    action = None
    try:
        message = orjson.loads(text)
    except (orjson.JSONDecodeError, TypeError):  # not JSON (the station gets FormationViolation): as text
        shown = redact(text)
    else:
        if isinstance(message, list) and len(message) > 2 and message[0] == 2 and isinstance(message[2], str):
            action = message[2]
        shown = _compact(redact_value(message))
    if len(shown) > TRACE_LIMIT:
        shown = f"{shown[:TRACE_LIMIT]}... ({len(shown) - TRACE_LIMIT} more characters)"
    return shown, action


def _compact(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def trace_frame(station_id: str, direction: str, text) -> None:
    """Log one frame of a traced station; ``direction`` is ``received`` or ``sent``."""
    shown, action = frame_for_trace(text)
    trace_log.debug("{station} {direction} {frame}", station=station_id, direction=direction, frame=shown,
                    action=action)


def trace_handshake(station_id: str, peer: str, path: str, headers: dict) -> None:
    trace_log.debug("{station} handshake from {peer}: GET {path} {headers}", station=station_id, peer=peer,
                    path=path, headers=_compact(redact_value(dict(headers))))


# -- the lines ---------------------------------------------------------------------------------


#: The characters of a text line's own layout: twistd ends it with a newline and writes each newline
#: inside the message as a newline and a tab.
_LAYOUT = {ord("\n"): None, ord("\t"): None}


def _escaped(line: str) -> str:
    """``line`` with every unprintable character but those of its layout escaped as Python writes it
    (``\\x1b``, ``\\r``, ``\\u202e``): stations' text (an id tag, a vendorId, a security event's techInfo)
    reaches log messages, and must not move a terminal's cursor, hide what went before or reorder it."""
    if line.translate(_LAYOUT).isprintable():
        return line
    return "".join(char if char.isprintable() or char in "\n\t" else ascii(char)[1:-1] for char in line)


def text_line(event: dict) -> str | None:
    """twistd's classic line (``2026-12-01T17:03:43+0000 [namespace#level] message``), redacted, its
    control characters escaped."""
    line = formatEventAsClassicLogText(event, formatTime=formatTime)
    return None if line is None else _escaped(redact(line))


def json_line(event: dict) -> str | None:
    """One JSON object: timestamp (ISO 8601, UTC), level, namespace, message, station_id and action when
    the event names them, the traceback of a failure; every text redacted."""
    when = event.get("log_time")
    level = event.get("log_level")
    record = {
        "timestamp": (datetime.fromtimestamp(when, tz=timezone.utc).isoformat(timespec="milliseconds")
                      .replace("+00:00", "Z") if when is not None else None),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace", "-"),
        "message": redact(formatEvent(event)),
    }
    station = event.get("station", event.get("station_id"))
    if isinstance(station, str):
        record["station_id"] = station
    action = event.get("action")
    if isinstance(action, str):
        record["action"] = action
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["traceback"] = redact(failure.getTraceback())
        except Exception:  # noqa: BLE001 - a failure that cannot render itself: its type still says something
            record["traceback"] = repr(getattr(failure, "value", failure))
    return json.dumps(record, ensure_ascii=False, default=str) + "\n"


LINE_FORMATS = {"text": text_line, "json": json_line}


def file_observer(out_file, log_format: str) -> FileLogObserver:
    """An observer writing each event to ``out_file`` as one ``log_format`` line."""
    return FileLogObserver(out_file, LINE_FORMATS[log_format])


def redacting_observer(observer):
    """Wraps an observer that formats events itself (syslog, ``twistd --logger``): it gets events whose
    message is redacted."""
    def observe(event):
        message = formatEvent(event)
        clean = redact(message)
        if clean != message:
            event = dict(event, log_format=clean.replace("{", "{{").replace("}", "}}"))
        observer(event)
    return observe


def level_predicate(level_name: str) -> LogLevelFilterPredicate:
    """``level_name`` and above for everything; the trace namespace always."""
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level_name))
    predicate.setLogLevelForNamespace(TRACE_NAMESPACE, LogLevel.debug)
    return predicate


class CSMSLogObserver(FilteringLogObserver):
    """Our lines on a log file, behind the level filter: what ``twistd csms`` logs through."""

    def __init__(self, out_file, log_level: str, log_format: str):
        super().__init__(file_observer(out_file, log_format), [level_predicate(log_level)])


def twistd_log_file(server_options):
    """The file twistd's options say to log to, chosen as twistd's own ``UnixAppLogger`` chooses (and
    rotated on SIGUSR1 as it does); None when twistd logs elsewhere (syslog, ``--logger``) or refuses
    the options itself (a daemon logging to stdout)."""
    if server_options.get("syslog") or server_options.get("logger"):
        return None
    name = server_options.get("logfile") or ""
    if name == "-" or not name and server_options.get("nodaemon"):
        return sys.stdout if server_options.get("nodaemon") else None
    log_file = LogFile.fromFullPath(name or "twistd.log")
    if not signal.getsignal(signal.SIGUSR1):
        def rotate(_number, _frame):
            from twisted.internet import reactor
            reactor.callFromThread(log_file.rotate)
        signal.signal(signal.SIGUSR1, rotate)
    return log_file


def install(publisher, log_level: str, log_format: str) -> None:
    """Put the level filter and redaction in front of observers twistd made itself (syslog,
    ``--logger``, or its log file when :func:`twistd_log_file` could not be used).

    A :class:`FileLogObserver` (twistd's log file) gets our lines: twistd offers no way to reach its
    file but the observer's private ``_outFile``. Any other observer keeps its own format, and is
    given events whose message is redacted. Our own observer is left as it is.
    """
    predicate = level_predicate(log_level)
    for observer in list(publisher._observers):  # noqa: SLF001 - no public way to list them
        if isinstance(observer, CSMSLogObserver):
            continue
        out_file = getattr(observer, "_outFile", None) if isinstance(observer, FileLogObserver) else None
        replacement = file_observer(out_file, log_format) if out_file is not None else redacting_observer(observer)
        publisher.removeObserver(observer)
        publisher.addObserver(FilteringLogObserver(replacement, [predicate]))
