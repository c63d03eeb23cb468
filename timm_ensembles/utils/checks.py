"""The checks of the numbers a user gives (flags, task options, function arguments), in one place: what a whole
number and a number are, their ranges, and the one line that refuses a value.

A whole number is an ``int`` and never a ``bool`` (``True`` is an int to Python, never a count); a number is an int
or a float, never a bool, and finite unless said otherwise. ``numpy=True`` also takes NumPy's scalars (any
``numbers.Integral`` / ``numbers.Real``), for functions fed from arrays. Bounds are named as pydantic's: ``ge`` and
``le`` inclusive, ``gt`` and ``lt`` exclusive; NaN is in no range.

The messages are ``<name> must be <expected>, got <value>.`` for a function's argument or a task's option, and
``--<flag> <value>: must be <expected>.`` for a command-line flag; ``expected`` is the caller's, in the words of its
domain (``a positive integer``, ``a probability in [0, 1]``).
"""
import difflib
import math
import numbers
from typing import Any

__all__ = ['is_whole', 'is_number', 'check_whole', 'check_number', 'check_range', 'check_option', 'flag_message',
           'close_matches']


def _in_range(value: Any, ge=None, gt=None, le=None, lt=None) -> bool:
    return ((ge is None or value >= ge) and (gt is None or value > gt)
            and (le is None or value <= le) and (lt is None or value < lt))


def is_whole(value: Any, ge: int | None = None, le: int | None = None, *, numpy: bool = False) -> bool:
    """Whether ``value`` is a whole number (not a bool) with ``ge <= value <= le``."""
    kinds = numbers.Integral if numpy else int
    return isinstance(value, kinds) and not isinstance(value, bool) and _in_range(value, ge=ge, le=le)


def is_number(value: Any, ge: float | None = None, gt: float | None = None, le: float | None = None,
              lt: float | None = None, *, finite: bool = True, numpy: bool = False) -> bool:
    """Whether ``value`` is a number (not a bool; finite unless ``finite=False``) within the bounds given."""
    kinds = numbers.Real if numpy else (int, float)
    if not isinstance(value, kinds) or isinstance(value, bool) or (finite and not math.isfinite(value)):
        return False
    return _in_range(value, ge, gt, le, lt)


def check_whole(name: str, value: Any, expected: str, ge: int | None = None, le: int | None = None, *,
                optional: bool = False, numpy: bool = False, error: type[Exception] = ValueError) -> Any:
    """Return ``value`` if it is a whole number within the bounds (or None, where ``optional``), else raise
    ``error('<name> must be <expected>, got <value!r>.')``."""
    if not (optional and value is None) and not is_whole(value, ge, le, numpy=numpy):
        raise error(f'{name} must be {expected}, got {value!r}.')
    return value


def check_number(name: str, value: Any, expected: str, ge: float | None = None, gt: float | None = None,
                 le: float | None = None, lt: float | None = None, *, optional: bool = False, numpy: bool = False,
                 error: type[Exception] = ValueError) -> Any:
    """Return ``value`` if it is a finite number within the bounds (or None, where ``optional``), else raise
    ``error('<name> must be <expected>, got <value!r>.')``."""
    if not (optional and value is None) and not is_number(value, ge, gt, le, lt, numpy=numpy):
        raise error(f'{name} must be {expected}, got {value!r}.')
    return value


def check_range(name: str, value: Any, expected: str, ge: float | None = None, gt: float | None = None,
                le: float | None = None, lt: float | None = None) -> Any:
    """Return ``value``, a number already checked to be one (``check_option``), if it lies within the bounds, else
    raise ``ValueError('<name> must be <expected>, got <value>.')``."""
    if not _in_range(value, ge, gt, le, lt):
        raise ValueError(f'{name} must be {expected}, got {value}.')
    return value


def check_option(name: str, value: Any, kind: type, low: float | None = None) -> None:
    """Refuse a task option of the wrong type or range when the task is built (options arrive from the command line
    as Python literals, and a string where a number belongs would otherwise fail only when the term is first used).

    Args:
        name: The option's name, for the message.
        value: Its value.
        kind: ``int`` (whole numbers only) or ``float`` (any real number, NaN and infinities included: a range
            check after it refuses those where they do not belong).
        low: Smallest allowed value, if any.

    Raises:
        ValueError: Saying what was given and what is allowed.
    """
    if not (is_whole(value) if kind is int else is_number(value, finite=False)):
        raise ValueError(f'{name} must be {"an integer" if kind is int else "a number"}, got {value!r}.')
    if low is not None and value < low:
        raise ValueError(f'{name} must be >= {low}, got {value}.')


def flag_message(name: str, value: Any, expected: str) -> str:
    """The line refusing a command-line flag's value: ``--<name> <value>: must be <expected>.`` (``name`` as the
    namespace spells it, ``_`` for ``-``; a list shown as its items, as typed)."""
    shown = ' '.join(map(str, value)) if isinstance(value, (list, tuple)) else value
    return f"--{name.replace('_', '-')} {shown}: must be {expected}."


def close_matches(word: str, candidates, n: int = 3) -> list[str]:
    """The candidates nearest ``word`` (difflib), best first."""
    return difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.6)
