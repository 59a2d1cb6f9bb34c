"""Human-readable sizes, rates and durations, and their parsing."""

from __future__ import annotations

import math
import re

from activault.errors import ConfigError


def human_bytes(n: float) -> str:
    """`n` bytes in decimal units, one decimal; a value that rounds to 1000 shows in the next unit."""
    if abs(n) < 1000:
        return f"{int(n)} B"  # truncated: stays below 1000
    for unit in ("KB", "MB", "GB", "TB", "PB"):
        n /= 1000
        number = f"{n:.1f}"
        if abs(float(number)) < 1000 or unit == "PB":
            return f"{number} {unit}"
    raise AssertionError("unreachable: PB takes every value")


# A number (1, 1.5, .5, 1.) and a unit: bits, or bytes where the unit's B is upper case.
_RATE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(bps|bit/s|b/s)\s*$", re.IGNORECASE)
_HELP = "write e.g. 1Gbps, 500Mbps or 100MB/s"


def parse_bandwidth(text: str) -> float:
    """Bytes per second of "1Gbps", "500 Mbit/s", "100MB/s", "1 GBPS".

    The prefix's case does not matter; the unit's `b` does: upper case (B/s, Bps, BPS) is bytes,
    lower case (b/s, bps) and the spelled-out bit/s (in any case) are bits.
    """
    m = _RATE.match(text)
    if not m:
        raise ConfigError(f"bandwidth {text!r} not understood; {_HELP}")
    value = float(m.group(1)) * 1000 ** " kmgt".index((m.group(2) or " ").lower())
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"bandwidth {text!r} not understood: a rate must be above 0 and finite; {_HELP}")
    unit = m.group(3)
    is_bytes = unit[0] == "B" and unit.lower() != "bit/s"
    return value if is_bytes else value / 8


# (seconds per unit, unit, shown in it while the rounded value is below this)
_DURATIONS = ((1, "s", 120.0), (60, "min", 120.0), (3600, "h", 48.0), (86400, "days", math.inf))


def duration(seconds: float) -> str:
    """Seconds, minutes, hours or days; a value that rounds to the next unit's start shows in it."""
    for scale, unit, below in _DURATIONS:
        number = f"{seconds / scale:.0f}" if unit == "s" else f"{seconds / scale:.1f}"
        if abs(float(number)) < below or unit == "days":
            return f"{number} {unit}"
    raise AssertionError("unreachable: days take every value")
