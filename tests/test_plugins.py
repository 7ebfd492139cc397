"""Third-party plugins add strategies the same way the built-ins do."""

import dataclasses
import enum
import json
import math
import os
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import pydantic
import pytest
import torch
from pydantic import Field

from iteris_daemon import hookimpl
from iteris_daemon.calibration import CalibrationSettings, read_jsonl
from iteris_daemon.cli import main
from iteris_daemon.lora import load_adapter
from iteris_daemon.plugin_manager import get_plugin_manager
from iteris_daemon.strategy import MergedAdapter, StrategyParams, per_adapter, task_arithmetic_factors
from registered import registered

PLUGIN_SOURCE = textwrap.dedent(
    '''
    from iteris_daemon import hookimpl
    from iteris_daemon.strategy import MergedAdapter, StrategyParams, per_adapter, task_arithmetic_factors


    class Params(StrategyParams):
        factor: float = 0.5


    class Scaled:
        name = "scaled_sum"
        description = "factor * sum of deltas (third-party test plugin)"
        Params = Params
        needs_calibration = False

        def merge(self, inputs, params, progress):
            weights = [params.factor] * len(inputs.adapters)
            return MergedAdapter(task_arithmetic_factors(inputs.adapters, weights))


    @hookimpl
    def register_strategies(register):
        register(Scaled())
    '''
)


class Mean:
    name = "mean_of_deltas"
    description = "average of the task deltas (registered object in a test)"
    Params = StrategyParams
    needs_calibration = False

    def merge(self, inputs, params, progress):
        n = len(inputs.adapters)
        return MergedAdapter(task_arithmetic_factors(inputs.adapters, [1 / n] * n))


class MeanPlugin:
    @hookimpl
    def register_strategies(self, register):
        register(Mean())


def test_registered_plugin_object(bert, tmp_path, capsys):
    base_dir, adapters = bert
    manager = get_plugin_manager()
    plugin = MeanPlugin()
    manager.register(plugin, name="mean-plugin")
    try:
        assert main(["plugins"]) == 0
        listing = capsys.readouterr().out
        assert "mean-plugin" in listing and "mean_of_deltas" in listing
        args = ["merge", "--base-model", str(base_dir), "--strategy", "mean_of_deltas", "--out", str(tmp_path / "m"), "-q"]
        for adapter in adapters:
            args += ["--adapter", str(adapter)]
        assert main(args) == 0
    finally:
        manager.unregister(plugin)
    merged = load_adapter(tmp_path / "m")
    inputs = [load_adapter(a) for a in adapters]
    for path, module in merged.modules.items():
        expected = sum(a.modules[path].delta() for a in inputs if path in a.modules) / 3
        assert torch.allclose(module.delta(), expected, atol=1e-6)


