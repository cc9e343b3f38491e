"""Quantised idle remainders: packing, error, bytes, and the round trip through DAHyper and its checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from nnunet_feddah.method.amr import AMR, AMRConfig
from nnunet_feddah.method.dahyper import DAHyper, DAHyperConfig
from nnunet_feddah.method.hypernet_file import load_hypernet, save_hypernet
from nnunet_feddah.method.quantize import BITS, CLIP_FRACTIONS, quantize
from nnunet_feddah.nnunet.network import hypernet_base, is_head
from nnunet_feddah.paths import bundled_plans_dir


def _kernel(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 8, 3, 3, 3, generator=g) * torch.rand(16, 1, 1, 1, 1, generator=g)  # channels differ


@pytest.mark.parametrize("bits", BITS)
def test_levels_round_trip_and_bytes_are_packed(bits):
    x = _kernel()
    q = quantize(x, bits)
    assert q.codes.dtype == torch.uint8 and q.codes.numel() == -(-x.numel() * bits // 8)
    assert q.nbytes == q.codes.numel() + 4 * 16
    y = q.dequantize()
    assert y.shape == x.shape
    # every value is an integer level of its channel's scale, within ±q
    levels = y.reshape(16, -1) / q.scale[:, None]
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert levels.abs().max() <= 2 ** (bits - 1) - 1 + 1e-4


def test_error_falls_with_bits_and_the_clip_search_helps():
    x = _kernel(1)
    errors = [float((quantize(x, b).dequantize() - x).norm() / x.norm()) for b in BITS]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.01 and errors[1] < 0.15
    # a plain max-scaled 2-bit quantiser, for comparison: the searched clip must beat it
    rows = x.reshape(16, -1)
    scale = rows.abs().amax(dim=1, keepdim=True)
    plain = (torch.clamp(torch.round(rows / scale), -1, 1) * scale - rows).norm() / rows.norm()
    assert errors[0] < 0.8 * float(plain) and CLIP_FRACTIONS[0] == 1.0


def test_zero_rows_and_vectors():
    assert torch.equal(quantize(torch.zeros(3, 4), 2).dequantize(), torch.zeros(3, 4))
    v = torch.tensor([0.5, -0.25, 0.0, 1.0])
    assert torch.allclose(quantize(v, 8).dequantize(), v, atol=1.0 / 127)
    with pytest.raises(ValueError, match="bits in"):
        quantize(v, 3)


@pytest.fixture(scope="module")
def base() -> dict:
    return hypernet_base(json.loads((bundled_plans_dir() / "template_cpu.json").read_text()))


def _change(weights: dict, seed: int, scale: float = 0.05) -> dict:
    """A dense change of ``scale`` of every tensor's norm: the rank-r generators hold only part of it."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in weights.items():
        noise = torch.randn(w.shape, generator=g)
        out[name] = w + scale * max(float(w.norm()), 1e-2) * noise / noise.norm()
    return out


def _two_tasks(base, bits: int) -> tuple[AMR, dict]:
    """kidneys fitted (it becomes the base), liver fitted, then a round without liver: liver goes idle."""
    amr = AMR(DAHyper(base, is_head, DAHyperConfig(generators=True, rank=4)), AMRConfig(idle_bits=bits))
    amr.allocate("kidneys", [2, 3])
    amr.update("kidneys", _change(amr.hyper.generate("kidneys"), 0, 1.0), round_index=1, source="a")
    amr.allocate("liver", [6])
    liver = _change(amr.hyper.generate("liver"), 1)
    amr.update("liver", liver, round_index=2, source="a")
    amr.update("kidneys", _change(amr.hyper.generate("kidneys"), 2), round_index=3, source="a")
    return amr, liver


def test_idle_task_keeps_its_remainder_in_few_bits(base, tmp_path):
    exact = {}
    for bits in (0, 2, 4, 8):
        amr, liver = _two_tasks(base, bits)
        event, = amr.compressed
        assert event["task"] == "liver" and event["bits"] == bits and "liver" not in amr.hyper.residuals
        assert ("liver" in amr.hyper.idle) == bool(bits)
        exact[bits] = (event["lost_of_delta"], amr.hyper.nbytes())
        # what is lost is what the report says: the idle weights against the exact upload
        base_view = amr.hyper.base_view("liver")
        now = amr.hyper.generate("liver")
        lost = sum(float((now[k] - liver[k]).double().pow(2).sum()) for k in liver) ** 0.5
        delta = sum(float((liver[k] - base_view[k]).double().pow(2).sum()) for k in liver) ** 0.5
        assert lost / delta == pytest.approx(event["lost_of_delta"], rel=1e-3, abs=1e-6)
    assert exact[0][0] > 0.5 > exact[2][0] > exact[4][0] > exact[8][0] and exact[8][0] < 0.01
    assert exact[0][1] < exact[2][1] < exact[4][1] < exact[8][1]  # memory pays for it
    amr, _ = _two_tasks(base, 4)
    path = save_hypernet(tmp_path / "idle.safetensors", amr.hyper, "sha256:test")
    loaded = load_hypernet(path, "sha256:test")
    assert loaded.nbytes() == amr.hyper.nbytes()
    for task in amr.hyper.tasks:
        assert all(torch.equal(loaded.generate(task)[k], v) for k, v in amr.hyper.generate(task).items())


def test_an_idle_task_trained_again_gets_its_exact_residual_back(base):
    amr, _ = _two_tasks(base, 4)
    sent = amr.hyper.generate("liver")
    again = _change(sent, 5)
    report = amr.update("liver", again, round_index=4, source="a")
    assert "liver" in amr.hyper.residuals and "liver" not in amr.hyper.idle
    assert report.update_lost < 1e-5  # the round's change on top of the quantised start reaches the next round whole
    with pytest.raises(ValueError, match="idle_bits"):
        AMRConfig(idle_bits=3)


