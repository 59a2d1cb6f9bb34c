"""A command's output written to a file all or nothing (the shell's `> FILE`)."""

from __future__ import annotations

import errno
import os
import stat
import uuid
from pathlib import Path


def unwritable(target: str) -> str | None:
    """Why `target` cannot be written (checked before the command runs), or None."""
    folder = Path(os.path.realpath(Path(target).expanduser())).parent
    if not folder.is_dir():
        return f"{folder} is not a folder"
    return None if os.access(folder, os.W_OK) or Path(target).exists() else f"{folder} is not writable"


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
