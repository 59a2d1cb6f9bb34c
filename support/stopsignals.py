"""A pytest plugin: SIGINT and SIGTERM end the session like Ctrl-C, once, and for good.

scripts/test.sh runs pytest in the background (so that its traps run at once), where SIGINT starts
out ignored, and would stay ignored in every process a test starts; it stops pytest with SIGTERM.
The first signal raises KeyboardInterrupt, so the fixtures' teardown stops the servers.

A library may put its own handler in place: `ray.init` makes SIGTERM a `sys.exit` in the driver,
which pytest reported as one test's failure before it ran the rest of the suite. So the handlers are
put back after every phase of every test, and a stop that a test swallowed still ends the session
once that test is torn down.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Generator

import pytest

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Stop:
    def __init__(self) -> None:
        self.main = os.getpid()
        self.signum: int | None = None  # the first stop signal received

    def __call__(self, signum: int, frame: object) -> None:
        if os.getpid() != self.main:  # a forked worker inherited this handler: end as the signal would
            os._exit(128 + signum)
        if self.signum is not None:  # Ctrl-C reaches pytest and test.sh, which forwards it: one must not cut teardown
            return
        self.signum = signum
        raise KeyboardInterrupt

    def install(self) -> None:
        for s in SIGNALS:
            if signal.getsignal(s) is not self:
                signal.signal(s, self)


_stop = _Stop()


def pytest_configure(config: pytest.Config) -> None:
    _stop.main = os.getpid()
    _stop.install()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    """After each phase (setup, call, teardown) of each test."""
    yield
    _stop.install()
    if _stop.signum is not None:
        item.session.shouldstop = f"stopped by {signal.Signals(_stop.signum).name}"
