"""Merge quality on a real model and real tasks, for N = 4 and N = 8 adapters.

The task adapters (see :mod:`benchmarks.train`) are merged with every strategy the
project ships; each task is then scored on its held-out test set with its own head.
Reported per strategy and N: accuracy and normalized accuracy (merged / own adapter)
per task, their mean, and the worst task.

IterIS' settings are chosen first, on the tasks' *validation* split (train examples
outside the calibration candidates, see :attr:`benchmarks.tasks.Task.validation`),
never on test data: one setting at a time is varied from the values chosen so far (the
regularisers, the stopping tolerance, the stopping rule, the schedule), and a value
replaces the current one when, for both N, it raises the mean normalized validation
accuracy by more than :data:`TIE` (a tie at the validation split's resolution), raises it at
no more passes over the calibration data, or makes fewer passes while staying within a tie
(see :func:`better`). The test tables
then use the chosen settings; an iteration curve (test) and a sample-count curve
(test, N = 4) follow. Calibration texts come from the training split only.

Run: ``python -m benchmarks.quality --workdir bench-out`` (writes quality.json and
two PNG plots there).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from tqdm.auto import tqdm

from iteris_daemon.merge import AdapterSpec, MergeRequest, run_merge

from .evaluate import accuracy, majority_accuracy
from .tasks import ORIGINAL_TASKS, TASKS
from .train import TrainConfig, default_model_path, train_all

GROUPS: dict[int, tuple[str, ...]] = {4: ORIGINAL_TASKS, 8: TASKS}
STRATEGIES = (  # every built-in strategy, PEFT's eleven combination types included
    "iteris", "regmean", "task_arithmetic", "ties", "dare", "core_space", "tsv", "iso_c", "iso_cts", "knots", "wudi",
    "peft_cat", "peft_linear", "peft_svd", "peft_ties", "peft_ties_svd", "peft_dare_linear", "peft_dare_linear_svd",
    "peft_dare_ties", "peft_dare_ties_svd", "peft_magnitude_prune", "peft_magnitude_prune_svd",
)
# IterIS settings tried on the validation split, one at a time; the first value is the default.
# Swept in this order, each from the values chosen before it.
SWEEP: dict[str, tuple] = {
    "a1=a2": (1e-3, 1e-4, 1e-5),
    "tolerance": (1e-3, 1e-2, 1e-1, 1.0),  # 1.0: in effect two solves (the first change is rarely 1 or more)
    "stop": ("change", "objective"),
    "schedule": ("joint", "sequential"),
    "loss_weighting": (0.0, 0.5, 1.0),
}
# Validation means this close are a tie (1/300 = 0.0033 is one example of one task's
# 300; the mean over N tasks moves in steps of 0.0033 / N).
TIE = 0.002
# IterIS variants that are not defaults, scored beside the strategies on the validation
# split and in the test tables (name -> parameters over the chosen ones).
VARIANTS: dict[str, dict] = {
    "iteris, refine_steps=100": {"refine_steps": 100},  # refine_holdout 0.2, the default
    "iteris, refine_steps=100, holdout=0": {"refine_steps": 100, "refine_holdout": 0.0},
    "iteris, refine_steps=200, lr=0.1": {"refine_steps": 200, "refine_lr": 0.1},
}
# Data-free strategies also at the settings their reference code publishes (for other
# models and tasks; not tuned here), scored beside them in the test tables when the
# strategy is: name -> (strategy, parameters).
PUBLISHED: dict[str, tuple[str, dict]] = {
    "knots, alpha=0.5": ("knots", {"alpha": 0.5}),  # KnOTS-TIES, Llama-3-8B LoRA config
    "knots, density=0.2, alpha=0.6": ("knots", {"density": 0.2, "alpha": 0.6}),  # KnOTS-TIES, ViT-B/32 LoRA config
    "knots, drop_rate=0.8, alpha=0.4": ("knots", {"drop_rate": 0.8, "alpha": 0.4}),  # KnOTS-DARE-TIES, Llama-3-8B
    "wudi, steps=300": ("wudi", {"steps": 300}),  # the reference code's 300 Adam steps at lr 1e-5
}
ITERATION_SWEEP = (1, 2, 3)  # solves, tolerance 0
SAMPLE_SWEEP = ()  # calibration samples per task, N = 4 (--samples 10 50 200; off by default: CPU time)


def merge_and_score(model: str, adapters: dict[str, Path], strategy: str, params: dict, out: Path,
                    limit: int | None = None, split: str = "test", dtype: str = "float32") -> dict:
    """Merge all adapters with ``strategy`` (the base model in ``dtype``) and return per-task
    accuracy on ``split`` plus timing."""
    report = run_merge(MergeRequest(
        base_model=model,
        adapters=[AdapterSpec(folder) for folder in adapters.values()],
        out=out, strategy=strategy, params=params, dtype=dtype, overwrite=True, evaluate=False, quiet=True,
    ))
    scores = {task: accuracy(model, out, folder, task, split=split, limit=limit) for task, folder in adapters.items()}
    return {"accuracy": scores, "merge_seconds": report["merge_seconds"], "iterations_run": report["iterations_run"],
            "returned_iteration": report["metrics"].get("returned_iteration"),
            "calibration_passes": report["metrics"].get("calibration_passes")}


def summary(scores: dict[str, float], own: dict[str, float]) -> dict:
    """Normalized accuracy per task (merged / own adapter), its mean and the worst task."""
    ratios = {task: scores[task] / own[task] for task in scores}
    worst = min(ratios, key=ratios.get)
    return {"normalized": ratios, "mean": sum(ratios.values()) / len(ratios), "worst": ratios[worst], "worst_task": worst}


def _params(setting: str, value) -> dict:
    return {"a1": value, "a2": value} if setting == "a1=a2" else {setting: value}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def _full(params: dict) -> dict:
    """IterIS' parameters with the defaults filled in, and the refinement's settings left
    out while it is off (they change nothing then): equal merges, one key."""
    from plugins.iteris import IterISParams

    full = IterISParams(**params).model_dump()
    if not full["refine_steps"]:
        full = {k: v for k, v in full.items() if not k.startswith("refine_") or k == "refine_steps"}
    return full


def better(candidate: dict[str, dict], current: dict[str, dict]) -> bool:
    """Whether ``candidate`` replaces ``current`` (both: validation figures by N). Work is
    counted in passes of the calibration data through the model (a sequential sweep makes
    two or three), and means closer than :data:`TIE` are a tie: a difference the split
    cannot resolve, so at equal work the current value stays. It does when, for every N,
    its mean is higher by more than a tie; or it is less work and its mean is within a tie."""
    def each(rule) -> bool:
        return all(rule(candidate[n]["mean"], current[n]["mean"], candidate[n]["calibration_passes"],
                        current[n]["calibration_passes"]) for n in current)

    return (each(lambda mean, was, work, had: mean > was + TIE)
            or each(lambda mean, was, work, had: mean >= was - TIE and work < had))


def choose(sweep_results: dict, setting: str, values: tuple, current) -> object:
    """The value of ``setting`` the sweep keeps, starting from ``current``."""
    best = current
    for value in values:
        figures = {n: sweep_results[n][setting][str(value)] for n in sweep_results}
        if value != best and better(figures, {n: sweep_results[n][setting][str(best)] for n in sweep_results}):
            best = value
    return best


def run(workdir: Path, groups: dict[int, tuple[str, ...]] = GROUPS, strategies: tuple[str, ...] = STRATEGIES,
        train_config: TrainConfig = TrainConfig(), sweep: dict[str, tuple] | None = SWEEP,
        iteration_sweep=ITERATION_SWEEP,
        sample_sweep=SAMPLE_SWEEP, test_limit: int | None = None, iteris_params: dict | None = None,
        checkpoint: Path | None = None, variants: dict[str, dict] = VARIANTS) -> dict:
    """Train (or reuse) the adapters, sweep IterIS on validation data, then the test tables.
    ``iteris_params`` overrides IterIS defaults everywhere (smoke tests shrink the work);
    ``checkpoint`` (a JSON file) is written after every entry and resumed from."""
    base_params = dict(iteris_params or {})
    model = default_model_path()
    every_task = tuple(dict.fromkeys(t for tasks in groups.values() for t in tasks))
    adapters = train_all(workdir / "adapters", model, train_config, every_task)
    merges = workdir / "merges"
    fresh = {"groups": {str(n): list(tasks) for n, tasks in groups.items()}, "baselines": {}, "sweep": {},
             "chosen": {}, "strategies": {}, "iterations": {}, "samples": {}}
    saved = _Saved(checkpoint, fresh)
    results = saved.results
    own_validation = {}
    for task in tqdm(every_task, desc="references"):
        folder = adapters[task]
        saved.keep(("baselines", task), lambda: {
            "majority": majority_accuracy(task),
            "base+head": accuracy(model, None, folder, task, limit=test_limit),
            "own adapter": accuracy(model, folder, folder, task, limit=test_limit),
        })
        if sweep:
            own_validation[task] = saved.keep(("own_validation", task), lambda: accuracy(
                model, folder, folder, task, split="validation", limit=test_limit))
    own = {t: results["baselines"][t]["own adapter"] for t in every_task}

    chosen = dict(base_params)
    if sweep:
        for setting, values in sweep.items():
            for n, tasks in groups.items():
                group = {t: adapters[t] for t in tasks}
                for value in tqdm(values, desc=f"sweep N={n} {setting}"):
                    params = _full({**chosen, **_params(setting, value)})
                    key = json.dumps(params, sort_keys=True)  # a setting met again is merged once

                    def measure(params=params, key=key, tasks=tasks, group=group, n=n):
                        folder = merges / f"sweep-{n}-{len(results.get('sweep_runs', {}).get(str(n), {}))}"
                        entry = merge_and_score(model, group, "iteris", params, folder, test_limit, split="validation")
                        return {**summary(entry["accuracy"], {t: own_validation[t] for t in tasks}),
                                "iterations_run": entry["iterations_run"], "calibration_passes": entry["calibration_passes"],
                                "merge_seconds": entry["merge_seconds"]}

                    figures = saved.keep(("sweep_runs", str(n), key), measure)
                    results["sweep"].setdefault(str(n), {}).setdefault(setting, {})[str(value)] = figures
            results["chosen"][setting] = choose(results["sweep"], setting, values, current=values[0])
            chosen.update(_params(setting, results["chosen"][setting]))

    for n, tasks in groups.items():
        group = {t: adapters[t] for t in tasks}
        own_n = {t: own[t] for t in tasks}
        published = {name: entry for name, entry in PUBLISHED.items() if entry[0] in strategies}
        runs = [(s, s, _full(chosen) if s == "iteris" else {}) for s in strategies]
        for name, strategy, params in tqdm(runs + [(name, *entry) for name, entry in published.items()],
                                           desc=f"strategies N={n}"):

            def score(strategy=strategy, params=params, group=group, own_n=own_n, name=name):
                entry = merge_and_score(model, group, strategy, params, merges / f"{_slug(name)}-{n}", test_limit)
                return {**entry, **summary(entry["accuracy"], own_n)}

            saved.keep(("strategies", str(n), name), score, params)
        for name, overrides in tqdm(variants.items(), desc=f"variants N={n}"):
            params = _full({**chosen, **overrides})

            def measure(params=params, group=group, own_n=own_n, folder=merges / f"variant-{n}-{_slug(name)}"):
                entry = merge_and_score(model, group, "iteris", params, folder, test_limit)
                result = {**entry, **summary(entry["accuracy"], own_n)}
                if sweep:  # the same merge on the validation split, where defaults are chosen
                    scores = {t: accuracy(model, folder, head, t, split="validation", limit=test_limit)
                              for t, head in group.items()}
                    result["validation"] = summary(scores, {t: own_validation[t] for t in group})
                return result

            saved.keep(("strategies", str(n), name), measure, params)
        for count in tqdm(iteration_sweep, desc=f"iterations N={n}"):
            params = _full({**chosen, "iterations": count, "tolerance": 0.0, "stop": "change"})
            saved.keep(("iterations", str(n), str(count)), lambda params=params, group=group, own_n=own_n, count=count:
                       summary(merge_and_score(model, group, "iteris", params, merges / f"iterations-{n}-{count}",
                                               test_limit)["accuracy"], own_n), params)
    first = min(groups)
    group = {t: adapters[t] for t in groups[first]}
    for samples in tqdm(sample_sweep, desc="sample sweep"):
        params = _full({**chosen, "samples_per_task": samples})
        saved.keep(("samples", str(samples)), lambda params=params, samples=samples: summary(merge_and_score(
            model, group, "iteris", params, merges / f"samples-{samples}", test_limit)["accuracy"],
            {t: own[t] for t in groups[first]}), params)
    return results


class _Saved:
    """Results written to ``path`` after every entry, and entries found there reused, so
    an interrupted run (the whole benchmark takes hours on 2 cores) resumes where it was."""

    def __init__(self, path: Path | None, fresh: dict):
        self.path = path
        self.results = fresh
        if path is not None and path.is_file():
            previous = json.loads(path.read_text())
            if previous.get("groups") == fresh["groups"]:
                self.results = {**fresh, **previous}

    def keep(self, keys: tuple[str, ...], compute, params: dict | None = None):
        """The entry at ``keys``, computed unless saved; with ``params``, an entry saved
        with other parameters (the defaults moved since) is computed again."""
        node = self.results
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        stale = params is not None and keys[-1] in node and node[keys[-1]].get("params") != params
        if keys[-1] not in node or stale:
            node[keys[-1]] = compute() if params is None else {**compute(), "params": params}
            if self.path is not None:
                self.path.write_text(json.dumps(self.results, indent=2) + "\n")
        return node[keys[-1]]


def table(results: dict) -> str:
    """Per N: every strategy's per-task accuracy (normalized), mean and worst task."""
    lines = []
    for n, tasks in results["groups"].items():
        strategies = results["strategies"].get(n, {})
        lines += [f"N = {n}", "", "| | " + " | ".join(tasks) + " | mean normalized | worst task |",
                  "|---" * (len(tasks) + 3) + "|"]
        own = {t: results["baselines"][t]["own adapter"] for t in tasks}
        for name in ("majority", "base+head", "own adapter"):
            row = {t: results["baselines"][t][name] for t in tasks}
            s = summary(row, own)
            lines.append(f"| {name} | " + " | ".join(f"{row[t]:.3f}" for t in tasks) +
                         f" | {s['mean']:.3f} | {s['worst']:.3f} ({s['worst_task']}) |")
        for name, entry in sorted(strategies.items(), key=lambda item: -item[1]["mean"]):
            cells = [f"{entry['accuracy'][t]:.3f} ({entry['normalized'][t]:.2f})" for t in tasks]
            lines.append(f"| {name} | " + " | ".join(cells) +
                         f" | **{entry['mean']:.3f}** | {entry['worst']:.3f} ({entry['worst_task']}) |")
        lines.append("")
    if results["sweep"]:
        lines += ["IterIS settings on the validation split (mean normalized / worst task):", "",
                  "| setting | value | " + " | ".join(f"N = {n}" for n in results["sweep"]) + " |",
                  "|---|---|" + "---|" * len(results["sweep"])]
        for setting in next(iter(results["sweep"].values())):
            for value in next(iter(results["sweep"].values()))[setting]:
                cells = []
                for n in results["sweep"]:
                    e = results["sweep"][n][setting][value]
                    cells.append(f"{e['mean']:.3f} / {e['worst']:.3f} ({e['iterations_run']} solves, "
                                 f"{e['calibration_passes']} passes)")
                lines.append(f"| {setting} | {value} | " + " | ".join(cells) + " |")
        lines += ["", f"chosen: {results['chosen']}", ""]
    for n, entries in results["strategies"].items():
        for name, e in entries.items():
            if "validation" in e:
                v = e["validation"]
                lines.append(f"IterIS variant {name}, N = {n}: validation {v['mean']:.3f} (worst {v['worst']:.3f}), "
                             f"test {e['mean']:.3f} (worst {e['worst']:.3f}), merge {e['merge_seconds']:.0f} s")
    for n, curve in results["iterations"].items():
        lines.append(f"IterIS on test, N = {n}, by solves: " +
                     ", ".join(f"{k}: {v['mean']:.3f} (worst {v['worst']:.3f})" for k, v in curve.items()))
    if results["samples"]:
        lines.append(f"IterIS on test, N = {min(int(n) for n in results['groups'])}, by samples per task: " +
                     ", ".join(f"{k}: {v['mean']:.3f}" for k, v in results["samples"].items()))
    return "\n".join(lines)


