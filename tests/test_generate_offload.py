"""The generate source on a base model larger than the memory it may take: placed by
accelerate (CPU memory, the rest read from disk), it samples what a whole load samples."""

from __future__ import annotations

import hashlib
import logging

import pytest
import transformers as tf
from builders import build_adapter, tiny_config, tokenizer

from iteris_daemon.calibration import CalibrationOptions
from iteris_daemon.lora import load_adapter
from iteris_daemon.plugins.calibration_generate import Generate


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A 6-block Llama of 76 MB in float32 (its embedding and head 31 MB each), two adapters,
    and one whose LoRA is zero: the base's own samples."""
    import torch

    root = tmp_path_factory.mktemp("offload")
    config = tiny_config("llama")
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 256, 512, 6
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, 64
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).save_pretrained(root / "base")
    tokenizer().save_pretrained(root / "base")
    adapters = [build_adapter(root / "base", root / f"a{seed}", seed=seed, family="llama", task_type="CAUSAL_LM",
                              scale=scale) for seed, scale in ((0, 0.3), (1, 0.3), (2, 0.0))]
    return root / "base", adapters


def _samples(source: Generate, adapter, options: CalibrationOptions) -> tuple:
    return source.load(load_adapter(adapter), options).samples


def test_a_base_past_its_memory_budget_samples_as_a_whole_load_and_leaves_no_offload_folder(llama, tmp_path,
                                                                                         monkeypatch, caplog):
    """70 MiB of CPU memory for a 73 MiB model: blocks go to disk, the adapters' LoRA with them.
    Two adapters in one run (the placed base is loaded again for the second). Nothing is
    written beside the checkpoint or in the working directory (PEFT's own offload path
    rewrote the shards there), and the offload folder is gone after ``release``."""
    base, adapters = llama
    checkpoint = hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()
    whole, placed = Generate(), Generate()
    settings = {"max_new_tokens": 8}
    options = CalibrationOptions(order=("generate",), base_model=str(base), samples=4, settings={"generate": settings})
    expected = [_samples(whole, adapter, options) for adapter in adapters]
    whole.release()
    assert expected[0] != expected[2] and expected[1] != expected[2]  # the adapters change what is sampled

    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    budget = CalibrationOptions(order=("generate",), base_model=str(base), samples=4, cache_dir=cache,
                                settings={"generate": {**settings, "max_memory_mb": {"cpu": 70}}})
    with caplog.at_level(logging.INFO, logger="iteris_daemon.plugins.calibration_generate"):
        got = [_samples(placed, adapter, budget) for adapter in adapters[:2]]
        folders = list((cache / "offload").iterdir())
    assert got == expected[:2]
    said = [r.getMessage() for r in caplog.records if "placed by accelerate" in r.getMessage()]
    assert len(said) == 2 and " on disk" in said[0] and " on cpu" in said[0], said
    assert len(folders) == 1 and folders[0].name.startswith("generate-offload-")
    placed.release()
    assert list((cache / "offload").iterdir()) == []
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]
    assert sorted(p.name for p in base.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                      "tokenizer.json", "tokenizer_config.json"]
    assert hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest() == checkpoint


def test_a_base_that_fits_is_loaded_whole(llama, caplog):
    base, adapters = llama
    options = CalibrationOptions(order=("generate",), base_model=str(base), samples=1,
                                 settings={"generate": {"max_new_tokens": 2}})
    source = Generate()
    with caplog.at_level(logging.INFO, logger="iteris_daemon.plugins.calibration_generate"):
        source.load(load_adapter(adapters[0]), options)
    source.release()
    assert f"generate: base model {base} loaded whole, on cpu" in caplog.messages
    # what is under way on a large base, where a batch takes minutes, and how long it took
    assert ("generate: sampling 1 texts from adapter a0 (up to 2 new tokens each, batches of 8)"
            in caplog.messages), caplog.messages
    assert any(m.startswith("generate: adapter a0: 1 texts in ") for m in caplog.messages), caplog.messages


