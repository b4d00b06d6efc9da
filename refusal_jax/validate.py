"""One validator for numbers given by users: command-line flags, settings dataclasses and API arguments alike.

A NaN never passes (it compares false with every threshold, so it silently switches filters off); infinities only
where a bound may meaningfully be infinite; ranges are checked where the number is read, with a message naming it.
As an argparse `type=` the validator raises `DataError`, which argparse does not catch: the command's
`main_wrapper` prints it as its one `error:` line.
"""

from __future__ import annotations

import math
from typing import Callable

from refusal_jax.errors import DataError


def real(value, name: str, *, low: float | None = None, high: float | None = None, low_open: bool = False,
         high_open: bool = False, allow_inf: bool = False) -> float:
    """`value` as a float: a number (not a bool), never NaN, finite unless `allow_inf`, within [low, high]
    (open ends with `low_open` / `high_open`). DataError naming `name` otherwise."""
    if isinstance(value, (bool, str, bytes)) or value is None:  # a setting given as text is a mistake, not a number
        raise DataError(f"{name} must be a number, got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        raise DataError(f"{name} must be a number, got {value!r}") from None
    if math.isnan(x):
        raise DataError(f"{name} is NaN; give a number")
    if math.isinf(x) and not allow_inf:
        raise DataError(f"{name} must be finite, got {x}")
    if low is not None and (x < low or (low_open and x == low)):
        raise DataError(f"{name} must be {'>' if low_open else '>='} {low}, got {x}")
    if high is not None and (x > high or (high_open and x == high)):
        raise DataError(f"{name} must be {'<' if high_open else '<='} {high}, got {x}")
    return x


def optional_real(value, name: str, **bounds) -> float | None:
    """`real`, with None passing through (an unset setting)."""
    return None if value is None else real(value, name, **bounds)


def integer(value, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int (an int or an integral float, not a bool) within [low, high]; DataError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not value.is_integer()):
        raise DataError(f"{name} must be a whole number, got {value!r}")
    n = int(value)
    if low is not None and n < low:
        raise DataError(f"{name} must be >= {low}, got {n}")
    if high is not None and n > high:
        raise DataError(f"{name} must be <= {high}, got {n}")
    return n


def real_arg(flag: str, **bounds) -> Callable[[str], float]:
    """An argparse `type=` for a float flag checked by `real` (its DataError becomes the command's error line)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise DataError(f"{flag} must be a number, got {text!r}") from None
        return real(value, flag, **bounds)

    parse.__name__ = "number"  # argparse names the type in its own messages
    return parse
