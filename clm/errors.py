"""User-facing errors: the CLI prints these as one line and exits 2, without a traceback."""


class ClmError(Exception):
    """A problem with the user's input or environment, with a message that names the fix."""

    exit_code = 2


class ConfigError(ClmError, ValueError):
    """An invalid or conflicting setting."""


class DataError(ClmError):
    """Data that is missing, unreadable, empty or in the wrong layout."""


class BackendUnavailableError(ClmError, ImportError):
    """The chosen backend's framework is not installed."""
