"""Errors raised by weakbench for bad user input.

Every message names the file (when there is one), the field, and the fix, so that the CLI can
print it on one line and exit non-zero.
"""

from __future__ import annotations


class WeakbenchError(Exception):
    """Base class of every user-facing error; the CLI prints ``str(err)`` and exits with 2."""


class DataError(WeakbenchError):
    """A dataset file is missing, malformed, or an image does not decode."""


class ConfigError(WeakbenchError):
    """A configuration or search-space file is invalid (unknown key, value out of range, …)."""


class UnknownNameError(WeakbenchError):
    """An unknown method, backbone, metric or model name was requested."""
