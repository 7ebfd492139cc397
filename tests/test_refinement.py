"""IterIS' optional refinement (block-wise distillation towards the task models), checked
against hidden states that plain transformers models compute with the weights written
in by hand: no engine code in the reference."""

import random
import re

import pytest
import torch
from transformers import AutoModel

from builders import apply_by_hand
from iteris_daemon.calibration import read_jsonl
from iteris_daemon.lora import load_adapter
from iteris_daemon.merge import AdapterSpec, MergeRequest, run_merge
from iteris_daemon.refinement import PATIENCE


def _merge(base_dir, adapter_dirs, out, **params):
    return run_merge(MergeRequest(base_model=str(base_dir), adapters=[AdapterSpec(d) for d in adapter_dirs], out=out,
                                  strategy="iteris", params=params, quiet=True, evaluate=False))


def _hidden_distances(base_dir, adapter_dirs, merged_dir, texts_of=None) -> list[list[float]]:
    """Per task and block: sum over the task's calibration samples (one at a time, so no
    padding) of ||H_merged - H_own||^2 / the sum of ||H_own||^2, H a block's output.
    ``texts_of``: per task, the texts to use instead of all its samples."""
    from builders import tokenizer

    tok = tokenizer()
    merged = apply_by_hand(AutoModel.from_pretrained(base_dir), merged_dir).eval()
    distances = []
    for i, adapter_dir in enumerate(adapter_dirs):
        own = apply_by_hand(AutoModel.from_pretrained(base_dir), adapter_dir).eval()
        texts = texts_of[i] if texts_of else [s.text for s in read_jsonl(adapter_dir / "calibration.jsonl").samples]
        num = den = None
        with torch.no_grad():
            for text in texts:
                ids = tok(text, return_tensors="pt")
                got = merged(**ids, output_hidden_states=True).hidden_states[1:]
                want = own(**ids, output_hidden_states=True).hidden_states[1:]
                n = torch.stack([(g - w).double().pow(2).sum() for g, w in zip(got, want)])
                d = torch.stack([w.double().pow(2).sum() for w in want])
                num, den = (n, d) if num is None else (num + n, den + d)
        distances.append((num / den).tolist())
    return distances


def test_refinement_lowers_the_block_distances_that_plain_models_measure(tiny, tmp_path):
    """BERT: each block's output is ``hidden_states[k + 1]``. The report's per-task loss
    after refining block k equals the distance the plain models measure with the final
    weights, and the refined merge is closer to every task model than the solve alone."""
    base_dir, adapter_dirs = tiny["bert"]
    solved = _merge(base_dir, adapter_dirs, tmp_path / "solved")
    refined = _merge(base_dir, adapter_dirs, tmp_path / "refined", refine_steps=20, refine_holdout=0)
    report = refined["metrics"]["refinement"]
    assert [b["block"] for b in report["blocks"]] == ["encoder.layer.0", "encoder.layer.1"]
    assert report["refined_blocks"] == 2
    before = _hidden_distances(base_dir, adapter_dirs, tmp_path / "solved")
    after = _hidden_distances(base_dir, adapter_dirs, tmp_path / "refined")
    names = [load_adapter(d).name for d in adapter_dirs]
    for k, block in enumerate(report["blocks"]):
        for i, name in enumerate(names):
            assert block["loss_after"][name] == pytest.approx(after[i][k], rel=1e-3), (block["block"], name)
    for k in range(2):
        assert sum(t[k] for t in after) < 0.9 * sum(t[k] for t in before), k
    # The solve's own loop is untouched: same iterations, same returned solve.
    assert refined["iterations_run"] == solved["iterations_run"]


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_refinement_keeps_the_rank(tiny, tmp_path, family):
    """On decoders and an encoder-decoder: the factors keep their shapes (rank sum r_i) and
    move, every block's loss goes down or the block keeps its solve, and PEFT loads it."""
    from peft import PeftModel

    from builders import model_class
    from conftest import TASK_TYPES

    base_dir, adapter_dirs = tiny[family]
    _merge(base_dir, adapter_dirs, tmp_path / "solved")
    refined = _merge(base_dir, adapter_dirs, tmp_path / "refined", refine_steps=20)
    report = refined["metrics"]["refinement"]
    assert report["blocks"] and report["refined_blocks"] >= 1
    for block in report["blocks"]:
        assert sum(block["loss_after"].values()) <= sum(block["loss_before"].values())
    solved_modules = load_adapter(tmp_path / "solved").modules
    refined_modules = load_adapter(tmp_path / "refined").modules
    assert set(solved_modules) == set(refined_modules)
    moved = {"A": 0, "B": 0}
    for path, module in refined_modules.items():
        for name in moved:
            got, solved = getattr(module, name), getattr(solved_modules[path], name)
            assert got.shape == solved.shape, (path, name)
            moved[name] += not torch.equal(got, solved)
    assert moved["A"] > 0 and moved["B"] > 0
    PeftModel.from_pretrained(model_class(TASK_TYPES[family]).from_pretrained(base_dir), tmp_path / "refined")


