"""The daemon's TOML config: the shipped example is valid; every mistake is one line
naming the file and the field."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from iteris_daemon.cli import main
from iteris_daemon.config import MAX_MEMORY_LIMIT_MB, load_config
from iteris_daemon.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "iteris-daemon.example.toml"
GROUP = '[[groups]]\nname = "g"\nbase_model = "b"\n'
FOLDER = '[[groups.destinations]]\nkind = "folder"\npath = "/tmp/x"\n'


def test_run_check_refuses_what_a_start_refuses_and_starts_nothing(tmp_path, capsys, monkeypatch):
    """No command checked a config as the start does: `sources scan --config` and `status
    --config` took a group's task_weights list, which `run` refused (the service failing at its
    restart). `run --check` refuses it in the start's words, and opens no catalog."""
    state = tmp_path / "state"
    config = tmp_path / "daemon.toml"
    monkeypatch.delenv("ITERIS_DAEMON_DB", raising=False)
    config.write_text(f'[daemon]\nstate_dir = "{state}"\n' + GROUP + 'params = { task_weights = [1.0, 2.0] }\n'
                      + FOLDER)
    assert main(["run", "--config", str(config), "--check"]) == 2
    assert capsys.readouterr().err.startswith(f"iteris-daemon: error: {config}: groups.0 (g): strategy 'iteris': "
                                              "task_weights: a group's adapters change from run to run")
    config.write_text(f'[daemon]\nstate_dir = "{state}"\ndevice = "cuda:999"\n' + GROUP + FOLDER)
    assert main(["run", "--config", str(config), "--check"]) == 2
    assert "[daemon] device: 'cuda:999' is not available here" in capsys.readouterr().err  # as the start says
    config.write_text(f'[daemon]\nstate_dir = "{state}"\n' + GROUP + FOLDER)
    assert main(["run", "--config", str(config), "--check"]) == 0
    assert capsys.readouterr().out == f"{config}: ok (0 sources, 1 group)\n"
    assert not state.exists()  # nothing started, no catalog made


def test_the_example_config_is_valid():
    config = load_config(EXAMPLE)
    assert [s.kind for s in config.sources] == ["local", "hub"]
    group = config.groups[0]
    assert group.strategy == "iteris" and [d["kind"] for d in group.destinations] == ["folder", "hub"]
    assert group.calibration.source_settings()["hub_dataset"]["repo_id"] == "acme/calibration"
    assert group.select.matches("team-folder", "sentiment", 1) and not group.select.matches("other", "sentiment", 1)
    assert group.gates.max_fidelity_gap == 1.5 and group.gates.max_regression == 0.05
    assert config.daemon.limits.limits().max_rank == 4096 and config.daemon.trust_remote_code == []


