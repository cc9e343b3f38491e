"""``report.json``, a markdown comparison table and PNG plots for evaluated strategies over one or more seeds.

One seed is one draw of the data, the sampling and the initial network, so a benchmark runs every
strategy on a few seeds and reports, per strategy, the mean over seeds with the half-width of its 95 %
confidence interval (Student's t, :mod:`nnunet_feddah.results.stats`), and every strategy's paired
difference to FedDAH over the seeds both ran. A difference whose interval contains 0 is not a result.

``report.json`` is read by other tools; its keys are fixed (issue 5; multi-seed layout)::

    {"strategies": {NAME: {"final_mean_dice": float, "forgetting": float, "bwt": float,
                           "dice_matrix": {"tasks": [...], "steps": [...], "values": [[...]]},
                           "server_bytes": int, "server_update_s": float, "wall_s": float,
                           "bytes_per_site_round": int, ...extra keys,
                           "per_seed": {"<seed>": {<the single-seed entry of strategy_entry>}},
                           "ci95": {METRIC: half-width or null, for every numeric scalar metric},
                           "n_seeds": int,
                           "paired_vs_feddah": {METRIC: {"mean", "ci95", "n", "per_seed", "resolved"}}}},
     "stream": PLAN_NAME, "seeds": [int, ...], "seed": int (the first seed, for single-seed readers),
     "headline": {"reference": "centralized",
                  "feddah_fraction_of_centralized": {"mean", "ci95", "n", "per_seed"}},
     ...extra keys}

Every metric key of a strategy holds the **mean over the seeds that strategy ran** (a strategy may be
missing from some seeds); numbers that are integers per seed (bytes, counts) stay integers, rounded.
``dice_matrix`` is the element-wise mean over seeds (null where no seed has a value; the union of the
seeds' tasks and steps). ``ci95`` is null where fewer than two seeds have a value. ``paired_vs_feddah``
(only for strategies other than ``feddah``, when ``feddah`` was run) holds the paired difference
``NAME − feddah`` of final mean Dice, forgetting, BWT and every other numeric scalar both have.
``headline`` (only when both ``feddah`` and ``centralized`` were run) is the per-seed ratio of their final
mean Dice. The strategy ``centralized`` is a reference without time steps: null forgetting/BWT and a
one-column Dice matrix are valid.

``steps`` are the rounds that close a time step; matrix entries and metrics that cannot be computed
(a task not seen yet, no old task) are ``null``. Plots: one mean Dice-matrix heatmap per strategy, Dice
over time per task (one panel per task, a line per strategy, 95 % CI error bars over seeds) and a bar
chart of final Dice / forgetting / BWT with 95 % CI error bars.

Over 400 lines because the schema check, the seed aggregation, the table and the plots all read the one
layout above; split apart, each would have to restate it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np

from nnunet_feddah.atomic import atomic_path, atomic_write_json
from nnunet_feddah.results.fcl_metrics import DiceMatrix
from nnunet_feddah.results.stats import mean_ci95, paired_difference, summary

REPORT_FILE = "report.json"
TABLE_FILE = "report.md"
NULLABLE_KEYS = ("final_mean_dice", "forgetting", "bwt")  # null when nothing could be evaluated / no old task
REQUIRED_KEYS = {"final_mean_dice": float, "forgetting": float, "bwt": float, "dice_matrix": dict,
                 "server_bytes": int, "server_update_s": float, "wall_s": float, "bytes_per_site_round": int}
PAIRED_REFERENCE = "feddah"  # every other strategy is compared with it, seed by seed
CENTRALIZED = "centralized"  # the upper reference of the headline (pooled data, no time steps)
SEED_KEYS = ("per_seed", "ci95", "n_seeds", "paired_vs_feddah")  # the multi-seed keys of a strategy block

Results = Mapping[str, tuple[Mapping[str, Any], Mapping[str, Any]]]  # strategy -> (evaluation, stats)
ResultsBySeed = Mapping[int, Results]  # seed -> strategy -> (evaluation, stats)


def _num(value: Any) -> float | None:
    return None if value is None or not math.isfinite(float(value)) else float(value)


def strategy_entry(evaluation: Mapping[str, Any], stats: Mapping[str, Any]) -> dict[str, Any]:
    """One strategy's block of report.json for one seed, from its evaluation and run statistics."""
    return {
        "final_mean_dice": _num(evaluation["final_mean_dice"]),
        "forgetting": _num(evaluation["forgetting"]),
        "bwt": _num(evaluation["bwt"]),
        "dice_matrix": evaluation["dice_matrix"],
        "server_bytes": int(stats["server_bytes"]),
        "server_update_s": float(stats["server_update_s"]),
        "wall_s": float(stats["wall_s"]),
        "bytes_per_site_round": int(stats["bytes_per_site_round"]),
        "per_site": evaluation.get("per_site", {}),
        "per_organ": evaluation.get("per_organ", {}),
        "new_task_first_dice": _num(evaluation.get("new_task_first_dice")),
        "server_bytes_by_step": evaluation.get("server_bytes_by_step", {}),
        "old_tasks": evaluation.get("old_tasks", []),
        **{k: v for k, v in stats.items() if k not in REQUIRED_KEYS},
    }


