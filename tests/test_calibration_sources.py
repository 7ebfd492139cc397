"""Calibration sources: configured order, a Hub dataset repo (real client, test server),
and the data-free fallback on generative and encoder models."""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from hub_server import HubServer, isolate_hub_client

from iteris_daemon.calibration import CalibrationOptions, CalibrationSet, Sample, read_jsonl
from iteris_daemon.cli import main
from iteris_daemon.errors import CalibrationError, CalibrationUnavailable, IterisError
from iteris_daemon.lora import load_adapter
from iteris_daemon.plugins.calibration_hub import HubDataset
from iteris_daemon.merge import gather_calibration
from iteris_daemon.runner import InWorkerCalibration, calibrate_all
from iteris_daemon.supervisor import WorkerFailed

TOKEN = "hf_calibration_token"


def test_order_decides_and_unknown_sources_are_named(bert, tmp_path):
    base, adapters = bert
    adapter = load_adapter(adapters[0])
    mapped = tmp_path / "mapped.jsonl"
    mapped.write_text('{"text": "from the mapping"}\n')
    options = CalibrationOptions(order=("files", "adapter"), files={adapter.name: mapped})
    assert gather_calibration([adapter], options, True)[0].samples[0].text == "from the mapping"
    options.order = ("adapter", "files")
    assert gather_calibration([adapter], options, True)[0].source.endswith("calibration.jsonl")
    with pytest.raises(CalibrationError, match="unknown calibration source"):
        gather_calibration([adapter], CalibrationOptions(order=("nonesuch",)), True)


def test_a_limited_read_takes_the_samples_a_whole_read_would(tmp_path):
    """Reading stops at ``limit`` samples; the samples are the first ``limit`` of a whole read
    (blank lines skipped, a conversation, a byte order mark), so merges do not change."""
    lines = ['{"text": "first"}', "", '{"messages": [{"role": "user", "content": "hi"}]}', "  ",
             *(json.dumps({"text": f"sample {i}", "target": f"t{i}"}) for i in range(20))]
    path = tmp_path / "calibration.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")
    whole = read_jsonl(path)
    assert len(whole.samples) == 22
    for limit in (1, 2, 3, 21, 22, 50):
        assert read_jsonl(path, limit) == whole.head(limit)


def test_a_merge_reads_a_calibration_file_no_further_than_its_samples(bert, tmp_path):
    """A merge takes the first ``samples_per_task`` samples, but read the whole file first: a
    file of millions of lines was held in memory, and a fault past the samples failed the
    merge. Here the samples are followed by 9 MiB that are not JSON: the merge equals the one
    of a file holding just the samples, byte for byte."""
    base_dir, adapters = bert
    first = (adapters[0] / "calibration.jsonl").read_bytes()
    mapped, exact = tmp_path / "long.jsonl", tmp_path / "exact.jsonl"
    mapped.write_bytes(first + b"not json " * (1 << 20) + b"\n")
    exact.write_bytes(first)
    samples = len(read_jsonl(exact).samples)
    outs = []
    for name, data in (("long", mapped), ("exact", exact)):
        outs.append(tmp_path / name)
        assert main(["merge", "--base-model", str(base_dir), "--out", str(outs[-1]), "-q", "--adapter",
                     f"{adapters[0]}={data}", "--adapter", str(adapters[1]), "--param", f"samples_per_task={samples}",
                     "--param", "iterations=1"]) == 0
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    with pytest.raises(CalibrationError, match=r"long\.jsonl:13: not valid JSON"):  # as a whole read meets it
        read_jsonl(mapped)


def test_hub_dataset_file_per_adapter(bert, tmp_path, monkeypatch):
    base, adapters = bert
    adapter = load_adapter(adapters[0])
    with HubServer(token=TOKEN) as hub:
        isolate_hub_client(monkeypatch, hub.endpoint, tmp_path / "hf-home")
        hub.create_repo_direct("acme/calib", {f"tasks/{adapter.name}.jsonl": b'{"text": "hub sample"}\n'},
                               repo_type="dataset", private=True)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        settings = {"hub_dataset": {"repo_id": "acme/calib", "filename": "tasks/{name}.jsonl",
                                    "endpoint": hub.endpoint, "cache_dir": str(tmp_path / "cache")}}
        found = gather_calibration([adapter], CalibrationOptions(order=("hub_dataset",), settings=settings), True)[0]
        assert found.samples[0].text == "hub sample" and found.source.startswith("hf://datasets/acme/calib/")
        other = load_adapter(adapters[1])  # no file for it: the next source answers
        found = gather_calibration([other], CalibrationOptions(order=("hub_dataset", "adapter"), settings=settings), True)[0]
        assert found.source.endswith("calibration.jsonl")


def test_merge_gives_a_calibration_source_its_settings_from_the_command_line(bert, tmp_path, monkeypatch, capsys):
    """`merge` had no way to give ``hub_dataset`` its repo: only a daemon config's table did.
    ``--calibration-setting SOURCE.KEY=VALUE`` gives it, checked before the base model loads."""
    base, adapters = bert
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    names = [load_adapter(path).name for path in adapters[:2]]
    with HubServer(token=TOKEN) as hub:
        isolate_hub_client(monkeypatch, hub.endpoint, tmp_path / "hf-home")
        hub.create_repo_direct("acme/calib", {f"{name}.jsonl": b'{"text": "hub sample %d"}\n' % i
                                              for i, name in enumerate(names)}, repo_type="dataset")
        command = ["merge", "--base-model", str(base), "--adapter", str(adapters[0]), "--adapter", str(adapters[1]),
                   "-q", "--param", "iterations=1", "--calibration-order", "hub_dataset",
                   "--calibration-setting", "hub_dataset.repo_id=acme/calib",
                   "--calibration-setting", f"hub_dataset.endpoint={hub.endpoint}"]
        assert main([*command, "--out", str(tmp_path / "out")]) == 0
        report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
        assert [given["calibration"]["source"] for given in report["inputs"]] == [
            f"hf://datasets/acme/calib/{name}.jsonl" for name in names]
        assert len(hub.requests_matching(r"^GET /datasets/acme/calib/resolve/")) == 2
    for extra, error in ((["--calibration-setting", "generate.seed=1"], "'generate' is not in --calibration-order"),
                         (["--calibration-setting", "hub_dataset.bogus=1"], "--calibration-setting: calibration.hub_dataset: bogus: Extra"),
                         (["--calibration-setting", "hub_dataset.endpoint=x"], "endpoint is given twice"),
                         (["--calibration-setting", "repo_id=acme/x"], "expected SOURCE.KEY=VALUE")):
        capsys.readouterr()
        assert main([*command, "--out", str(tmp_path / "refused"), *extra]) == 2
        assert error in capsys.readouterr().err and not (tmp_path / "refused").exists()