@pytest.mark.parametrize("text,message", [
    ("[[groups]\n", "invalid TOML"),
    ('[daemon]\ngrace_seconds = -1\n', "daemon.grace_seconds"),
    ('[daemon]\nbogus = 1\n', "daemon.bogus: Extra inputs are not permitted"),
    ('[daemon.limits]\nmax_rank = 0\n', "daemon.limits.max_rank: Input should be greater than 0"),
    ('[daemon]\ndevice = "gpu"\n', "daemon.device: unknown device 'gpu' (use cpu, cuda or cuda:N)"),
    ('[daemon]\ndevices = ["cuda:0", "tpu"]\n', "daemon.devices.1: unknown device 'tpu'"),
    ('[daemon]\ndevice = "cuda:\u0661"\n', "daemon.device: unknown device 'cuda:\u0661'"),  # a digit, not ASCII
    # torch refuses a leading zero: the config took it, and every merge failed in its worker.
    ('[daemon]\ndevices = ["cuda:1", "cuda:01"]\n', "daemon.devices.1: unknown device 'cuda:01'"),
    ('[daemon]\ndevice = "cuda:00"\n', "daemon.device: unknown device 'cuda:00'"),
    (GROUP + '[groups.gates]\nmax_regression = -1\n' + FOLDER, "groups.0.gates.max_regression"),
    (GROUP + '[groups.gates]\nmax_regression = true\n' + FOLDER, "groups.0.gates.max_regression"),
    ('[[sources]]\nname = "s"\nkind = "local"\npaths = ["/x"]\ntrust_remote_code = true\n',
     "sources.0 (s): trust_remote_code: Extra inputs"),
    (GROUP + 'params = { iterationz = 3 }\n' + FOLDER, "groups.0 (g): strategy 'iteris': iterationz"),
    # Taken by position, a group's weights went to whichever adapter took a removed one's place.
    (GROUP + 'params = { task_weights = [1.0, 2.0] }\n' + FOLDER,
     "groups.0 (g): strategy 'iteris': task_weights: a group's adapters change from run to run, so give "
     "task_weights by adapter name, as a table (task_weights = { news = 2.0, topic = 0.5 }; an adapter not named "
     "takes 1.0), not by position"),
    # Named by the table's key: "weights.1" sent the operator counting a table's entries.
    (GROUP + 'strategy = "ties"\nparams = { weights = { news = 1.0, topic = "a" } }\n' + FOLDER,
     "groups.0 (g): strategy 'ties': weights.topic: Input should be a valid number"),
    (GROUP + 'params = { task_weights = { news = -1.0 } }\n' + FOLDER,
     "groups.0 (g): strategy 'iteris': params: task_weights must be non-negative"),
    (GROUP + 'strategy = "nonesuch"\n' + FOLDER, "unknown strategy 'nonesuch'"),
    (GROUP + '[[groups.destinations]]\nkind = "ftp"\n', "unknown destination kind 'ftp'"),
    (GROUP + '[[groups.destinations]]\nkind = "folder"\n', "destinations.0: path: Field required"),
    (GROUP + 'cron = "61 * * * *"\n' + FOLDER, "cron '61 * * * *'"),
    (GROUP + 'cron = "0 3 * * *"\ninterval_seconds = 60\n' + FOLDER, "not both"),
    (GROUP + FOLDER + GROUP + FOLDER, "groups: group name 'g' is used twice"),
    ('[[sources]]\nname = "s"\nkind = "local"\npaths = ["/x"]\n' * 2, "sources: source name 's' is used twice"),
    # Found only where the catalog opened, in an error naming neither the file nor the field.
    ('[daemon]\ndatabase = "catalog.db"\n', "daemon.database: 'catalog.db' is not a SQLAlchemy URL"),
    ('[daemon]\ndatabase = "nosuch://iteris:pw@db/iteris"\n',
     "daemon.database: 'nosuch://iteris:***@db/iteris': Can't load plugin: sqlalchemy.dialects:nosuch"),
    (GROUP + '[groups.calibration]\norder = ["adapter", "nope"]\n' + FOLDER, "unknown calibration source 'nope'"),
    # Typos of a source's settings table, or of a field, were accepted and ignored.
    (GROUP + '[groups.calibration]\nhub_datset = { repo_id = "a/b" }\n' + FOLDER,
     "groups.0 (g): calibration.hub_datset: not a calibration source's settings table (sources: adapter, files"),
    (GROUP + '[groups.calibration]\nsamples = 3\n' + FOLDER, "calibration.samples: not a calibration source's"),
    # A source without a Settings model reads no settings: its table was loaded and ignored.
    (GROUP + '[groups.calibration]\norder = ["adapter"]\nadapter = { whatever = 2 }\n' + FOLDER,
     "groups.0 (g): calibration.adapter: whatever: 'adapter' takes no settings"),
    (GROUP + '[groups.calibration.adapter]\nwhatever = 2\nfile = "a.jsonl"\n' + FOLDER,
     "groups.0 (g): calibration.adapter: whatever, file: 'adapter' takes no settings"),
    # A source's table was only checked at the group's first merge, hours after start.
    (GROUP + '[groups.calibration.generate]\nsampels = 3\n' + FOLDER,
     "groups.0 (g): calibration.generate: sampels: Extra inputs are not permitted"),
    # A source's table whose source the order leaves out was ignored: the group never generated.
    (GROUP + '[groups.calibration.generate]\nsamples = 3\n' + FOLDER,
     "groups.0 (g): calibration.generate: settings for a source that calibration.order does not list (files, "
     "adapter, hub_dataset); add 'generate' to the order or drop the table"),
    (GROUP + '[groups.calibration]\norder = ["adapter"]\nfiles = { a = "/tmp/a.jsonl" }\n' + FOLDER,
     "groups.0 (g): calibration.files: a mapping for a source that calibration.order does not list (adapter)"),
    # No source to ask: every adapter was held back, for ever, as "no calibration data (asked: )".
    (GROUP + '[groups.calibration]\norder = []\n' + FOLDER,
     "groups.0 (g): calibration.order is empty, and strategy iteris needs calibration data; list the sources"),
    (GROUP + '[groups.calibration.hub_dataset]\nfilename = "{name}.jsonl"\n' + FOLDER,
     "groups.0 (g): calibration.hub_dataset: repo_id: Field required"),
    # Each failed every adapter at run time (`KeyError: 'adapter'`), holding the group back.
    (GROUP + '[groups.calibration.hub_dataset]\nrepo_id = "a/b"\nfilename = "{adapter}.jsonl"\n' + FOLDER,
     "calibration.hub_dataset: filename: '{adapter}.jsonl' names adapter; only {name} is filled in"),
    (GROUP + '[groups.calibration.hub_dataset]\nrepo_id = "a/b"\nfilename = "{name.jsonl"\n' + FOLDER,
     "calibration.hub_dataset: filename: '{name.jsonl' is not a template"),
    (GROUP + '[groups.calibration.hub_dataset]\nrepo_id = "not a repo id!"\n' + FOLDER,
     "calibration.hub_dataset: repo_id: 'not a repo id!' is not OWNER/NAME"),
    (GROUP + '[[groups.destinations]]\nkind = "hub"\nrepo_id = "acme"\n', "destinations.0: repo_id: 'acme' is not OWNER/NAME"),
    ('[[sources]]\nname = "s"\nkind = "hub"\n', "sources.0 (s): settings: Value error, give repos or an author"),
    ('[[sources]]\nname = "s"\nkind = "local"\npaths = []\n', "sources.0 (s): paths"),
    # A published merge inside a watched folder would come back as an input (and the reverse).
    ('[[sources]]\nname = "s"\nkind = "local"\npaths = ["/tmp"]\n' + GROUP + FOLDER,
     "groups.0 (g): destinations.0.path: /tmp/x overlaps the folder /tmp that source 's' watches"),
    ('[[sources]]\nname = "s"\nkind = "local"\npaths = ["/tmp/x/adapters"]\n' + GROUP + FOLDER,
     "destinations.0.path: /tmp/x overlaps the folder /tmp/x/adapters"),
    ('[[sources]]\nname = "a\\nb"\nkind = "local"\npaths = ["/x"]\n', "sources.0.name: a name has 1 to 200 printable"),
    (GROUP.replace('"g"', '"g\\u001b[2K"') + FOLDER, "groups.0.name: a name has 1 to 200 printable characters"),
    # The daemon's own runs (merges, published and kept copies) and downloads came back as adapters.
    ('[daemon]\nstate_dir = "/tmp/w/state"\n[[sources]]\nname = "s"\nkind = "local"\npaths = ["/tmp/w"]\n',
     "sources.0 (s): /tmp/w holds the daemon's state folder /tmp/w/state; the daemon would register its own merges"),
    ('[daemon]\ncache_dir = "/tmp/w"\n[[sources]]\nname = "s"\nkind = "local"\npaths = ["/tmp/w"]\n',
     "sources.0 (s): /tmp/w holds the daemon's cache folder /tmp/w;"),
    # Two destinations in one folder remove each other's staging copies and versions.
    (GROUP + FOLDER + GROUP.replace('"g"', '"h"') + FOLDER,
     "groups.1 (h): destinations.0.path: /tmp/x overlaps the destination /tmp/x of group 'g'"),
    ("[daemon]\ngrace_seconds = inf\n", "daemon.grace_seconds: Input should be a finite number"),
    ("[daemon]\nclaim_ttl_seconds = 0.001\n", "daemon.claim_ttl_seconds: Input should be greater than or equal to 1"),
    ("[daemon]\nretry_seconds = 60\nretry_max_seconds = 30\n",
     "retry_max_seconds (30) is below retry_seconds (60), the first wait"),
    (GROUP + "[groups.select]\nnames = []\n" + FOLDER, "groups.0.select.names: List should have at least 1 item"),
    # Periods past the scheduler's date range crashed the daemon at start (OverflowError) or on
    # a reload; a cron that never fires broke every group's tick.
    (GROUP + "interval_seconds = 1e14\n" + FOLDER, "groups.0.interval_seconds: Input should be less than or equal to"),
    ("[daemon]\ncatalog_check_seconds = 1e15\n", "daemon.catalog_check_seconds: Input should be less than or equal"),
    # A period of 1e-6 s busied the daemon; after the host slept, APScheduler listed every one missed.
    (GROUP + "interval_seconds = 1e-6\n" + FOLDER, "groups.0.interval_seconds: Input should be greater than or equal to 0.1"),
    ("[daemon]\ncatalog_check_seconds = 0.01\n", "daemon.catalog_check_seconds: Input should be greater than or equal to 0.1"),
    ("[daemon]\nrescan_seconds = 0.01\n", "daemon.rescan_seconds: Input should be greater than or equal to 0.1"),
    ('[[sources]]\nname = "s"\nkind = "hub"\nauthor = "acme"\ninterval_seconds = 0.001\n',
     "sources.0 (s): interval_seconds: Input should be greater than or equal to 0.1"),
    # Accepted, then every merge and shapes worker died in setrlimit (OverflowError).
    ("[daemon]\nworker_memory_limit_mb = 99999999999999999\n",
     "daemon.worker_memory_limit_mb: Input should be less than or equal to 8796093022207"),
    ('[[sources]]\nname = "s"\nkind = "local"\npaths = ["/x"]\nsettle_seconds = 1e15\n',
     "sources.0 (s): settle_seconds: Input should be less than or equal to"),
    (GROUP + 'cron = "0 0 30 2 *"\n' + FOLDER, "cron '0 0 30 2 *' never fires"),
    ('[daemon.prune]\ncron = "0 0 30 2 *"\n', "daemon.prune.cron: cron '0 0 30 2 *' never fires"),
    ('[daemon.prune]\ncron = "daily"\n', "daemon.prune.cron: cron 'daily': a crontab expression has 5 fields"),
    # Fewer than `status` reads would change what it shows (as `db prune --keep-runs` refuses).
    ('[daemon.prune]\nkeep_runs = 10\n', "daemon.prune.keep_runs: at least 50 (the runs `status` reads), got 10"),
    ('[daemon.prune]\nolder_than_days = -1\n',
     "daemon.prune.older_than_days: Input should be greater than or equal to 0"),
    # Two sources over one folder registered each adapter twice, and groups merged it twice.
    ('[[sources]]\nname = "a"\nkind = "local"\npaths = ["/tmp/w"]\n'
     '[[sources]]\nname = "b"\nkind = "local"\npaths = ["/srv", "/tmp/w/team"]\n',
     "sources.1 (b): /tmp/w/team overlaps the folder /tmp/w that source 'a' watches"),
])
def test_mistakes_are_one_line_naming_the_field(tmp_path, capsys, text, message):
    path = tmp_path / "config.toml"
    path.write_text(text)
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and message.replace("Value error, ", "") in err and err.count("\n") == 1


