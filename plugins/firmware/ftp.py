"""An upload-only FTP server for diagnostics (``twisted.protocols.ftp``), for stations that only speak FTP.

Each GetDiagnostics gets ``ftp://<user>:<secret>@host:port/``; the login is refused once that
request's upload is stored or its credentials expired. The avatar can only STOR: it sees an empty
directory and cannot read, delete, rename or create anything.

Data connections stay where the operator put the server: passive ports are bound on the address the
control connection arrived on (never on every interface), optionally from a configured port range,
and active mode (PORT/EPRT) may only connect back to the client's own address (no FTP bounce).
"""
from __future__ import annotations

import io

from twisted.cred import checkers, credentials, error as cred_error, portal
from twisted.internet import defer, interfaces
from twisted.logger import Logger
from twisted.protocols import ftp
from zope.interface import implementer

from .uploads import TOO_LARGE, UploadRefused, split_path_token

log = Logger(namespace="csms.firmware.ftp")


class UploadTooLarge(ftp.FTPCmdError):
    errorCode = ftp.EXCEEDED_STORAGE_ALLOC


class UploadNotAccepted(ftp.FTPCmdError):
    errorCode = ftp.REQ_ACTN_NOT_TAKEN


@implementer(checkers.ICredentialsChecker)
class UploadCredentialsChecker:
    """Accepts a user/secret pair while its diagnostics request still takes an upload."""

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, uploads):
        self.uploads = uploads

    def requestAvatarId(self, creds):
        try:
            user = creds.username.decode("utf-8") if isinstance(creds.username, bytes) else creds.username
            secret = creds.password.decode("utf-8") if isinstance(creds.password, bytes) else creds.password
        except UnicodeDecodeError:
            return defer.fail(cred_error.UnauthorizedLogin())
        d = self.uploads.check(user, secret)

        def refused(failure):
            failure.trap(UploadRefused)
            log.info("FTP login refused: {reason}", reason=failure.value.reason)
            raise cred_error.UnauthorizedLogin(str(failure.value))
        return d.addCallbacks(lambda _: f"{user}-{secret}", refused)


@implementer(interfaces.IConsumer)
class _Buffer:
    """Collects an upload in memory up to the limit (then only counts), so the reactor never writes to disk."""

    def __init__(self, limit: int):
        self.limit = limit
        self.data = io.BytesIO()
        self.size = 0
        self.producer = None

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    def write(self, data: bytes):
        self.size += len(data)
        if self.size <= self.limit:
            self.data.write(data)


@implementer(ftp.IWriteFile)
class _UploadFile:
    def __init__(self, shell, name: str):
        self.shell = shell
        self.name = name
        self.buffer = _Buffer(shell.uploads.max_size)

    def receive(self):
        return defer.succeed(self.buffer)

    def close(self):
        if self.buffer.size > self.buffer.limit:
            return defer.fail(UploadTooLarge())
        d = self.shell.uploads.receive(self.shell.user, self.shell.secret, self.name,
                                       self.buffer.data.getvalue(), "ftp")

        def stored(file):
            log.info("Diagnostics {name} ({size} bytes) uploaded over FTP for request {request_id}",
                     name=file["name"], size=file["size"], request_id=file["request_id"])

        def refused(failure):
            failure.trap(UploadRefused)
            if failure.value.reason == TOO_LARGE:
                raise UploadTooLarge()
            raise UploadNotAccepted(str(failure.value))
        return d.addCallbacks(stored, refused)


@implementer(ftp.IFTPShell)
class UploadShell:
    """What a logged-in station may do: store files. Everything else is refused."""

    def __init__(self, uploads, user: str, secret: str):
        self.uploads = uploads
        self.user = user
        self.secret = secret

    def openForWriting(self, path):
        if not path:
            return defer.fail(ftp.IsADirectoryError("/"))
        return defer.succeed(_UploadFile(self, path[-1]))

    def openForReading(self, path):
        return defer.fail(ftp.PermissionDeniedError("/".join(path)))

    def access(self, path):
        # Every directory looks like the (empty) root, so a station that CWDs somewhere first still works.
        return defer.succeed(None)

    def stat(self, path, keys=()):
        if path:
            return defer.fail(ftp.FileNotFoundError("/".join(path)))
        values = {"size": 0, "directory": True, "permissions": 0o700, "hardlinks": 1, "modified": 0,
                  "owner": self.user, "group": self.user}
        return defer.succeed([values.get(key) for key in keys])

    def list(self, path, keys=()):
        return defer.succeed([])

    def makeDirectory(self, path):
        # Some stations create a folder before uploading; pretend it exists (it is the same empty root).
        return defer.succeed(None)

    def removeDirectory(self, path):
        return defer.fail(ftp.PermissionDeniedError("/".join(path)))

    def removeFile(self, path):
        return defer.fail(ftp.PermissionDeniedError("/".join(path)))

    def rename(self, fromPath, toPath):
        return defer.fail(ftp.PermissionDeniedError("/".join(fromPath)))


@implementer(portal.IRealm)
class UploadRealm:
    def __init__(self, uploads):
        self.uploads = uploads

    def requestAvatar(self, avatarId, mind, *interfaces_):
        if ftp.IFTPShell not in interfaces_:
            raise NotImplementedError("only IFTPShell avatars")
        user, secret = split_path_token(avatarId)
        return ftp.IFTPShell, UploadShell(self.uploads, user, secret), lambda: None


class ConfinedFTP(ftp.FTP):
    """twisted's FTP protocol, with data connections kept to the configured interface and the client."""

    def getDTPPort(self, factory, interface=""):
        # twisted binds passive ports on every interface by default; use the control connection's address.
        return super().getDTPPort(factory, interface=interface or self.transport.getHost().host)

    def ftp_PORT(self, address):
        try:
            numbers = [int(x) for x in address.split(",")]
            host = "%d.%d.%d.%d" % tuple(numbers[:4])
        except (ValueError, TypeError):
            return defer.fail(ftp.CmdSyntaxError(address))
        if host != self.transport.getPeer().host:
            return defer.fail(ftp.PermissionDeniedError("PORT to another host"))
        return super().ftp_PORT(address)

    def ftp_EPRT(self, extendedAddress):
        parts = extendedAddress[1:].split(extendedAddress[:1]) if extendedAddress else []
        if len(parts) < 3 or parts[1] != self.transport.getPeer().host:
            return defer.fail(ftp.PermissionDeniedError("EPRT to another host"))
        return super().ftp_EPRT(extendedAddress)


class UploadFTPFactory(ftp.FTPFactory):
    protocol = ConfinedFTP
    allowAnonymous = False
    noisy = False
    timeOut = 300

    def __init__(self, uploads, passive_ports=None, max_connections: int = 50):
        the_portal = portal.Portal(UploadRealm(uploads), [UploadCredentialsChecker(uploads)])
        super().__init__(the_portal)
        if passive_ports is not None:
            self.passivePortRange = passive_ports
        self.connectionLimit = max_connections


def parse_port_range(text: str):
    """``"30000-30099"`` -> range(30000, 30100); ``""`` -> None (any free port)."""
    text = (text or "").strip()
    if not text:
        return None
    low, sep, high = text.partition("-")
    low_n = int(low)
    high_n = int(high) if sep else low_n
    if not 0 < low_n <= high_n < 65536:
        raise ValueError(text)
    return range(low_n, high_n + 1)
