"""Registering a test's plugin objects for the length of a ``with`` block, through the
real plugin manager, as an installed package's ``register_*`` hook would."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from iteris_daemon import hookimpl
from iteris_daemon.plugin_manager import get_plugin_manager


@contextmanager
def registered(hook: str, *objects) -> Iterator[None]:
    """``hook`` (``register_strategies``, ``register_calibration_sources``,
    ``register_publishers``) registers ``objects`` while the block runs."""

    def register_all(self, register):
        for item in objects:
            register(item)

    plugin_class = type("TestPlugin", (), {hook: hookimpl(register_all)})
    register_all.__name__ = hook
    manager, plugin = get_plugin_manager(), plugin_class()
    manager.register(plugin, name=f"test-plugin-{id(plugin)}")
    try:
        yield
    finally:
        manager.unregister(plugin)