def test_a_state_folder_hidden_in_a_watched_folder_is_accepted(tmp_path):
    """A source does not look into hidden folders: the daemon's state may live in one."""
    path = tmp_path / "config.toml"
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path}/adapters/.iteris"\n'
                    f'[[sources]]\nname = "s"\nkind = "local"\npaths = ["{tmp_path}/adapters"]\n')
    assert load_config(path).daemon.state_dir == tmp_path / "adapters" / ".iteris"


def test_calibration_orders_that_make_sense_are_accepted(tmp_path):
    """The refusals of an empty order and of a table the order leaves out stop at what
    cannot work: a data-free strategy needs no source, and a listed source takes its table."""
    path = tmp_path / "config.toml"
    path.write_text(GROUP + 'strategy = "ties"\n[groups.calibration]\norder = []\n' + FOLDER
                    + GROUP.replace('"g"', '"h"') + '[groups.calibration]\norder = ["files", "generate"]\n'
                    '[groups.calibration.generate]\nsamples = 3\n' + FOLDER.replace("/tmp/x", "/tmp/y"))
    ties, generating = load_config(path).groups
    assert ties.calibration.order == [] and generating.calibration.source_settings() == {"generate": {"samples": 3}}


HUB = '[[groups.destinations]]\nkind = "hub"\nrepo_id = "acme/unified"\n'


