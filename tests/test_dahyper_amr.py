"""DAHyper's generators (``generators=True``, the paper's hypernetwork, kept as ablations) + AMR on the CPU plan's
real network shapes with random (low-rank) targets — seconds, no data."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from nnunet_feddah.method.aggregate import change_lost, relative_l2
from nnunet_feddah.method.amr import AMR, AMRConfig
from nnunet_feddah.method.dahyper import CapacityError, DAHyper, DAHyperConfig, TargetMismatchError
from nnunet_feddah.method.hypernet_file import HypernetFileError, load_hypernet, save_hypernet
from nnunet_feddah.method.similarity import js_divergence
from nnunet_feddah.nnunet.network import build_network, hypernet_base, is_head, load_unique_tensors
from nnunet_feddah.paths import bundled_plans_dir

FINGERPRINT = "sha256:test"


@pytest.fixture(scope="module")
def plans() -> dict:
    return json.loads((bundled_plans_dir() / "template_cpu.json").read_text())


@pytest.fixture(scope="module")
def base(plans) -> dict:
    return hypernet_base(plans)


def make_amr(base, beta: float = 1.0, **config) -> AMR:
    return AMR(DAHyper(base, is_head, DAHyperConfig(generators=True, **config)), AMRConfig(beta=beta))


def trained_like(hyper: DAHyper, key: str, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """The task's current weights plus a rank-2 change per kernel and noise on small tensors."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in hyper.generate(key).items():
        if w.ndim >= 2 and w.shape[0] > 1:
            m, n = w.shape[0], w[0].numel()
            change = torch.randn(m, 2, generator=g) @ torch.randn(2, n, generator=g) / 2 ** 0.5
            out[name] = w + scale * w.std() * change.reshape(w.shape)
        else:
            out[name] = w + scale * (w.std() if w.numel() > 1 else 1.0) * torch.randn(w.shape, generator=g)
    return out


def test_generated_weights_load_strictly_and_run(base, plans):
    amr = make_amr(base)
    amr.allocate("kidneys", [2, 3])
    weights = amr.hyper.generate("kidneys")
    assert weights["decoder.seg_layers.0.weight"].shape[0] == 3
    network = build_network(plans, 3)
    load_unique_tensors(network, weights, "generated")
    with torch.no_grad():
        out = network(torch.zeros(1, 1, 32, 32, 32))
    assert out[0].shape == (1, 3, 32, 32, 32)


def test_first_upload_becomes_base_and_later_uploads_fit(base):
    amr = make_amr(base)
    amr.allocate("kidneys", [2, 3])
    first = trained_like(amr.hyper, "kidneys", 1, scale=1.0)
    report = amr.update("kidneys", first, round_index=1, source="site1")
    assert report.rebased and report.fidelity_rel_l2 < 1e-6
    second = trained_like(amr.hyper, "kidneys", 2)
    report = amr.update("kidneys", second, round_index=2, source="site1")
    assert report.similarity is None  # same site continues its own training
    assert report.fidelity_rel_l2 < 1e-4, report


def test_new_task_starts_from_organ_rows_of_known_tasks(base):
    amr = make_amr(base)
    amr.allocate("kidneys", [2, 3])
    amr.update("kidneys", trained_like(amr.hyper, "kidneys", 1, scale=1.0), round_index=1, source="a")
    amr.update("kidneys", trained_like(amr.hyper, "kidneys", 2), round_index=2, source="a")
    kidneys = amr.hyper.generate("kidneys")
    amr.allocate("liver+left_kidney", [6, 3])
    new = amr.hyper.generate("liver+left_kidney")
    head = "decoder.seg_layers.0.weight"
    torch.testing.assert_close(new[head][2], kidneys[head][2], atol=1e-5, rtol=0)  # left kidney row reused
    torch.testing.assert_close(new[head][1], amr.hyper.base[head][6])  # liver: organ's initial row
    assert relative_l2(new, {k: v for k, v in kidneys.items() if not is_head(k)} | {
        k: new[k] for k in new if is_head(k)}) < 1e-4