def test_a_base_none_of_which_fits_in_memory_samples_from_disk_and_says_it_is_slow(llama, tmp_path, caplog):
    """A budget of 1 MiB: accelerate puts the whole model on disk. The samples are a whole
    load's, and a WARNING says each batch reads every weight from disk (the INFO line alone
    said only "1 on disk")."""
    base, adapters = llama
    settings = {"max_new_tokens": 4}
    options = CalibrationOptions(order=("generate",), base_model=str(base), samples=2, settings={"generate": settings})
    whole = Generate()
    expected = _samples(whole, adapters[0], options)
    whole.release()
    placed = Generate()
    budget = CalibrationOptions(order=("generate",), base_model=str(base), samples=2, cache_dir=tmp_path / "cache",
                                settings={"generate": {**settings, "max_memory_mb": {"cpu": 1}}})
    with caplog.at_level(logging.INFO, logger="iteris_daemon.plugins.calibration_generate"):
        assert _samples(placed, adapters[0], budget) == expected
    placed.release()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("iteris")]
    assert len(warned) == 1 and "no part of base model" in warned[0] and "{'cpu': 1}" in warned[0], warned


def test_max_memory_mb_names_devices_as_the_merge_does():
    from iteris_daemon.errors import ConfigError

    with pytest.raises(ConfigError, match="max_memory_mb"):
        Generate().load(None, CalibrationOptions(base_model="x", settings={"generate": {"max_memory_mb": {"gpu": 1}}}))


def test_a_base_is_sized_in_the_dtype_it_loads_in(llama, tmp_path, caplog):
    """A bfloat16 checkpoint loaded in float32 takes twice its files' size; it was sized as
    stored, so a budget between the two loaded it whole, past the budget."""
    import torch

    base, adapters = llama
    half = tmp_path / "half"
    tf.LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16).save_pretrained(half)
    tokenizer().save_pretrained(half)
    settings = {"max_new_tokens": 4}
    whole = Generate()
    expected = _samples(whole, adapters[0], CalibrationOptions(
        order=("generate",), base_model=str(half), samples=2, dtype="float32", settings={"generate": settings}))
    whole.release()
    placed = Generate()
    budget = CalibrationOptions(order=("generate",), base_model=str(half), samples=2, dtype="float32",
                                cache_dir=tmp_path / "cache", settings={"generate": {**settings, "max_memory_mb": {
                                    "cpu": 60, "cuda": 60}}})  # "cuda": none here, and no CUDA call made for it
    with caplog.at_level(logging.INFO, logger="iteris_daemon.plugins.calibration_generate"):
        assert _samples(placed, adapters[0], budget) == expected  # 37 MiB stored, 73 MiB loaded
    placed.release()
    assert any("placed by accelerate" in message for message in caplog.messages), caplog.messages