# ---------------------------------------------------------------------------------------------- over seeds
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_matrix(value: Any) -> bool:
    return isinstance(value, Mapping) and {"tasks", "steps", "values"} <= set(value)


def numeric_keys(entries: Sequence[Mapping[str, Any]]) -> list[str]:
    """The numeric scalar metrics of per-seed entries: keys whose values are all numbers or null (bools are not).

    The three continual-learning metrics always count (they may be null in every seed, e.g. for the
    centralized reference), so every report has their mean and interval.
    """
    keys = list(NULLABLE_KEYS)
    for entry in entries:
        for key in entry:
            if key in keys:
                continue
            values = [e[key] for e in entries if key in e]
            if all(v is None or _is_number(v) for v in values) and any(_is_number(v) for v in values):
                keys.append(key)
    return keys


def _mean_number(values: Sequence[Any]) -> int | float | None:
    """Mean of the numbers; an integer (rounded) when every seed's value is one, so bytes and counts stay ints."""
    mean, _ = mean_ci95(values)
    present = [v for v in values if _is_number(v)]
    if mean is not None and present and all(isinstance(v, int) for v in present):
        return int(round(mean))
    return mean


def matrix_stats(matrices: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[int], np.ndarray, np.ndarray]:
    """``(tasks, steps, mean, ci95)`` of Dice matrices (JSON form) of several seeds, entry by entry.

    Tasks are the union in first-seen order, steps the sorted union, so seeds whose schedules differ still
    line up by (task, round); a cell is the mean over the seeds that have a value there (NaN where none;
    the interval is NaN with fewer than two values).
    """
    tasks = list(dict.fromkeys(t for m in matrices for t in m["tasks"]))
    steps = sorted({int(s) for m in matrices for s in m["steps"]})
    cells: dict[tuple[int, int], list[float | None]] = {}
    for m in matrices:
        for task, row in zip(m["tasks"], m["values"], strict=True):
            for step, value in zip(m["steps"], row, strict=True):
                cells.setdefault((tasks.index(task), steps.index(int(step))), []).append(value)
    mean = np.full((len(tasks), len(steps)), np.nan)
    ci = np.full((len(tasks), len(steps)), np.nan)
    for (i, j), values in cells.items():
        m, c = mean_ci95(values)
        mean[i, j] = np.nan if m is None else m
        ci[i, j] = np.nan if c is None else c
    return tasks, steps, mean, ci


def _mean_value(values: Sequence[Any]) -> Any:
    """The mean over seeds of one non-scalar entry value (per-site matrices, per-organ curves, task lists).

    Numbers and lists of numbers are averaged (element-wise), matrices cell by cell, mappings key by key;
    lists of names are joined (first-seen order). Anything else is the first seed's value when the seeds
    disagree; ``per_seed`` keeps every seed's own value.
    """
    present = [v for v in values if v is not None]
    if not present:
        return None
    if all(_is_number(v) for v in present):
        return _mean_number(present)
    if all(_is_matrix(v) for v in present):
        tasks, steps, mean, _ = matrix_stats(present)
        return DiceMatrix(tasks, steps, mean).to_json()
    if all(isinstance(v, Mapping) for v in present):
        keys = list(dict.fromkeys(k for v in present for k in v))
        return {k: _mean_value([v[k] for v in present if k in v]) for k in keys}
    if all(isinstance(v, (list, tuple)) for v in present):
        items = [x for v in present for x in v]
        if all(x is None or _is_number(x) for x in items):
            return [_mean_number([x for x in column if x is not None])
                    for column in zip_longest(*present, fillvalue=None)]
        if all(isinstance(x, str) for x in items):
            return list(dict.fromkeys(items))
    return present[0]


