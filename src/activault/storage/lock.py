"""One collector per (run, machine index): a claim that a crashed holder cannot keep forever.

Local store: an `flock` on `{run}/.locks/machine-{i}.lock`. The kernel drops it when the holding
process ends, however it ends, so a stale lock never blocks a resume.

Object stores have no such lock. There the claim is a lease object at the same key, written only
if absent (If-None-Match), renewed by a background thread every quarter of `lease_seconds`, and
taken over once its holder has not renewed it for `lease_seconds`, or at once when the holder was a
process of this machine that no longer exists (If-Match on the version read, so of two collectors
taking over, one wins). Expiry compares the holder's clock with the taker's: machines are assumed
to agree to within a small part of `lease_seconds` (NTP does). The holder stops before its own
lease could have expired (`check`, called before each file and each record). A write already in
flight when a stalled or partitioned holder wakes may still land after a takeover: a file then
holds the same bytes under the same name as the taker's (collection is deterministic), and the
progress record, the one object that counts files, is written only over the bytes its writer last
saw there (`Store.swap`, vault/writer.py), so a holder that lost the claim counts nothing and
never writes over the taker's record.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

from activault.errors import LockedError, NotFoundError, StorageError
from activault.storage.base import LOCKS, Store
from activault.storage.local import LocalStore

log = logging.getLogger(__name__)

LEASE_SECONDS = 120.0


def lock_key(run: str, machine: int) -> str:
    return f"{run}/{LOCKS}/machine-{machine:05d}.lock"


def hold_task(store: Store, run: str, task: str, doing: str, lease_seconds: float = LEASE_SECONDS) -> MachineLock:
    """Claim `run` for a whole-run task, one at a time, as `hold` claims a machine.

    Args:
        task: names the lock, e.g. "recompress".
        doing: what a refused second one is told, e.g. "being recompressed".
    """
    key = f"{run}/{LOCKS}/{task}.lock"
    if isinstance(store, LocalStore):
        return FileLock(store.path_of(key), f"run {run!r}", doing)
    return Lease(store, key, f"run {run!r}", lease_seconds, doing)


def hold(store: Store, run: str, machine: int, lease_seconds: float = LEASE_SECONDS) -> MachineLock:
    """Claim machine `machine` of `run`, or raise LockedError naming the collector that holds it."""
    key = lock_key(run, machine)
    if isinstance(store, LocalStore):
        return FileLock(store.path_of(key), f"run {run!r} machine {machine}")
    return Lease(store, key, f"run {run!r} machine {machine}", lease_seconds)


class MachineLock:
    """A held claim; `check` raises once it is lost, `release` gives it up."""

    def check(self) -> None:
        """Raise LockedError if another collector may now hold the claim."""

    def current_holder(self) -> str:
        """Who holds the claim now, read from the store, as messages name them."""
        return "another collector"

    def release(self) -> None: ...

    def __enter__(self) -> MachineLock:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def _holder() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": _iso(time.time()),
        "token": uuid.uuid4().hex,
        "pids": _pid_space(),
    }


def _pid_space() -> str | None:
    """This boot and PID namespace (Linux): where a pid names one process, or None where unknown."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


_LIVE: set[str] = set()  # tokens of the leases this process holds now


def _is_dead(holder: dict[str, Any]) -> bool:
    """Whether a lease's holder is certainly gone: a process of this very machine and PID namespace
    that no longer exists (or this process, which no longer holds it). Else only expiry tells."""
    here = _pid_space()
    if here is None or holder.get("pids") != here or not isinstance(holder.get("pid"), int):
        return False
    if holder["pid"] == os.getpid():
        return holder.get("token") not in _LIVE
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:
        pass  # alive, another user's
    return False


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "a collector whose details are not readable yet"
    host, pid, since = (holder.get(k, "?") for k in ("host", "pid", "started"))
    return f"host {host}, pid {pid}, running since {since}"


def _named(holder: dict[str, Any] | None, token: str) -> str:
    """A holder's description, saying when it is the claim asking."""
    mine = holder is not None and holder.get("token") == token
    return _describe(holder) + (" (this collector)" if mine else "")


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


class FileLock(MachineLock):
    """An exclusive flock on a file; the holder's host, pid and start time are its content."""

    def __init__(self, path: Path, what: str, doing: str = "being collected"):
        self.path, self.what, self.doing = path, what, doing
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = self._lock()
            holder = _holder()
            self.token = holder["token"]
            info = json.dumps(holder).encode()
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, info, 0)
        except OSError as e:
            raise StorageError(
                f"cannot create the lock file {path}: {e.strerror or e}; make the store writable and run again"
            ) from e

    def _lock(self) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _parse(os.pread(fd, 4096, 0))
                os.close(fd)
                raise LockedError(
                    f"{self.what} is {self.doing} by {_describe(holder)} (lock {self.path}); "
                    "wait for it to finish, or stop it, then run the same command again to resume"
                ) from None
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)  # the previous holder removed the file as we opened it: lock the new one

    def current_holder(self) -> str:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return f"no collector (the lock file {self.path} is gone)"
        try:
            return _named(_parse(os.pread(fd, 4096, 0)), self.token)
        finally:
            os.close(fd)

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked: see _lock's inode check
            self.path.parent.rmdir()
            self.path.parent.parent.rmdir()  # a run stopped before writing anything: no folder
        except OSError:
            pass  # other machines' locks remain, or the filesystem turned read-only
        finally:
            os.close(self.fd)
            self.fd = -1