def test_an_offload_folder_a_killed_run_left_is_swept_and_one_in_use_kept(llama, tmp_path):
    """A run killed mid-sampling left its offload folder (a MoE's experts: tens of GB) for ever.
    The next placed load deletes those no process holds, and leaves one another run holds."""
    import fcntl
    import os

    base, adapters = llama
    offload = tmp_path / "cache" / "offload"
    left, held = offload / "generate-offload-left", offload / "generate-offload-held"
    cut = offload / "generate-offload-cut"  # killed while it was deleted: its lock (deleted last) is gone
    for folder in (left, held, cut):
        folder.mkdir(parents=True)
        (folder / ".lock").touch()
        (folder / "weights.dat").write_bytes(b"0" * 1024)
    (cut / ".lock").unlink()
    holder = os.open(held / ".lock", os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        source = Generate()
        options = CalibrationOptions(order=("generate",), base_model=str(base), samples=1, cache_dir=tmp_path / "cache",
                                     settings={"generate": {"max_new_tokens": 2, "max_memory_mb": {"cpu": 70}}})
        _samples(source, adapters[0], options)
        assert not left.exists() and not cut.exists() and (held / "weights.dat").exists()
        source.release()
        assert sorted(p.name for p in offload.iterdir()) == ["generate-offload-held"]
    finally:
        os.close(holder)


def test_an_offload_folder_that_cannot_be_locked_is_one_error_and_leaves_nothing(llama, tmp_path, monkeypatch):
    """A cache folder on a filesystem without flock (NFS without lockd): a raw OSError, and a
    half-made folder and an open file left at each try. Now one error naming the folder and
    what to do, nothing left behind."""
    import errno
    import os

    from iteris_daemon.errors import CalibrationError
    from iteris_daemon.plugins import generate_placement

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    base, adapters = llama
    monkeypatch.setattr(generate_placement.fcntl, "flock", no_locks)
    options = CalibrationOptions(order=("generate",), base_model=str(base), samples=1, cache_dir=tmp_path / "cache",
                                 settings={"generate": {"max_new_tokens": 2, "max_memory_mb": {"cpu": 70}}})
    open_before = len(os.listdir("/proc/self/fd"))
    source = Generate()
    with pytest.raises(CalibrationError, match="cannot hold an offload folder there .No locks available.*local disk"):
        _samples(source, adapters[0], options)
    source.release()
    assert list((tmp_path / "cache" / "offload").iterdir()) == []
    assert len(os.listdir("/proc/self/fd")) == open_before


def test_a_base_nothing_of_which_fits_the_device_computes_on_the_cpu():
    """On a CUDA device whose budget takes none of the base, accelerate keeps it all in CPU
    memory and adds no hooks: the inputs went to the GPU and generate() failed. They go
    where the model computes."""
    import torch

    from iteris_daemon.plugins.generate_placement import main_device

    cuda = torch.device("cuda:0")  # named only: nothing runs there
    assert main_device({"": "cpu"}, cuda) == torch.device("cpu")
    assert main_device({"model.embed_tokens": 0, "model.layers": "cpu", "lm_head": "disk"}, cuda) == cuda
    assert main_device({"model": "cpu", "lm_head": "disk"}, torch.device("cpu")) == torch.device("cpu")


def test_a_stop_ends_the_sampling_and_release_deletes_the_offload_folder(llama, tmp_path):
    """A stop (the daemon's SIGTERM to its calibration worker) was seen only between adapters:
    sampling a placed base ran on past the worker's grace, which killed it and left its offload
    folder. The stop ends it before the next batch; the release deletes the folder."""
    from iteris_daemon.errors import MergeCancelled

    base, adapters = llama
    asked = []

    def stop_after_one_batch() -> bool:
        asked.append(True)
        return len(asked) > 1

    options = CalibrationOptions(order=("generate",), base_model=str(base), samples=16, cache_dir=tmp_path / "cache",
                                 settings={"generate": {"max_new_tokens": 2, "max_memory_mb": {"cpu": 70}}},
                                 should_stop=stop_after_one_batch)
    source = Generate()
    with pytest.raises(MergeCancelled, match="cancelled while generating calibration samples for"):
        _samples(source, adapters[0], options)
    assert len(asked) == 2  # one batch of 8 sampled, the second not begun
    assert len(list((tmp_path / "cache" / "offload").iterdir())) == 1
    source.release()
    assert list((tmp_path / "cache" / "offload").iterdir()) == []


def test_a_whole_load_sweeps_an_offload_folder_a_killed_run_left(llama, tmp_path):
    """Only a placed load swept what a killed run left: with the budget gone (or memory
    freed) the folder stayed for ever."""
    base, adapters = llama
    left = tmp_path / "cache" / "offload" / "generate-offload-left"
    left.mkdir(parents=True)
    (left / ".lock").touch()
    options = CalibrationOptions(order=("generate",), base_model=str(base), samples=1, cache_dir=tmp_path / "cache",
                                 settings={"generate": {"max_new_tokens": 2}})
    source = Generate()
    _samples(source, adapters[0], options)
    source.release()
    assert not left.exists()
