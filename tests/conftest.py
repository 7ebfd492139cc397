import os
from pathlib import Path

import pytest

# The Hub is unreachable here: anything that tries it must fail fast, not hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist every worker is one of `-n` parallel processes sharing the cores: one
# torch thread each (and in the daemons they start) instead of each taking all of them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

from builders import FAMILIES, build_adapter, build_tiny_model  # noqa: E402
from group_runs import Setup, build_runner_adapters  # noqa: E402

TASK_TYPES = {"bert": None, "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Per family: a tiny base model and three adapters of different ranks (one rsLoRA)."""
    root = tmp_path_factory.mktemp("tiny")
    built = {}
    for family in FAMILIES:
        task_type = TASK_TYPES[family]
        base = build_tiny_model(family, root / f"{family}-base", task_type)
        adapters = [
            build_adapter(base, root / f"{family}-a{seed}", seed=seed, family=family, task_type=task_type,
                          r=2 + seed, alpha=4 + 2 * seed, use_rslora=(seed == 2))
            for seed in range(3)
        ]
        built[family] = (base, adapters)
    return built


@pytest.fixture(scope="session")
def bert(tiny):
    return tiny["bert"]


@pytest.fixture
def host_clock_ahead(monkeypatch, catalog_url):
    """The daemon code's clock an hour ahead of the catalog server's, as on a host whose clock
    drifted; only where the catalog is a server (SQLite's clock is this host's, by design).
    ``server_time()``: the real time, which the server on this host keeps."""
    import sys
    from datetime import timedelta
    from types import SimpleNamespace

    import iteris_daemon.catalog.models as models
    import iteris_daemon.runner  # noqa: F401  (and status: imported, so that their clocks move too)
    import iteris_daemon.status  # noqa: F401

    if catalog_url.startswith("sqlite"):
        pytest.skip("a SQLite catalog's clock is this host's")
    real = models.utcnow
    for name, module in list(sys.modules.items()):  # every module that took the clock by name
        if name.startswith("iteris_daemon") and getattr(module, "utcnow", None) is real:
            monkeypatch.setattr(module, "utcnow", lambda: real() + timedelta(hours=1))
    return SimpleNamespace(server_time=real)


@pytest.fixture
def hashed(monkeypatch) -> list[Path]:
    """The folders whose files are read for a fingerprint, in order (folder sources)."""
    import iteris_daemon.sources.local as local

    folders: list[Path] = []
    real = local.folder_fingerprint
    monkeypatch.setattr(local, "folder_fingerprint", lambda folder, *a, **k: folders.append(folder) or real(folder, *a, **k))
    return folders


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_url(request, tmp_path):
    """A real, empty catalog database: a SQLite file, then the PostgreSQL test server."""
    from databases import database

    with database(request.param, tmp_path) as url:
        yield url


@pytest.fixture(scope="module")
def runner_adapters(tmp_path_factory):
    """A tiny BERT and two adapters on it (``group_runs``), built once per test module."""
    return build_runner_adapters(tmp_path_factory.mktemp("runner"))


@pytest.fixture
def setup(tmp_path, runner_adapters):
    """A catalog holding ``runner_adapters`` through a folder source, for ``run_group``."""
    base, adapters = runner_adapters
    s = Setup(tmp_path, base, adapters)
    yield s
    s.catalog.close()


@pytest.fixture
def bounded():
    """:func:`~iteris_daemon.retry.bound_requests`, the daemon's Hub client, for one test;
    huggingface_hub's client factory (process-wide) is put back after it."""
    from huggingface_hub.utils import _http, set_client_factory

    from iteris_daemon import retry

    original = _http._GLOBAL_CLIENT_FACTORY
    yield retry.bound_requests
    set_client_factory(original)
    retry._bound.clear()
