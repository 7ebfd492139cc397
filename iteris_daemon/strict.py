"""The validation every settings table and parameter model shares, plugins' included."""

from pydantic import ConfigDict

STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)
"""A settings table: unknown keys are an error, not a silent no-op; TOML has inf and nan, and
no setting means "forever" by them (a gate is turned off with false); values are not coerced
across types (``max_rank = true`` was 1, ``exact_ranks = "off"`` false, a plugin source's
``count = true`` 1 sample; an int is still a float)."""

PLUGIN_SETTINGS = ConfigDict(extra="forbid", allow_inf_nan=False)
"""The base of a plugin's settings model: unknown keys and inf/nan refused, values converted
as pydantic does by default (a TOML string to a ``Path`` or an Enum field of a third-party
plugin). A plugin may set ``model_config = STRICT`` itself, as the built-ins do (with
``iteris_daemon.config.PathSetting`` for paths)."""
