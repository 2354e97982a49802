"""Checks of single config values, each failing with one :class:`~common.errors.ConfigError` line."""

from __future__ import annotations

import math
import re
from typing import Any

from common.errors import ConfigError

# The one site-name rule (node config, enrollment, kits, fl-sim's scenarios); ``\Z``: no trailing newline.
SITE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")


def as_number(value: Any) -> float:
    """``value`` as a float; NaN for a bool or anything that does not parse as a number."""
    try:
        return math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return math.nan


def positive_float(key: str, value: Any) -> float:
    """Return ``value`` as a finite float > 0 or raise :class:`ConfigError`."""
    number = as_number(value)
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"Expected `{key}` to be a positive number, but got {value!r}")
    return number


def positive_int(key: str, value: Any) -> int:
    """Return ``value`` as an int >= 1 or raise :class:`ConfigError`."""
    number = as_number(value) if isinstance(value, int | float) else math.nan
    whole = math.isfinite(number) and int(number) == number
    if not whole or number < 1:
        raise ConfigError(f"Expected `{key}` to be a positive integer, but got {value!r}")
    return int(value)


def non_negative_int(key: str, value: Any) -> int:
    """Return ``value`` as an int >= 0 or raise :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"Expected `{key}` to be a non-negative integer, but got {value!r}")
    return value


def non_negative_float(key: str, value: Any) -> float:
    """Return ``value`` as a finite float >= 0 or raise :class:`ConfigError`."""
    number = as_number(value)
    if not math.isfinite(number) or number < 0:
        raise ConfigError(f"Expected `{key}` to be a non-negative number, but got {value!r}")
    return number


def fraction(key: str, value: Any, *, allow_zero: bool = False) -> float:
    """Return ``value`` as a float in (0, 1] (or [0, 1]) or raise :class:`ConfigError`.

    Parameters
    ----------
    key, value
        The config key, named in the error message, and its value: a number or a string that parses as one
        (a bool or NaN is refused).
    allow_zero
        Accept 0 too: the interval is [0, 1] instead of (0, 1].
    """
    number = as_number(value)
    low_ok = number >= 0 if allow_zero else number > 0
    if not (low_ok and number <= 1):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ConfigError(f"Expected `{key}` to be a number in {interval}, but got {value!r}")
    return number


def choice(key: str, value: Any, options: tuple[str, ...] | list[str]) -> str:
    """Return ``value`` if it is one of ``options`` or raise :class:`ConfigError`.

    Parameters
    ----------
    key, value
        The config key, named in the error message, and its value.
    options
        The accepted values; the error message lists them in this order.
    """
    if value not in options:
        raise ConfigError(f"Expected `{key}` to be one of {', '.join(options)}, but got {value!r}")
    return str(value)


def site_name(value: Any) -> str:
    """Return ``value`` if it is a site name (letters, digits, ``_`` and ``-``; at most 64) or raise :class:`ConfigError`."""
    if not isinstance(value, str) or not SITE_NAME_RE.match(value):
        raise ConfigError(
            "Expected `site` to be a name of letters, digits, '_' or '-' "
            f"(at most 64 characters), but got {value!r}"
        )
    return value
