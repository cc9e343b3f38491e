"""``report.json``, a markdown comparison table and PNG plots for one or more evaluated strategies.

``report.json`` is read by other tools; its keys are fixed (issue 5)::

    {"strategies": {NAME: {"final_mean_dice": float, "forgetting": float, "bwt": float,
                           "dice_matrix": {"tasks": [...], "steps": [...], "values": [[...]]},
                           "server_bytes": int, "server_update_s": float, "wall_s": float,
                           "bytes_per_site_round": int, ...extra keys}},
     "stream": PLAN_NAME, "seed": int}

``steps`` are the rounds that close a time step; matrix entries and metrics that cannot be computed
(a task not seen yet, no old task) are ``null``. Plots: one Dice-matrix heatmap per strategy, Dice over
time per task (one panel per task, a line per strategy) and a bar chart of final Dice / forgetting / BWT.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from nnunet_feddah.atomic import atomic_path, atomic_write_json
from nnunet_feddah.results.fcl_metrics import DiceMatrix

REPORT_FILE = "report.json"
TABLE_FILE = "report.md"
NULLABLE_KEYS = ("final_mean_dice", "forgetting", "bwt")  # null when nothing could be evaluated / no old task
REQUIRED_KEYS = {"final_mean_dice": float, "forgetting": float, "bwt": float, "dice_matrix": dict,
                 "server_bytes": int, "server_update_s": float, "wall_s": float, "bytes_per_site_round": int}


def _num(value: Any) -> float | None:
    return None if value is None or not math.isfinite(float(value)) else float(value)


def strategy_entry(evaluation: Mapping[str, Any], stats: Mapping[str, Any]) -> dict[str, Any]:
    """One strategy's block of report.json from its evaluation and run statistics."""
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
        "old_tasks": evaluation.get("old_tasks", []),
        **{k: v for k, v in stats.items() if k not in REQUIRED_KEYS},
    }


def check_report(report: Mapping[str, Any]) -> list[str]:
    """Problems with a report against the schema (empty list: it conforms)."""
    problems = []
    if not isinstance(report.get("stream"), str):
        problems.append("field 'stream' must be a string (the plan name)")
    if not isinstance(report.get("seed"), int):
        problems.append("field 'seed' must be an integer")
    strategies = report.get("strategies")
    if not isinstance(strategies, Mapping) or not strategies:
        return [*problems, "field 'strategies' must be a non-empty object"]
    for name, entry in strategies.items():
        for key, kind in REQUIRED_KEYS.items():
            value = entry.get(key, "missing")
            if value is None and key in NULLABLE_KEYS:
                continue
            accepted = (int, float) if kind is float else (kind,)
            if isinstance(value, bool) or not isinstance(value, accepted):
                problems.append(f"strategies.{name}.{key} is {value!r}, expected {kind.__name__}")
        matrix = entry.get("dice_matrix") or {}
        values = matrix.get("values")
        if not (isinstance(matrix.get("tasks"), list) and isinstance(matrix.get("steps"), list)
                and isinstance(values, list) and len(values) == len(matrix["tasks"])
                and all(isinstance(row, list) and len(row) == len(matrix["steps"]) for row in values)):
            problems.append(f"strategies.{name}.dice_matrix must have tasks, steps and a tasks × steps values list")
    return problems


def format_metric(value: float | None, spec: str = ".3f") -> str:
    """A metric for people: ``–`` where it could not be computed (null in report.json)."""
    return "–" if value is None else format(value, spec)