HUB_SOURCE = '[[sources]]\nname = "s"\nkind = "hub"\nrepos = ["acme/x"]\n'


@pytest.mark.parametrize("text,message", [
    # Loose types were coerced: max_rank = true was 1 (every adapter rejected), exact_ranks = "off" false.
    ('[daemon.limits]\nmax_rank = true\n', "daemon.limits.max_rank: Input should be a valid integer"),
    (GROUP + 'min_adapters = true\n' + FOLDER, "groups.0.min_adapters: Input should be a valid integer"),
    (GROUP + 'exact_ranks = "off"\n' + FOLDER, "groups.0.exact_ranks: Input should be a valid boolean"),
    ('[daemon]\ngrace_seconds = "60"\n', "daemon.grace_seconds: Input should be a valid number"),
    (GROUP + '[groups.select]\nids = [3.0]\n' + FOLDER, "groups.0.select.ids.0: Input should be a valid integer"),
    (GROUP + '[groups.gates]\nmax_regression = "0.1"\n' + FOLDER, "groups.0.gates.max_regression: Input should be"),
    ('[[sources]]\nname = "s"\nkind = "local"\npaths = ["/x"]\nsettle_seconds = "2"\n',
     "sources.0 (s): settle_seconds: Input should be a valid number"),
    (HUB_SOURCE + 'retry_attempts = 2.0\n', "sources.0 (s): retry_attempts: Input should be a valid integer"),
    (GROUP + FOLDER + 'keep = "3"\n', "groups.0 (g): destinations.0: keep: Input should be a valid integer"),
    (GROUP + HUB + 'private = "no"\n', "groups.0 (g): destinations.0: private: Input should be a valid boolean"),
    # Selected nothing, for ever.
    (GROUP + '[groups.select]\nsources = []\n' + FOLDER, "groups.0.select: sources = [] selects nothing; leave it out"),
    (GROUP + '[groups.select]\nids = []\n' + FOLDER, "groups.0.select: ids = [] selects nothing; leave it out"),
    # ... as did an empty name pattern and an id below 1 (QA CFG), though this README said so.
    (GROUP + '[groups.select]\nnames = ["a*", ""]\n' + FOLDER, 'groups.0.select: names: "" matches no adapter name'),
    (GROUP + '[groups.select]\nids = [2, -1]\n' + FOLDER, "groups.0.select: ids: adapter ids are 1 or more"),
    # Taken for the working directory (a service's is /).
    (GROUP.replace('"b"', '""') + FOLDER, "groups.0.base_model: empty (it would be the working directory)"),
    ('[daemon]\nstate_dir = ""\n', "daemon.state_dir: empty (it would be the working directory)"),
    ('[daemon]\ncache_dir = " "\n', "daemon.cache_dir: empty (it would be the working directory)"),
    ('[[sources]]\nname = "s"\nkind = "local"\npaths = [""]\n', "sources.0 (s): paths.0: empty (it would be"),
    (GROUP + FOLDER.replace('"/tmp/x"', '""'), "groups.0 (g): destinations.0: path: empty (it would be"),
    # Hub settings a source had checked, and a destination's or a dataset's failed at each use.
    (GROUP + HUB + 'endpoint = "not a url"\n', "destinations.0: endpoint: 'not a url' is not an http(s) URL"),
    (GROUP + HUB + 'branch = " "\n', "groups.0 (g): destinations.0: branch: a branch name, not blank"),
    (GROUP + '[groups.calibration]\nhub_dataset = { repo_id = "acme/cal", endpoint = "ftp://x" }\n' + FOLDER,
     "groups.0 (g): calibration.hub_dataset: endpoint: 'ftp://x' is not an http(s) URL"),
    ('[[sources]]\nname = "s"\nkind = "hub"\nauthor = "a b/c"\n',
     "sources.0 (s): author: 'a b/c' is not a Hub user or organisation name"),
    (HUB_SOURCE + 'retry_base_seconds = 100\nretry_cap_seconds = 1\n',
     "sources.0 (s): settings: retry_cap_seconds (1) is below retry_base_seconds (100), the first wait"),
    (GROUP + HUB + 'retry_base_seconds = 100\nretry_cap_seconds = 1\n',
     "groups.0 (g): destinations.0: settings: retry_cap_seconds (1) is below retry_base_seconds (100)"),
])
def test_loose_or_empty_values_are_refused(tmp_path, capsys, text, message):
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value) and "\n" not in str(error.value)


