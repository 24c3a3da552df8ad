"""JSON read from files that anyone could have damaged: records, states, metrics, manifests.

`json.loads` takes more than our writers ever write, and what it takes breaks the reader later:
NaN and Infinity (int() and format() of them raise), integers of hundreds of digits (float() of
them overflows; past 4,300 digits json.loads itself raises a plain ValueError, not a decode
error) and arrays nested thousands deep (RecursionError). `loads` refuses all of these with
json.JSONDecodeError, the one exception every reader already treats as "a damaged line".

Numbers our writers write (steps, seconds, byte counts, ids) are finite and fit in 64 bits. A loss
can be NaN or infinite (a run that diverged), so metrics rows are read with `nonfinite=True`: NaN
and Infinity are then floats, and whoever reads a step, a restart or a time checks it is finite.
"""

from __future__ import annotations

import json
import math
from typing import Any

INT_LIMIT = 2**63  # what a C long holds: every count, step or size we write fits


def _refuse(text: str) -> Any:
    raise ValueError(f"{text} is not a finite number")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses to inf
        raise ValueError(f"{text[:20]} is out of range")
    return value


def _int(text: str) -> int:
    if len(text) > 20:  # no need to convert 5,000 digits to find them too many
        raise ValueError(f"an integer of {len(text)} digits")
    value = int(text)
    if not -INT_LIMIT <= value < INT_LIMIT:
        raise ValueError(f"{text} is out of range")
    return value


def loads(text: str | bytes, nonfinite: bool = False) -> Any:
    """json.loads that raises json.JSONDecodeError for anything our writers would never write
    (NaN, Infinity and floats past the float range are allowed with `nonfinite`)."""
    try:
        if nonfinite:
            return json.loads(text, parse_int=_int)
        return json.loads(text, parse_constant=_refuse, parse_float=_float, parse_int=_int)
    except json.JSONDecodeError:
        raise
    except (ValueError, RecursionError) as exc:  # our hooks, an undecodable byte string, deep nesting
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        doc = text if isinstance(text, str) else text.decode("utf-8", "replace")
        raise json.JSONDecodeError(why, doc[:200], 0) from None