class Lease(MachineLock):
    """A lease object, created if absent, renewed in the background, taken over once expired."""

    def __init__(
        self, store: Store, key: str, what: str, seconds: float = LEASE_SECONDS, doing: str = "being collected"
    ):
        self.store, self.key, self.what, self.seconds, self.doing = store, key, what, seconds, doing
        self.holder = _holder()
        self.body = b""
        self.expires = 0.0
        self.lost: str | None = None
        self._stop = threading.Event()
        self._acquire()
        _LIVE.add(self.holder["token"])
        self._thread = threading.Thread(target=self._renew, name="activault-lease", daemon=True)
        self._thread.start()

    def _new_body(self) -> tuple[bytes, float]:
        now = time.time()
        expires = now + self.seconds
        body = {**self.holder, "renewed": _iso(now), "renewed_at": now, "expires_at": expires}
        return json.dumps(body).encode(), expires

    def _acquire(self) -> None:
        for _ in range(5):  # the lease changed while we looked: look again
            body, expires = self._new_body()
            if self.store.swap(self.key, body, None):
                self.body, self.expires = body, expires
                return
            try:
                current = bytes(self.store.get(self.key))
            except NotFoundError:
                continue
            other = _parse(current) or {}  # an unreadable lease protects nothing: taken over
            if other.get("token") == self.holder["token"]:  # our create, its reply lost and retried
                self.body, self.expires = current, float(other["expires_at"])
                return
            deadline = other.get("expires_at")
            deadline = float(deadline) if isinstance(deadline, int | float) else 0.0
            if time.time() <= deadline and not _is_dead(other):
                renewed = other.get("renewed", "?")
                raise LockedError(
                    f"{self.what} is {self.doing} by {_describe(other)} "
                    f"(lease {self.store.url(self.key)}, renewed {renewed}); wait "
                    "for it to finish or stop it. If that process is dead, its lease expires at "
                    f"{_iso(deadline)}: run the same command again after that"
                )
            body, expires = self._new_body()
            if self.store.swap(self.key, body, current):
                what, holder = self.what, _describe(other)
                log.warning("took over %s from %s: it is gone or its lease expired", what, holder)
                self.body, self.expires = body, expires
                return
        url = self.store.url(self.key)
        raise LockedError(f"{self.what}: several collectors are claiming {url} at once; run one")

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 4):
            body, expires = self._new_body()
            try:
                if self.store.swap(self.key, body, self.body):
                    self.body, self.expires = body, expires
                    continue
                current = _parse(bytes(self.store.get(self.key)))
            except Exception as e:  # noqa: BLE001 - retried next period; `check` fails at expiry
                log.warning("could not renew the lease on %s: %s", self.what, e)
                continue
            if current == json.loads(body):  # ours: the reply was lost and the retry refused
                self.body, self.expires = body, expires
                continue
            self.lost = _describe(current) if current else "another collector (lease removed)"
            return

    def check(self) -> None:
        if self.lost is not None:
            raise LockedError(f"{self.what} was taken over by {self.lost}; this collector stopped")
        if time.time() > self.expires:
            raise LockedError(
                f"the lease on {self.what} ({self.store.url(self.key)}) could not be renewed for "
                f"{self.seconds:g}s, so another collector may have taken over; this one stopped. "
                "Run the same command again to resume"
            )

    def current_holder(self) -> str:
        try:
            current = bytes(self.store.get(self.key))
        except NotFoundError:
            return "no collector (the lease was released)"
        except StorageError as e:
            return f"a collector not known now (the lease cannot be read: {e})"
        return _named(_parse(current), self.holder["token"])

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        _LIVE.discard(self.holder["token"])
        self._thread.join(timeout=self.seconds)  # a renewal may be retrying a slow store
        if self.lost is not None or self._thread.is_alive():
            return  # not ours any more, or about to expire by itself
        try:  # only our own lease: a newer holder's must stay
            if bytes(self.store.get(self.key)) == self.body:
                self.store.delete(self.key)
        except StorageError as e:
            log.warning(
                "could not remove the lease %s (it expires by itself): %s",
                self.store.url(self.key),
                e,
            )
