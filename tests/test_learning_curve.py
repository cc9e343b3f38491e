"""The learning-curve benchmark's verdict (issue 12): a seed passes only within the training-time budget."""

from __future__ import annotations

from pathlib import Path

from nnunet_feddah.research.learning_curve import TIME_BUDGET_S, CurveSettings, format_summary, plot_curves, summarise


def _rows(dice: list[float], seconds: list[float]) -> list[dict]:
    return [{"iterations": 300 * (i + 1), "dice": d, "train_s": s} for i, (d, s) in enumerate(zip(dice, seconds,
                                                                                                 strict=True))]


def test_target_needs_four_of_five_seeds_within_the_time_budget(tmp_path: Path):
    late = TIME_BUDGET_S + 10
    curves = {
        "kidneys": {0: _rows([0.7, 0.85], [60, 120]), 1: _rows([0.7, 0.82], [60, 120]), 2: _rows([0.7, 0.81], [60, 120]),
                    3: _rows([0.7, 0.79, 0.88], [60, 120, late]), 4: _rows([0.8, 0.9], [50, 100])},
        "spleen": {s: _rows([0.6, 0.79], [60, 120]) for s in range(4)} | {4: _rows([0.81], [90])},
        "pancreas": {s: _rows([0.61], [100]) for s in range(5)},
    }
    settings = CurveSettings(organs=tuple(curves))
    summary = summarise(settings, curves)
    assert summary["kidneys"]["seeds_passed"] == {0: True, 1: True, 2: True, 3: False, 4: True}  # 0.88 came too late
    assert summary["kidneys"]["passes"] and not summary["spleen"]["passes"] and summary["pancreas"]["passes"]
    assert summary["pancreas"]["target"] == 0.60 and summary["spleen"]["target"] == 0.80
    first = summary["kidneys"]["checkpoints"][0]
    assert first["iterations"] == 300 and first["per_seed"] == [0.7, 0.7, 0.7, 0.7, 0.8]
    assert abs(first["mean"] - 0.72) < 1e-12 and first["ci95"] > 0
    text = format_summary(summary)
    assert "PASS  kidneys: 4/5 seeds" in text and "FAIL  spleen: 1/5 seeds" in text
    png = plot_curves(tmp_path / "curves.png", curves, settings)
    assert png.is_file() and png.stat().st_size > 1000


def test_donor_start_keeps_the_donor_trunk_and_its_background_row(tmp_path: Path):
    import torch

    from nnunet_feddah.nnunet.network import hypernet_base, is_head
    from nnunet_feddah.nnunet.shared_plans import load_template
    from nnunet_feddah.nnunet.weights import load_weights, save_weights
    from nnunet_feddah.organs import Task
    from nnunet_feddah.research.learning_curve import donor_start_file

    plans = load_template("cpu")
    base = hypernet_base(plans)  # 16 organ slots; the kidneys network has 3 outputs (background, both kidneys)
    kidneys = {name: (t[[0, 2, 3]] if is_head(name) else t) + 1.0 for name, t in base.items()}
    start, _ = load_weights(donor_start_file(save_weights(tmp_path / "k.safetensors", kidneys, {}), "kidneys",
                                             "spleen", plans, tmp_path))
    spleen = Task.parse("spleen").labels[0]
    for name, tensor in start.items():
        if is_head(name):  # background from the donor, the spleen row untrained (the base's)
            assert torch.equal(tensor[0], kidneys[name][0]) and torch.equal(tensor[1], base[name][spleen])
        else:
            assert torch.equal(tensor, kidneys[name])
