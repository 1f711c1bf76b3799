"""Errors the command line reports as one line and a non-zero exit."""

__all__ = ["CheckpointError", "ConfigError", "DistsparseError"]


class DistsparseError(Exception):
    """Bad input a user can fix; the message names the key or file and what was expected."""


class ConfigError(DistsparseError):
    """An invalid, unknown or missing configuration key or value."""


class CheckpointError(DistsparseError):
    """A missing, corrupt or mismatched checkpoint or run directory."""
