"""version.py: `__version__` is a PEP 440 version, the one the installed distribution's metadata carries
(pyproject.toml reads it from this module: a reinstall is what brings the two together)."""

from __future__ import annotations

from importlib.metadata import version

from packaging.version import Version

import activault
from activault.version import __version__


def test_version_is_pep440_and_the_installed_distributions() -> None:
    assert str(Version(__version__)) == __version__  # valid and already in normalised form
    assert version("activault") == __version__
    assert activault.__version__ == __version__