def _drift_after_new_tasks(base, beta: float, n_new: int = 5) -> float:
    amr = make_amr(base, beta=beta)
    amr.allocate("spleen", [1])
    amr.update("spleen", trained_like(amr.hyper, "spleen", 0, scale=1.0), round_index=1, source="a")
    amr.update("spleen", trained_like(amr.hyper, "spleen", 1), round_index=2, source="a")
    amr.allocate("liver", [6])
    amr.update("liver", trained_like(amr.hyper, "liver", 2), round_index=3, source="a")
    reference = amr.hyper.generate("liver")
    organs = [2, 3, 10, 7, 8, 9, 4]
    for i in range(n_new):
        key = f"task{i}"
        amr.allocate(key, [organs[i]])
        report = amr.update(key, trained_like(amr.hyper, key, 10 + i), round_index=4 + i, source="b")
        assert report.fidelity_rel_l2 < 1e-3
    return relative_l2(amr.hyper.generate("liver"), reference)


def test_historical_regulariser_protects_old_tasks_and_ablation_forgets(base):
    protected = _drift_after_new_tasks(base, beta=1.0)
    ablated = _drift_after_new_tasks(base, beta=0.0)
    assert protected < 1e-3
    assert ablated > 10 * protected and ablated > 1e-3


def test_weight_histogram_similarity_prefers_near_copies(base, plans):
    """The pre-2026-12-02 reading, kept as ``similarity="weights"``: similar weight histograms → more history."""
    amr = AMR(DAHyper(base, is_head, DAHyperConfig(generators=True)), AMRConfig(similarity="weights"))
    amr.allocate("liver", [6])
    amr.update("liver", trained_like(amr.hyper, "liver", 1, scale=1.0), round_index=1, source="a")
    history = amr.hyper.generate("liver")
    near = {k: v + 1e-3 * v.std() * torch.randn_like(v) if v.numel() > 1 else v for k, v in history.items()}
    fresh = hypernet_base(plans, seed=5)  # an untrained network: same shapes, unrelated values
    unrelated = {k: (v[[0, 6]] if is_head(k) else v) for k, v in fresh.items()}
    assert js_divergence(history, near) < 0.01 < js_divergence(history, unrelated)
    report_near = amr.update("liver", near, round_index=2, source="b")
    hyper2 = AMR(DAHyper(base, is_head, DAHyperConfig(generators=True)), AMRConfig(similarity="weights"))
    hyper2.allocate("liver", [6])
    hyper2.update("liver", history, round_index=1, source="a")
    report_far = hyper2.update("liver", unrelated, round_index=2, source="b")
    assert report_near.similarity > report_far.similarity
    assert report_near.ws_measure == "weights"


def test_predictive_history_weight_rises_with_the_sites_divergence():
    """W_s = σ((JS − mid) / scale): a healthy round's JS keeps (nearly) all of the change, a divergent one
    almost none; a site that sent no JS gets the fixed weight, never the histogram reading."""
    from nnunet_feddah.method.aggregate import Contribution
    from nnunet_feddah.method.similarity import history_weight

    config = AMRConfig()
    weights = {"w": torch.zeros(3)}

    def ws(js):
        return history_weight(config, weights, Contribution("b", weights, 1, js))

    values = [ws(js).value for js in (0.0, 0.002, config.ws_js_mid, 0.0097, 0.05, 0.6)]
    assert values == sorted(values) and len(set(values)) == len(values) - 1  # 0.05 and 0.6 both saturate at 1
    assert values[1] < 0.01 and values[2] == pytest.approx(0.5) and values[3] > 0.9 and values[-1] == 1.0
    assert ws(0.002).measure == "predictive" and ws(0.002).divergence == 0.002
    silent = ws(None)
    assert (silent.value, silent.measure) == (config.fixed_similarity, "fixed")
    for claim in (float("nan"), float("inf")):  # no evidence: weighed like silence, never a NaN weight
        assert (ws(claim).value, ws(claim).measure) == (config.fixed_similarity, "fixed")
    with pytest.raises(ValueError, match="similarity must be one of"):
        AMRConfig(similarity="cosine")


