"""The validation every settings table and parameter model shares, plugins' included."""

from pydantic import ConfigDict

STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)
"""A settings table: unknown keys are an error, not a silent no-op; TOML has inf and nan, and
no setting means "forever" by them (a gate is turned off with false); values are not coerced
across types (``max_rank = true`` was 1, ``exact_ranks = "off"`` false, a plugin source's
``count = true`` 1 sample; an int is still a float)."""
