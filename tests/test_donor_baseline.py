"""``fedavg-per-task-donor``: per-task FedAvg that starts a new task where FedDAH's allocation does.

Pure torch on a tiny fake network (a low-rank kernel, dense vectors, an organ-keyed head): milliseconds.
"""

from __future__ import annotations

import copy

import pytest
import torch

from nnunet_feddah.federation.plan_reader import parse_plan
from nnunet_feddah.method.aggregate import relative_l2
from nnunet_feddah.method.donor import FittedTask, choose_donor, donor_start
from nnunet_feddah.method.fedavg import DonorPerTaskFedAvgStrategy, PerTaskFedAvgStrategy
from nnunet_feddah.method.feddah import FedDAHStrategy
from nnunet_feddah.method.registry import STRATEGIES, load_strategy, make_strategy, saved_strategy_name
from nnunet_feddah.method.strategy import Upload, task_slots

SLOTS = 6  # background + organs 1..5
HYPER = {"embedding_dim": 8, "code_dim": 8, "rank": 2, "organ_embedding_dim": 4, "num_organ_slots": SLOTS}
FINGERPRINT = "sha256:fake"
HEAD = "seg.weight"


def is_head(name: str) -> bool:
    return name.startswith("seg.")


@pytest.fixture
def base() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"enc.conv.weight": torch.randn(8, 4, 3, 3, generator=g),  # low-rank unit in DAHyper
            "enc.conv.bias": torch.randn(8, generator=g),
            "enc.norm.weight": 1 + 0.1 * torch.randn(8, generator=g),
            HEAD: torch.randn(SLOTS, 8, 1, 1, 1, generator=g),
            "seg.bias": torch.randn(SLOTS, generator=g)}