def test_case_weighted_history_is_fedavg_across_time(base):
    """similarity="cases": history counts as its training cases, W* = (n_h S + Σ n_i W_i) / (n_h + Σ n_i)."""
    from nnunet_feddah.method.aggregate import Contribution

    amr = AMR(DAHyper(base, is_head, DAHyperConfig(generators=True)), AMRConfig(similarity="cases"))
    amr.allocate("liver", [6])
    amr.update_round({"liver": [Contribution("a", trained_like(amr.hyper, "liver", 1, scale=1.0), 6)]}, 1)
    sent = amr.hyper.generate("liver")
    uploads = {"b": trained_like(amr.hyper, "liver", 2), "c": trained_like(amr.hyper, "liver", 3)}
    reports = amr.update_round({"liver": [Contribution("b", uploads["b"], 2), Contribution("c", uploads["c"], 4)]}, 2)
    assert [(r.ws_measure, r.similarity) for r in reports["liver"]] == [("cases", 0.5), ("cases", 0.5)]
    name = "encoder.stages.0.0.convs.0.conv.weight"
    expected = (6 * sent[name].double() + 2 * uploads["b"][name].double() + 4 * uploads["c"][name].double()) / 12
    torch.testing.assert_close(amr.hyper.generate("liver")[name].double(), expected, rtol=0, atol=1e-6)
    assert amr.hyper.tasks["liver"].training_cases == {"a": 6, "b": 2, "c": 4}


def test_bad_targets_raise_before_any_change(base):
    amr = make_amr(base)
    amr.allocate("kidneys", [2, 3])
    amr.update("kidneys", trained_like(amr.hyper, "kidneys", 1, scale=1.0), round_index=1, source="a")
    before = {k: v.clone() for k, v in amr.hyper.params.items()}
    base_before = {k: v.clone() for k, v in amr.hyper.base.items()}
    good = trained_like(amr.hyper, "kidneys", 2)
    name = next(iter(good))
    bad_inputs = {
        "missing": {k: v for k, v in good.items() if k != name},
        "extra": {**good, "surprise.weight": torch.zeros(1)},
        "shape": {**good, name: good[name][:1]},
        "nan": {**good, name: torch.full_like(good[name], float("nan"))},
        "inf": {**good, name: torch.full_like(good[name], float("inf"))},
    }
    for kind, upload in bad_inputs.items():
        with pytest.raises(TargetMismatchError):
            amr.update("kidneys", upload, round_index=2, source="a")
        for k, v in before.items():
            assert torch.equal(amr.hyper.params[k], v), kind
        for k, v in base_before.items():
            assert torch.equal(amr.hyper.base[k], v), kind
        assert amr.hyper.tasks["kidneys"].rounds_seen == [1], kind


def test_save_load_round_trip_is_bit_exact(base, tmp_path):
    amr = make_amr(base)
    amr.allocate("kidneys", [2, 3])
    amr.update("kidneys", trained_like(amr.hyper, "kidneys", 1, scale=1.0), round_index=1, source="a")
    amr.allocate("liver", [6])
    amr.update("liver", trained_like(amr.hyper, "liver", 2), round_index=2, source="b")
    path = save_hypernet(tmp_path / "hyper.safetensors", amr.hyper, FINGERPRINT)
    loaded = load_hypernet(path, FINGERPRINT)
    for key in ("kidneys", "liver"):
        for name, tensor in amr.hyper.generate(key).items():
            assert torch.equal(loaded.generate(key)[name], tensor)
    assert loaded.tasks == amr.hyper.tasks
    # the random state travels too: the next registration draws the same embedding
    amr.hyper.register("spleen", [1])
    loaded.register("spleen", [1])
    assert torch.equal(loaded.embeddings["spleen"], amr.hyper.embeddings["spleen"])
    with pytest.raises(HypernetFileError, match="architecture_fingerprint"):
        load_hypernet(path, "sha256:other")
    with pytest.raises(HypernetFileError, match="does not exist"):
        load_hypernet(tmp_path / "nope.safetensors")


def _three_fitted_tasks(base, **config) -> AMR:
    amr = make_amr(base, **config)
    for i, (key, organs) in enumerate([("kidneys", [2, 3]), ("liver", [6]), ("spleen", [1])]):
        amr.allocate(key, organs)
        amr.update(key, trained_like(amr.hyper, key, i, scale=1.0 if i == 0 else 0.05), round_index=i, source="a")
    return amr