def test_the_example_config_with_every_option_switched_on_is_valid(tmp_path):
    """Strict types refuse none of what the example shows: each commented option switched on,
    but `cron` and the second `params`, alternatives to the lines above them."""
    token = tmp_path / "token"
    token.write_text("hf_example\n")
    token.chmod(0o600)
    lines = []
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        switched = re.match(r"# (\[daemon\.\w+\].*|(\w+) = .*)", line)
        lines.append(switched[1] if switched and switched[2] not in ("cron", "params") else line)
    text = re.sub(r'token_file = "[^"]*"', f'token_file = "{token}"', "\n".join(lines))
    text = re.sub(r'secret_file = "[^"]*"', f'secret_file = "{token}"', text)  # read when the config loads
    path = tmp_path / "config.toml"
    path.write_text(text.replace('order = ["files", "adapter", "hub_dataset"]', 'order = ["files", "adapter", "hub_dataset", "generate"]'))
    config = load_config(path)
    group = config.groups[0]
    assert config.daemon.metrics is not None and config.daemon.webhooks.max_body_bytes == 1048576
    assert config.daemon.merge_devices() == ["cuda:0", "cuda:1"] and config.daemon.database.startswith("postgresql")
    assert group.exact_ranks is True and group.select.ids == [3, 7] and group.gates.max_added_loss == 0.5
    assert config.sources[1].validated().token_file == token and group.destinations[1]["tag_runs"] is True
    assert (config.daemon.prune.older_than_days, config.daemon.prune.keep_runs) == (90, 50)


