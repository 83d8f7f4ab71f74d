"""Files on disk: firmware images and uploaded diagnostics. Blocking I/O: call these in a thread.

Every name that reaches the disk goes through :func:`firmware_name` or :func:`upload_name`, and
every final path is checked by :func:`inside`, so no name can escape its directory.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile

_FIRMWARE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")
CHUNK = 65536
#: Uploads are spooled to hidden files named so (the file server never serves a hidden file).
TEMP_PREFIX = ".upload-"


class TooLarge(Exception):
    """More bytes than the configured limit."""


def firmware_name(name: str) -> str:
    """The name unchanged when it is a plain file name, else ValueError (the API answers 422)."""
    if not _FIRMWARE_NAME.match(name or "") or ".." in name:
        raise ValueError("a firmware file name is 1-128 characters of A-Z a-z 0-9 . _ + - "
                         "starting with a letter or digit, without '..'")
    return name


def upload_name(name: str | None, default: str = "diagnostics") -> str:
    """A station's upload name made safe: its last path segment, unsafe characters replaced."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = _UNSAFE.sub("_", base).lstrip(".")[:128]
    return base or default


def inside(directory: str, name: str) -> str:
    """``directory/name``, refusing anything that would land outside ``directory``."""
    root = os.path.realpath(directory)
    path = os.path.realpath(os.path.join(root, name))
    if os.path.dirname(path) != root:
        raise ValueError(f"{name!r} is not a plain file name")
    return path


def spool(directory: str, source, limit: int) -> tuple[str, int, str, str]:
    """Copy ``source`` (a file object or bytes) to a hidden temporary file in ``directory``.

    Returns (temporary path, size, sha256, md5); raises TooLarge (and leaves nothing) past ``limit``.
    """
    os.makedirs(directory, exist_ok=True)
    sha256, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    fd, temp_path = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            if isinstance(source, (bytes, bytearray)):
                chunks = [bytes(source)]
            else:
                chunks = iter(lambda: source.read(CHUNK), b"")
            for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise TooLarge(limit)
                sha256.update(chunk)
                md5.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        discard(temp_path)
        raise
    return temp_path, size, sha256.hexdigest(), md5.hexdigest()


def remove_leftover_uploads(directory: str) -> list[str]:
    """Remove the temporary files of uploads a crash interrupted (never served, never in the database).

    At start-up only: while the CSMS runs, such a file may be an upload in progress. Returns their names.
    """
    removed = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith(TEMP_PREFIX) and entry.is_file(follow_symlinks=False):
                discard(entry.path)
                removed.append(entry.name)
    return removed


def discard(path: str | None) -> None:
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