def test_refinement_with_whole_model_passes_is_refused_naming_both(tiny, tmp_path):
    """``refine_steps=5 blockwise=false`` merged without refining, with a WARNING that blamed the
    model ("needs block-by-block execution, which ... does not allow"; QA CLI): refused now,
    before anything loads."""
    from iteris_daemon.errors import ParameterError

    base_dir, adapter_dirs = tiny["bert"]
    with pytest.raises(ParameterError, match=r"refine_steps needs blockwise = true"):
        _merge(base_dir, adapter_dirs, tmp_path / "out", refine_steps=5, blockwise=False, iterations=1)
    assert not (tmp_path / "out").exists()


def test_the_cli_turns_refinement_on_and_reports_it(tiny, tmp_path, capsys):
    from builders import cli_merge

    base_dir, adapter_dirs = tiny["llama"]
    assert cli_merge(base_dir, adapter_dirs, tmp_path / "out", "--param", "refine_steps=5", "--param",
                     "refine_holdout=0") == 0
    out = capsys.readouterr().out
    assert "refinement: 2 of 2 blocks refined; last block's output distance" in out and "held-out" not in out
    assert cli_merge(base_dir, adapter_dirs, tmp_path / "held", "--param", "refine_steps=5") == 0  # holdout 0.2
    assert re.search(r"blocks refined; .*\(mean over tasks\), held-out samples [\d.]+ -> [\d.]+",
                     capsys.readouterr().out)
    assert cli_merge(base_dir, adapter_dirs, tmp_path / "bad", "--param", "refine_lr=0") == 2
    assert "refine_lr" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert cli_merge(base_dir, adapter_dirs, tmp_path / "bad", "--param", "refine_holdout=1") == 2
    assert "refine_holdout" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_a_block_that_the_steps_made_worse_keeps_the_solve(tiny, tmp_path):
    """Steps of a whole RMS each (refine_lr=1) overshoot on tiny Llama: with every sample
    taking steps (no held-out part), such a block must come back exactly as solved, and say so."""
    base_dir, adapter_dirs = tiny["llama"]
    _merge(base_dir, adapter_dirs, tmp_path / "solved")
    report = _merge(base_dir, adapter_dirs, tmp_path / "refined", refine_steps=10, refine_lr=1.0, refine_holdout=0)
    blocks = report["metrics"]["refinement"]["blocks"]
    kept_solve = [b["block"] for b in blocks if not b["refined"]]
    assert kept_solve, "no block overshot: the test no longer exercises the fallback"
    for block in blocks:
        if not block["refined"]:
            assert block["loss_after"] == block["loss_before"]
    solved, refined = load_adapter(tmp_path / "solved").modules, load_adapter(tmp_path / "refined").modules
    for path in solved:
        if any(path.startswith(name + ".") for name in kept_solve):
            assert torch.equal(refined[path].A, solved[path].A) and torch.equal(refined[path].B, solved[path].B)