def markdown_table(report: Mapping[str, Any]) -> str:
    rows = ["| strategy | final mean Dice | forgetting | BWT | server memory MB (= models) | server update (s) | "
            "wall (s) | MB per site-round |", "|---|---|---|---|---|---|---|---|"]
    for name, e in report["strategies"].items():
        model_bytes = e["bytes_per_site_round"] / 2  # one model's weights (down + up = 2 models per site-round)
        models = f" ({e['server_bytes'] / model_bytes:.1f})" if model_bytes else ""
        rows.append(f"| {name} | {format_metric(e['final_mean_dice'])} | {format_metric(e['forgetting'], '+.3f')} | "
                    f"{format_metric(e['bwt'], '+.3f')} | {e['server_bytes'] / 1e6:.2f}{models} | {e['server_update_s']:.1f} | "
                    f"{e['wall_s']:.0f} | {e['bytes_per_site_round'] / 1e6:.2f} |")
    return "\n".join(rows)


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plot_report(out_dir: Path, report: Mapping[str, Any]) -> list[Path]:
    """Heatmaps, Dice-over-time curves and the comparison bars; returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # nnU-Net's progress logger switches seaborn on globally (font_scale 2.5); these plots use plain defaults
    with plt.style.context("default"), plt.rc_context({"font.size": 9}):
        return _plot(plt, out_dir, report)


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
        ax.set_title(f"{name}: Dice (mean over sites)")
        fig.colorbar(image, ax=ax, fraction=0.05)
        path = out_dir / f"dice_matrix_{name}.png"
        _save(fig, path)
        plt.close(fig)
        written.append(path)

    tasks = list(dict.fromkeys(t for e in strategies.values() for t in e["dice_matrix"]["tasks"]))
    steps_all = sorted({s for e in strategies.values() for s in e["dice_matrix"]["steps"]})
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 2.8), squeeze=False, sharey=True)
    for ax, task in zip(axes[0], tasks, strict=True):
        for name, entry in strategies.items():
            matrix = entry["dice_matrix"]
            if task in matrix["tasks"]:
                row = matrix["values"][matrix["tasks"].index(task)]
                ax.plot(matrix["steps"], [np.nan if v is None else v for v in row], marker="o", label=name)
        ax.set_title(task)
        ax.set_xlabel("end of time step (round)")
        ax.set_xticks(steps_all)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("Dice")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    path = out_dir / "dice_over_time.png"
    _save(fig, path)
    plt.close(fig)
    written.append(path)

    names = list(strategies)
    fig, axes = plt.subplots(1, 3, figsize=(3.2 * 3, 0.9 + 0.35 * len(names)))
    for ax, (key, label) in zip(axes, (("final_mean_dice", "final mean Dice"), ("forgetting", "forgetting"),
                                       ("bwt", "BWT")), strict=True):
        values = [strategies[n][key] if strategies[n][key] is not None else np.nan for n in names]
        ax.barh(names, values, color=["C0" if n.startswith("feddah") else "C7" for n in names])
        ax.set_title(label)
        ax.axvline(0, color="k", lw=0.6)
        if key == "final_mean_dice":
            ax.set_xlim(0, 1)
        ax.invert_yaxis()
    for ax in axes[1:]:
        ax.set_yticklabels([])
    path = out_dir / "strategy_comparison.png"
    _save(fig, path)
    plt.close(fig)
    written.append(path)
    return written


def build_report(results: Mapping[str, tuple[Mapping[str, Any], Mapping[str, Any]]], stream: str,
                 seed: int, **extra: Any) -> dict[str, Any]:
    report = {"strategies": {name: strategy_entry(ev, st) for name, (ev, st) in results.items()},
              "stream": stream, "seed": int(seed), **extra}
    problems = check_report(report)
    if problems:
        raise ValueError("report.json would not match its schema: " + "; ".join(problems))
    return report


def write_report(out_dir: Path | str, results: Mapping[str, tuple[Mapping[str, Any], Mapping[str, Any]]],
                 stream: str, seed: int, **extra: Any) -> Path:
    """Write report.json, report.md and the plots into ``out_dir``; returns the report.json path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = build_report(results, stream, seed, **extra)
    atomic_write_json(out_dir / REPORT_FILE, report)
    with atomic_path(out_dir / TABLE_FILE) as tmp:
        tmp.write_text(f"# {stream} (seed {seed})\n\n{markdown_table(report)}\n")
    plot_report(out_dir, report)
    return out_dir / REPORT_FILE
