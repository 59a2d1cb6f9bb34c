"""tools/output.py: a command's output written all or nothing (the shell's `> FILE`): a regular file is
replaced whole or left as it was, a device or FIFO is written in place without ever blocking."""

from __future__ import annotations

import errno
import os
import select
import threading
import time
from pathlib import Path

import pytest

from activault.tools.output import unwritable, write_whole


def test_write_whole_never_blocks_on_a_fifo_and_keeps_the_mode(tmp_path: Path) -> None:
    from activault.tools.output import write_whole

    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(OSError) as e:  # nobody reads it: ENXIO at once, not a hang
        write_whole(str(tmp_path / "pipe"), "x")
    assert e.value.errno == errno.ENXIO
    target = tmp_path / "out.txt"
    target.write_text("old")
    target.chmod(0o600)
    write_whole(str(target), "new")
    assert target.read_text() == "new" and (target.stat().st_mode & 0o777) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt", "pipe"]  # no temp file left


def test_a_new_file_gets_the_text_and_the_usual_mode(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    write_whole(str(tmp_path / "new.txt"), "héllo ✓\n" * 1000)
    assert (tmp_path / "new.txt").read_text() == "héllo ✓\n" * 1000
    assert ((tmp_path / "new.txt").stat().st_mode & 0o777) == 0o666 & ~umask
    write_whole(str(tmp_path / "empty.txt"), "")
    assert (tmp_path / "empty.txt").read_bytes() == b""


def test_a_failed_write_leaves_the_old_file_whole_and_no_temp_file(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "out.txt"
    target.write_text("the old output")
    real_write = os.write
    calls = []

    def disk_full(fd, data):
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data[:5])

    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(OSError) as e:
        write_whole(str(target), "a new and longer output")
    monkeypatch.undo()
    assert e.value.errno == errno.ENOSPC and len(calls) == 2
    assert target.read_text() == "the old output" and os.listdir(tmp_path) == ["out.txt"]


def test_readers_see_the_old_file_or_the_new_one_never_a_part(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    seen = []
    real_write = os.write

    def slow(fd, data):
        n = real_write(fd, data[:2])
        seen.append(target.read_text())
        return n

    monkeypatch.setattr(os, "write", slow)
    write_whole(str(target), "new text, written two bytes at a time")
    assert len(seen) > 5 and set(seen) == {"old"}
    assert target.read_text() == "new text, written two bytes at a time"


def test_a_link_is_written_through_and_stays_a_link(tmp_path: Path) -> None:
    (tmp_path / "real.txt").write_text("old")
    os.symlink(tmp_path / "real.txt", tmp_path / "link.txt")
    write_whole(str(tmp_path / "link.txt"), "new")
    assert (tmp_path / "link.txt").is_symlink() and (tmp_path / "real.txt").read_text() == "new"
    os.symlink(tmp_path / "missing.txt", tmp_path / "dangling.txt")
    write_whole(str(tmp_path / "dangling.txt"), "created")
    assert (tmp_path / "dangling.txt").is_symlink() and (tmp_path / "missing.txt").read_text() == "created"


def test_a_device_is_written_in_place(tmp_path: Path) -> None:
    write_whole("/dev/null", "x" * 100_000)
    assert Path("/dev/null").exists() and not Path("/dev/null").is_file()


def test_a_fifo_with_a_reader_gets_everything(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    got = []
    ready = threading.Event()

    def read() -> None:
        fd = os.open(tmp_path / "pipe", os.O_RDONLY | os.O_NONBLOCK)
        ready.set()
        # Until a writer opens the FIFO a read is an end of file at once, which made this test
        # flaky when it closed first (ENXIO for the writer): wait for data, then read to the end.
        data, deadline = b"", time.monotonic() + 5
        with os.fdopen(fd, "rb", buffering=0) as f:
            while time.monotonic() < deadline:
                select.select([fd], [], [], 0.1)
                chunk = f.read(65536)
                if chunk is None or (not chunk and not data):
                    continue  # nothing yet (no writer so far)
                if not chunk:
                    break
                data += chunk
        got.append(data)

    reader = threading.Thread(target=read)
    reader.start()
    assert ready.wait(5)
    write_whole(str(tmp_path / "pipe"), "through the pipe")
    reader.join(5)
    assert got == [b"through the pipe"]


def test_a_folder_is_refused_and_left_alone(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep").write_text("x")
    with pytest.raises(IsADirectoryError):
        write_whole(str(tmp_path / "d"), "text")
    assert os.listdir(tmp_path / "d") == ["keep"] and sorted(os.listdir(tmp_path)) == ["d"]


def test_text_that_cannot_be_encoded_changes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(ValueError):
        write_whole(str(target), "lone surrogate \udcff")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]


def test_unwritable_says_why_write_whole_would_fail(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "file").write_text("x")
    os.mkfifo(tmp_path / "pipe")
    os.symlink(tmp_path / "d", tmp_path / "link-to-d")
    cases = {
        str(tmp_path / "d"): f"{tmp_path / 'd'} is a folder; name a file in it",  # was None
        str(tmp_path / "link-to-d"): f"{tmp_path / 'd'} is a folder; name a file in it",
        str(tmp_path / "file" / "x"): f"{tmp_path / 'file'} is not a folder",
        str(tmp_path / ("y" * 300)): "File name too long",
        str(tmp_path / "d" / "new.txt"): None,
        str(tmp_path / "file"): None,
        "/dev/null": None,
    }
    for target, why in cases.items():
        got = unwritable(target)
        assert got == why if why is None or why.startswith("/") else why in str(got), (target, got)
        if got is not None:  # what unwritable refuses, write_whole fails on
            with pytest.raises(OSError):
                write_whole(target, "text")
        else:
            write_whole(target, "text")
    assert (tmp_path / "d" / "new.txt").read_text() == "text" and os.listdir(tmp_path / "d") == ["new.txt"]


def test_unwritable_names_a_missing_folder_before_anything_runs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("x")
    (tmp_path / "d").mkdir()
    assert unwritable(str(tmp_path / "d" / "new.txt")) is None
    assert unwritable("relative.txt") is None and unwritable(str(tmp_path / "file")) is None
    assert unwritable(str(tmp_path / "nope" / "x.txt")) == f"{tmp_path / 'nope'} is not a folder"
    assert unwritable(str(tmp_path / "file" / "x.txt")) == f"{tmp_path / 'file'} is not a folder"
    monkeypatch.setenv("HOME", str(tmp_path / "d"))
    assert unwritable("~/x.txt") is None