@pytest.mark.parametrize("source,destination,refused", [
    ('author = "acme"', HUB, "acme/unified@main is polled by source 'h'"),
    ('author = "ACME"', HUB.replace("acme/", "Acme/"), "Acme/unified@main is polled by source 'h'"),  # the Hub ignores case
    ('repos = ["acme/unified"]', HUB + 'branch = "main"\n', "acme/unified@main is polled by source 'h'"),
    ('repos = ["acme/unified@merged"]', HUB + 'branch = "merged"\n', "acme/unified@merged is polled by source 'h'"),
    ('author = "acme"\nendpoint = "http://hub.local/"', HUB + 'endpoint = "http://hub.local"\n',
     "acme/unified@main is polled by source 'h'"),
    ('author = "acme"', HUB + 'branch = "merged"\n', None),  # an author's repos are polled on main
    ('repos = ["acme/unified@v2"]', HUB, None),
    ('author = "acme"', HUB.replace("acme/", "acme-merged/"), None),
    ('author = "acme"\nendpoint = "http://hub.local"', HUB, None),  # another Hub
])
def test_a_hub_destination_that_a_hub_source_polls_is_refused(tmp_path, capsys, source, destination, refused):
    """The example config watched author "acme" and published to acme/unified-lora: every
    merge was registered as an adapter and merged into the next (folder destinations were
    already refused where a source watches them)."""
    path = tmp_path / "config.toml"
    path.write_text(f'[[sources]]\nname = "h"\nkind = "hub"\n{source}\n' + GROUP + destination)
    if refused is None:
        assert load_config(path).groups[0].destinations[0]["kind"] == "hub"
        return
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: groups.0 (g): destinations.0.repo_id: {refused}; the daemon would register its own merges" in err


@pytest.mark.parametrize("first,second,refused", [
    (HUB, GROUP.replace('"g"', '"h"') + HUB, "groups.1 (h): destinations.0.repo_id: acme/unified@main is already "
                                             "the destination of group 'g'"),
    (HUB, HUB, "groups.0 (g): destinations.1.repo_id: acme/unified@main is already the destination of group 'g'"),
    (HUB + 'branch = "main"\nendpoint = "https://huggingface.co/"\n', GROUP.replace('"g"', '"h"') + HUB.replace(
        "acme/", "Acme/"), "groups.1 (h): destinations.0.repo_id: Acme/unified@main is already"),  # the defaults
    (HUB, GROUP.replace('"g"', '"h"') + HUB + 'branch = "v2"\n', None),
    (HUB, GROUP.replace('"g"', '"h"') + HUB + 'endpoint = "http://hub.local"\n', None),
])
def test_two_destinations_on_one_hub_branch_are_refused(tmp_path, first, second, refused):
    """Both were accepted: the branch served whichever group's merge was committed last,
    and `status` reported each group's merge as published there (folders were refused)."""
    path = tmp_path / "config.toml"
    path.write_text(GROUP + first + second)
    if refused is None:
        assert [d["repo_id"] for g in load_config(path).groups for d in g.destinations] == ["acme/unified"] * 2
        return
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value).startswith(f"{path}: {refused}")


