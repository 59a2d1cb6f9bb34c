"""Errors a user can cause, each with a message that names the problem and the fix."""


class ActivaultError(Exception):
    """Base for every error that the CLI reports as one clear line (no traceback)."""


class ConfigError(ActivaultError, ValueError):
    """The configuration is invalid; the message names the field and the accepted values."""


class StorageError(ActivaultError):
    """The store cannot be reached, read or written; the message names the URI and the fix."""


class FormatError(ActivaultError):
    """A stored file is missing, truncated or corrupted; the message names the file."""


class LockedError(StorageError):
    """Another collector holds this run and machine index; the message names it."""


class DataError(ActivaultError):
    """The input text cannot be used (a bad record, no documents); the message says where."""


class NotFoundError(StorageError, FileNotFoundError):
    """A key, file or folder does not exist in the store."""


def shown(text: str) -> str:
    """`text` quoted for a message; a long one (a 5000-character name) cut, with its length."""
    return repr(text) if len(text) <= 120 else f"{text[:80]!r}...{text[-20:]!r} ({len(text)} characters)"
