"""JSON from untrusted files (adapter configs, safetensors headers, calibration lines),
and JSON that other programs can read (:func:`dumps`).

``json.loads`` recurses once per nesting level: a few hundred kilobytes of ``[[[[``
raise ``RecursionError`` (not a ``ValueError``), which stopped whole scans; a value
parsed just under Python's recursion limit can still exhaust it later, wherever it
is walked or written again. A number of more than 4300 digits raises a bare
``ValueError``. Here every such input is a :class:`JSONLimitError`, a ``ValueError``
like every other parse failure, so callers catch ``ValueError`` alone.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 64  # PEFT configs nest 3 levels, safetensors headers 3, calibration lines 1


class JSONLimitError(ValueError):
    """Valid JSON, maybe, but beyond what an untrusted file may ask of the parser."""


def loads(text: str | bytes, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads(text)``, refusing values nested deeper than ``max_depth`` levels."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise JSONLimitError(f"nested deeper than {max_depth} levels") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise
    except ValueError as exc:  # int(): "Exceeds the limit (4300 digits) for integer string conversion"
        raise JSONLimitError(f"a number too long to convert ({str(exc).split(';')[0]})") from None
    if depth(value, max_depth) > max_depth:
        raise JSONLimitError(f"nested deeper than {max_depth} levels")
    return value


def depth(value: Any, stop: int | None = None) -> int:
    """Nesting depth of lists and objects in ``value`` (a scalar: 0), without recursion;
    counting ends once it passes ``stop``."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, level = pending.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if stop is not None and deepest > stop:
            break
        pending.extend((child, level + 1) for child in children)
    return deepest


def finite(value: Any) -> Any:
    """``value`` with every non-finite float as None: JSON has no Infinity or NaN (Python
    writes them anyway, and JSON.parse, Go and PostgreSQL refuse the file)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def dumps(value: Any, **options: Any) -> str:
    """Standard JSON: non-finite floats written as null (see :func:`finite`)."""
    return json.dumps(finite(value), allow_nan=False, **options)