@pytest.mark.parametrize("table,field", [
    ('[[sources]]\nname = "s"\nkind = "hub"\nrepos = ["acme/x"]\ntoken_file = "{token}"\n', "sources.0 (s): token_file"),
    (GROUP + HUB + 'token_file = "{token}"\n', "groups.0 (g): destinations.0.token_file"),
    (GROUP + '[groups.calibration.hub_dataset]\nrepo_id = "a/b"\ntoken_file = "{token}"\n' + FOLDER,
     "groups.0 (g): calibration.hub_dataset.token_file"),
])
def test_a_token_file_that_is_not_a_file_is_refused_without_quoting_it(tmp_path, monkeypatch, table, field):
    """A missing one was accepted (the source unhealthy, the destination failing at its first
    publish); a token pasted in its place was stored in the catalog and printed by
    `sources list --json`. The error never quotes it. One open to other users passed the config
    and failed every poll or publish after it (QA CFG): refused with the config now."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "config.toml"
    token = "hf_" + "Z" * 34
    path.write_text(table.format(token=token))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value) == (f"{path}: {field}: no such file (is it the token itself? give the path of a file "
                                "holding it)")
    (tmp_path / token).mkdir()
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value) == f"{path}: {field}: not a regular file"
    (tmp_path / token).rmdir()
    (tmp_path / token).write_text("a file named so\n")
    (tmp_path / token).chmod(0o644)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value) == (f"{path}: {field} is open to other users (mode 644); it must be readable by its owner "
                                "only: chmod 600 it")
    (tmp_path / token).chmod(0o600)
    assert load_config(path)


def test_false_turns_a_gate_off(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(GROUP + '[groups.gates]\nmax_regression = false\nmax_fidelity_gap = 2\n' + FOLDER)
    gates = load_config(path).groups[0].gates
    assert gates.max_regression is None and gates.max_fidelity_gap == 2.0


def test_missing_config_file(tmp_path, capsys):
    assert main(["run", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "config file does not exist" in capsys.readouterr().err


def test_the_largest_worker_memory_limit_is_one_a_worker_can_set(tmp_path):
    """The bound on ``worker_memory_limit_mb`` is what the worker's setrlimit takes (in a
    process of its own: the limit stays for its life)."""
    path = tmp_path / "config.toml"
    path.write_text(f"[daemon]\nworker_memory_limit_mb = {MAX_MEMORY_LIMIT_MB}\n")
    limit = load_config(path).daemon.worker_memory_limit_mb
    probe = f"from iteris_daemon.worker import _limit_memory; _limit_memory({limit})"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.timeout(120)  # before the fix the daemon started, and ran on
@pytest.mark.parametrize("line,refused", [
    ('device = "cuda"', "device: 'cuda' is"),
    ('devices = ["cpu", "cuda", "cuda:1", "cuda"]', "devices: 'cuda', 'cuda:1' are"),
])
def test_a_merge_device_not_on_this_host_is_refused_at_start(tmp_path, capsys, monkeypatch, line, refused):
    """``[daemon] device = "cuda"`` on a host without CUDA: the daemon started, and every
    run failed seconds into its worker, in an error naming no setting (found by QA). The
    start asks torch (in a worker-like interpreter) and refuses it in one line naming the
    field and the devices there are. ``CUDA_VISIBLE_DEVICES=""`` hides any GPU here."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    path = tmp_path / "config.toml"
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n{line}\n')
    assert main(["run", "--config", str(path)]) == 2
    assert capsys.readouterr().err == (f"iteris-daemon: error: {path}: [daemon] {refused} not available here: torch "
                                       "sees 0 CUDA devices (available: cpu)\n")
    assert not (tmp_path / "state").exists()  # nothing started


@pytest.mark.parametrize("line,warned", [
    ('devices = ["cpu", "cuda:1", "cuda:1"]', "[daemon] worker_memory_limit_mb = 4096 is not applied to the merges on "
                                              "cuda:1: CUDA reserves far more address space than it uses and cannot "
                                              "start under that limit (RLIMIT_AS); limit a GPU worker's host memory "
                                              "through the unit's MemoryMax (a cgroup) instead"),
    ('devices = ["cpu"]', None),
    ('devices = ["cpu", "cuda:1"]\nmax_concurrent_merges = 1', None),  # cuda:1 runs no merge (found by QA)
])
def test_a_memory_limit_with_a_cuda_device_is_warned_of_at_start(tmp_path, caplog, monkeypatch, line, warned):
    """The worker leaves ``worker_memory_limit_mb`` off on CUDA (CUDA cannot start under
    ``RLIMIT_AS``): the start says so once. A file where the state folder goes ends the start
    just after (two GPUs faked: the check that the devices exist passes)."""
    monkeypatch.setattr("iteris_daemon.devices.cuda_device_count", lambda: 2)
    (tmp_path / "state").write_text("in the way")
    path = tmp_path / "config.toml"
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\nworker_memory_limit_mb = 4096\n{line}\n')
    assert main(["run", "--config", str(path)]) == 2
    said = [r.getMessage() for r in caplog.records if "worker_memory_limit_mb" in r.getMessage()]
    assert said == ([warned] if warned else []), said
    assert all(r.levelname == "WARNING" for r in caplog.records if "worker_memory_limit_mb" in r.getMessage())


