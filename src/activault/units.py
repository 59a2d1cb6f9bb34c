"""Human-readable sizes, rates and durations, and their parsing."""

from __future__ import annotations

import re

from activault.errors import ConfigError


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} PB"


_RATE = re.compile(r"^\s*([\d.]+)\s*([kmgt]?)(bps|bit/s|b/s|B/s|Bps)\s*$", re.IGNORECASE)


def parse_bandwidth(text: str) -> float:
    """Bytes per second of "1Gbps", "500 Mbit/s", "100MB/s" (bits unless the B is upper case)."""
    m = _RATE.match(text)
    if not m:
        raise ConfigError(f"bandwidth {text!r} not understood; write e.g. 1Gbps, 500Mbps or 100MB/s")
    value = float(m.group(1)) * 1000 ** " kmgt".index((m.group(2) or " ").lower())
    unit = m.group(3)
    return value if unit in ("B/s", "Bps") else value / 8


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
