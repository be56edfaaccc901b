"""Errors a user can cause. The CLI prints them without a traceback and exits non-zero."""

from __future__ import annotations


class KdbenchError(Exception):
    """Base class; the message says what to fix."""

    exit_code = 2


class ConfigError(KdbenchError):
    """A grid file or a plugin parameter is wrong."""

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = problems or [message]
        super().__init__(message)


class PluginError(KdbenchError):
    """A plugin is missing, broken, or claimed twice."""


class DataError(KdbenchError):
    """A dataset root is missing or not in the expected format."""