def trained(weights: dict[str, torch.Tensor], seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """``weights`` plus a rank-1 change per matrix-like tensor and noise on vectors (what a site returns)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in weights.items():
        if w.ndim >= 2 and w.shape[0] > 1:
            change = torch.randn(w.shape[0], 1, generator=g) @ torch.randn(1, w[0].numel(), generator=g)
            out[name] = w + scale * change.reshape(w.shape)
        else:
            out[name] = w + scale * torch.randn(w.shape, generator=g)
    return out


def pair(base, **feddah_params):
    feddah = FedDAHStrategy.create(base, is_head, {**HYPER, **feddah_params})
    donor = DonorPerTaskFedAvgStrategy.create(base, is_head, {})
    return feddah, donor


def step(strategies, round_index: int, jobs: list[tuple[str, str, list[int], int]]) -> None:
    """One round: every (site, task, organs, seed) job gets its weights from FedDAH, trains, and the same
    upload goes to every strategy (so both see exactly the same data)."""
    feddah = strategies[0]
    uploads = []
    for site, task, organs, seed in jobs:
        sent = [s.weights_for(site, task, organs, round_index) for s in strategies]
        uploads.append(Upload(site, task, organs, trained(sent[0], seed), num_training_cases=1))
    for s in strategies:
        s.update(copy.deepcopy(uploads), round_index)
    assert feddah.tasks()  # FedDAH accepted them


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_registered_and_accepted_by_the_plan(base):
    assert "fedavg-per-task-donor" in STRATEGIES
    plan = {"name": "t", "plans_identifier": "P", "sites": [{"name": "a", "dataset": 501, "stream": ["kidneys"]}],
            "rounds_per_step": 1, "local": {"epochs": 1, "iterations_per_epoch": 1},
            "strategy": {"name": "fedavg-per-task-donor"}}
    assert parse_plan(plan).strategy.name == "fedavg-per-task-donor"
    assert isinstance(make_strategy("fedavg-per-task-donor", {}, base, is_head), DonorPerTaskFedAvgStrategy)
    with pytest.raises(ValueError, match="strategy.params"):
        make_strategy("fedavg-per-task-donor", {"beta": 1}, base, is_head)


def test_a_task_without_fitted_donor_starts_from_the_base(base):
    feddah, donor = pair(base)
    plain = PerTaskFedAvgStrategy.create(base, is_head, {})
    expected = {k: (v[task_slots([1, 2])] if is_head(k) else v) for k, v in base.items()}
    for s in (feddah, donor, plain):
        assert_bit_identical(s.weights_for("s1", "A", [1, 2], 1), expected)
    # a second task asked in the same round, before anything was fitted, starts from the base too
    assert_bit_identical(donor.weights_for("s2", "B", [2, 4], 1),
                         {k: (v[task_slots([2, 4])] if is_head(k) else v) for k, v in base.items()})
    assert donor.donors == {"A": None, "B": None}


def test_new_task_starts_bit_identical_to_feddahs_allocation(base):
    """After one upload FedDAH holds task A exactly (the first upload becomes its base, G stays zero), so its
    allocation of B and the baseline's start of B are computed from identical donor weights."""
    feddah, donor = pair(base)
    step((feddah, donor), 1, [("s1", "A", [1, 2], 11)])
    assert_bit_identical(feddah.task_weights("A"), donor.task_weights("A"))
    ours, theirs = donor.weights_for("s1", "B", [2, 4], 2), feddah.weights_for("s1", "B", [2, 4], 2)
    assert_bit_identical(ours, theirs)
    a = donor.task_weights("A")
    assert torch.equal(ours[HEAD][0], a[HEAD][0]) and torch.equal(ours[HEAD][1], a[HEAD][2])  # bg, organ 2 of A
    assert torch.equal(ours[HEAD][2], base[HEAD][4])  # organ 4: nobody learned it
    assert torch.equal(ours["enc.conv.weight"], a["enc.conv.weight"])
    plain = PerTaskFedAvgStrategy.create(base, is_head, {})
    plain.update([Upload("s1", "A", [1, 2], a)], 1)
    assert torch.equal(plain.weights_for("s1", "B", [2, 4], 2)["enc.conv.weight"], base["enc.conv.weight"])
    assert donor.donors["B"] == "A"


def _three_tasks(base, **feddah_params):
    """A [1,2] fitted in rounds 1-2, C [3] in round 3; then B [2,3,5] shares one organ with each (tie in
    organs: the more recently fitted C donates, organ 2 comes from A, organ 5 from the base)."""
    feddah, donor = pair(base, **feddah_params)
    step((feddah, donor), 1, [("s1", "A", [1, 2], 1)])
    step((feddah, donor), 2, [("s1", "A", [1, 2], 2)])
    step((feddah, donor), 3, [("s2", "C", [3], 3)])
    return feddah, donor


def test_shared_rule_gives_identical_starts_for_identical_donor_weights(base):
    """FedDAH's generated weights reproduce its fit targets only to solver precision, so the end-to-end
    comparison below needs a tolerance; with the same donor weights the two allocations are bit-identical."""
    feddah, donor = _three_tasks(base)
    for task in ("A", "C"):  # give the baseline exactly the weights FedDAH holds for the fitted tasks
        model = donor.store.models[donor.model_name("", task)]
        for name, tensor in feddah.task_weights(task).items():
            if is_head(name):
                model[name][task_slots(donor.organs_by_task[task])] = tensor
            else:
                model[name] = tensor.clone()
    a, c = feddah.task_weights("A"), feddah.task_weights("C")  # before B's fit nudges them (β·L_R is soft)
    targets = []
    fit = feddah.amr._fit_allocation
    feddah.amr._fit_allocation = lambda key, target, start: targets.append(target) or fit(key, target, start)
    feddah.weights_for("s3", "B", [2, 3, 5], 4)
    ours = donor.weights_for("s3", "B", [2, 3, 5], 4)
    assert_bit_identical(ours, targets[0])
    assert donor.donors["B"] == "C"
    assert torch.equal(ours[HEAD][0], c[HEAD][0]) and torch.equal(ours["enc.conv.weight"], c["enc.conv.weight"])
    assert torch.equal(ours[HEAD][1], a[HEAD][2])  # organ 2: A's row
    assert torch.equal(ours[HEAD][2], c[HEAD][1])  # organ 3: the donor's row
    assert torch.equal(ours[HEAD][3], base[HEAD][5])  # organ 5: the base's row


@pytest.mark.parametrize(("params", "tolerance"), [({"exact_residuals": "always"}, 1e-6),  # exact store
                                                    ({}, 2e-2)])  # A went idle in round 3: held in 4 bits
def test_end_to_end_start_matches_feddah_within_its_fidelity(base, params, tolerance):
    feddah, donor = _three_tasks(base, **params)
    for task in ("A", "C"):
        assert relative_l2(feddah.task_weights(task), donor.task_weights(task)) < tolerance
    ours, theirs = donor.weights_for("s3", "B", [2, 3, 5], 4), feddah.weights_for("s3", "B", [2, 3, 5], 4)
    assert donor.donors["B"] == "C"
    assert relative_l2(theirs, ours) < tolerance
    assert torch.equal(ours["enc.conv.weight"], donor.task_weights("C")["enc.conv.weight"])


def test_choose_donor_ties():
    fitted = [FittedTask("A", (1, 2), 2), FittedTask("C", (3,), 3), FittedTask("D", (4,), 3)]
    assert choose_donor([2, 3], fitted).key == "C"  # organ tie: most recent round
    assert choose_donor([3, 4], fitted).key == "C"  # organ and round tie: first registered
    assert choose_donor([1, 2, 4], fitted).key == "A"  # organs first
    assert choose_donor([1], []) is None
    assert donor_start([1], [], lambda k: {}, {}, []) is None


def test_state_round_trips(base, tmp_path):
    _, donor = _three_tasks(base)
    donor.weights_for("s3", "B", [2, 3, 5], 4)
    path = donor.save(tmp_path / "strategy.safetensors", FINGERPRINT)
    assert saved_strategy_name(path) == "fedavg-per-task-donor"
    loaded = load_strategy(path, FINGERPRINT, is_head)
    assert isinstance(loaded, DonorPerTaskFedAvgStrategy)
    (t1, i1), (t2, i2) = donor.state(), loaded.state()
    assert i1 == i2 and i1["donors"] == {"A": None, "C": "A", "B": "C"} and i1["last_round"] == {"A": 2, "C": 3}
    assert_bit_identical(t1, t2)
    # the loaded strategy goes on exactly like the original: another new task picks the same donor and rows
    upload = Upload("s3", "B", [2, 3, 5], trained(donor.weights_for("s3", "B", [2, 3, 5], 4), 9))
    assert_bit_identical(loaded.weights_for("s3", "B", [2, 3, 5], 4), donor.weights_for("s3", "B", [2, 3, 5], 4))
    for s in (donor, loaded):
        s.update([copy.deepcopy(upload)], 4)
    assert_bit_identical(donor.weights_for("s1", "E", [5, 1], 5), loaded.weights_for("s1", "E", [5, 1], 5))
    assert loaded.donors["E"] == donor.donors["E"] == "B"
