"""The hooks a plugin can implement. Built-in strategies and calibration sources use
exactly these hooks, registered through the ``iteris_daemon`` entry-point group.

A plugin is any module or object with functions decorated by :data:`hookimpl`::

    from iteris_daemon import hookimpl

    @hookimpl
    def register_strategies(register):
        register(MyStrategy())
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    from .calibration import CalibrationSet
    from .lora import LoraAdapter
    from .strategy import MergeStrategy

PROJECT = "iteris_daemon"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_strategies(register: Callable[["MergeStrategy"], None]) -> None:
    """Register merge strategies by calling ``register(strategy)`` once per strategy.

    A strategy is an object satisfying :class:`iteris_daemon.strategy.MergeStrategy`:
    a unique ``name``, a one-line ``description``, a pydantic ``Params`` model (its
    fields are the strategy's parameters, validated before the merge starts) and a
    ``merge(inputs, params, progress)`` method returning a merged adapter.
    """


@hookspec(firstresult=True)
def calibration_for(adapter: "LoraAdapter", options: dict) -> "CalibrationSet | None":
    """Return unlabelled calibration inputs for ``adapter``, or ``None`` to let the next
    source answer. The first non-``None`` answer wins.

    ``options`` carries the caller's configuration, e.g. ``{"files": {adapter_name: path}}``
    for files given on the command line. Raise :class:`~iteris_daemon.errors.CalibrationError`
    when data exists but is malformed: silently skipping it would merge on the wrong data.
    """
