"""The library's own exceptions: every user-facing failure is one of these, with a message that says
what was wrong and what exists instead."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class HeadqError(Exception):
    """Base class of every error headq raises on purpose."""


class SpecError(HeadqError, ValueError):
    """A method spec string that does not parse, or names a method or parameter that does not exist."""


class PluginError(HeadqError):
    """A plugin that failed to load, or two plugins that claim one name."""


class CacheStateError(HeadqError, RuntimeError):
    """The quantized cache was used in a way that would silently give wrong results."""


class CalibrationError(HeadqError, ValueError):
    """A method needs calibration it was not given, or was given calibration for another model."""


def suggest(name: str, choices: Iterable[str]) -> str:
    """' Did you mean 'x'?' for the closest choice, or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""