def seed_block(per_seed: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One strategy's report block from its per-seed entries (``{"<seed>": strategy_entry(...)}``).

    The metric keys hold the means, ``ci95`` the interval half-widths of every numeric scalar metric,
    ``n_seeds`` how many seeds the strategy ran, ``per_seed`` the entries themselves.
    """
    entries = list(per_seed.values())
    numeric = numeric_keys(entries)
    block: dict[str, Any] = {}
    for key in dict.fromkeys([*REQUIRED_KEYS, *(k for e in entries for k in e)]):
        values = [e[key] for e in entries if key in e]
        if key in numeric:
            block[key] = _mean_number(values)
        elif key == "dice_matrix":
            tasks, steps, mean, _ = matrix_stats(values)
            block[key] = DiceMatrix(tasks, steps, mean).to_json()
        elif values:
            block[key] = _mean_value(values)
    block["per_seed"] = {seed: dict(entry) for seed, entry in per_seed.items()}
    block["ci95"] = {key: mean_ci95([e.get(key) for e in entries])[1] for key in numeric}
    block["n_seeds"] = len(entries)
    return block


def _paired(block: Mapping[str, Any], reference: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Paired differences ``block − reference`` per metric: the CL metrics and every numeric scalar both have."""
    mine = numeric_keys(list(block["per_seed"].values()))
    theirs = set(numeric_keys(list(reference["per_seed"].values())))
    return {key: paired_difference({s: e.get(key) for s, e in block["per_seed"].items()},
                                   {s: e.get(key) for s, e in reference["per_seed"].items()})
            for key in mine if key in theirs}


def _headline(strategies: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
    """FedDAH's final mean Dice as a fraction of centralized, seed by seed; None unless both were run."""
    if PAIRED_REFERENCE not in strategies or CENTRALIZED not in strategies:
        return None
    ours, upper = strategies[PAIRED_REFERENCE]["per_seed"], strategies[CENTRALIZED]["per_seed"]
    ratios = {}
    for seed, entry in ours.items():
        a = entry.get("final_mean_dice")
        b = upper.get(seed, {}).get("final_mean_dice")
        if _is_number(a) and _is_number(b) and math.isfinite(a) and math.isfinite(b) and b != 0:
            ratios[seed] = a / b
    return {"reference": CENTRALIZED,
            "feddah_fraction_of_centralized": {**summary(ratios.values()), "per_seed": ratios}}


# ---------------------------------------------------------------------------------------------- schema
def _entry_problems(where: str, entry: Any) -> list[str]:
    if not isinstance(entry, Mapping):
        return [f"{where} must be an object"]
    problems = []
    for key, kind in REQUIRED_KEYS.items():
        value = entry.get(key, "missing")
        if value is None and key in NULLABLE_KEYS:
            continue
        accepted = (int, float) if kind is float else (kind,)
        if isinstance(value, bool) or not isinstance(value, accepted):
            problems.append(f"{where}.{key} is {value!r}, expected {kind.__name__}")
    matrix = entry.get("dice_matrix") or {}
    values = matrix.get("values") if isinstance(matrix, Mapping) else None
    if not (isinstance(matrix, Mapping) and isinstance(matrix.get("tasks"), list)
            and isinstance(matrix.get("steps"), list) and isinstance(values, list)
            and len(values) == len(matrix["tasks"])
            and all(isinstance(row, list) and len(row) == len(matrix["steps"]) for row in values)):
        problems.append(f"{where}.dice_matrix must have tasks, steps and a tasks × steps values list")
    return problems


def check_report(report: Mapping[str, Any]) -> list[str]:
    """Problems with a report against the schema (empty list: it conforms)."""
    problems = []
    if not isinstance(report.get("stream"), str):
        problems.append("field 'stream' must be a string (the plan name)")
    seeds = report.get("seeds")
    seeds_ok = isinstance(seeds, list) and bool(seeds) and all(isinstance(s, int) and not isinstance(s, bool)
                                                               for s in seeds)
    if not seeds_ok:
        problems.append(f"field 'seeds' is {seeds!r}, expected a non-empty list of integers")
    if not isinstance(report.get("seed"), int) or isinstance(report.get("seed"), bool):
        problems.append("field 'seed' must be an integer (the first seed)")
    strategies = report.get("strategies")
    if not isinstance(strategies, Mapping) or not strategies:
        return [*problems, "field 'strategies' must be a non-empty object"]
    known = {str(s) for s in seeds} if seeds_ok else None
    for name, entry in strategies.items():
        problems += _entry_problems(f"strategies.{name}", entry)
        if not isinstance(entry, Mapping):
            continue
        per_seed = entry.get("per_seed")
        if not isinstance(per_seed, Mapping) or not per_seed:
            problems.append(f"strategies.{name}.per_seed must be a non-empty object (seed -> entry)")
        else:
            for seed, seed_entry in per_seed.items():
                if known is not None and str(seed) not in known:
                    problems.append(f"strategies.{name}.per_seed has seed {seed!r}, which is not in 'seeds'")
                problems += _entry_problems(f"strategies.{name}.per_seed.{seed}", seed_entry)
        ci95 = entry.get("ci95")
        if not isinstance(ci95, Mapping) or any(v is not None and not _is_number(v) for v in ci95.values()):
            problems.append(f"strategies.{name}.ci95 must be an object of half-widths (numbers or null)")
        n_seeds = entry.get("n_seeds")
        if not isinstance(n_seeds, int) or isinstance(n_seeds, bool) or n_seeds < 1:
            problems.append(f"strategies.{name}.n_seeds is {n_seeds!r}, expected a positive integer")
    return problems


# ---------------------------------------------------------------------------------------------- table
def format_metric(value: float | None, spec: str = ".3f") -> str:
    """A metric for people: ``–`` where it could not be computed (null in report.json)."""
    return "–" if value is None else format(value, spec)


def format_mean_ci(mean: float | None, ci95: float | None, spec: str = ".3f", scale: float = 1.0) -> str:
    """``mean ± half-width`` (the mean alone without an interval, ``–`` without a mean)."""
    if mean is None:
        return "–"
    text = format(mean / scale, spec)
    return text if ci95 is None else f"{text} ± {format(ci95 / scale, spec.lstrip('+'))}"


def _signed(value: float) -> str:
    return format(value, "+.3f").replace("-", "−")


def format_difference(difference: Mapping[str, Any] | None) -> str:
    """A paired difference as ``+0.012 [−0.030, +0.054]``, with ``unresolved`` when its interval contains 0."""
    if not difference or difference.get("mean") is None:
        return "–"
    mean, ci95 = difference["mean"], difference.get("ci95")
    if ci95 is None:
        return f"{_signed(mean)} (n = {difference.get('n', 1)}, no CI) unresolved"
    text = f"{_signed(mean)} [{_signed(mean - ci95)}, {_signed(mean + ci95)}]"
    return text if difference.get("resolved") else f"{text} unresolved"


def markdown_table(report: Mapping[str, Any]) -> str:
    """The headline, the number of seeds and one row per strategy (means ± 95 % CI, paired Δ vs FedDAH)."""
    seeds = report.get("seeds") or [report.get("seed")]
    lines = []
    headline = (report.get("headline") or {}).get("feddah_fraction_of_centralized")
    if headline:
        lines.append(f"**Headline:** FedDAH final mean Dice = {format_mean_ci(headline['mean'], headline['ci95'])} × "
                     f"{(report.get('headline') or {}).get('reference', CENTRALIZED)} (mean ± 95 % CI over "
                     f"{headline['n']} seed(s))")
    lines.append(f"Seeds: {len(seeds)} ({', '.join(map(str, seeds))}). Values are means over seeds ± the half-width of "
                 f"the 95 % confidence interval of the mean (Student's t; none with one seed). A paired difference "
                 f"whose interval contains 0 is unresolved: it is not a result.")
    lines.append("")
    lines += ["| strategy | seeds | final mean Dice | forgetting | BWT | new task after its 1st step | "
              "server memory MB (= models) | server update (s) | wall (s) | MB per site-round | "
              "update lost, mean (max) | site's change lost | Δ final mean Dice vs feddah [95 % CI] |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in report["strategies"].items():
        ci = e.get("ci95", {})
        model_bytes = e["bytes_per_site_round"] / 2  # one model's weights (down + up = 2 models per site-round)
        models = f" ({e['server_bytes'] / model_bytes:.1f})" if model_bytes else ""
        paired = "reference" if name == PAIRED_REFERENCE else \
            format_difference(e.get("paired_vs_feddah", {}).get("final_mean_dice"))
        lines.append(
            f"| {name} | {e.get('n_seeds', 1)} | {format_mean_ci(e['final_mean_dice'], ci.get('final_mean_dice'))} | "
            f"{format_mean_ci(e['forgetting'], ci.get('forgetting'), '+.3f')} | "
            f"{format_mean_ci(e['bwt'], ci.get('bwt'), '+.3f')} | "
            f"{format_mean_ci(e.get('new_task_first_dice'), ci.get('new_task_first_dice'))} | "
            f"{format_mean_ci(e['server_bytes'], ci.get('server_bytes'), '.2f', 1e6)}{models} | "
            f"{format_mean_ci(e['server_update_s'], ci.get('server_update_s'), '.1f')} | "
            f"{format_mean_ci(e['wall_s'], ci.get('wall_s'), '.0f')} | {e['bytes_per_site_round'] / 1e6:.2f} | "
            f"{_lost(e)} | {format_metric(e.get('site_change_lost_mean'))} | {paired} |")
    return "\n".join(lines + memory_lines(report))


def memory_lines(report: Mapping[str, Any]) -> list[str]:
    """Server memory (MB, mean over seeds) at every time step against the number of tasks held, per strategy."""
    curves = {name: e["server_bytes_by_step"] for name, e in report["strategies"].items()
              if e.get("server_bytes_by_step")}
    if not curves:
        return []
    rounds = sorted({int(r) for curve in curves.values() for r in curve})
    tasks = {r: next((c[str(r)]["tasks"] for c in curves.values() if str(r) in c), None) for r in rounds}
    lines = ["", "Server memory (MB) after each time step, by the number of tasks it holds:", "",
             "| strategy | " + " | ".join(f"round {r} ({tasks[r]} tasks)" for r in rounds) + " |",
             "|---|" + "---|" * len(rounds)]
    for name, curve in curves.items():
        cells = [format_metric(curve[str(r)]["bytes"] / 1e6, ".2f") if str(r) in curve else "–" for r in rounds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _lost(entry: Mapping[str, Any]) -> str:
    """``update_lost`` of a strategy that compresses (mean over uploads, and the worst upload); – otherwise."""
    if entry.get("update_lost_mean") is None:
        return "–"
    return f"{format_metric(entry['update_lost_mean'], '.4f')} ({format_metric(entry.get('update_lost_max'), '.4f')})"


# ---------------------------------------------------------------------------------------------- plots
def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


@contextlib.contextmanager
def plain_pyplot() -> Iterator[Any]:
    """``matplotlib.pyplot`` (Agg) with plain defaults for the duration of a plot.

    nnU-Net's progress logger switches seaborn on globally (font_scale 2.5) in any process that trained, which
    would blow every label of our plots up to poster size.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.style.context("default"), plt.rc_context({"font.size": 9}):
        yield plt


def plot_report(out_dir: Path, report: Mapping[str, Any]) -> list[Path]:
    """Heatmaps, Dice-over-time curves and the comparison bars; returns the PNG paths."""
    with plain_pyplot() as plt:
        return _plot(plt, out_dir, report)


def _seed_matrices(entry: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    per_seed = entry.get("per_seed") or {}
    return [e["dice_matrix"] for e in per_seed.values()] or [entry["dice_matrix"]]


def _plot(plt: Any, out_dir: Path, report: Mapping[str, Any]) -> list[Path]:
    written = []
    strategies = report["strategies"]
    for name, entry in strategies.items():
        matrix = DiceMatrix.from_json(entry["dice_matrix"])
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(matrix.steps), 0.8 + 0.45 * len(matrix.tasks)))
        image = ax.imshow(np.ma.masked_invalid(matrix.values), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for (i, j), value in np.ndenumerate(matrix.values):
            if math.isfinite(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="w" if value < 0.6 else "k", fontsize=8)
        ax.set_xticks(range(len(matrix.steps)), [f"r{s}" for s in matrix.steps])
        ax.set_yticks(range(len(matrix.tasks)), matrix.tasks)
        ax.set_xlabel("end of time step (round)")
        ax.set_title(f"{name}: Dice (mean over sites and {entry.get('n_seeds', 1)} seed(s))")
        fig.colorbar(image, ax=ax, fraction=0.05)
        path = out_dir / f"dice_matrix_{name}.png"
        _save(fig, path)
        plt.close(fig)
        written.append(path)

    curves = {name: matrix_stats(_seed_matrices(entry)) for name, entry in strategies.items()}
    tasks = list(dict.fromkeys(t for tasks, *_ in curves.values() for t in tasks))
    steps_all = sorted({s for _, steps, *_ in curves.values() for s in steps})
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks) + 1.8, 2.8), squeeze=False, sharey=True)
    for ax, task in zip(axes[0], tasks, strict=True):
        for name, (m_tasks, m_steps, mean, ci) in curves.items():
            if task in m_tasks:
                i = m_tasks.index(task)
                ax.errorbar(m_steps, mean[i], yerr=np.nan_to_num(ci[i]), marker="o", capsize=2, label=name)
        ax.set_title(task)
        ax.set_xlabel("end of time step (round)")
        ax.set_xticks(steps_all)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("Dice (mean ± 95 % CI over seeds)")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))  # beside, not over, the curves
    path = out_dir / "dice_over_time.png"
    _save(fig, path)
    plt.close(fig)
    written.append(path)

    names = list(strategies)
    fig, axes = plt.subplots(1, 3, figsize=(3.2 * 3, 0.9 + 0.35 * len(names)))
    for ax, (key, label) in zip(axes, (("final_mean_dice", "final mean Dice"), ("forgetting", "forgetting"),
                                       ("bwt", "BWT")), strict=True):
        values = [np.nan if strategies[n][key] is None else strategies[n][key] for n in names]
        errors = [strategies[n].get("ci95", {}).get(key) for n in names]
        ax.barh(names, values, xerr=[0.0 if e is None else e for e in errors], capsize=3,
                color=["C0" if n.startswith("feddah") else "C7" for n in names])
        ax.set_title(f"{label} (± 95 % CI)")
        ax.axvline(0, color="k", lw=0.6)
        if key == "final_mean_dice":
            ax.set_xlim(0, 1)
        # fixed rows, top to bottom: a panel whose last bars are NaN (centralized has no forgetting) would
        # otherwise autoscale to fewer rows and its bars would drift against the names of the first panel
        ax.set_ylim(len(names) - 0.5, -0.5)
    for ax in axes[1:]:
        ax.set_yticklabels([])
    path = out_dir / "strategy_comparison.png"
    _save(fig, path)
    plt.close(fig)
    written.append(path)
    return written


# ---------------------------------------------------------------------------------------------- report
def build_report(results_by_seed: ResultsBySeed, stream: str, **extra: Any) -> dict[str, Any]:
    """The report.json object (module docstring) from ``{seed: {strategy: (evaluation, stats)}}``."""
    if not results_by_seed:
        raise ValueError("no seed to report: results_by_seed is empty")
    seeds = sorted(int(s) for s in results_by_seed)
    by_name: dict[str, dict[str, dict[str, Any]]] = {}  # strategy -> "<seed>" -> entry
    for seed in sorted(results_by_seed, key=int):
        for name, (evaluation, stats) in results_by_seed[seed].items():
            by_name.setdefault(name, {})[str(int(seed))] = strategy_entry(evaluation, stats)
    # a malformed seed would break the averaging below: name it against the schema first
    problems = [p for name, per_seed in by_name.items() for seed, entry in per_seed.items()
                for p in _entry_problems(f"strategies.{name}.per_seed.{seed}", entry)]
    if problems:
        raise ValueError("report.json would not match its schema: " + "; ".join(problems))
    strategies = {name: seed_block(per_seed) for name, per_seed in by_name.items()}
    if PAIRED_REFERENCE in strategies:
        for name, block in strategies.items():
            if name != PAIRED_REFERENCE:
                block["paired_vs_feddah"] = _paired(block, strategies[PAIRED_REFERENCE])
    report: dict[str, Any] = {"strategies": strategies, "stream": stream, "seeds": seeds, "seed": seeds[0]}
    headline = _headline(strategies)
    if headline is not None:
        report["headline"] = headline
    report.update(extra)
    problems = check_report(report)
    if problems:
        raise ValueError("report.json would not match its schema: " + "; ".join(problems))
    return report


def write_report(out_dir: Path | str, results_by_seed: ResultsBySeed, stream: str, **extra: Any) -> Path:
    """Write report.json, report.md and the plots into ``out_dir``; returns the report.json path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = build_report(results_by_seed, stream, **extra)
    atomic_write_json(out_dir / REPORT_FILE, report)
    seeds = report["seeds"]
    with atomic_path(out_dir / TABLE_FILE) as tmp:
        tmp.write_text(f"# {stream} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''}: "
                       f"{', '.join(map(str, seeds))})\n\n{markdown_table(report)}\n")
    plot_report(out_dir, report)
    return out_dir / REPORT_FILE