def test_valid_devices(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[daemon]\ndevices = ["cpu", "cuda", "cuda:0", "cuda:1", "cuda:10"]\n')
    assert load_config(path).daemon.merge_devices() == ["cpu", "cuda", "cuda:0", "cuda:1", "cuda:10"]


def test_a_webhook_without_a_secret_names_the_file_and_field(tmp_path, monkeypatch):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    path = tmp_path / "config.toml"
    path.write_text('[daemon.webhooks]\nlisten = "127.0.0.1:0"\n')
    with pytest.raises(ConfigError, match=f"^{path}: daemon.webhooks.secret_file: not set, and no "
                                          r"\$CREDENTIALS_DIRECTORY"):
        load_config(path)
    assert load_config(path, check_plugins=False).daemon.webhooks is not None  # `status` needs no secret


def test_paths_and_local_base_models_are_made_absolute(tmp_path, monkeypatch):
    """``~`` was taken literally (a folder named ``~`` under the working directory held the
    catalog, open to others), and a relative base model folder meant another folder, or
    none, from a service's working directory (``/``): it is the config's folder's. A Hub repo
    id stays as it is."""
    home, work = tmp_path / "home", tmp_path / "work"
    (work / "models" / "base").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    path = work / "config.toml"
    whole = ('[daemon]\nstate_dir = "~/state"\ncache_dir = "~/cache"\n'
             'trust_remote_code = ["./models/base", "acme/coder"]\n'
             '[[sources]]\nname = "s"\nkind = "local"\npaths = ["~/loras"]\nbase_model = "models/base"\n'
             '[[sources]]\nname = "h"\nkind = "hub"\nrepos = ["acme/x"]\nbase_model = "acme/base"\n'
             '[[groups]]\nname = "g"\nbase_model = "./models/base"\n'
             '[groups.calibration.files]\nx = "~/x.jsonl"\n'
             '[[groups.destinations]]\nkind = "folder"\npath = "~/out"\n')
    path.write_text(whole)
    config = load_config(path)
    base = str(work / "models" / "base")
    assert (config.daemon.state_dir, config.daemon.cache_dir) == (home / "state", home / "cache")
    assert config.daemon.trust_remote_code == [base, "acme/coder"]
    assert config.daemon.catalog_url() == f"sqlite:///{home / 'state' / 'catalog.db'}"
    # A SQLite catalog's relative path too (each command run elsewhere made a catalog of its
    # own, QA MIG); "~", an absolute path, memory and a server's URL stay as written.
    for given, read in (("sqlite:///rel/catalog.db", f"sqlite:///{work / 'rel' / 'catalog.db'}"),
                        ("sqlite:///~/c.db", "sqlite:///~/c.db"), ("sqlite:////abs/c.db", "sqlite:////abs/c.db"),
                        ("sqlite://", "sqlite://"), ("postgresql+psycopg://u:p@h/db", "postgresql+psycopg://u:p@h/db")):
        path.write_text(f'[daemon]\ndatabase = "{given}"\n')
        assert load_config(path).daemon.catalog_url() == read, given
    # A catalog where earlier releases found it (the working directory's), none in the config's
    # folder: refused naming both, not a new empty catalog (re-registering, re-publishing all).
    (tmp_path / "rel").mkdir()
    (tmp_path / "rel" / "catalog.db").touch()
    path.write_text('[daemon]\ndatabase = "sqlite:///rel/catalog.db"\n')
    with pytest.raises(ConfigError, match=f"{work / 'rel' / 'catalog.db'}, which does not exist; the catalog is at "
                                          f"{tmp_path / 'rel' / 'catalog.db'} \\(from the working directory"):
        load_config(path)
    path.write_text(whole)
    config = load_config(path)
    assert config.sources[0].settings() == {"paths": [str(home / "loras")], "base_model": base}  # as stored
    assert config.sources[1].settings() == {"repos": ["acme/x"], "base_model": "acme/base"}
    group = config.groups[0]
    assert group.base_model == base and group.calibration.files == {"x": home / "x.jsonl"}
    from plugins.publish_folder import FolderPublishSettings
    assert FolderPublishSettings.model_validate({"path": group.destinations[0]["path"]}).path == home / "out"