def test_every_trained_parameter_group_changes_in_an_update_and_old_tasks_stay(base):
    """Stage 1 trains z_T, every E_l, F and the organ embeddings; stage 2 the generators; the others are held.

    The upload continues the liver's own change by 30 % (plus noise), which the generators learned already
    express: stage 1 explains part of it (9 % of the error measured; the noise is not shared); a random change shares nothing and stage 1
    keeps the codes as they were (tested with the 64 tasks below)."""
    amr = _three_fitted_tasks(base)
    hyper = amr.hyper
    params = {k: v.clone() for k, v in hyper.params.items()}
    embeddings = {k: v.clone() for k, v in hyper.embeddings.items()}
    old = {t: hyper.generate(t) for t in ("kidneys", "spleen")}
    now, start, noise = hyper.generate("liver"), hyper.base_view("liver"), trained_like(hyper, "liver", 7, scale=0.01)
    upload = {k: noise[k] + 0.3 * (now[k] - start[k]) for k in now}
    report = amr.update("liver", upload, round_index=3, source="a")
    changed = {name for name, value in params.items() if not torch.equal(hyper.params[name], value)}
    assert {n for n in params if n.endswith("::E")} <= changed  # every per-layer projection
    assert {"encoder::F", "organs::embedding"} <= changed
    moving = {k for k in upload if not torch.equal(upload[k], now[k])}  # (norm scales with std 0 get no noise)
    assert {n for n in params if n.endswith(("::G", "::GA", "::GB")) and n.split("::")[0] in moving} <= changed
    assert not torch.equal(hyper.embeddings["liver"], embeddings["liver"])
    assert all(torch.equal(hyper.embeddings[t], embeddings[t]) for t in ("kidneys", "spleen"))
    assert 1 < report.steps <= amr.config.code_steps + 1 and 0.05 < report.shared_explained <= 1
    assert report.update_lost < 1e-4  # the exact residual of the active task
    for t, weights in old.items():  # stage 2 put them back although stage 1 moved their codes
        assert relative_l2(hyper.generate(t), weights) < 1e-6
    assert change_lost(hyper.base_view("spleen"), old["spleen"], hyper.generate("spleen")) < 1e-4  # of its delta


def test_factor_targets_are_aligned_with_what_the_task_generates(base):
    """An upload equal to what the generators give maps to exactly their outputs (SVD rotation removed)."""
    from nnunet_feddah.method.recalibration import generator_targets

    amr = _three_fitted_tasks(base)
    hyper = amr.hyper
    wanted = generator_targets(hyper, "liver", hyper.generate("liver", with_residual=False))
    inputs, owner = hyper.generator_inputs(list(hyper.tasks))
    index = list(hyper.tasks).index("liver")
    lowrank = [p for p in wanted if p.endswith("::GA")]
    assert lowrank
    for param, output in wanted.items():
        now = hyper.params[param].double() @ inputs[param][:, owner[param] == index].double()
        # float32 weights leave ~1e-4 in the SVD of small deltas; an unaligned factor would be off by O(1)
        assert float((output - now).norm()) <= 1e-3 * max(float(now.norm()), 1e-6), param


def test_encoder_switch_changes_codes_only_when_enabled(base):
    with_encoder = DAHyper(base, is_head, DAHyperConfig(generators=True, layer_encoder=True))
    without = DAHyper(base, is_head, DAHyperConfig(generators=True, layer_encoder=False))
    assert torch.count_nonzero(without.params["encoder::F"]) == 0
    assert torch.count_nonzero(with_encoder.params["encoder::F"]) > 0
    assert all(torch.equal(without.params[k], v) for k, v in with_encoder.params.items() if k != "encoder::F")


def _composed_federation(base, layer_encoder: bool) -> AMR:
    """Three tasks fitted from donor starts (so both federations get the same uploads), then a composed one."""
    amr = _three_fitted_tasks(base, layer_encoder=layer_encoder)
    amr.config = replace(amr.config, new_task_start="composed")
    amr.allocate("liver+kidneys", [6, 2, 3])
    return amr


