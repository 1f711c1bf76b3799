"""Errors the command line reports as one line and a non-zero exit."""

__all__ = ["CheckpointError", "ConfigError", "DataError", "DistsparseError"]


class DistsparseError(Exception):
    """Bad input a user can fix; the message names the key or file and what was expected."""


class ConfigError(DistsparseError):
    """An invalid, unknown or missing configuration key or value."""


class CheckpointError(DistsparseError):
    """A missing, corrupt or mismatched checkpoint or run directory."""


class DataError(DistsparseError):
    """A missing, empty or unreadable data set folder or file (images, .beton)."""