def test_entry_point_plugin_in_a_fresh_process(bert, tmp_path):
    """An installed distribution with an ``iteris_daemon`` entry point is picked up."""
    base_dir, adapters = bert
    site = tmp_path / "site"
    (site / "thirdparty_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "thirdparty_plugin.py").write_text(PLUGIN_SOURCE)
    (site / "thirdparty_plugin-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: thirdparty-plugin\nVersion: 0.1\n"
    )
    (site / "thirdparty_plugin-0.1.dist-info" / "entry_points.txt").write_text(
        "[iteris_daemon]\nthirdparty = thirdparty_plugin\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    listing = subprocess.run(
        [sys.executable, "-m", "iteris_daemon", "plugins", "--json"], env=env, capture_output=True, text=True, check=True
    )
    data = json.loads(listing.stdout)
    assert {"name": "thirdparty", "origin": "thirdparty-plugin 0.1"} in data["plugins"]
    assert "scaled_sum" in {s["name"] for s in data["strategies"]}

    cmd = [sys.executable, "-m", "iteris_daemon", "merge", "--base-model", str(base_dir), "-q",
           "--strategy", "scaled_sum", "--param", "factor=0.25", "--out", str(tmp_path / "m")]
    for adapter in adapters[:2]:
        cmd += ["--adapter", str(adapter)]
    subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    merged = load_adapter(tmp_path / "m")
    inputs = [load_adapter(a) for a in adapters[:2]]
    path = next(iter(merged.modules))
    expected = 0.25 * sum(a.modules[path].delta() for a in inputs if path in a.modules)
    assert torch.allclose(merged.modules[path].delta(), expected, atol=1e-6)
    report = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    assert report["strategy"] == "scaled_sum" and report["params"] == {"factor": 0.25}


class Misbehaving:
    """A strategy plugin with a bug: ``mistake`` says which."""

    name = "misbehaving"
    description = "returns what it should not (a test plugin)"
    Params = StrategyParams
    needs_calibration = False

    def __init__(self, mistake: str):
        self.mistake = mistake

    def merge(self, inputs, params, progress):
        modules = task_arithmetic_factors(inputs.adapters, [1.0] * len(inputs.adapters))
        path, (B, A) = next((p, f) for p, f in modules.items() if f[0].shape[0] != f[1].shape[1])  # not square
        if self.mistake == "transposed":  # B A's transpose: of a (d_in, d_out) layer
            modules[path] = (A.T, B.T)
        elif self.mistake == "unknown layer":
            modules["no.such.layer"] = modules.pop(path)
        elif self.mistake == "no layers":
            modules = {}
        elif self.mistake == "a layer left out":  # its adapters' deltas there lost
            del modules[path]
        elif self.mistake == "rank 0":
            modules[path] = (B[:, :0], A[:0])
        elif self.mistake == "shared":  # one tensor for every layer's B of that shape: written as copies
            modules = {p: (B if b.shape == B.shape else b, a) for p, (b, a) in modules.items()}
        elif self.mistake == "huge":  # finite, but not in float16
            modules[path] = (B * 1e6, A)
        elif self.mistake == "overflowing product":  # finite factors, an infinite delta
            modules[path] = (B * 1e30, A * 1e30)
        elif self.mistake == "raises":
            raise KeyError("a bug in the plugin")
        elif self.mistake == "exits":  # a library it calls does sys.exit
            sys.exit(3)
        elif self.mistake == "not a MergedAdapter":
            return modules
        elif self.mistake == "not a pair":
            modules[path] = B
        elif self.mistake == "edits its inputs":  # DARE's drop done on the inputs themselves
            inputs.adapters[0].modules[path].B.mul_(0.5)
        elif self.mistake == "replaces its inputs":
            inputs.adapters[-1].modules[path] = dataclasses.replace(inputs.adapters[-1].modules[path], A=A * 2)
        elif self.mistake == "complex":
            modules[path] = (B.to(torch.complex64), A)
        elif self.mistake == "integer":
            modules[path] = (B, (A * 1000).round().to(torch.int32))
        elif self.mistake == "scales its inputs":  # no tensor touched: the evaluation compared with the new scale
            inputs.adapters[0].modules[path].scaling *= 2
        elif self.mistake == "reorders its inputs":  # the evaluation paired adapters with other tasks' calibration
            inputs.adapters.reverse()
        elif self.mistake == "reorders its calibration":
            inputs.calibration.reverse()
        elif self.mistake == "meta":  # built without data by mistake
            modules[path] = (B.to("meta"), A.to("meta"))
        elif self.mistake == "a metric not JSON":
            return MergedAdapter(modules, {"norms": B.norm(dim=0)})
        elif self.mistake == "alignment_loss of another form":
            return MergedAdapter(modules, {"alignment_loss": 0.25})
        elif self.mistake == "truncation_error of another form":
            return MergedAdapter(modules, {"truncation_error": 0.63})
        elif self.mistake == "a NaN alignment loss":  # shown as "nan ->" in the report
            return MergedAdapter(modules, {"alignment_loss": {inputs.adapters[0].name: [1.0, math.nan]}})
        elif self.mistake == "iterations_run of another form":  # "(many iterations ...)", into the catalog too
            return MergedAdapter(modules, {"iterations_run": "many"})
        elif self.mistake == "modules a list":
            return MergedAdapter(list(modules.items()))
        elif self.mistake == "metrics a list":  # "returned MergedAdapter, not a MergedAdapter" (QA PLUG)
            return MergedAdapter(modules, [("alignment_loss", 1.0)])
        elif self.mistake == "sparse":  # isfinite() raised NotImplementedError, a page of dispatcher text
            modules[path] = (B.to_sparse(), A)
        return MergedAdapter(modules)


@pytest.mark.parametrize("mistake, message", [
    ("transposed", "returned factors of shapes B"),
    ("unknown layer", "returned layer 'no.such.layer', which no adapter adapts"),
    ("no layers", "returned no layers"),
    ("a layer left out", "returned no factors for layer "),
    ("rank 0", "and r >= 1"),
    ("huge", "overflow torch.float16"),
    ("overflowing product", "overflows torch.float32 (finite factors, an infinite product)"),  # with --no-eval too
    # These three were tracebacks, exit 1 (found by QA writing a third-party strategy).
    ("raises", "strategy misbehaving failed: KeyError: 'a bug in the plugin'"),
    ("exits", "strategy misbehaving failed: SystemExit: 3"),  # was exit 3, nothing said
    ("not a MergedAdapter", "strategy misbehaving returned dict, not a MergedAdapter"),
    ("not a pair", "strategy misbehaving returned Tensor for "),
    # The evaluation compared the merge with the edited inputs: the figures misled.
    ("edits its inputs", "strategy misbehaving changed its input adapter "),
    ("replaces its inputs", "strategy misbehaving changed its input adapter "),
    # Cast without a word: the imaginary part dropped, the integers written as floats.
    ("complex", "returned factors of dtypes B torch.complex64, A torch.float32 for"),
    ("integer", "returned factors of dtypes B torch.float32, A torch.int32 for"),
    ("scales its inputs", "strategy misbehaving changed its input adapter "),
    ("reorders its inputs", "strategy misbehaving changed its inputs.adapters (their order or items)"),
    ("reorders its calibration", "strategy misbehaving changed its inputs.calibration (their order or items)"),
    ("meta", "returned factors on devices B meta, A meta for "),  # a traceback from isfinite()
    # A traceback at writing the report, after the whole merge; a float truncation_error was ignored
    # (rank_cap_error 0.0 for a real error of 0.63).
    ("a metric not JSON", "returned metric 'norms', which is not JSON (TypeError: Object of type Tensor"),
    ("alignment_loss of another form", "returned metric 'alignment_loss' as 0.25; that key is reserved"),
    ("a NaN alignment loss", "that key is reserved for a table {adapter name: [loss, ...]} of finite numbers"),
    ("iterations_run of another form", "returned metric 'iterations_run' as 'many'; that key is reserved"),
    # Found by QA writing a third-party strategy: tracebacks (an AttributeError; torch's dispatcher).
    ("modules a list", "strategy misbehaving returned modules as list, not a dict"),
    ("metrics a list", "strategy misbehaving returned a MergedAdapter whose metrics are a list, not a dict"),
    ("sparse", "returned factors of layouts B torch.sparse_coo, A torch.strided for "),
    ("truncation_error of another form", "returned metric 'truncation_error' as 0.63; that key is reserved"),
    ("shared", None),
])
def test_a_strategys_mistakes_are_refused_before_anything_is_written(bert, tmp_path, capsys, mistake, message):
    """A plugin strategy's output was written unchecked: an adapter PEFT could not load (or
    that silently lost a layer) and exit 0, or a traceback; tensors shared between layers
    failed in safetensors after the whole merge."""
    base_dir, adapters = bert

    class Plugin:
        @hookimpl
        def register_strategies(self, register):
            register(Misbehaving(mistake))

    manager = get_plugin_manager()
    plugin = Plugin()
    manager.register(plugin, name="misbehaving-plugin")
    out = tmp_path / "m"
    try:
        args = ["merge", "--base-model", str(base_dir), "--strategy", "misbehaving", "--out", str(out), "-q",
                "--no-eval",
                *(["--output-dtype", "float16"] if mistake == "huge" else [])]
        code = main([*args, *(f"--adapter={a}" for a in adapters)])
    finally:
        manager.unregister(plugin)
    err = capsys.readouterr().err
    if message is None:
        assert code == 0, err
        merged = load_adapter(out)
        inputs = [load_adapter(a) for a in adapters]
        assert len(merged.modules) == len({p for a in inputs for p in a.modules})
        return
    assert code == 2 and not out.exists(), err
    last = err.strip().splitlines()[-1]
    assert last.startswith({"huge": "iteris-daemon: error: merged weights of",
                            "overflowing product": "iteris-daemon: error: the merged delta B @ A of",
                            "raises": "iteris-daemon: error: strategy misbehaving failed",
                            "exits": "iteris-daemon: error: strategy misbehaving failed",
                            "edits its inputs": "iteris-daemon: error: strategy misbehaving changed",
                            "scales its inputs": "iteris-daemon: error: strategy misbehaving changed",
                            "reorders its inputs": "iteris-daemon: error: strategy misbehaving changed",
                            "reorders its calibration": "iteris-daemon: error: strategy misbehaving changed",
                            "replaces its inputs": "iteris-daemon: error: strategy misbehaving changed"}.get(
        mistake, "iteris-daemon: error: strategy misbehaving returned")) and message in last
    assert "Traceback" not in err


class _TorchMetrics:
    """Metrics as torch and numpy reductions return them: 0-d tensors and numpy scalars."""

    name = "torch_metrics"
    description = "sum, with metrics computed by torch (a test plugin)"
    Params = StrategyParams
    needs_calibration = False

    def merge(self, inputs, params, progress):
        import numpy as np

        modules = task_arithmetic_factors(inputs.adapters, [1.0] * len(inputs.adapters))
        return MergedAdapter(modules, {"truncation_error": {"max": torch.tensor(0.25)}, "mean": np.float32(0.5),
                                       "alignment_loss": {inputs.adapters[0].name: (torch.tensor(2.0), 1.0)}})


def test_a_strategys_tensor_and_numpy_metrics_are_written_as_numbers(bert, tmp_path, capsys):
    """A 0-d tensor in the metrics was a traceback at writing the report, after the whole merge."""
    base_dir, adapters = bert
    out = tmp_path / "m"
    with registered("register_strategies", _TorchMetrics()):
        code = main(["merge", "--base-model", str(base_dir), "--strategy", "torch_metrics", "--out", str(out), "-q",
                     "--no-eval", *(f"--adapter={a}" for a in adapters)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "merge_report.json").read_text())
    assert report["rank_cap_error"] == 0.25
    assert report["metrics"] == {"truncation_error": {"max": 0.25}, "mean": 0.5,
                                 "alignment_loss": {Path(adapters[0]).name: [2.0, 1.0]}}


class _Loose:
    """A strategy whose Params is a plain pydantic model: ``--param wieght=3`` was ignored."""

    name = "loose"
    needs_calibration = False

    class Params(pydantic.BaseModel):
        weight: float = 1.0

    def merge(self, inputs, params, progress):
        raise AssertionError("never called")


class _Nameless:
    Params = StrategyParams
    needs_calibration = False

    def merge(self, inputs, params, progress):
        raise AssertionError("never called")


@pytest.mark.parametrize("item, message", [
    (_Loose(), "strategy 'loose' (from test_plugins): its Params must subclass iteris_daemon.strategy.StrategyParams"),
    (_Nameless(), "a strategy registered by test_plugins has no name"),
    (None, "the register_strategies hook of plugin 'test-plugin-"),
])
def test_a_malformed_plugin_object_or_a_raising_hook_is_one_line(capsys, item, message):
    """These were tracebacks in `plugins`, `merge` and the daemon (an AttributeError on
    ``name``, a hook's own exception), or a strategy whose parameters took any typo."""
    class Raising:  # the hook's own failure: a name that reads as a ZeroDivisionError
        @property
        def name(self):
            return 1 / 0

    with registered("register_strategies", item if item is not None else Raising()):
        code = main(["plugins"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().startswith(f"iteris-daemon: error: {message}") and err.count("\n") == 1, err
    if item is None:
        assert "(registered) failed: ZeroDivisionError: division by zero (-v shows where)" in err


class _Numbered(_Nameless):
    name = 7  # an Enum member or a number: every listing failed in sorted() with a TypeError naming nothing


class _Nameless2(_Nameless):
    name = "twice"


class _RequiredWeights(_Nameless):
    """A required ``per_adapter`` field, and one with a default factory: both fine (found in review)."""

    name = "required_weights"

    class Params(StrategyParams):
        weights: list[float] = Field(json_schema_extra=per_adapter(1.0))
        scales: list[float] = Field(default_factory=list, json_schema_extra=per_adapter(1.0))


class _ScalarWeights(_Nameless):
    """A ``per_adapter`` marker on a float field: a TypeError (``len()``) at the first merge."""

    name = "scalar_weights"

    class Params(StrategyParams):
        weights: float = Field(1.0, json_schema_extra=per_adapter(1.0))


class _Colour(enum.Enum):
    red = "red"


def _strategy_with(field: str, annotation, default) -> _Nameless:
    """A strategy whose one parameter ``field`` is of ``annotation``, ``default``."""
    params = type("Params", (StrategyParams,), {"__annotations__": {field: annotation}, field: default})
    return type("_Typed", (_Nameless,), {"name": f"typed_{field}", "Params": params})()


def test_a_parameter_no_json_gives_is_found_beside_a_required_one():
    """A required field left the whole check out (its model had no defaults to build); an
    aliased field (`lambda`) was refused as if its type were (review RV13)."""
    from iteris_daemon.errors import PluginError
    from iteris_daemon.plugin_manager import _check_given_as_json

    class Required(StrategyParams):
        need: int
        colour: _Colour = _Colour.red

    class Aliased(StrategyParams):
        lambda_: float = Field(0.5, alias="lambda")

    with pytest.raises(PluginError, match="its parameter colour cannot be given as JSON"):
        _check_given_as_json("required", "test", Required)
    _check_given_as_json("aliased", "test", Aliased)


class _NoSettings:
    kind, Settings = "no_settings", None  # required: a config using it failed when read, in an AttributeError

    def publish(self, request, settings):
        raise AssertionError("never called")


def test_a_plugin_objects_name_and_required_model_are_checked_when_it_registers(capsys):
    with registered("register_strategies", _Numbered()):
        assert main(["plugins"]) == 2
    assert capsys.readouterr().err == ("iteris-daemon: error: a strategy registered by test_plugins has name 7: not "
                                       "a non-empty name without spaces or control characters (logs, listings and "
                                       "the CLI show it)\n")
    # Names that break the listing, or that the command line cannot give (found by QA):
    for what, hook, name, problem in (("calibration source", "register_calibration_sources", "two\nlines", "not a"),
                                      ("calibration source", "register_calibration_sources", "", "not a"),
                                      ("calibration source", "register_calibration_sources", " ", "not a"),
                                      ("calibration source", "register_calibration_sources", "a,b", "it holds ','"),
                                      ("strategy", "register_strategies", "ours:v2", "it holds ':'")):
        item = type("Item", (_Nameless,), {"name": name, "load": None})()
        with registered(hook, item):
            assert main(["plugins"]) == 2
        assert f"a {what} registered by test_plugins has name {name!r}: {problem}" in capsys.readouterr().err
    # One plugin registering a name twice is not "two plugins"; a per-adapter field's default is a list or None.
    with registered("register_strategies", _Nameless2(), _Nameless2()):
        assert main(["plugins"]) == 2
    assert capsys.readouterr().err == "iteris-daemon: error: test_plugins registers a strategy named 'twice' twice: rename one\n"
    with registered("register_strategies", _RequiredWeights()):
        assert main(["plugins"]) == 0
    capsys.readouterr()
    with registered("register_strategies", _ScalarWeights()):
        assert main(["plugins"]) == 2
    assert capsys.readouterr().err == (
        "iteris-daemon: error: strategy 'scalar_weights' (from test_plugins): its parameter weights is marked "
        "per_adapter, one value per adapter, so its default must be a list or None, not 1.0\n")
    # A type that JSON does not hold: every --param and config value was refused ("Input should be
    # an instance of Colour"), blaming it, and the daemon's worker could not read back what was recorded
    for field, annotation, default, refused in (("colour", _Colour, _Colour.red, "an instance of _Colour"),
                                                ("out", Path, Path("/tmp/x"), "an instance of Path"),
                                                ("sizes", tuple[float, ...], (1.0,), "a valid tuple")):
        with registered("register_strategies", _strategy_with(field, annotation, default)):
            assert main(["plugins"]) == 2
        assert capsys.readouterr().err == (
            f"iteris-daemon: error: strategy 'typed_{field}' (from test_plugins): its parameter {field} cannot be given "
            f"as JSON, as --param and the config give it (Input should be {refused}): use Literal[...] for an Enum, "
            "str for a Path, list for a tuple\n")
    # what the built-ins use; a field that opts out of strictness takes a string for its Path (review RV12)
    for field, annotation, default in (("mode", typing.Literal["a", "b"], "a"),
                                       ("folder", Path, Field(Path("/tmp"), strict=False))):
        with registered("register_strategies", _strategy_with(field, annotation, default)):
            assert main(["plugins"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    with registered("register_publishers", _NoSettings()):
        assert main(["plugins"]) == 2
    assert capsys.readouterr().err == (
        "iteris-daemon: error: publisher 'no_settings' (from test_plugins): its Settings must subclass "
        "iteris_daemon.publish.PublisherSettings, which refuses unknown keys\n")


def test_an_installed_plugins_malformed_object_or_raising_hook_names_its_entry_point(tmp_path):
    """A hook that raised was "a plugin's register_strategies hook failed", naming no package."""
    for module, body, expected in (
            ("raising_plugin", "def register_strategies(register):\n    {}['bucket']\n",
             "the register_strategies hook of plugin 'raising' (raising 0.1: raising_plugin) failed: KeyError: "
             "'bucket' (-v shows where)"),
            ("numbered_plugin", "def register_strategies(register):\n    register(type('S', (), {'name': 7, "
             "'Params': None, 'needs_calibration': False, 'merge': None})())\n",
             "a strategy registered by plugin 'numbered' (numbered 0.1: numbered_plugin) has name 7: not a "
             "non-empty name without spaces or control characters (logs, listings and the CLI show it)")):
        name = module.removesuffix("_plugin")
        source = f"from iteris_daemon import hookimpl\n\n@hookimpl\n{body}"
        env = _fake_distribution(tmp_path / module, name, f"{name} = {module}", source)
        result = subprocess.run([sys.executable, "-m", "iteris_daemon", "plugins"], env=env, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 2 and result.stderr == f"iteris-daemon: error: {expected}\n", result.stderr


class _StoreSettings(CalibrationSettings):
    url: str
    ratio: float = 0.5
    root: Path = Path("/srv")  # a plain Path, as a third-party plugin writes it (TOML gives a string)


class _Store:
    """A third-party calibration source with a settings table of its own."""

    name = "store"
    Settings = _StoreSettings

    def load(self, adapter, options):
        raise AssertionError("never called")


class _LooseStore(_Store):
    class Settings(pydantic.BaseModel):
        url: str


def test_a_calibration_sources_settings_table_is_checked_when_the_config_is_read(tmp_path, capsys):
    """A source's ``Settings`` model checks its ``[groups.calibration.<name>]`` table when the
    config is read (``run`` refuses to start), as a strategy's parameters are; before, a
    typo there surfaced at the group's first merge. A model that does not subclass the
    strict base is refused when the plugin registers."""
    config = tmp_path / "config.toml"
    config.write_text('[[groups]]\nname = "g"\nbase_model = "b"\n[groups.calibration.store]\nulr = "x"\n'
                      '[[groups.destinations]]\nkind = "folder"\npath = "/tmp/x"\n')
    with registered("register_calibration_sources", _Store()):
        assert main(["run", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err == (f"iteris-daemon: error: {config}: groups.0 (g): calibration.store: url: Field required; "
                   "ulr: Extra inputs are not permitted\n")
    with registered("register_calibration_sources", _LooseStore()):
        assert main(["plugins"]) == 2
    assert capsys.readouterr().err == (
        "iteris-daemon: error: calibration source 'store' (from test_plugins): its Settings must subclass "
        "iteris_daemon.calibration.CalibrationSettings, which refuses unknown keys\n")
    # inf and nan are no setting (QA PLG: `ratio = inf` was taken); a plain Path field takes TOML's string.
    for value in ("inf", "nan"):
        config.write_text('[[groups]]\nname = "g"\nbase_model = "b"\n[groups.calibration.store]\nurl = "x"\n'
                          f'ratio = {value}\n[[groups.destinations]]\nkind = "folder"\npath = "/tmp/x"\n')
        with registered("register_calibration_sources", _Store()):
            assert main(["run", "--config", str(config)]) == 2
        assert "calibration.store: ratio: Input should be a finite number" in capsys.readouterr().err
    settings = _StoreSettings.model_validate({"url": "x", "root": "/data/calibration"})
    assert settings.root == Path("/data/calibration")


class _Unwritable:
    """A strategy whose parameter's default JSON cannot hold: a traceback after the whole merge."""

    name, description, needs_calibration = "unwritable", "a test plugin", False

    class Params(StrategyParams):
        model_config = pydantic.ConfigDict(arbitrary_types_allowed=True)
        sentinel: object = object()

    def merge(self, inputs, params, progress):
        raise AssertionError("never called: refused before the base model loads")


def test_parameters_json_cannot_hold_are_refused_before_the_merge(bert, tmp_path, capsys):
    base_dir, adapters = bert
    with registered("register_strategies", _Unwritable()):
        code = main(["merge", "--base-model", str(base_dir), "--strategy", "unwritable", "--out", str(tmp_path / "m"),
                     "-q", *(f"--adapter={a}" for a in adapters)])
    err = capsys.readouterr().err
    # refused when it registers (its default: an object), before any merge (it was refused at each)
    assert code == 2 and err.startswith("iteris-daemon: error: strategy 'unwritable' (from test_plugins): its parameter "
                                        "sentinel's default cannot be written as JSON (") and "Traceback" not in err, err
    assert not (tmp_path / "m").exists()


def _fake_distribution(site, name, entry_point, module_source=None):
    """A dist-info folder on PYTHONPATH declaring ``entry_point`` in the iteris_daemon group."""
    info = site / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[iteris_daemon]\n{entry_point}\n")
    if module_source is not None:
        module = entry_point.partition("=")[2].strip().partition(":")[0]
        (site / f"{module}.py").write_text(module_source)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


@pytest.mark.parametrize(
    "entry_point, source, expected",
    [
        ("broken = no_such_module_xyz", None,
         "plugin 'broken' (broken 0.1: no_such_module_xyz) cannot be loaded: No module named 'no_such_module_xyz'"),
        ("broken = broken_on_import", "raise RuntimeError('no GPU here')\n",
         "plugin 'broken' (broken 0.1: broken_on_import) cannot be loaded: RuntimeError: no GPU here"),
        # argparse's parse_args() at module level: merge and run ended silently with exit 0
        ("broken = exits_on_import", "import sys\nsys.exit(0)\n",
         "plugin 'broken' (broken 0.1: exits_on_import) cannot be loaded: SystemExit: 0"),
    ],
)
def test_broken_plugin_is_named_in_one_line(tmp_path, entry_point, source, expected):
    """An installed plugin that cannot be imported: exit 2 with one line naming it, no traceback."""
    env = _fake_distribution(tmp_path / "site", "broken", entry_point, source)
    result = subprocess.run(
        [sys.executable, "-m", "iteris_daemon", "plugins"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("iteris-daemon: error: " + expected), result.stderr
    assert "uninstall 'broken'" in lines[0]
    assert result.stdout == ""


def test_a_third_party_entry_point_named_like_a_built_in_one_is_refused(tmp_path):
    """``baselines = my_package.strategies`` made task_arithmetic, ties and dare vanish with
    exit 0: pluggy loads one entry point per name and skips the other silently."""
    env = _fake_distribution(tmp_path / "site", "my_package", "baselines = my_strategies",
                             "from iteris_daemon import hookimpl\n")
    result = subprocess.run([sys.executable, "-m", "iteris_daemon", "plugins"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().startswith("iteris-daemon: error: plugin name 'baselines' is declared by ")
    assert "(iteris_daemon.plugins.baselines)" in result.stderr and "my_package (my_strategies)" in result.stderr


def test_closed_stdout_pipe_exits_quietly(tmp_path):
    """``iteris-daemon plugins --json | head -c 600``: no BrokenPipeError traceback."""
    reader, writer = os.pipe()
    os.close(reader)  # the reader is gone before anything is written
    try:
        result = subprocess.run(
            [sys.executable, "-m", "iteris_daemon", "plugins", "--json"],
            stdout=writer, stderr=subprocess.PIPE, text=True, timeout=60,
        )
    finally:
        os.close(writer)
    assert result.stderr == ""
    assert result.returncode == 1


def test_a_checkout_without_an_editable_install_is_explained():
    """Run from a source checkout while the installed copy is not editable, the checkout's
    ``iteris_daemon`` is imported and has no ``plugins`` subpackage (the install maps the
    top-level folder into it): the error says so and what to do. (This suite runs from an
    editable install, where the mapping holds, so the missing module is constructed.)"""
    import iteris_daemon
    from iteris_daemon.plugin_manager import _checkout_hint

    checkout = Path(iteris_daemon.__file__).resolve().parent.parent
    for missing in ("iteris_daemon.plugins", "iteris_daemon.migrations"):
        hint = _checkout_hint(ModuleNotFoundError(f"No module named {missing!r}", name=missing))
        assert f"source checkout {checkout}" in hint and "pip install -e ." in hint
    for other in ("iteris_daemon.plugins.no_such_plugin", "numpy_xyz"):  # a real broken plugin: no such advice
        assert _checkout_hint(ModuleNotFoundError(f"No module named {other!r}", name=other)) == ""
    assert _checkout_hint(RuntimeError("iteris_daemon.plugins")) == ""


class _Window(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(strict=True, extra="forbid")
    start: int = 1
    share: float = 0.5


class _Typed:
    """A strategy whose parameters have no default, a default made by a factory, a nested model."""

    class Params(StrategyParams):
        label: str
        weights: list[float] = []
        names: list[str] = Field(default_factory=lambda: ["a", "b"])
        window: _Window = _Window()

    name = "typed"
    needs_calibration = False  # and no description: optional for a third-party plugin

    def merge(self, inputs, params, progress):
        return MergedAdapter(task_arithmetic_factors(inputs.adapters, [1.0] * len(inputs.adapters)))


def test_plugin_listing_copes_with_what_third_party_plugins_leave_out(capsys):
    """`plugins` crashed on a plugin without a ``description``, and showed a required
    parameter's or a factory's default as ``PydanticUndefined``. A compare spec's value
    may hold a ``:``; inf and nan are no parameter value."""
    from iteris_daemon.compare import parse_contender
    from iteris_daemon.errors import ParameterError

    class Plugin:
        @hookimpl
        def register_strategies(self, register):
            register(_Typed())

    manager = get_plugin_manager()
    plugin = Plugin()
    manager.register(plugin, name="typed-plugin")
    try:
        assert main(["plugins"]) == 0 and "typed" in capsys.readouterr().out
        assert main(["plugins", "--json"]) == 0
        assert {"name": "typed", "description": "", "needs_calibration": False} in json.loads(
            capsys.readouterr().out)["strategies"]
        assert main(["plugins", "--params", "typed", "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        # a nested model's default as it is written (it was the string "start=1 share=0.5")
        assert {row["name"]: row["default"] for row in rows} == {"label": None, "weights": [], "names": ["a", "b"],
                                                                 "window": {"start": 1, "share": 0.5}}
        assert {row["name"]: row["required"] for row in rows} == {"label": True, "weights": False, "names": False,
                                                                  "window": False}
        assert parse_contender('typed:label="a:b":names=["x:y"]:window={"start":2}').params.model_dump() == {
            "label": "a:b", "weights": [], "names": ["x:y"], "window": {"start": 2, "share": 0.5}}
        with pytest.raises(ParameterError, match="finite number"):
            parse_contender("typed:label=x:weights=[Infinity]")
    finally:
        manager.unregister(plugin)


def test_plugin_parameters_are_listed_with_the_bounds_their_model_checks(capsys):
    """`plugins --params` showed types and defaults but not the bounds that refuse a value
    (``iterations`` 0, ``refine_holdout`` 1); long types broke the table's columns."""
    assert main(["plugins", "--params", "iteris", "--json"]) == 0
    ranges = {row["name"]: row["range"] for row in json.loads(capsys.readouterr().out)}
    assert ranges["iterations"] == ">= 1, <= 1000" and ranges["refine_lr"] == "> 0, <= 1"
    assert ranges["adaptive_weights"] is None and ranges["samples_per_task"] == ">= 1"
    assert main(["plugins", "--params", "iteris"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert "int (>= 1, <= 1000)" in next(r for r in rows if r.split()[0] == "iterations")
    assert len({row.index("default=") for row in rows}) == 1  # one column, whatever the types' lengths
    # Per-adapter fields said nothing of it: a daemon group must give them as a table by adapter name.
    assert main(["plugins", "--params", "task_arithmetic", "--json"]) == 0
    unnamed = {row["name"]: row["per_adapter"] for row in json.loads(capsys.readouterr().out)}
    assert unnamed == {"weights": 1.0, "scale": None}
    assert main(["plugins", "--params", "task_arithmetic"]) == 0
    assert ("per-adapter weights, in --adapter order (a daemon group gives a table by adapter name; an adapter not "
            "named takes 1.0)"
            in next(r for r in capsys.readouterr().out.splitlines() if r.split()[0] == "weights"))


def test_two_plugins_with_one_name_and_a_misspelt_hook_are_one_line_errors(tmp_path):
    """Both were silent or a traceback: a second strategy named ``iteris`` raised a bare
    ValueError, and a hook spelt ``register_strategy`` loaded a plugin that provided nothing."""
    duplicate = textwrap.dedent(PLUGIN_SOURCE).replace('name = "scaled_sum"', 'name = "iteris"')
    misspelt = "from iteris_daemon import hookimpl\n\n@hookimpl\ndef register_strategy(register):\n    pass\n"
    for module, source, expected in (
            ("dup_plugin", duplicate, "two plugins register a strategy named 'iteris' (from "),
            ("misspelt_plugin", misspelt, "plugin 'misspelt' implements a hook iteris-daemon does not have")):
        name = module.removesuffix("_plugin")
        env = _fake_distribution(tmp_path / module, name, f"{name} = {module}", source)
        result = subprocess.run([sys.executable, "-m", "iteris_daemon", "plugins"], env=env, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith("iteris-daemon: error: " + expected), result.stderr


def test_a_plugins_parameter_named_like_an_evaluation_setting_is_its_own(bert, tmp_path, capsys):
    """The report's evaluation runs the model as a built-in strategy's ``accumulate_dtype``,
    ``blockwise``, ``batch_size`` and ``max_length`` say, and a merge takes its first
    ``samples_per_task``; a plugin's parameter of that name meaning something else (a dtype
    the evaluation has no accumulator for, "auto", fractions) failed its merge, after
    merging or in a traceback (found by QA writing a third-party strategy)."""

    class Params(StrategyParams):
        accumulate_dtype: str = "bfloat16"
        batch_size: str = "auto"
        max_length: float = 0.9
        samples_per_task: float = 0.5

    class OwnDtype:
        name, description, needs_calibration = "own_dtype", "a test plugin", True

        def __init__(self):
            self.Params = Params

        def merge(self, inputs, params, progress):
            return MergedAdapter(task_arithmetic_factors(inputs.adapters, [1.0] * len(inputs.adapters)))

    base_dir, adapters = bert
    with registered("register_strategies", OwnDtype()):
        code = main(["merge", "--base-model", str(base_dir), "--strategy", "own_dtype", "--out", str(tmp_path / "m"),
                     "-q", *(f"--adapter={a}" for a in adapters)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    assert report["tasks"] and report["params"]["samples_per_task"] == 0.5
    assert [i["calibration"]["samples"] for i in report["inputs"]] == [
        len(read_jsonl(Path(a) / "calibration.jsonl").samples) for a in adapters]  # all: none taken as a count


def test_plugins_params_shows_the_settings_of_calibration_sources_and_destinations(capsys):
    """`plugins --params` knew strategies only: a calibration source's or a destination's
    table (``[groups.calibration.hub_dataset]``, ``kind = "hub"``) was documented nowhere the
    CLI shows, and types printed as ``Optional[Annotated[pathlib.Path, AfterValidator(...)]]``."""
    assert main(["plugins", "--params", "hub_dataset", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"repo_id", "filename", "revision", "endpoint", "token_file", "cache_dir", "retry_attempts",
                         "retry_base_seconds", "retry_cap_seconds"}
    assert rows["token_file"]["type"] == "Path | None" and rows["repo_id"]["required"]
    assert rows["filename"]["default"] == "{name}.jsonl" and not rows["filename"]["required"]
    assert main(["plugins", "--params", "destination:hub"]) == 0
    out = capsys.readouterr().out
    assert '[[groups.destinations]] kind = "hub"' in out.splitlines()[0]
    assert next(r for r in out.splitlines() if r.split()[0] == "endpoint").split()[1:4] == ["str", "|", "None"]
    assert main(["plugins", "--params", "adapter"]) == 0
    assert capsys.readouterr().out == (
        "adapter: calibration.jsonl inside the adapter folder (or its Hub repo); 'adapter' takes no settings\n")


def test_plugins_params_tells_where_the_files_mapping_goes_not_the_settings_of_a_table(capsys):
    """``files`` showed "the settings of [groups.calibration.files]" and "(no settings)": that
    table is the adapter -> file mapping, not the source's settings, which it has none of."""
    assert main(["plugins", "--params", "files"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [
        "files: a JSON Lines file mapped to the adapter (--adapter DIR=FILE, or the config); 'files' takes no settings: "
        "a file is mapped to an adapter with --adapter DIR=FILE.jsonl (merge, compare) or a daemon config's "
        '[groups.calibration] files = { ADAPTER = "FILE.jsonl" }']
    assert main(["plugins", "--params", "hub_dataset"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith(
        "the settings of [groups.calibration.hub_dataset] (merge, compare: --calibration-setting hub_dataset.KEY=VALUE)")


def test_plugins_params_names_what_it_cannot_tell_apart(capsys):
    """A name two plugins share (a strategy and a destination kind) is not guessed: KIND:NAME picks one."""

    class Folder(_Typed):
        name = "folder"

    class Plugin:
        @hookimpl
        def register_strategies(self, register):
            register(Folder())

    manager = get_plugin_manager()
    plugin = Plugin()
    manager.register(plugin, name="folder-strategy")
    try:
        assert main(["plugins", "--params", "folder"]) == 2
        assert ("'folder' names a strategy and a destination; write strategy:folder or destination:folder"
                in capsys.readouterr().err)
        assert main(["plugins", "--params", "strategy:folder", "--json"]) == 0
        assert {row["name"] for row in json.loads(capsys.readouterr().out)} == {"label", "weights", "names", "window"}
        assert main(["plugins", "--params", "calibration:folder"]) == 2
        assert "no calibration source named 'folder'" in capsys.readouterr().err
        assert main(["plugins", "--params", "publisher:folder"]) == 2
        assert "unknown kind 'publisher' (use strategy, calibration, destination)" in capsys.readouterr().err
    finally:
        manager.unregister(plugin)


def test_calibration_setting_takes_a_source_name_holding_a_dot():
    """``--calibration-setting SOURCE.KEY=VALUE`` split at the first '.': a source named
    ``my.store`` (which a config writes as ``[groups.calibration."my.store"]``) could not be
    given a setting. A key has no '.', so the last '.' before '=' ends the source's name."""
    from iteris_daemon.cli.merge import _calibration_settings

    dotted = type("Dotted", (_Store,), {"name": "my.store"})()
    with registered("register_calibration_sources", dotted):
        tables = _calibration_settings(["my.store.url=https://x.example/a.b", "my.store.ratio=0.25"], ("my.store",))
    assert tables == {"my.store": {"url": "https://x.example/a.b", "ratio": 0.25}}