def test_composed_start_is_generated_from_the_organs_tasks_and_depends_on_the_encoder(base):
    """Fitted tasks come out the same with and without the encoder (stage 2 fits them exactly); a composed
    new task is what the hypernetwork generates for its embedding, and there the encoder changes the weights."""
    on, off = _composed_federation(base, True), _composed_federation(base, False)
    hyper = on.hyper
    prototypes = [hyper.embeddings[t] for t in ("liver", "kidneys", "kidneys")]  # one per organ: 6, 2, 3
    jitter = hyper.embeddings["liver+kidneys"] - torch.stack(prototypes).mean(0)
    assert 0 < float(jitter.norm()) < 0.2 * float(prototypes[0].norm())  # the organs' mean plus a small jitter
    for t in ("liver", "spleen"):
        assert relative_l2(off.hyper.generate(t), hyper.generate(t)) < 1e-5
    composed_on, composed_off = hyper.generate("liver+kidneys"), off.hyper.generate("liver+kidneys")
    base_view = hyper.base_view("liver+kidneys")
    assert change_lost(base_view, composed_on, composed_off) > 1e-2  # of the composed task's own delta
    liver = hyper.generate("liver")
    trunk = [k for k in liver if not is_head(k)]
    assert relative_l2({k: composed_on[k] for k in trunk}, {k: liver[k] for k in trunk}) < 0.2
    with pytest.raises(ValueError, match="new_task_start"):
        AMRConfig(new_task_start="nearest")


def test_round_combines_changes_by_training_cases_and_weighs_a_new_source_by_ws(base):
    """W* = S + Σ c_i k_i (W_i − S): a, b continue (k = 1), c is new to the task (k = 1 − W_s)."""
    from nnunet_feddah.method.aggregate import Contribution

    amr = make_amr(base)
    amr.allocate("liver", [6])
    first = [Contribution(s, trained_like(amr.hyper, "liver", i, scale=1.0), n) for i, (s, n) in
             enumerate([("a", 1), ("b", 3)])]
    reports = amr.update_round({"liver": first}, round_index=1)["liver"]
    assert [r.case_weight for r in reports] == [0.25, 0.75] and reports[0].rebased
    sent = amr.hyper.generate("liver")
    uploads = {s: trained_like(amr.hyper, "liver", 10 + i) for i, s in enumerate("abc")}
    cases = {"a": 1, "b": 2, "c": 5}
    reports = amr.update_round({"liver": [Contribution(s, uploads[s], cases[s], 0.006) for s in "cba"]},
                               round_index=2)
    by_source = {r.source: r for r in reports["liver"]}
    assert [r.source for r in reports["liver"]] == ["c", "b", "a"]  # reports follow the order given
    assert by_source["a"].similarity is None and by_source["b"].similarity is None
    w_s = by_source["c"].similarity
    assert w_s == pytest.approx(1 / (1 + math.exp(1))) and by_source["c"].keep == pytest.approx(1 - w_s)
    assert (by_source["c"].ws_measure, by_source["c"].js_divergence) == ("predictive", 0.006)
    expected = {k: v.double() + sum(cases[s] / 8 * (1 - (w_s if s == "c" else 0)) * (uploads[s][k].double() - v.double())
                                    for s in "abc") for k, v in sent.items()}
    generated = amr.hyper.generate("liver")
    for k in ("encoder.stages.0.0.convs.0.conv.weight", "decoder.seg_layers.0.weight"):
        torch.testing.assert_close(generated[k].double(), expected[k], rtol=0, atol=1e-6)
    assert by_source["a"].update_lost < 1e-4 and by_source["a"].generator_lost > by_source["a"].update_lost


