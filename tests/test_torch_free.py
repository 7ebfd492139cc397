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
            "knots", "peft_cat"} <= set(found["strategies"])
    assert {"adapter", "files", "hub_dataset", "generate"} <= set(found["calibration_sources"])
    assert {"folder", "hub"} <= set(found["publishers"])
    assert found["imported"] == []


STATUS_PROBE = textwrap.dedent(
    """
    import json
    import sys

    from iteris_daemon.cli import main

    code = main(["status", "--config", sys.argv[1], "--json"])
    print(json.dumps([name for name in ("alembic", "numpy", "prometheus_client", "huggingface_hub", "watchdog",
                                        "apscheduler", "torch") if name in sys.modules]), file=sys.stderr)
    sys.exit(code)
    """
)


def test_status_loads_only_what_it_shows(tmp_path):
    """``iteris-daemon status`` (a command operators and scripts run often) reads a
    migrated catalog without importing Alembic, numpy, the metrics library, the Hub
    client, the watcher or the scheduler: their imports were most of its time."""
    state = tmp_path / "state"
    config = tmp_path / "daemon.toml"
    config.write_text(textwrap.dedent(f"""
        [daemon]
        state_dir = "{state}"
        [daemon.metrics]
        listen = "127.0.0.1:0"
        [[sources]]
        name = "team"
        kind = "hub"
        repos = ["alice/lora-a"]
        [[groups]]
        name = "unified"
        base_model = "{tmp_path / 'base'}"
        [[groups.destinations]]
        kind = "folder"
        path = "{tmp_path / 'published'}"
        """))
    first = subprocess.run([sys.executable, "-c", STATUS_PROBE, str(config)], capture_output=True, text=True, timeout=300)
    assert first.returncode == 2 and "no catalog at" in first.stderr  # status creates none (a typo must not look empty)
    subprocess.run([sys.executable, "-m", "iteris_daemon", "db", "upgrade", "--db", f"sqlite:///{state / 'catalog.db'}"],
                   check=True, capture_output=True, timeout=300)
    again = subprocess.run([sys.executable, "-c", STATUS_PROBE, str(config)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["groups"] == []  # the daemon writes groups into the catalog, not status
    assert json.loads(again.stderr.splitlines()[-1]) == []