def test_held_out_samples_choose_each_blocks_iterate(tiny, tmp_path):
    """BERT, ``refine_holdout=0.25``: the report's held-out losses are the distances plain
    models measure on exactly the held-out samples; the kept iterate is one that was
    checked (every 20 / 10 = 2 steps), and it is no worse there than the solve."""
    base_dir, adapter_dirs = tiny["bert"]
    solved = _merge(base_dir, adapter_dirs, tmp_path / "solved")
    refined = _merge(base_dir, adapter_dirs, tmp_path / "refined", refine_steps=20, refine_holdout=0.25)
    rng = random.Random(0)  # the refinement's seed; tasks draw their held-out samples in order
    held = [[s.text for s in read_jsonl(d / "calibration.jsonl").split(0.25, rng, "refine_holdout")[1].samples]
            for d in adapter_dirs]
    assert {len(h) for h in held} == {3}  # of 12 samples each
    names = [load_adapter(d).name for d in adapter_dirs]
    blocks = refined["metrics"]["refinement"]["blocks"]
    after = _hidden_distances(base_dir, adapter_dirs, tmp_path / "refined", held)
    before_first = _hidden_distances(base_dir, adapter_dirs, tmp_path / "solved", held)
    for k, block in enumerate(blocks):
        for i, name in enumerate(names):
            assert block["heldout_after"][name] == pytest.approx(after[i][k], rel=1e-3), (block["block"], name)
        assert sum(block["heldout_after"].values()) <= sum(block["heldout_before"].values())
        assert block["steps_kept"] % 2 == 0 and block["steps_kept"] <= block["steps_taken"] <= 20
    for i, name in enumerate(names):  # the first block's inputs are the same for the solve
        assert blocks[0]["heldout_before"][name] == pytest.approx(before_first[i][0], rel=1e-3)
    assert refined["metrics"]["refinement"]["refined_blocks"] >= 1
    assert refined["iterations_run"] == solved["iterations_run"]


def test_held_out_samples_stop_a_block_that_does_not_improve(tiny, tmp_path):
    """Overshooting steps (tiny Llama, refine_lr=1) with a held-out part: a block whose
    held-out loss never improves stops after PATIENCE checks and keeps its solve bit for bit."""
    base_dir, adapter_dirs = tiny["llama"]
    _merge(base_dir, adapter_dirs, tmp_path / "solved")
    report = _merge(base_dir, adapter_dirs, tmp_path / "refined", refine_steps=30, refine_lr=1.0, refine_holdout=0.25)
    blocks = report["metrics"]["refinement"]["blocks"]
    kept_solve = [b["block"] for b in blocks if b["steps_kept"] == 0]
    assert kept_solve, "no block overshot: the test no longer exercises the early stop"
    every = 30 // 10
    for block in blocks:
        if block["steps_kept"] == 0:
            assert block["steps_taken"] == PATIENCE * every and not block["refined"]
            assert block["loss_after"] == block["loss_before"]
    solved, refined = load_adapter(tmp_path / "solved").modules, load_adapter(tmp_path / "refined").modules
    for path in solved:
        if any(path.startswith(name + ".") for name in kept_solve):
            assert torch.equal(refined[path].A, solved[path].A) and torch.equal(refined[path].B, solved[path].B)


def test_a_held_out_part_needs_two_samples_and_says_which_file(tiny, tmp_path, capsys):
    """One calibration sample cannot be split: the merge stops before writing anything,
    naming the file; with the held-out part off the same sample refines."""
    import shutil

    from builders import cli_merge

    base_dir, adapter_dirs = tiny["llama"]
    single = tmp_path / "single"
    shutil.copytree(adapter_dirs[0], single)
    first = (single / "calibration.jsonl").read_text().splitlines()[0]
    (single / "calibration.jsonl").write_text(first + "\n")
    adapters = [single, *adapter_dirs[1:]]
    assert cli_merge(base_dir, adapters, tmp_path / "bad", "--param", "refine_steps=3") == 2
    err = capsys.readouterr().err
    assert "refine_holdout needs at least 2 calibration samples, got 1" in err and str(single) in err
    assert not (tmp_path / "bad").exists()
    assert cli_merge(base_dir, adapters, tmp_path / "ok", "--param", "refine_steps=3",
                     "--param", "refine_holdout=0") == 0