def test_compression_modes(base):
    """'active' compresses an idle task's residual (reported), 'never' keeps none, 'always' keeps every one."""
    sizes = {}
    for mode in ("active", "never", "always"):
        amr = AMR(DAHyper(base, is_head, DAHyperConfig(generators=True)), AMRConfig(exact_residuals=mode))
        amr.allocate("kidneys", [2, 3])
        amr.update("kidneys", trained_like(amr.hyper, "kidneys", 1, scale=1.0), round_index=1, source="a")
        amr.allocate("liver", [6])
        amr.update("liver", trained_like(amr.hyper, "liver", 2), round_index=2, source="a")
        sizes[mode] = (sorted(amr.hyper.residuals), [e["task"] for e in amr.compressed])
    assert sizes == {"active": (["liver"], ["kidneys"]), "never": ([], []), "always": (["kidneys", "liver"], [])}
    with pytest.raises(ValueError, match="exact_residuals"):
        AMRConfig(exact_residuals="sometimes")


def full_rank_change(weights: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Every tensor + a dense (full-rank) change of 5 % of its norm: nothing a rank-16 store holds exactly."""
    out = {}
    for name, w in weights.items():
        noise = torch.randn(w.shape, generator=generator)
        out[name] = w + 0.05 * max(float(w.norm()), 1e-2) * noise / noise.norm()
    return out


def fit_full_rank_tasks(amr: AMR, n: int, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """Allocate and fit ``n`` single-organ tasks one per round; each task's weights right after its fit."""
    g = torch.Generator().manual_seed(seed)
    reference = {}
    for i in range(n):
        key = f"t{i}"
        amr.allocate(key, [1 + i % 15])
        amr.update(key, full_rank_change(amr.hyper.generate(key), g), round_index=i, source="s")
        reference[key] = amr.hyper.generate(key)
    return reference


def test_code_grows_before_it_fills_and_growing_changes_no_output(base, tmp_path):
    """With a fixed code an old task moved by 37 % of its own delta at 33 tasks; the code now grows first."""
    config = DAHyperConfig(generators=True, code_dim=8, code_growth=4, code_headroom=2)
    amr = AMR(DAHyper(base, is_head, config), AMRConfig(exact_residuals="never"))
    reference = fit_full_rank_tasks(amr, 10, seed=0)
    assert amr.hyper.code_size == 12  # 10 tasks + 2 headroom: grown once from 8 by 4
    before = {t: amr.hyper.generate(t) for t in reference}
    amr.hyper.register("grows", [6])  # 11 + 2 > 12: grows to 16
    assert amr.hyper.code_size == 16
    for t, weights in before.items():
        for name, tensor in amr.hyper.generate(t).items():
            torch.testing.assert_close(tensor, weights[name], rtol=0, atol=1e-6)
    for t in list(reference)[1:]:  # t0's upload became the base: it has no delta of its own to measure against
        assert change_lost(amr.hyper.base_view(t), reference[t], amr.hyper.generate(t)) < 1e-3
    path = save_hypernet(tmp_path / "grown.safetensors", amr.hyper, FINGERPRINT)
    loaded = load_hypernet(path, FINGERPRINT)
    assert loaded.code_size == 16
    for t in amr.hyper.tasks:
        for name, tensor in amr.hyper.generate(t).items():
            assert torch.equal(loaded.generate(t)[name], tensor)


def test_capacity_limit_refuses_with_the_limit_named(base):
    hyper = DAHyper(base, is_head, DAHyperConfig(generators=True, code_dim=8, code_growth=8, code_headroom=2, max_code_dim=16))
    for i in range(14):
        hyper.register(f"t{i}", [1])
    with pytest.raises(CapacityError, match="max_code_dim=16"):
        hyper.register("one-too-many", [1])
    assert "one-too-many" not in hyper.tasks and "one-too-many" not in hyper.embeddings
    assert hyper.code_size == 16


@pytest.mark.slow
def test_64_tasks_with_full_rank_targets_keep_every_old_task_in_place(base):
    """Real-shaped (CPU plan) full-rank targets, no exact residuals: each old task moves ≤ 1e-3 of its delta."""
    amr = AMR(DAHyper(base, is_head, DAHyperConfig(generators=True)), AMRConfig(exact_residuals="never"))
    reference = fit_full_rank_tasks(amr, 64, seed=1)
    assert amr.hyper.code_size >= 64 + amr.hyper.config.code_headroom
    worst = max(change_lost(amr.hyper.base_view(t), reference[t], amr.hyper.generate(t)) for t in list(reference)[1:])
    assert worst < 1e-3, worst