def plot(results: dict, workdir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    curves = [("iterations", "IterIS solves", "iteris_iterations.png", False, results["iterations"]),
              ("samples", "calibration samples per task (N = 4)", "iteris_samples.png", True,
               {str(min(int(n) for n in results["groups"])): results["samples"]} if results["samples"] else {})]
    for _key, xlabel, name, log, by_n in curves:
        if not by_n:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
        for n, curve in by_n.items():
            xs = [int(x) for x in curve]
            line, = ax.plot(xs, [v["mean"] for v in curve.values()], marker="o", label=f"IterIS, N = {n}")
            group = results["strategies"].get(str(n), {})
            others = [e["mean"] for k, e in group.items() if not k.startswith("iteris") and k not in PUBLISHED]
            if others:
                ax.axhline(max(others), color=line.get_color(), linestyle="--", alpha=0.6,
                           label=f"best other strategy, N = {n}")
            ax.set_xticks(xs, [str(x) for x in xs])
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean normalized accuracy (test)")
        ax.legend(loc="lower right", fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(workdir / name)
        plt.close(fig)
        paths.append(workdir / name)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--workdir", type=Path, default=Path("bench-out"))
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--no-sweep", action="store_true", help="skip the validation sweep (IterIS at its defaults)")
    parser.add_argument("--no-variants", action="store_true",
                        help="skip the IterIS variants and the iteration sweep (e.g. to rerun one data-free strategy)")
    parser.add_argument("--samples", type=int, nargs="*", default=list(SAMPLE_SWEEP), metavar="N",
                        help="calibration samples per task for the sample curve (N = 4, test split), e.g. 10 50 200")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = run(args.workdir, strategies=tuple(args.strategies), sweep=None if args.no_sweep else SWEEP,
                  sample_sweep=tuple(args.samples), checkpoint=args.workdir / "quality.partial.json",
                  **({"variants": {}, "iteration_sweep": ()} if args.no_variants else {}))
    (args.workdir / "quality.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    for path in plot(results, args.workdir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