@pytest.mark.parametrize("setting, error", [
    ("files.x=1", "iteris-daemon: error: --calibration-setting: calibration.files: x: 'files' takes no settings: a file "
                  "is mapped to an adapter with --adapter DIR=FILE.jsonl (merge, compare) or a daemon config's "
                  '[groups.calibration] files = { ADAPTER = "FILE.jsonl" }'),
    ("adapter.y=2", "iteris-daemon: error: --calibration-setting: calibration.adapter: y: 'adapter' takes no settings"),
])
def test_a_setting_for_a_source_without_settings_is_refused(bert, tmp_path, capsys, setting, error):
    """``files`` and ``adapter`` read no settings: ``files.news=news.jsonl`` was accepted and
    ignored, and the merge read the adapter's own calibration.jsonl."""
    base, adapters = bert
    assert main(["merge", "--base-model", str(base), "--adapter", str(adapters[0]), "--adapter", str(adapters[1]),
                 "-q", "--param", "iterations=1", "--calibration-setting", setting, "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.splitlines() == [error] and not (tmp_path / "out").exists()


def test_a_calibration_plugins_failure_of_many_lines_is_told_in_one():
    """A plugin's failure is one line naming the source, the line that says what happened
    (after a Hub client's status heading, the next one); before, every line of it reached
    the held-back reason (found by QA)."""
    class Store:
        def load(self, adapter, options):
            raise RuntimeError("403 Client Error. (Request ID: r1)\n\nCannot access gated repo for url http://hub/x.\n"
                               "Access to dataset x is restricted.")

    [answer] = calibrate_all([SimpleNamespace(name="news")], CalibrationOptions(order=("store",)), {"store": Store()})
    assert str(answer) == ("store: calibration source failed on adapter news: RuntimeError: Cannot access gated repo "
                           "for url http://hub/x.")


def test_a_files_source_is_named_absolute_with_its_links_kept(tmp_path, monkeypatch):
    """Relative, it is made absolute (the report is read elsewhere); through a symlink it keeps
    the link: the daemon replaces a snapshot's path in it by the adapter's, and under systemd's
    DynamicUser the state folder is a link (/var/lib/iteris-daemon -> private/...), which a
    resolved path no longer held: reports named the deleted snapshot (review RV12)."""
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "c.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path)
    assert read_jsonl(Path("link") / "c.jsonl").source == str(tmp_path / "link" / "c.jsonl")


def test_a_release_that_fails_in_the_daemon_holds_back_what_the_source_answered(bert, monkeypatch):
    """An in-process source whose release raised: the error left the daemon's run unrecorded,
    tried again with backoff for ever ("the run could not be carried out"); in a calibration
    worker it failed the worker, taken for the worker's failure. Now each adapter it
    answered is held back with the release's line, in the daemon and in the worker."""
    from iteris_daemon import plugin_manager, worker
    from iteris_daemon.calibration import Sample

    class Store:  # data for all but the last adapter: the next source answers for that one (review RV12)
        def __init__(self, last: str):
            self.last = last

        def load(self, adapter, options):
            return None if adapter.name == self.last else CalibrationSet((Sample(f"about {adapter.name}"),), "store")

        def release(self):
            raise ValueError("handle already closed")

    expected = "store: calibration source failed to release what it kept: ValueError: handle already closed"
    other = SimpleNamespace(load=lambda adapter, options: CalibrationSet((Sample("other"),), "other"))
    answers = calibrate_all([SimpleNamespace(name=name) for name in "abc"], CalibrationOptions(order=("store", "other")),
                            {"store": Store("c"), "other": other})
    assert [str(answer) for answer in answers[:2]] == [expected] * 2 and answers[2].source == "other"
    assert all(isinstance(answer, CalibrationError) for answer in answers[:2])
    folders = bert[1][:2]
    monkeypatch.setattr(plugin_manager, "calibration_sources", lambda: {"store": Store(folders[1].name)})
    job = {"source": "store", "adapters": [{"path": str(f), "name": f.name} for f in folders],
           "options": {"order": ["store"], "files": {}, "base_model": None, "samples": 1, "limit": None,
                       "settings": {}}}
    assert worker._calibration(job, threading.Event()) == [{"error": expected, "out_of_memory": False}, None]


def test_a_hub_dataset_file_other_than_the_listing_says_is_removed_and_fetched_again(bert, tmp_path, monkeypatch):
    """The file's download is answered with other bytes of the same size, once: the
    adapter gets an error naming the file and both hashes, the bytes leave the cache,
    and the next run reads the listed file. Without the check the changed bytes were
    read as that adapter's calibration data. The error makes the run wait
    (CalibrationUnavailable): as a plain CalibrationError it held the adapter back as a bad
    input, and the merge of the others was published (QA HUB)."""
    base, adapters = bert
    adapter = load_adapter(adapters[0])
    content = b'{"text": "hub sample"}\n{"text": "another sample"}\n'
    with HubServer(token=TOKEN) as hub:
        isolate_hub_client(monkeypatch, hub.endpoint, tmp_path / "hf-home")
        hub.create_repo_direct("acme/calib", {f"{adapter.name}.jsonl": content}, repo_type="dataset")
        settings = {"hub_dataset": {"repo_id": "acme/calib", "endpoint": hub.endpoint,
                                    "cache_dir": str(tmp_path / "cache")}}
        options = CalibrationOptions(order=("hub_dataset",), settings=settings)
        hub.inject(rf"^GET /datasets/acme/calib/resolve/[0-9a-f]+/{adapter.name}\.jsonl$", ("corrupt",), times=1)
        with pytest.raises(CalibrationUnavailable, match="as downloaded it has git blob sha1 .* where the listing says"):
            gather_calibration([adapter], options, True)
        assert not list((tmp_path / "cache").rglob("blobs/*")) and not list((tmp_path / "cache").rglob("snapshots/*/*"))
        found = gather_calibration([adapter], options, True)[0]
        assert [s.text for s in found.samples] == ["hub sample", "another sample"]
        assert len(hub.requests_matching(rf"^GET /datasets/acme/calib/resolve/[0-9a-f]+/{adapter.name}\.jsonl$")) == 2


@pytest.mark.parametrize("status, headers", [(401, {}), (403, {"X-Error-Code": "GatedRepo"}), (403, {})],
                         ids=["token-refused", "gated", "forbidden"])
def test_a_hub_dataset_the_token_may_not_read_makes_the_run_wait(bert, tmp_path, monkeypatch, status, headers):
    """A dataset whose token was rotated, or that is gated, held every adapter reading it back
    as a bad input; where some adapters had data from another source, the merge of the
    rest was published (QA HUB). A token refused may be put right: the run waits."""
    base, adapters = bert
    adapter = load_adapter(adapters[0])
    with HubServer(token=TOKEN) as hub:
        isolate_hub_client(monkeypatch, hub.endpoint, tmp_path / "hf-home")
        hub.create_repo_direct("acme/calib", {f"{adapter.name}.jsonl": b'{"text": "x"}\n'}, repo_type="dataset")
        settings = {"hub_dataset": {"repo_id": "acme/calib", "endpoint": hub.endpoint,
                                    "cache_dir": str(tmp_path / "cache")}}
        hub.inject(r"^GET /api/datasets/acme/calib", ("status", status, headers), times=1)
        with pytest.raises(CalibrationUnavailable, match=f"^hub_dataset: acme/calib/{adapter.name}.jsonl: HTTP {status}"):
            gather_calibration([adapter], CalibrationOptions(order=("hub_dataset",), settings=settings), True)


def test_hub_dataset_keeps_its_files_in_the_daemons_cache_at_the_commit_read_last(tmp_path, monkeypatch):
    """The daemon's cache folder (``CalibrationOptions.cache_dir``) holds the downloads, in
    ``calibration/``, and each refresh of the dataset replaces the files of the commit before:
    they were kept for ever (a dataset refreshed daily: a copy a day), and under the default
    cache folder whatever ``[daemon] cache_dir`` said (found by QA)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "default-cache"))
    monkeypatch.delenv("CACHE_DIRECTORY", raising=False)
    adapters = [SimpleNamespace(name="news"), SimpleNamespace(name="sport")]
    with HubServer(token=TOKEN) as hub:
        isolate_hub_client(monkeypatch, hub.endpoint, tmp_path / "hf-home")
        hub.create_repo_direct("acme/calib", {"news.jsonl": b'{"text": "news 0"}\n', "sport.jsonl": b'{"text": "sport"}\n'},
                               repo_type="dataset")
        options = CalibrationOptions(order=("hub_dataset",), cache_dir=tmp_path / "daemon-cache",
                                     settings={"hub_dataset": {"repo_id": "acme/calib", "endpoint": hub.endpoint}})
        for version in range(1, 4):
            answers = calibrate_all(adapters, options, {"hub_dataset": HubDataset()})
            assert [a.samples[0].text for a in answers] == [f"news {version - 1}", "sport"]
            hub.commit_direct("acme/calib", {"news.jsonl": b'{"text": "news %d"}\n' % version}, repo_type="dataset")
    cache = tmp_path / "daemon-cache" / "calibration"
    snapshots = list(cache.glob("datasets--acme--calib/snapshots/*"))
    assert len(snapshots) == 1 and sorted(p.name for p in snapshots[0].iterdir()) == ["news.jsonl", "sport.jsonl"]
    assert len(list(cache.glob("datasets--acme--calib/blobs/*"))) == 2
    assert not (tmp_path / "default-cache").exists()


def test_hub_dataset_read_at_two_revisions_keeps_both_until_one_is_not_read_for_30_days(tmp_path, monkeypatch):
    """Two groups read one dataset, one at the tag ``v1`` and one at ``main``: the cache kept
    only the commit read last, so each group's load deleted the other's files and every run
    downloaded them again (found by QA). Both stay now; a revision no load read for 30 days
    has its files deleted."""
    adapters = [SimpleNamespace(name="news")]
    with HubServer(token=TOKEN) as hub:
        isolate_hub_client(monkeypatch, hub.endpoint, tmp_path / "hf-home")
        hub.create_repo_direct("acme/calib", {"news.jsonl": b'{"text": "news 0"}\n'}, repo_type="dataset")
        hub.create_tag_direct("acme/calib", "v1", repo_type="dataset")
        pinned, latest = (CalibrationOptions(order=("hub_dataset",), cache_dir=tmp_path / "daemon-cache", settings={
            "hub_dataset": {"repo_id": "acme/calib", "endpoint": hub.endpoint, **revision}})
            for revision in ({"revision": "v1"}, {}))
        for version in range(1, 4):
            hub.commit_direct("acme/calib", {"news.jsonl": b'{"text": "news %d"}\n' % version}, repo_type="dataset")
            for options, text in ((pinned, "news 0"), (latest, f"news {version}")):
                assert calibrate_all(adapters, options, {"hub_dataset": HubDataset()})[0].samples[0].text == text
        downloads = hub.requests_matching(r"^GET /datasets/acme/calib/resolve/[0-9a-f]+/news\.jsonl$")
        assert len(downloads) == 4  # v1 once, main at each of its 3 commits
        repo = tmp_path / "daemon-cache" / "calibration" / "datasets--acme--calib"
        assert len(list(repo.glob("snapshots/*"))) == 2
        old = time.time() - 31 * 86400
        os.utime(repo / "refs" / "v1", (old, old))
        calibrate_all(adapters, latest, {"hub_dataset": HubDataset()})
        assert [p.name for p in repo.glob("snapshots/*")] == [(repo / "refs" / "main").read_text()]
        assert not (repo / "refs" / "v1").exists()


def test_a_hub_dataset_file_past_the_calibration_limit_is_not_downloaded(bert, tmp_path, monkeypatch):
    """The README says ``[daemon.limits]`` caps calibration files also for Hub downloads;
    a hub_dataset file was downloaded whole and parsed whatever its size. The daemon gives
    the source its ``max_calibration_bytes``; a file past it is an error naming it."""
    base, adapters = bert
    adapter = load_adapter(adapters[0])
    content = b"".join(b'{"text": "sample %d"}\n' % i for i in range(20))  # 380 bytes
    with HubServer(token=TOKEN) as hub:
        isolate_hub_client(monkeypatch, hub.endpoint, tmp_path / "hf-home")
        hub.create_repo_direct("acme/calib", {f"{adapter.name}.jsonl": content}, repo_type="dataset")
        settings = {"hub_dataset": {"repo_id": "acme/calib", "endpoint": hub.endpoint,
                                    "cache_dir": str(tmp_path / "cache")}}
        small = CalibrationOptions(order=("hub_dataset",), settings=settings, max_download_bytes=100)
        with pytest.raises(CalibrationError, match=rf"acme/calib/{adapter.name}\.jsonl: is {len(content)} bytes, "
                                                   r"above the limit of 100 \(\[daemon.limits\] max_calibration_bytes\)"):
            gather_calibration([adapter], small, True)
        assert not hub.requests_matching(r"^GET /datasets/acme/calib/resolve/")
        assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.stat().st_size]
        enough = CalibrationOptions(order=("hub_dataset",), settings=settings, max_download_bytes=len(content))
        assert len(gather_calibration([adapter], enough, True)[0].samples) == 20


@pytest.mark.parametrize("sha", ["../../../../escaped", "/ABSOLUTE", "A" * 40])
def test_a_hub_dataset_commit_sha_that_is_not_40_hex_digits_is_refused_before_any_download(tmp_path, monkeypatch, sha):
    """The dataset's commit sha, as the Hub answers it, was passed on as the download's
    revision, and ``huggingface_hub`` writes ``refs/<revision>`` in the cache: ``../`` or an
    absolute path wrote a file outside it (found by QA). Now the adapter gets an error naming
    the source and the dataset, and nothing is downloaded or written."""
    if sha.startswith("/"):
        sha = str(tmp_path / "absolute")
    real_info, real_resolve = HubServer._info, HubServer._resolve

    def info(self, found, commit, *, blobs):
        answer = real_info(self, found, commit, blobs=blobs)
        return {**answer, "sha": sha} if found.repo_id == "eve/calib" else answer

    def resolve(self, repo, revision):  # a Hub that serves whatever revision it named
        return repo.resolve(revision) or real_resolve(self, repo, "main")

    monkeypatch.setattr(HubServer, "_info", info)
    monkeypatch.setattr(HubServer, "_resolve", resolve)
    cache = tmp_path / "a" / "b" / "c" / "cache"
    with HubServer(token=TOKEN) as hub:
        isolate_hub_client(monkeypatch, hub.endpoint, tmp_path / "hf-home")
        hub.create_repo_direct("eve/calib", {"news.jsonl": b'{"text": "news"}\n'}, repo_type="dataset")
        options = CalibrationOptions(order=("hub_dataset",), settings={"hub_dataset": {
            "repo_id": "eve/calib", "endpoint": hub.endpoint, "cache_dir": str(cache)}})
        with pytest.raises(CalibrationError, match=r"^hub_dataset: dataset eve/calib: the Hub answered a commit sha "
                                                   r".*, not 40 hex digits; nothing downloaded$"):
            HubDataset().load(SimpleNamespace(name="news"), options)
        assert not hub.requests_matching(r"^(GET|HEAD) /datasets/eve/calib/resolve/")
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and cache not in p.parents and "hf-home" not in p.parts]


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])  # llama: its tokenizer gives token_type_ids
def test_generated_fallback_is_used_and_marked(tiny, tmp_path, capsys, family):
    base, adapters = tiny[family]
    for adapter in adapters[:2]:
        (adapter / "calibration.jsonl").rename(adapter / "calibration.jsonl.off")
    try:
        code = main(["merge", "--base-model", str(base), "--adapter", str(adapters[0]), "--adapter", str(adapters[1]),
                     "--out", str(tmp_path / "m"), "-q", "--param", "iterations=1", "--param", "samples_per_task=56",
                     "--calibration-order", "files,adapter,generate"])
    finally:
        for adapter in adapters[:2]:
            (adapter / "calibration.jsonl.off").rename(adapter / "calibration.jsonl")
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    # The settings that made the inputs: the report reproduces them (it said only "from a0")
    used = "random vocabulary words, seed 0" if family == "bert" else "seed 0, max_new_tokens 32"
    for entry, adapter in zip(report["inputs"], adapters):
        assert entry["calibration"]["generated"] is True
        assert entry["calibration"]["samples"] == 56  # as many as the merge uses (it made 50, whatever was asked)
        assert entry["calibration"]["source"] == f"generated by generate from {adapter.name} ({used}, samples 56" + (
            ")" if family == "bert" else ", float32)")


def _eos_first(tiny, tmp_path):
    """A copy of the tiny GPT-2 that ends every text at once: its final norm gives every
    position one hidden state, which the (tied) head scores as EOS far above any other token."""
    import shutil

    import torch
    from transformers import GPT2LMHeadModel

    base = shutil.copytree(tiny["gpt2"][0], tmp_path / "eos-first")
    model = GPT2LMHeadModel.from_pretrained(base)
    with torch.no_grad():
        direction = torch.nn.functional.normalize(torch.randn(model.config.n_embd), dim=0)
        model.transformer.wte.weight[model.config.eos_token_id] = 10 * direction
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(10 * direction)
    model.save_pretrained(base)
    return base


def test_samples_that_end_at_once_are_no_calibration(tiny, tmp_path):
    """A model that says EOS right after BOS (as instruct models do): every sample was the
    EOS's own text ("[SEP]"), and the merge succeeded on one identical token per task. No
    text left is an error naming the adapter and the setting that keeps EOS away, which
    then gives text as long as it asks for."""
    from iteris_daemon.plugin_manager import calibration_sources

    base, adapter = _eos_first(tiny, tmp_path), load_adapter(tiny["gpt2"][1][0])
    options = CalibrationOptions(order=("generate",), base_model=str(base), samples=4)
    said = rf"^{adapter.path}: every sample generated from adapter {adapter.name} ended at once \(EOS\) and holds no " \
           r"text; set generate\.min_new_tokens"
    with pytest.raises(CalibrationError, match=said):
        calibration_sources()["generate"].load(adapter, options)
    options.settings = {"generate": {"min_new_tokens": 3, "max_new_tokens": 3}}
    data = calibration_sources()["generate"].load(adapter, options)
    assert len(data.samples) == 4  # none dropped
    assert data.source == f"generated by generate from {adapter.name} (seed 0, max_new_tokens 3, min_new_tokens 3, " \
                          "samples 4, float32)"
    adapters = tiny["gpt2"][1][:2]  # and a merge on them succeeds, as the error's advice says
    assert main(["merge", "--base-model", str(base), "--out", str(tmp_path / "m"), "-q", "--param", "iterations=1",
                 "--param", "samples_per_task=4", "--calibration-order", "generate",
                 "--calibration-setting", "generate.min_new_tokens=3", "--calibration-setting",
                 "generate.max_new_tokens=3", *(f"--adapter={a}" for a in adapters)]) == 0
    report = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    assert [i["calibration"]["samples"] for i in report["inputs"]] == [4, 4]


def test_samples_without_text_are_dropped_in_one_line(caplog):
    from iteris_daemon.plugins.calibration_generate import _kept

    adapter = SimpleNamespace(name="a0", path=Path("a0"))
    with caplog.at_level("WARNING"):
        assert _kept([Sample("text"), None, Sample("more"), None], adapter, {"max_new_tokens": 32}) == [
            Sample("text"), Sample("more")]
    assert [r.getMessage() for r in caplog.records] == [
        "generate: 2 of 4 samples generated from adapter a0 hold no text (EOS at once); dropped"]


def test_generation_stops_where_learned_positions_end(tiny, caplog):
    """max_new_tokens past GPT-2's 128 learned positions failed with "IndexError: index out
    of range in self"; it is capped at them, in one line. Llama's rotary positions have no
    table, and its 128 do not cap it."""
    from iteris_daemon.plugin_manager import calibration_sources

    for family, used in (("gpt2", 127), ("llama", 200)):
        base, adapters = tiny[family]
        adapter = load_adapter(adapters[0])
        options = CalibrationOptions(order=("generate",), base_model=str(base), samples=2,
                                     settings={"generate": {"max_new_tokens": 200}})
        with caplog.at_level("WARNING"):
            data = calibration_sources()["generate"].load(adapter, options)
        assert data.source == (f"generated by generate from {adapter.name} (seed 0, max_new_tokens {used}, "
                               "samples 2, float32)")
    assert [r.getMessage() for r in caplog.records if "capped" in r.getMessage()] == [
        f"generate: max_new_tokens 200 capped at 127 for adapter {load_adapter(tiny['gpt2'][1][0]).name}: the base "
        "model's learned position table holds 128 positions (max_position_embeddings), one of them the token "
        "generation starts from"]


def test_generation_pads_with_a_token_the_model_holds(tiny, tmp_path):
    """A tokenizer given a pad token the model's embedding lacks (added without resizing it):
    the seq2seq prompts, padded with it, failed in generate() with an IndexError. It pads
    with the id the model's config names, as the merge does."""
    import shutil

    from transformers import AutoTokenizer

    from iteris_daemon.plugin_manager import calibration_sources

    base_dir, adapters = tiny["t5"]
    base = shutil.copytree(base_dir, tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})  # id 30522, of a 30522-row embedding
    tokenizer.save_pretrained(base)
    options = CalibrationOptions(order=("generate",), base_model=str(base), samples=9,
                                 settings={"generate": {"max_new_tokens": 4}})
    samples = calibration_sources()["generate"].load(load_adapter(adapters[0]), options).samples
    assert len(samples) == 9 and all(s.target for s in samples)


def _generated_with_prompts(monkeypatch, base, adapter, samples: int, max_new_tokens: int):
    """The generate source's samples for ``adapter``, and the prompts it gave ``generate`` (a
    spy records them; generation itself runs)."""
    import transformers

    from iteris_daemon.plugin_manager import calibration_sources

    prompts = []
    generate = transformers.GenerationMixin.generate

    def spy(self, *args, **kwargs):
        prompts.extend(kwargs["input_ids"].tolist())
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(transformers.GenerationMixin, "generate", spy)
    options = CalibrationOptions(order=("generate",), base_model=str(base), samples=samples,
                                 settings={"generate": {"max_new_tokens": max_new_tokens}})
    return calibration_sources()["generate"].load(load_adapter(adapter), options), prompts


def test_generation_starts_from_one_bos_token(tiny, tmp_path, monkeypatch):
    """A decoder's samples start from its BOS alone, as its texts do. The prompt was the BOS's
    text, to which the tokenizer added its own: [BOS, BOS, EOS] on Llama-style tokenizers (a
    spy on ``generate`` records the prompts; generation itself runs)."""
    import shutil

    from transformers import AutoTokenizer

    base_dir, adapters = tiny["llama"]
    base = shutil.copytree(base_dir, tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.bos_token = "[CLS]"  # a tokenizer that names a BOS and adds its own specials
    tokenizer.save_pretrained(base)
    data, prompts = _generated_with_prompts(monkeypatch, base, adapters[0], samples=3, max_new_tokens=4)
    assert len(data.samples) == 3 and prompts == [[tokenizer.bos_token_id]] * 3


def test_generation_runs_where_and_as_the_merge_says(tiny, monkeypatch, capsys):
    """merge --dtype, --device and --trust-remote-code reach the generate source, which
    loaded the base in float32 on the CPU whatever they said (a 70B base, once per adapter,
    sampled on the CPU). A device this machine lacks is one line."""
    import torch
    import transformers

    from iteris_daemon.cli import build_parser
    from iteris_daemon.cli.merge import calibration_options
    from iteris_daemon.plugin_manager import calibration_sources

    base_dir, adapters = tiny["llama"]
    args = build_parser().parse_args(["merge", "--base-model", str(base_dir), "--adapter", str(adapters[0]),
                                      "--out", "m", "--dtype", "bfloat16", "--calibration-order", "generate"])
    options = calibration_options(args)
    assert (options.device, options.dtype, options.trust_remote_code) == ("cpu", "bfloat16", False)
    seen = []
    generate = transformers.GenerationMixin.generate

    def spy(self, *args, **kwargs):
        seen.append((self.dtype, kwargs["input_ids"].device.type))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(transformers.GenerationMixin, "generate", spy)
    options.base_model, options.samples = str(base_dir), 2
    options.settings = {"generate": {"max_new_tokens": 2}}
    data = calibration_sources()["generate"].load(load_adapter(adapters[0]), options)
    assert len(data.samples) == 2 and seen == [(torch.bfloat16, "cpu")]
    options.device = "cuda:7"
    with pytest.raises(IterisError, match="device 'cuda:7' is not available here"):
        calibration_sources()["generate"].load(load_adapter(adapters[0]), options)


def test_without_generate_a_missing_calibration_is_an_error(bert, tmp_path, capsys):
    base, adapters = bert
    (adapters[0] / "calibration.jsonl").rename(adapters[0] / "calibration.jsonl.off")
    try:
        code = main(["merge", "--base-model", str(base), "--adapter", str(adapters[0]), "--adapter", str(adapters[1]),
                     "--out", str(tmp_path / "m"), "-q"])
    finally:
        (adapters[0] / "calibration.jsonl.off").rename(adapters[0] / "calibration.jsonl")
    assert code == 2 and "asked: files, adapter" in capsys.readouterr().err


class _Answering:
    """An in-process source that has data for the adapters named in ``has``."""

    def __init__(self, name: str, has: set[str]):
        self.name, self.description, self.has, self.asked = name, "test", has, []

    def load(self, adapter, options):
        self.asked.append(adapter.name)
        return CalibrationSet((Sample(f"{self.name} for {adapter.name}"),), self.name) if adapter.name in self.has else None


def test_the_daemon_asks_a_worker_source_once_per_run_in_the_configured_order(tmp_path):
    """``runner.calibrate_all``: each adapter gets the first answer in the order, as
    ``first_calibration`` gives it; a ``runs_in_worker`` source is asked about every adapter
    still unanswered in one worker job; one adapter's error there holds back only it, and a
    worker that dies holds back those it was asked about (counted, not fatal)."""
    adapters = [SimpleNamespace(name=name, path=tmp_path / name) for name in ("a", "b", "c", "d")]
    jobs = []

    def in_worker(job, label):
        jobs.append([entry["name"] for entry in job["adapters"]])
        answers = {"b": {"samples": [["generated for b", None]], "source": "gen", "generated": True},
                   "c": {"error": "c: the model would not load"}, "d": None}
        return [answers.get(name) for name in jobs[-1]]

    files = _Answering("files", {"a", "d"})
    generate = InWorkerCalibration(_Answering("generate", set()), in_worker)
    options = CalibrationOptions(order=("files", "generate"))
    answers = calibrate_all(adapters, options, {"files": files, "generate": generate})
    assert jobs == [["b", "c"]] and files.asked == ["a", "b", "c", "d"]
    assert [answers[0].samples[0].text, answers[1].samples[0].text, answers[3].samples[0].text] == [
        "files for a", "generated for b", "files for d"]
    assert answers[1].generated and isinstance(answers[2], IterisError) and "would not load" in str(answers[2])

    # The worker first: what it has no data for falls through to the next source.
    jobs.clear()
    files.asked.clear()
    options = CalibrationOptions(order=("generate", "files"))
    answers = calibrate_all(adapters, options, {"files": files, "generate": generate})
    assert jobs == [["a", "b", "c", "d"]] and files.asked == ["a", "d"]  # a: no answer from the worker; d: None
    assert answers[0].samples[0].text == "files for a" and answers[3].samples[0].text == "files for d"

    def dies(job, label):
        raise WorkerFailed("the worker was killed by SIGKILL", "signal")

    answers = calibrate_all(adapters, CalibrationOptions(order=("files", "generate")),
                            {"files": files, "generate": InWorkerCalibration(_Answering("generate", set()), dies)})
    assert answers[0].source == answers[3].source == "files"
    assert all(isinstance(answers[i], WorkerFailed) and answers[i].kind == "signal" for i in (1, 2))
    assert str(answers[1]) == "calibration source generate: the worker was killed by SIGKILL"


def test_a_calibration_worker_short_of_memory_is_waited_for_as_one_that_died(bert, tmp_path, monkeypatch):
    """A ``generate`` worker whose base does not fit its memory raises ``MemoryError`` inside
    the source: the worker answered it as that adapter's error, so the run held the adapter
    back at once and merged the others (QA RV5), while a worker killed for memory was waited
    for. Now an answer that says memory ran out is a ``WorkerFailed`` of kind ``memory``;
    any other error of the source still holds back only its adapter."""
    import threading

    from iteris_daemon import plugin_manager
    from iteris_daemon.runner import _answer
    from iteris_daemon.worker import _calibration

    class ShortOfMemory:
        def load(self, adapter, options):
            if adapter.name == "big":
                raise MemoryError("Cannot allocate memory (os error 12)")
            raise ValueError("this adapter's own problem")

    monkeypatch.setattr(plugin_manager, "calibration_sources", lambda: {"gen": ShortOfMemory()})
    adapter = bert[1][0]
    job = {"source": "gen", "adapters": [{"path": str(adapter), "name": "big"}, {"path": str(adapter), "name": "odd"}],
           "options": {"order": ["gen"], "files": {}, "base_model": str(bert[0]), "samples": 4, "limit": 4,
                       "settings": {}, "cache_dir": None}}
    big, odd = (_answer(answer) for answer in _calibration(job, threading.Event()))
    assert isinstance(big, WorkerFailed) and big.kind == "memory" and "MemoryError: Cannot allocate memory" in str(big)
    assert not isinstance(odd, WorkerFailed) and "ValueError: this adapter's own problem" in str(odd)


def test_a_sources_empty_or_malformed_answer(bert):
    """A plugin source's set of no samples was taken as the adapter's data (every figure 0,
    "samples": 0), and a list of strings ended in an AttributeError: now an empty set is no
    answer (the next source is asked) and anything but Samples an error naming the source."""
    from iteris_daemon.calibration import first_calibration
    from iteris_daemon.plugin_manager import calibration_sources

    adapter = load_adapter(bert[1][0])
    answers = {"empty": CalibrationSet((), "nothing"), "strings": CalibrationSet(("a", "b"), "strings"),
               "none": CalibrationSet(None, "none"), "generator": CalibrationSet((Sample(t) for t in "ab"), "gen")}
    available = {name: SimpleNamespace(load=lambda a, o, name=name: answers[name]) for name in answers}
    available["adapter"] = calibration_sources()["adapter"]
    found = first_calibration(adapter, CalibrationOptions(order=("empty", "adapter")), available)
    assert found.source.endswith("calibration.jsonl") and found.samples
    assert first_calibration(adapter, CalibrationOptions(order=("empty",)), available) is None
    # samples=None was a TypeError that ended a daemon run, not the adapter's; what is wrong is said ("answered
    # CalibrationSet ..., not a CalibrationSet of Samples" read as a contradiction, QA PLUG)
    for wrong, said in (("strings", "holding a str, not a Sample"), ("none", "whose samples are a NoneType, not a"),
                        ("generator", "whose samples are a generator, not a tuple or list")):
        with pytest.raises(CalibrationError, match=f"^{wrong}: calibration source answered a CalibrationSet for adapter "
                                                   f"{adapter.name} {said}"):
            first_calibration(adapter, CalibrationOptions(order=(wrong, "adapter")), available)
    # The daemon's path checks the same way: the empty set falls through, the strings hold the adapter back.
    empty_first, strings_first, none_first = (
        calibrate_all([adapter], CalibrationOptions(order=(name, "adapter")), available)[0]
        for name in ("empty", "strings", "none"))
    assert empty_first.source.endswith("calibration.jsonl") and empty_first.samples
    assert isinstance(strings_first, CalibrationError) and str(strings_first).startswith("strings: calibration source")
    assert isinstance(none_first, CalibrationError) and str(none_first).startswith("none: calibration source answered")
    # A source that is not a string failed after the whole merge, at writing the report (the daemon's run
    # escaped, unrecorded, retried for ever): a path is taken as its string, anything else holds the adapter back.
    available["path"] = SimpleNamespace(load=lambda a, o: CalibrationSet((Sample("fine"),), Path("/srv/x.jsonl")))
    available["number"] = SimpleNamespace(load=lambda a, o: CalibrationSet((Sample("fine"),), 7))
    assert first_calibration(adapter, CalibrationOptions(order=("path",)), available).source == "/srv/x.jsonl"
    with pytest.raises(CalibrationError, match=f"^number: calibration source answered a CalibrationSet for adapter "
                                               f"{adapter.name} whose source is int, not a string"):
        first_calibration(adapter, CalibrationOptions(order=("number",)), available)
    by_path, by_number = calibrate_all([adapter], CalibrationOptions(order=("path", "number")), available)[0], \
        calibrate_all([adapter], CalibrationOptions(order=("number",)), available)[0]
    assert by_path.source == "/srv/x.jsonl" and str(by_number).startswith("number: calibration source answered")
    # Samples a file's line could not hold: an empty text was merged on, a number a TypeError; an empty
    # text_pair, or one beside messages, was taken; an int content was "AttributeError: ... 'encode'".
    for bad, problem in ((Sample(""), 'missing or empty "text"'), (Sample(123), 'missing or empty "text"'),
                         (Sample("text", target=4), '"target" must be a string'),
                         (Sample("text", text_pair=""), '"text_pair" must be a non-empty string'),
                         (Sample("text", text_pair=7), '"text_pair" must be a non-empty string'),
                         (Sample("u: hi", messages=(("u", "hi"),), text_pair="b"), 'a "messages" sample takes no "text_pair"'),
                         (Sample("u: hi", target="t", messages=(("u", "hi"),)), 'a "messages" sample takes no "target"'),
                         (Sample("u: ", messages=(("u", " "),)), '"messages" has no content'),
                         (Sample("", messages=(("u", "hi"),)), 'a "messages" sample needs its plain rendering'),
                         (Sample("u: 7", messages=(("u", 7),)), '"messages" must be a non-empty list of'),
                         (Sample("\ud800"), "holds an unpaired surrogate")):
        available["bad"] = SimpleNamespace(load=lambda a, o, bad=bad: CalibrationSet((Sample("fine"), bad), "bad"))
        with pytest.raises(CalibrationError, match=f"^bad: calibration source answered sample 2 for adapter "
                                                   f"{adapter.name}: {re.escape(problem)}"):
            first_calibration(adapter, CalibrationOptions(order=("bad",)), available)
    available["bad"] = SimpleNamespace(load=lambda a, o: CalibrationSet((Sample("fine"),), "bad", generated="yes"))
    with pytest.raises(CalibrationError, match="^bad: .* whose generated is str, not a bool$"):
        first_calibration(adapter, CalibrationOptions(order=("bad",)), available)


def test_a_source_that_raises_is_named(bert):
    """A plugin source whose store is unreachable ended ``merge`` in a traceback: now its
    failure is one CalibrationError naming the source and the adapter (the cause chained,
    for -v), while a source's own CalibrationError passes through as it was."""
    from iteris_daemon.calibration import first_calibration

    adapter = load_adapter(bert[1][0])

    def unreachable(a, o):
        raise ConnectionError("store.example: connection refused")

    def malformed(a, o):
        raise CalibrationError("rows.jsonl", "not valid JSON", line=3)

    available = {"store": SimpleNamespace(load=unreachable), "rows": SimpleNamespace(load=malformed)}
    with pytest.raises(CalibrationError) as caught:
        first_calibration(adapter, CalibrationOptions(order=("store",)), available)
    assert str(caught.value) == (f"store: calibration source failed on adapter {adapter.name}: "
                                 "ConnectionError: store.example: connection refused")
    assert isinstance(caught.value.__cause__, ConnectionError)
    with pytest.raises(CalibrationError, match=r"^rows.jsonl:3: not valid JSON$"):
        first_calibration(adapter, CalibrationOptions(order=("rows", "store")), available)
    # A library that calls sys.exit: `merge` ended with its code and no word, the daemon's run left running.
    available["exits"] = SimpleNamespace(load=lambda a, o: sys.exit(3))
    with pytest.raises(CalibrationError, match=f"^exits: calibration source failed on adapter {adapter.name}: "
                                               "SystemExit: 3$"):
        first_calibration(adapter, CalibrationOptions(order=("exits",)), available)


def test_a_source_that_raises_holds_its_adapter_back_in_the_daemon_too(bert):
    """The daemon asked sources through its own function, which let anything but an
    IterisError through: a plugin's ConnectionError ended the whole run in a traceback
    ("could not be carried out", retried for ever, nothing recorded). Now it holds that
    adapter back with the line ``merge`` gives, and the other adapters are answered. A
    worker source without a description no longer breaks every run either."""
    from iteris_daemon.validation import read_layout

    adapters = [read_layout(folder) for folder in bert[1][:2]]

    def flaky(adapter, options):
        if adapter.name == adapters[0].name:
            raise ConnectionError("store.example: connection refused")
        return CalibrationSet((Sample(text="from the store"),), "store")

    nameless = SimpleNamespace(name="gen", runs_in_worker=True)  # no description: it is optional
    generate = InWorkerCalibration(nameless, lambda job, label: [None] * len(job["adapters"]))
    answers = calibrate_all(adapters, CalibrationOptions(order=("store", "gen")),
                            {"store": SimpleNamespace(load=flaky), "gen": generate})
    assert isinstance(answers[0], CalibrationError) and str(answers[0]) == (
        f"store: calibration source failed on adapter {adapters[0].name}: ConnectionError: store.example: "
        "connection refused")
    assert answers[1].samples[0].text == "from the store" and generate.description == ""


@pytest.mark.parametrize("settings, message", [
    ({"sampels": 3}, "calibration.generate: sampels: Extra inputs are not permitted"),
    ({"samples": "many"}, "calibration.generate: samples: Input should be a valid integer"),
    ({"max_new_tokens": 0}, "calibration.generate: max_new_tokens: Input should be greater than or equal to 1"),
    ({"min_new_tokens": 40}, "calibration.generate: min_new_tokens: 40 is more than max_new_tokens (32)"),
])
def test_the_generate_sources_settings_are_checked(bert, settings, message):
    """A typo was ignored, and "many" a ValueError from int() in the worker."""
    from iteris_daemon.errors import ConfigError
    from iteris_daemon.plugin_manager import calibration_sources

    adapter = load_adapter(bert[1][0])
    options = CalibrationOptions(order=("generate",), base_model=str(bert[0]), settings={"generate": settings})
    with pytest.raises(ConfigError) as caught:
        calibration_sources()["generate"].load(adapter, options)
    assert str(caught.value) == message


class _Keeping:
    """A source that keeps something between the loads of a run (as ``generate`` keeps the
    base model) and records what it is asked; it fails on the adapter named ``fails``, and
    sets ``stop`` once it has answered, as a SIGTERM would."""

    name = "keeping"

    def __init__(self, events: list[str], fails: str | None = None, stop=None):
        self.events, self.fails, self.stop, self.kept = events, fails, stop, None

    def load(self, adapter, options):
        self.kept = self.kept or object()
        self.events.append(f"load {adapter.name}")
        if adapter.name == self.fails:
            raise ConnectionError("store.example: connection refused")
        if self.stop is not None:
            self.stop.set()
        return CalibrationSet((Sample(f"kept for {adapter.name}"),), self.name)

    def release(self):
        self.events.append("release")
        self.kept = None


def test_a_source_is_released_once_it_answered_for_every_adapter_before_the_merge_loads_the_base(bert, tmp_path,
                                                                                                 monkeypatch):
    """``merge`` asks the source about every adapter, releases it, and only then loads the
    base model: what the source kept (``generate``'s model) never sits beside the merge's.
    An error releases it too."""
    import iteris_daemon.merge as merge
    from registered import registered

    base, folders = bert
    names = [folder.name for folder in folders[:2]]
    events: list[str] = []
    load_base = merge.load_base

    def recorded(*args, **kwargs):
        events.append("load base")
        return load_base(*args, **kwargs)

    monkeypatch.setattr(merge, "load_base", recorded)
    with registered("register_calibration_sources", _Keeping(events)):
        assert main(["merge", "--base-model", str(base), "--adapter", str(folders[0]), "--adapter", str(folders[1]),
                     "--out", str(tmp_path / "m"), "-q", "--param", "iterations=1",
                     "--calibration-order", "keeping"]) == 0
    assert events == [f"load {names[0]}", f"load {names[1]}", "release", "load base"]
    events.clear()
    adapters = [load_adapter(folder) for folder in folders[:2]]
    with registered("register_calibration_sources", _Keeping(events, fails=names[0])):
        with pytest.raises(CalibrationError, match="^keeping: calibration source failed on adapter"):
            gather_calibration(adapters, CalibrationOptions(order=("keeping", "adapter")), True)
    assert events == [f"load {names[0]}", "release"]


def test_the_daemon_releases_a_source_after_all_adapters_also_on_an_error_or_a_stop(bert):
    """``calibrate_all`` releases an in-process source once it has asked it about every
    adapter still unanswered (one adapter's error holds back only that adapter), before
    the next source is asked, and when a stop request ends it."""
    from iteris_daemon.errors import MergeCancelled
    from iteris_daemon.validation import read_layout

    adapters = [read_layout(folder) for folder in bert[1][:2]]
    events: list[str] = []
    sources = {"keeping": _Keeping(events, fails=adapters[0].name), "adapter": _Answering("adapter", set())}
    answers = calibrate_all(adapters, CalibrationOptions(order=("keeping", "adapter")), sources)
    assert isinstance(answers[0], CalibrationError) and answers[1].samples[0].text == f"kept for {adapters[1].name}"
    assert events == [f"load {adapters[0].name}", f"load {adapters[1].name}", "release"]
    events.clear()
    with pytest.raises(MergeCancelled):
        calibrate_all(adapters, CalibrationOptions(order=("keeping",)), sources, should_stop=lambda: bool(events))
    assert events == [f"load {adapters[0].name}", "release"]


def test_a_calibration_worker_releases_its_source_after_all_adapters_also_on_a_cancel(bert):
    """The worker that answers for every adapter of a run releases the source after the
    last one, and when a SIGTERM cancels it between two adapters."""
    import threading

    from registered import registered

    from iteris_daemon.worker import run_job

    folders = bert[1][:2]
    job = {"kind": "calibration", "source": "keeping",
           "adapters": [{"path": str(folder), "name": folder.name} for folder in folders],
           "options": {"order": ["keeping"], "files": {}, "base_model": str(bert[0]), "samples": 2, "limit": 2,
                       "settings": {}}}
    events: list[str] = []
    with registered("register_calibration_sources", _Keeping(events)):
        result = run_job(job, threading.Event())
    assert result["status"] == "ok" and [a["samples"] for a in result["report"]] == [
        [[f"kept for {folder.name}", None]] for folder in folders]
    assert events == [f"load {folders[0].name}", f"load {folders[1].name}", "release"]
    events.clear()
    stop = threading.Event()
    with registered("register_calibration_sources", _Keeping(events, stop=stop)):
        assert run_job(job, stop)["status"] == "cancelled"
    assert events == [f"load {folders[0].name}", "release"]


def test_a_release_that_fails_is_named_and_the_other_sources_are_released_all_the_same():
    from iteris_daemon.calibration import releasing

    events: list[str] = []

    def broken():
        raise RuntimeError("handle already closed")

    sources = {"broken": SimpleNamespace(release=broken), "none": SimpleNamespace(), "keeping": _Keeping(events)}
    with pytest.raises(CalibrationError, match="^broken: calibration source failed to release what it kept: "
                                               "RuntimeError: handle already closed$"):
        with releasing(sources):
            pass
    assert events == ["release"]


def test_a_failing_release_does_not_replace_the_blocks_own_error(caplog):
    """A cancel (or "no calibration data") in the block came out as the release's error: a
    daemon stopped by systemd recorded a failed run. The block's error goes on; the release's
    is logged."""
    from iteris_daemon.calibration import releasing
    from iteris_daemon.errors import MergeCancelled

    def broken():
        raise RuntimeError("handle already closed")

    events: list[str] = []
    with pytest.raises(MergeCancelled, match="^stopped$"):
        with releasing({"broken": SimpleNamespace(release=broken), "keeping": _Keeping(events)}):
            raise MergeCancelled("stopped")
    assert events == ["release"]
    assert "broken: calibration source failed to release what it kept: RuntimeError: handle already closed" in caplog.text


_OTHER_TARGETS = {  # per family: adapters that adapt different layers at different ranks, one saving lm_head
    "llama": ([["q_proj", "lm_head_saved"], ["down_proj", "up_proj"], ["q_proj", "o_proj"]]),
    "t5": ([["q", "lm_head_saved"], ["wo", "k"], ["o", "wi"]]),
}


@pytest.mark.parametrize("family, task_type", [("llama", "CAUSAL_LM"), ("t5", "SEQ_2_SEQ_LM")])
def test_generate_loads_the_base_once_per_run_and_samples_what_a_load_per_adapter_did(tiny, tmp_path, monkeypatch,
                                                                                      family, task_type):
    """``generate`` loaded the whole base model again for every adapter (20 loads of a 70B
    base for a merge of 20 LoRAs). Now one source asked about a run's adapters loads it once
    and applies each adapter in turn; its samples equal those of a fresh source per adapter
    (the load per adapter of before) with the same seed, though the adapters adapt different
    layers at different ranks, one saves lm_head whole, and one fails half-applied (first and
    between two).
    ``release()`` frees the model; a load after it, or with another dtype, loads afresh."""
    import gc
    import weakref

    import builders
    import transformers
    from builders import build_adapter

    from iteris_daemon.calibration import ask
    from iteris_daemon.plugin_manager import calibration_sources

    base = tiny[family][0]
    adapters = []
    for seed, targets in enumerate(_OTHER_TARGETS[family]):
        saved = ["lm_head"] if "lm_head_saved" in targets else None
        folder = build_adapter(base, tmp_path / f"a{seed}", seed=seed, family=family, task_type=task_type, r=2 + 3 * seed,
                               use_rslora=seed == 1, targets=[t for t in targets if t != "lm_head_saved"],
                               modules_to_save=saved)
        adapters.append(load_adapter(folder))
    wider = transformers.AutoConfig.from_pretrained(base)  # an adapter of a wider base: PEFT wraps the layers
    setattr(wider, "d_model" if family == "t5" else "hidden_size", 64)  # it names, then refuses its weights
    builders.model_class(task_type).from_config(wider).save_pretrained(tmp_path / "wider")
    builders.tokenizer().save_pretrained(tmp_path / "wider")
    foreign = load_adapter(build_adapter(tmp_path / "wider", tmp_path / "foreign", seed=7, family=family,
                                         task_type=task_type, targets=_OTHER_TARGETS[family][1]))
    loads: list[weakref.ref] = []
    from_pretrained = transformers.PreTrainedModel.from_pretrained.__func__

    def counted(cls, *args, **kwargs):
        model = from_pretrained(cls, *args, **kwargs)
        loads.append(weakref.ref(model))
        return model

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(counted))
    options = CalibrationOptions(order=("generate",), base_model=str(base), samples=9,
                                 settings={"generate": {"max_new_tokens": 6, "seed": 3}})
    one_each = [calibration_sources()["generate"].load(adapter, options).samples for adapter in adapters]
    assert len(loads) == 3 and len({s for samples in one_each for s in samples}) == 27  # the adapters differ
    loads.clear()
    source = calibration_sources()["generate"]
    refused = f"^generate: calibration source failed on adapter {foreign.name}: RuntimeError: Error"
    with pytest.raises(CalibrationError, match=refused):  # first: the base it wrapped is dropped
        ask("generate", source, foreign, options)
    shared = [source.load(adapter, options).samples for adapter in adapters]
    assert shared == one_each
    with pytest.raises(CalibrationError, match=refused):  # between two
        ask("generate", source, foreign, options)
    assert [source.load(adapter, options).samples for adapter in adapters[1:]] == one_each[1:]
    assert len(loads) == 3  # once, and again after each adapter that failed half-applied
    model = loads[-1]
    source.release()
    gc.collect()
    assert model() is None
    assert source.load(adapters[0], options).samples == one_each[0] and len(loads) == 4
    options.dtype = "bfloat16"  # loaded alike or not at all: another dtype loads afresh
    source.load(adapters[0], options)
    assert len(loads) == 5 and loads[3]() is None


def test_generate_applies_an_adapter_peft_refuses_on_the_kept_base_to_a_fresh_one(tiny, tmp_path):
    """PEFT keeps a deleted adapter's module wrappers and refuses to wrap one in another: an
    adapter with a LoRA on lm_head after one that saved lm_head whole (or the other way
    round) failed on the kept base ("Target module ModulesToSaveWrapper(...) is not
    supported"), where a load per adapter had given its samples. It now gets them from a
    fresh base, as a load per adapter did."""
    from builders import build_adapter

    from iteris_daemon.plugin_manager import calibration_sources

    base = tiny["llama"][0]
    saves = load_adapter(build_adapter(base, tmp_path / "saves", seed=0, family="llama", task_type="CAUSAL_LM",
                                       targets=["v_proj"], modules_to_save=["lm_head"]))
    lora = load_adapter(build_adapter(base, tmp_path / "lora", seed=1, family="llama", task_type="CAUSAL_LM",
                                      targets=["q_proj", "lm_head"], save_embedding_layers=False))
    assert "lm_head" in lora.modules
    options = CalibrationOptions(order=("generate",), base_model=str(base), samples=4,
                                 settings={"generate": {"max_new_tokens": 6, "seed": 3}})
    for adapters in ([saves, lora], [lora, saves]):
        fresh = [calibration_sources()["generate"].load(adapter, options).samples for adapter in adapters]
        assert fresh[0] != fresh[1]
        source = calibration_sources()["generate"]
        assert [source.load(adapter, options).samples for adapter in adapters] == fresh
        source.release()


def test_generation_without_a_bos_starts_from_a_token_the_model_holds(tiny, tmp_path, monkeypatch):
    """Without a BOS the first token is drawn at random: it was drawn from the whole tokenizer,
    whose added tokens (the embedding not resized) the model does not hold (an IndexError half
    the time here, the tokenizer twice the embedding's rows)."""
    import shutil

    from transformers import AutoTokenizer

    base_dir, adapters = tiny["llama"]
    base = shutil.copytree(base_dir, tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens([f"extra{i}" for i in range(30522)])  # ids 30522-61043, of a 30522-row embedding
    tokenizer.save_pretrained(base)
    assert AutoTokenizer.from_pretrained(base).bos_token_id is None
    data, prompts = _generated_with_prompts(monkeypatch, base, adapters[0], samples=16, max_new_tokens=2)
    assert len(data.samples) == 16 and len(prompts) == 16 and all(0 <= p < 30522 for (p,) in prompts)


def test_a_worker_source_is_given_the_daemons_cache_folder_and_stop(bert, tmp_path, monkeypatch):
    """A source the daemon runs in a worker got no ``cache_dir``: ``generate`` put the offload
    folder of a base too large for memory in the default cache folder, not the daemon's. The
    job carries it, and the worker hands it on, with the worker's stop (``should_stop``), which
    ``generate`` checks between batches."""
    from iteris_daemon import worker

    seen, asked = [], []
    stop = threading.Event()

    class Recording:
        name = "recording"

        def load(self, adapter, options):
            seen.append(options.cache_dir)
            asked.append(options.should_stop)
            return CalibrationSet((Sample("made"),), self.name)

    jobs = []
    source = InWorkerCalibration(Recording(), lambda job, label: jobs.append(job) or worker._calibration(
        json.loads(json.dumps(job)), stop))  # through JSON, as the worker gets it
    monkeypatch.setattr("iteris_daemon.plugin_manager.calibration_sources", lambda: {"recording": Recording()})
    adapter = SimpleNamespace(name="a", path=bert[1][0])
    cache = tmp_path / "cache"
    answers = source.load_many([adapter], CalibrationOptions(order=("recording",), cache_dir=cache))
    assert answers[0].samples[0].text == "made" and seen == [cache]
    assert jobs[0]["options"]["cache_dir"] == str(cache)
    assert not asked[0]()
    stop.set()  # the worker's SIGTERM
    assert asked[0]()
