"""A command's output written to a file all or nothing (the shell's `> FILE`)."""

from __future__ import annotations

import errno
import os
import stat
import uuid
from pathlib import Path


def unwritable(target: str) -> str | None:
    """Why `write_whole(target)` would fail (checked before the command runs), or None: the same
    cases as it, a folder, a device or FIFO written in place, a regular file through a temp name."""
    path = Path(os.path.realpath(Path(target).expanduser()))
    try:
        st: os.stat_result | None = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        st = None
    except OSError as e:  # e.g. a name too long, a permission on the way
        return f"{path}: {e.strerror or e}"
    if st is not None and stat.S_ISDIR(st.st_mode):
        return f"{path} is a folder; name a file in it"
    if st is not None and not stat.S_ISREG(st.st_mode):
        return None if os.access(path, os.W_OK) else f"{path} is not writable"
    folder = path.parent
    if not folder.is_dir():
        return f"{folder} is not a folder"
    # A regular file is replaced by a temp file renamed over it: the folder must be writable.
    return None if os.access(folder, os.W_OK) else f"{folder} is not writable"


def write_whole(target: str, text: str) -> None:
    """Write `text` to `target` all or nothing: a regular file is replaced by a renamed temp file, so a
    failure leaves it as it was; a device or FIFO (/dev/null, a pipe) is written in place."""
    path = Path(os.path.realpath(Path(target).expanduser()))
    data = memoryview(text.encode())
    try:
        st: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "it is a folder")
    if st is not None and not stat.S_ISREG(st.st_mode):
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # a FIFO nobody reads: ENXIO, not a hang
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        return
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        try:
            _write_all(fd, data)
            if st is not None:
                os.fchmod(fd, stat.S_IMODE(st.st_mode))
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_all(fd: int, data: memoryview) -> None:
    while data.nbytes:
        data = data[os.write(fd, data) :]
