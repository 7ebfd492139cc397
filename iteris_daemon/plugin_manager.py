"""The one place the plugin manager is built. Built-in plugins arrive through the
``iteris_daemon`` entry-point group like any third-party package's."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import NoReturn

import pluggy
from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from . import hookspecs
from .errors import ConfigError, PluginError, UnknownStrategyError
from .calibration import CalibrationSettings, CalibrationSource
from .publish import Publisher, PublisherSettings
from .strategy import DEFAULT_STRATEGY, MergeStrategy, StrategyParams, per_adapter_fields


@cache
def get_plugin_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    _refuse_shared_names()
    try:
        manager.load_setuptools_entrypoints(hookspecs.PROJECT)
    except (Exception, SystemExit) as exc:  # sys.exit(0) at a plugin's import ended merge and run with exit 0
        _raise_for_broken_plugin(manager, exc)
    try:
        manager.check_pending()
    except pluggy.PluginValidationError as exc:  # a misspelt hook would silently provide nothing
        name = manager.get_name(exc.plugin) or repr(exc.plugin)
        hooks = ", ".join(sorted(n for n in dir(hookspecs) if n.startswith("register_")))
        raise PluginError(f"plugin {name!r} implements a hook iteris-daemon does not have ({_one_line(exc)}); "
                          f"its hooks: {hooks}") from None
    return manager


def _refuse_shared_names() -> None:
    """Two packages with an entry point of one name in our group: pluggy loads the first
    it finds and skips the other without a word, so a third-party ``baselines`` took the
    built-in strategies away (which one won followed ``sys.path``)."""
    import importlib.metadata

    owners: dict[str, tuple[str, str]] = {}  # entry-point name -> (distribution, object)
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group != hookspecs.PROJECT:
                continue
            owner = (dist.metadata["Name"], ep.value)
            first = owners.setdefault(ep.name, owner)
            if first[0].lower().replace("_", "-") != owner[0].lower().replace("_", "-"):  # not one package seen twice
                raise PluginError(f"plugin name {ep.name!r} is declared by {first[0]} ({first[1]}) and by {owner[0]} "
                                  f"({owner[1]}): only one would load; one of them must rename its entry point in "
                                  f"the {hookspecs.PROJECT!r} group")


def _raise_for_broken_plugin(manager: pluggy.PluginManager, error: Exception | SystemExit) -> NoReturn:
    """A plugin failed to import or register: name its entry point and distribution.

    A broken plugin is a hard error, not a warning: strategies, calibration sources and
    publishers all come from plugins, and a merge or daemon run that silently lacked one
    could produce something other than what was asked. pluggy stops at the first failure
    with the plugins before it registered; this repeats its loop from there (on a manager
    that is then thrown away) to find which entry point it was."""
    import importlib.metadata

    for dist in list(importlib.metadata.distributions()):
        for ep in dist.entry_points:
            if ep.group != hookspecs.PROJECT or manager.has_plugin(ep.name) or manager.is_blocked(ep.name):
                continue
            try:
                manager.register(ep.load(), name=ep.name)
            except (Exception, SystemExit) as exc:
                where = f"{dist.metadata['Name']} {dist.version}: {ep.value}"
                advice = _checkout_hint(exc) or (f"iteris-daemon refuses to run with a broken plugin installed: "
                                                 f"fix or uninstall {dist.metadata['Name']!r}")
                raise PluginError(f"plugin {ep.name!r} ({where}) cannot be loaded: {_one_line(exc)} ({advice})") from None
    raise PluginError(f"the {hookspecs.PROJECT!r} plugins cannot be loaded: {_one_line(error)}") from None


def _checkout_hint(exc: Exception) -> str:
    """What to do when our own plugins are missing because ``iteris_daemon`` was imported
    from a source checkout (the current folder comes first on ``sys.path``) while the
    installed copy is not an editable one: the checkout keeps ``plugins/`` and
    ``migrations/`` beside the package, and only an install maps them into it."""
    if not isinstance(exc, ModuleNotFoundError) or exc.name not in (f"{__package__}.plugins", f"{__package__}.migrations"):
        return ""
    checkout = Path(__file__).resolve().parent.parent
    if not (checkout / "plugins").is_dir():
        return ""
    return (f"{__package__} was imported from the source checkout {checkout}, whose plugins/ folder only an "
            f"install maps into the package: install the checkout editable (pip install -e .) or run from "
            f"another folder")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if isinstance(exc, ImportError) and text else f"{type(exc).__name__}: {text}"


# What separates a name from what follows it on the command line: ``compare --strategy NAME:K=V``,
# ``--calibration-order NAME,NAME``.
_SEPARATORS = {"strategy": (":", "compare --strategy NAME:KEY=VALUE"),
               "calibration source": (",", "--calibration-order A,B")}


def _name_problem(name: object, what: str) -> str | None:
    """Why ``name`` cannot name a plugin object of kind ``what``, or None."""
    if not isinstance(name, str) or not name or any(c.isspace() or not c.isprintable() for c in name):
        return "not a non-empty name without spaces or control characters (logs, listings and the CLI show it)"
    separator, where = _SEPARATORS.get(what, ("", ""))
    if separator and separator in name:
        return f"it holds {separator!r}, which separates names in {where}"
    return None


# What each kind of plugin object must have (``description`` is optional), and the base
# class its validated settings must use where it has them, which refuse unknown keys (a
# typo is an error). A calibration source's ``Settings`` is optional.
_REQUIRED = {
    "strategy": (("name", "Params", "needs_calibration", "merge"), ("Params", StrategyParams)),
    "calibration source": (("name", "load"), ("Settings", CalibrationSettings)),
    "publisher": (("kind", "Settings", "publish"), ("Settings", PublisherSettings)),
}


def _collect(hook, key: str, what: str) -> dict:
    """Call a ``register_*`` hook, plugin by plugin in pluggy's order; a second plugin may not
    silently take a name, and a malformed object (a name that is not a string, a required
    ``Params``/``Settings`` of None) or a hook that raises is one line naming its plugin (the
    entry point and distribution of an installed one), not a traceback later, naming nothing."""
    found: dict = {}
    origins: dict = {}
    attributes, settings = _REQUIRED[what]
    manager = get_plugin_manager()
    dists = {id(plugin): dist for plugin, dist in manager.list_plugin_distinfo()}

    def register(item, where: str) -> None:
        missing = [name for name in attributes if not hasattr(item, name)]
        if missing:
            raise PluginError(f"a {what} registered by {where} has no {', '.join(missing)}")
        name = getattr(item, key)
        if (problem := _name_problem(name, what)) is not None:
            raise PluginError(f"a {what} registered by {where} has {key} {name!r}: {problem}")
        model = getattr(item, settings[0], None)
        if (model is not None or settings[0] in attributes) and not (
                isinstance(model, type) and issubclass(model, settings[1])):
            raise PluginError(f"{what} {name!r} (from {where}): its {settings[0]} must subclass "
                              f"{settings[1].__module__}.{settings[1].__name__}, which refuses unknown keys")
        if what == "strategy":
            _check_per_adapter_defaults(name, where, model)
            _check_given_as_json(name, where, model)
        if name in found and origins[name] == where:
            raise PluginError(f"{where} registers a {what} named {name!r} twice: rename one")
        if name in found:
            raise PluginError(f"two plugins register a {what} named {name!r} (from "
                              f"{' and '.join(sorted({origins[name], where}))}): uninstall or rename one")
        found[name], origins[name] = item, where

    for impl in reversed(getattr(manager.hook, hook).get_hookimpls()):  # pluggy calls the last registered first
        dist = dists.get(id(impl.plugin))
        module = getattr(impl.plugin, "__name__", type(impl.plugin).__module__)
        plugin = f"plugin {impl.plugin_name!r} ({dist.project_name} {dist.version}: {module})" if dist else None
        arguments = {"register": lambda item: register(item, plugin or type(item).__module__)}
        try:
            impl.function(*(arguments[name] for name in impl.argnames))
        except (PluginError, MemoryError):  # out of memory is said as such (a worker under its limit)
            raise
        except (Exception, SystemExit) as exc:  # pluggy says which plugin's hook failed in the traceback only
            raise PluginError(f"the {hook} hook of {plugin or f'plugin {impl.plugin_name!r} ({module})'} failed: "
                              f"{_one_line(exc)} (-v shows where)") from exc
    return found


def _check_per_adapter_defaults(name: str, where: str, params: type[StrategyParams]) -> None:
    """A field marked ``per_adapter`` holds a list (one value per adapter) or None."""
    for field in per_adapter_fields(params):
        info = params.model_fields[field]
        if info.is_required():  # no default to check: the value is checked before each merge
            continue
        default = info.get_default(call_default_factory=True)
        if default is not None and not isinstance(default, (list, tuple)):
            raise PluginError(f"strategy {name!r} (from {where}): its parameter {field} is marked per_adapter, one "
                              f"value per adapter, so its default must be a list or None, not {default!r:.40}")


def _check_given_as_json(name: str, where: str, params: type[StrategyParams]) -> None:
    """Parameters arrive as JSON values (``--param``, a TOML table) and are recorded as JSON,
    which the daemon's merge worker reads back, all strictly: a field whose default's own JSON
    form its type refuses (an Enum, a Path, a tuple) could never be given, and was refused at
    every merge, blaming the value. A required field has no default to try."""
    defaults = params.model_construct()  # the defaults, unvalidated (a required field has none)
    given = {}
    for field, info in params.model_fields.items():
        if info.is_required():
            continue
        try:
            given |= defaults.model_dump(mode="json", include={field}, by_alias=True)  # as a config names it
        except (PydanticSerializationError, TypeError, ValueError) as exc:
            raise PluginError(f"strategy {name!r} (from {where}): its parameter {field}'s default cannot be written "
                              f"as JSON ({_one_line(exc)})") from None
    try:
        params.model_validate(given)  # the model's own validators and strictness, as --param's values meet them
    except (TypeError, ValueError) as exc:  # a validator's own rule, or a mistake in it: met at the merge
        errors = exc.errors() if isinstance(exc, ValidationError) else []
        # A type refused (not a validator's rule, which judges the values together, nor a field not given)
        for error in errors:
            if error["loc"] and error["type"] not in ("value_error", "assertion_error", "missing"):
                raise PluginError(f"strategy {name!r} (from {where}): its parameter {error['loc'][0]} cannot be given "
                                  f"as JSON, as --param and the config give it ({error['msg']}): use Literal[...] "
                                  "for an Enum, str for a Path, list for a tuple") from None


def strategies() -> dict[str, MergeStrategy]:
    """All registered strategies by name, the default first."""
    found = _collect("register_strategies", "name", "strategy")
    return dict(sorted(found.items(), key=lambda item: (item[0] != DEFAULT_STRATEGY, item[0])))


def get_strategy(name: str) -> MergeStrategy:
    available = strategies()
    if name not in available:
        raise UnknownStrategyError(f"unknown strategy {name!r}; available: {', '.join(sorted(available))}")
    return available[name]


def calibration_sources() -> dict[str, CalibrationSource]:
    """All registered calibration sources by name."""
    return _collect("register_calibration_sources", "name", "calibration source")


def publishers() -> dict[str, Publisher]:
    """All registered publishers by kind."""
    return dict(sorted(_collect("register_publishers", "kind", "publisher").items()))


def get_publisher(kind: str) -> Publisher:
    available = publishers()
    if kind not in available:
        raise ConfigError(f"unknown destination kind {kind!r}; available: {', '.join(available) or 'none'}")
    return available[kind]


def plugin_names() -> list[tuple[str, str]]:
    """(name, origin) of every loaded plugin, for ``iteris-daemon plugins``."""
    manager = get_plugin_manager()
    dists = {id(plugin): dist for plugin, dist in manager.list_plugin_distinfo()}
    rows = []
    for name, plugin in manager.list_name_plugin():
        if plugin is hookspecs or name is None:
            continue
        dist = dists.get(id(plugin))
        origin = f"{dist.project_name} {dist.version}" if dist else "registered at run time"
        rows.append((name, origin))
    return rows
