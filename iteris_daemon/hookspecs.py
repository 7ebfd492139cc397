"""The hooks a plugin can implement. Built-in strategies, calibration sources and
publishers use exactly these hooks, registered through the ``iteris_daemon`` entry-point group.

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
    from .calibration import CalibrationSource
    from .publish import Publisher
    from .strategy import MergeStrategy

PROJECT = "iteris_daemon"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_strategies(register: Callable[["MergeStrategy"], None]) -> None:
    """Register merge strategies by calling ``register(strategy)`` once per strategy.

    A strategy is an object satisfying :class:`iteris_daemon.strategy.MergeStrategy`:
    a unique ``name`` (a string), ``needs_calibration`` (whether ``inputs.calibration``
    must hold every adapter's samples), a ``Params`` model subclassing
    :class:`~iteris_daemon.strategy.StrategyParams` (its fields are the strategy's
    parameters, validated before the merge starts), a ``merge(inputs, params, progress)``
    method returning a :class:`~iteris_daemon.strategy.MergedAdapter`, and optionally a
    one-line ``description``.
    """


@hookspec
def register_calibration_sources(register: Callable[["CalibrationSource"], None]) -> None:
    """Register calibration sources by calling ``register(source)`` once per source.

    A source satisfies :class:`iteris_daemon.calibration.CalibrationSource`: a unique
    ``name`` (what ``CalibrationOptions.order`` lists) and ``load(adapter, options)``
    returning a :class:`~iteris_daemon.calibration.CalibrationSet` or ``None`` to let
    the next source in the configured order answer. Its optional ``Settings``, a
    :class:`~iteris_daemon.calibration.CalibrationSettings` model, checks its config table
    (``[groups.calibration.<name>]``, in ``options.settings[name]``) when the config is
    read; :func:`~iteris_daemon.calibration.source_settings` validates it the same way in
    ``load``; a source without one takes no settings (a table given it is refused). A source
    whose ``load`` needs torch
    or a model sets ``runs_in_worker = True``: the daemon, which never imports torch,
    then calls it in a worker process (the adapter it gets is read from the run's
    snapshot; the samples come back as JSON). A source that keeps state between the
    ``load`` calls of a run (a loaded model) frees it in an optional ``release()``, called
    once the run's adapters were all asked about, before the merge loads its base model.
    """


@hookspec
def register_publishers(register: Callable[["Publisher"], None]) -> None:
    """Register publishers by calling ``register(publisher)`` once per publisher.

    A publisher satisfies :class:`iteris_daemon.publish.Publisher`: a unique ``kind``
    (what a destination names in the config), a ``Settings`` model subclassing
    :class:`~iteris_daemon.publish.PublisherSettings` (its destination's table, checked when
    the config is read), and ``publish(request, settings)`` returning a
    :class:`~iteris_daemon.publish.PublishResult`.
    """
