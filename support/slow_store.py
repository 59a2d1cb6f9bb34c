"""A local store whose writes take a while, record their order, and fail on request."""

from __future__ import annotations

import threading
import time

from activault.errors import StorageError
from activault.storage import LocalStore


class SlowStore(LocalStore):
    def __init__(self, root, delay=0.05, fail_on: str | None = None):
        super().__init__(root, fsync=False)
        self.delay, self.fail_on = delay, fail_on
        self.order: list[str] = []
        self.lock = threading.Lock()

    def put(self, key, data):
        time.sleep(self.delay)
        if self.fail_on and self.fail_on in key:
            raise StorageError(f"cannot write {key}: disk full")
        super().put(key, data)
        with self.lock:
            self.order.append(key)

    def swap(self, key, data, expect):
        wrote = super().swap(key, data, expect)  # a replace goes through put, a create does not
        if wrote and expect is None:
            with self.lock:
                self.order.append(key)
        return wrote
