"""units.py: sizes, rates and durations for humans, and the parsing of rates: values read back from
what is printed, and garbage refused with one clear ConfigError."""

from __future__ import annotations

import random
import re

import pytest

from activault.errors import ConfigError
from activault.units import duration, human_bytes, parse_bandwidth

UNIT = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "PB": 1e15}
SECONDS = {"s": 1, "min": 60, "h": 3600, "days": 86400}


def read_back(text: str, units: dict[str, float]) -> float:
    """The value a printed `number unit` stands for (this test's own parser)."""
    m = re.fullmatch(r"(-?[\d.]+) (\w+)", text)
    assert m and m.group(2) in units, text
    return float(m.group(1)) * units[m.group(2)]


def test_parse_bandwidth() -> None:
    assert parse_bandwidth("1Gbps") == 125e6 and parse_bandwidth("100MB/s") == 100e6
    assert parse_bandwidth("500 Mbit/s") == 62.5e6


@pytest.mark.parametrize(
    "text,bytes_per_second",
    [
        ("8bps", 1),
        ("1 kbit/s", 125),
        ("1Kbps", 125),
        ("2.5 Gb/s", 2.5e9 / 8),
        ("1Tbps", 1e12 / 8),
        ("  10 Mbps  ", 10e6 / 8),
        ("1KB/s", 1e3),  # an upper-case B is bytes
        ("3 GBps", 3e9),
        ("1gB/s", 1e9),  # the prefix is case-insensitive, the B is not
        ("1 GBPS", 1e9),  # upper-case B: bytes, as the docstring says (was read as bits)
        ("1 GBIT/S", 1e9 / 8),  # bit spelled out: bits in any case
        ("1 Gbit/s", 1e9 / 8),
        ("1 GbPS", 1e9 / 8),
        (".5Gbps", 0.5e9 / 8),
        ("2.MB/s", 2e6),
    ],
)
def test_bandwidths_are_bytes_per_second(text, bytes_per_second):
    assert parse_bandwidth(text) == pytest.approx(bytes_per_second, rel=1e-12)


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "   ",
        "fast",
        "100",  # no unit
        "Gbps",  # no number
        "-1Gbps",
        "1e3Mbps",
        "1 Gbps extra",
        "1Xbps",
        "1 GiB/s",
        "one Gbps",
        "1\x00Gbps",
        "\x00",
        "9" * 5000 + "Gbits",
        "1.2.3Gbps",  # was: a raw ValueError from float()
        ".Gbps",
        "1..Gbps",
        ".",
    ],
)
def test_garbage_bandwidth_is_one_clear_config_error(garbage):
    with pytest.raises(ConfigError) as e:
        parse_bandwidth(garbage)
    message = str(e.value)
    assert message.startswith(f"bandwidth {garbage!r} not understood") and "1Gbps" in message


@pytest.mark.parametrize("nothing", ["0Gbps", "0.0 MB/s", ".0bps", "00kbps", "9" * 400 + "Gbps"])
def test_a_rate_of_zero_or_infinity_is_refused(nothing):
    # 0 used to pass, then divide by zero in the upload-time estimate.
    with pytest.raises(ConfigError) as e:
        parse_bandwidth(nothing)
    assert str(e.value).startswith(f"bandwidth {nothing!r} not understood: a rate must be above 0 and finite")


@pytest.mark.parametrize(
    "n,text",
    [
        (999_950, "1.0 MB"),  # rounds to 1000.0 KB: shown in the next unit
        (999_949, "999.9 KB"),
        (999.99, "999 B"),  # whole bytes are truncated, never 1000 B
        (999_950_000, "1.0 GB"),
        (-999_950, "-1.0 MB"),
        (999_950e15, "999950.0 PB"),
    ],
)
def test_human_bytes_rolls_over_at_unit_boundaries(n, text):
    assert human_bytes(n) == text


@pytest.mark.parametrize(
    "seconds,text",
    [
        (119.4, "119 s"),
        (119.6, "2.0 min"),  # was "120 s"
        (7196, "119.9 min"),
        (7199, "2.0 h"),  # was "120.0 min"
        (172_500, "47.9 h"),
        (172_799, "2.0 days"),  # was "48.0 h"
    ],
)
def test_duration_rolls_over_at_unit_boundaries(seconds, text):
    assert duration(seconds) == text


def test_no_printed_value_reaches_its_units_limit():
    rng = random.Random(2)
    limits = {"B": 1000, "KB": 1000, "MB": 1000, "GB": 1000, "TB": 1000, "s": 120, "min": 120, "h": 48}
    for _ in range(5000):
        for text in (human_bytes(10 ** rng.uniform(0, 17)), duration(10 ** rng.uniform(0, 7))):
            number, unit = text.split()
            assert float(number) < limits.get(unit, float("inf")), text


@pytest.mark.parametrize(
    "n,text",
    [
        (0, "0 B"),
        (1, "1 B"),
        (999, "999 B"),
        (1000, "1.0 KB"),
        (1536, "1.5 KB"),
        (12_300_000, "12.3 MB"),
        (4e9, "4.0 GB"),
        (7.25e12, "7.2 TB"),
        (1e15, "1.0 PB"),
        (3.5e18, "3500.0 PB"),  # nothing beyond PB
        (-2500, "-2.5 KB"),
    ],
)
def test_human_bytes(n, text):
    assert human_bytes(n) == text


def test_human_bytes_reads_back_within_its_rounding():
    rng = random.Random(0)
    for _ in range(2000):
        n = 10 ** rng.uniform(0, 17)
        text = human_bytes(n)
        # Whole bytes below 1000 (truncated), one decimal of the unit above: at most 5% off.
        assert read_back(text, UNIT) == pytest.approx(n, rel=0.05, abs=1), (n, text)


@pytest.mark.parametrize(
    "rate,printed", [("100MB/s", "100.0 MB"), ("2 GB/s", "2.0 GB"), ("750KBps", "750.0 KB"), ("8Gbps", "1.0 GB")]
)
def test_a_bandwidth_reads_back_through_human_bytes(rate, printed):
    assert human_bytes(parse_bandwidth(rate)) == printed


@pytest.mark.parametrize(
    "seconds,text",
    [
        (0, "0 s"),
        (59.4, "59 s"),
        (119, "119 s"),
        (120, "2.0 min"),
        (3600, "60.0 min"),
        (7200, "2.0 h"),
        (90000, "25.0 h"),
        (172800, "2.0 days"),
        (10 * 86400, "10.0 days"),
    ],
)
def test_duration(seconds, text):
    assert duration(seconds) == text


def test_duration_reads_back_within_its_rounding():
    rng = random.Random(1)
    for _ in range(2000):
        s = 10 ** rng.uniform(-1, 8)
        text = duration(s)
        assert read_back(text, SECONDS) == pytest.approx(s, rel=0.05, abs=0.5), (s, text)
