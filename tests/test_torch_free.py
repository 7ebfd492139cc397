"""The daemon never imports torch: loading every built-in plugin and validating every
strategy's parameters stays torch-free; only a merge (in a worker process) imports it."""

import json
import subprocess
import sys
import textwrap

HEAVY = ("torch", "transformers", "peft")

PROBE = textwrap.dedent(
    f"""
    import json
    import sys

    import iteris_daemon.strategy
    from iteris_daemon import plugin_manager

    strategies = plugin_manager.strategies()
    for strategy in strategies.values():
        iteris_daemon.strategy.parse_params(strategy, {{}})
    print(json.dumps({{
        "strategies": sorted(strategies),
        "calibration_sources": sorted(plugin_manager.calibration_sources()),
        "publishers": sorted(plugin_manager.publishers()),
        "imported": [name for name in {HEAVY!r} if name in sys.modules],
    }}))
    """
)


def test_plugins_and_parameters_load_without_torch():
    # A fresh interpreter: this test process has imported torch long ago.
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert {"iteris", "regmean", "task_arithmetic", "ties", "dare", "core_space", "tsv", "iso_c", "iso_cts",
            "peft_cat"} <= set(found["strategies"])
    assert {"adapter", "files", "hub_dataset", "generate"} <= set(found["calibration_sources"])
    assert {"folder", "hub"} <= set(found["publishers"])
    assert found["imported"] == []