def test_without_generators_every_task_is_the_base_plus_its_own_remainder(base, tmp_path):
    """The plain store: nothing shared is fitted, so an old task is not touched by later ones at all, and
    the server holds the base, the active tasks' exact deltas and the idle ones' quantised deltas."""
    amr = AMR(DAHyper(base, is_head, DAHyperConfig(generators=False)), AMRConfig(idle_bits=4))
    assert amr.hyper.params == {} and amr.hyper.code_size == 0
    uploads, liver_idle_later = {}, {}
    for i, task in enumerate(["kidneys", "liver", "spleen", "pancreas"]):
        amr.allocate(task, [[2, 3], [6], [1], [10]][i], round_index=i)
        uploads[task] = _change(amr.hyper.generate(task), i, 1.0 if i == 0 else 0.05)
        amr.update(task, uploads[task], round_index=i, source="a")
        exact = amr.hyper.generate(task)
        assert all(torch.equal(exact[k], uploads[task][k]) or (exact[k] - uploads[task][k]).abs().max() < 1e-6
                   for k in exact)
        if i == 2:  # liver went idle in this round: what it generates stays put from now on
            liver_idle_later = amr.hyper.generate("liver")
    assert sorted(amr.hyper.idle) == ["kidneys", "liver", "spleen"] and list(amr.hyper.residuals) == ["pancreas"]
    assert all(torch.equal(amr.hyper.generate("liver")[k], v) for k, v in liver_idle_later.items())
    model = sum(v.numel() * 4 for v in uploads["pancreas"].values())
    base_bytes = sum(v.numel() * 4 for v in base.values())
    assert amr.hyper.nbytes() < base_bytes + model + 3 * model / 6  # three idle tasks at ~4 bits of 32
    path = save_hypernet(tmp_path / "store.safetensors", amr.hyper, "sha256:test")
    loaded = load_hypernet(path, "sha256:test")
    for task in amr.hyper.tasks:
        assert all(torch.equal(loaded.generate(task)[k], v) for k, v in amr.hyper.generate(task).items())
    with pytest.raises(ValueError, match="generators"):
        AMR(DAHyper(base, is_head, DAHyperConfig(generators=False)), AMRConfig(new_task_start="composed"))


def test_a_hundred_tasks_leave_every_idle_task_where_it_went_idle():
    """Nothing shared is refitted, so registering and training 100 tasks moves no idle task at all (the
    target was ≤ 1e-3 of its delta), and each keeps its upload within the 4-bit error of its own delta.
    A small network (a kernel, its norm, a 16-slot head) keeps this to seconds; the CPU plan's shapes run
    the same stream in ``scripts/bench_server.py --plans cpu-store --tasks 100``."""
    g = torch.Generator().manual_seed(3)
    small = {"enc.conv.weight": torch.randn(16, 8, 3, 3, 3, generator=g), "enc.norm.weight": torch.ones(16),
             "seg.weight": torch.randn(16, 16, 1, 1, 1, generator=g), "seg.bias": torch.zeros(16)}
    amr = AMR(DAHyper(small, lambda name: name.startswith("seg."), DAHyperConfig(generators=False)),
              AMRConfig(idle_bits=4))
    uploads, when_idle = {}, {}
    previous = None
    for t in range(100):
        key = f"t{t:03d}"
        amr.allocate(key, [1 + t % 15], round_index=t)
        uploads[key] = _change(amr.hyper.generate(key), 100 + t)
        amr.update(key, uploads[key], round_index=t, source=f"site{t % 4}")
        if previous is not None:
            assert [e["task"] for e in amr.compressed] == [previous]
            when_idle[previous] = amr.hyper.generate(previous)
        previous = key
    assert len(amr.hyper.idle) == 99 and list(amr.hyper.residuals) == ["t099"]
    for key, weights in when_idle.items():
        now = amr.hyper.generate(key)
        assert all(torch.equal(now[k], v) for k, v in weights.items()), key
        view = amr.hyper.base_view(key)
        lost = sum(float((now[k] - uploads[key][k]).double().pow(2).sum()) for k in now) ** 0.5
        delta = sum(float((uploads[key][k] - view[k]).double().pow(2).sum()) for k in now) ** 0.5
        assert lost <= 0.15 * delta, key


def test_files_written_before_the_store_load_as_they_were(base, tmp_path):
    """A DAHyper checkpoint from before 2026-12-07 has no ``generators`` field (it had generators), and its AMR
    settings name the removed solver and no ``idle_bits`` (an idle residual was dropped): it must come back so."""
    from nnunet_feddah.method.feddah import FedDAHStrategy
    from nnunet_feddah.method.hypernet_file import FORMAT
    from nnunet_feddah.tensor_file import write_tensors

    amr, _ = _two_tasks(base, 0)
    tensors, info = amr.hyper.state()
    del info["config"]["generators"], info["idle_bits"]
    info["extra"] = {"strategy": "feddah", "amr": {"beta": 1.0, "solver": "closed_form", "adam_steps": 100}}
    path = write_tensors(tmp_path / "old.safetensors", tensors,
                         {"format": FORMAT, "architecture_fingerprint": "sha256:test", "info": json.dumps(info)})
    loaded = FedDAHStrategy.load(path, "sha256:test", is_head)
    assert loaded.hyper.config.generators and loaded.amr.config.idle_bits == 0
    for task in amr.hyper.tasks:
        assert all(torch.equal(loaded.hyper.generate(task)[k], v) for k, v in amr.hyper.generate(task).items())
