"""growkit.prune: backward elimination of grown branches, channel pruning with Torch-Pruning."""
from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp

import growkit
from growkit.core.cost import count_params
from growkit.prune import branch_scores
from growkit.train import evaluate

from .conftest import run_eval


@pytest.fixture(scope="module")
def grown(digits, trained):
    train_l, val_l = digits
    res = growkit.grow(trained, train_l, val_l, rounds=1, budget=growkit.Budget(params=1.6), seed=0, progress=False)
    assert len(growkit.plan_of(res.model).edits) >= 3
    return res.model


@pytest.mark.parametrize("criterion", ["contribution", "eta"])
def test_backward_elimination_removes_the_weakest_branch_each_step(criterion, digits, trained, grown):
    train_l, val_l = digits
    before = copy.deepcopy(grown.state_dict())
    n = len(growkit.plan_of(grown).edits)
    first = branch_scores(grown, val_l, criterion, 4, None, torch.device("cpu"))
    res = growkit.prune(grown, train_l, val_l, method="branches", criterion=criterion, seed=0, progress=False)
    assert all(torch.equal(v, grown.state_dict()[k]) for k, v in before.items())  # input untouched
    kinds = [e.kind for e in res.gallery]
    assert kinds == ["base"] + ["pruned"] * n  # no budget: down to the base model
    assert [len(e.plan.edits) for e in res.gallery] == list(range(n, -1, -1))
    assert res.history[0]["removed"] == min(first, key=lambda k: (first[k], k))
    x = next(iter(val_l))[0]
    for h, e in zip(res.history, res.gallery.entries[1:]):
        # the removed branch scored lowest in its step, and is gone from the plan
        assert h["removed"] == min(h["scores"], key=lambda k: (h["scores"][k], k))
        assert h["removed"] not in {ed.key for ed in e.plan.edits}
        # each pruned model is a growkit model: its plan replays on the base with its weights
        m = growkit.apply_plan(trained, e.plan)
        m.load_state_dict(e.state)
        assert count_params(m) == e.cost.params
        assert evaluate(m, val_l)["accuracy"] == pytest.approx(1 - e.val_error)
        assert torch.equal(run_eval(res.model_of(e), x), run_eval(m, x))
    assert res.gallery[-1].cost.params == count_params(trained)
    assert res.best.val_error == min(e.val_error for e in res.gallery)
    assert "branches pruning" in res.report()


def test_branch_pruning_stops_within_budget(digits, trained, grown):
    train_l, val_l = digits
    base_params = count_params(trained)
    budget = growkit.Budget(params=1.15)  # relative to the ungrown base model
    res = growkit.prune(grown, train_l, val_l, method="branches", budget=budget, seed=0, progress=False)
    within = [e for e in res.gallery if e.cost.params <= 1.15 * base_params]
    assert within and res.gallery[-1] is within[0]  # stopped at the first model within budget
    assert all(e.cost.params > 1.15 * base_params for e in res.gallery.entries[:-1])
    assert count_params(res.model) <= 1.15 * base_params
    assert growkit.plan_of(res.model) is not None  # still a growkit model: save / load work


@pytest.mark.parametrize("importance", ["l1", "bn_scale"])
def test_channel_pruning_meets_budget_and_rebuilds(importance, digits, trained):
    train_l, val_l = digits
    base_params = count_params(trained)
    res = growkit.prune(trained, train_l, val_l, method="channels", importance=importance, budget=0.6, steps=4,
                        max_ratio=0.6, seed=0, progress=False)
    assert res.gallery[0].kind == "base" and all(e.kind == "pruned" for e in res.gallery.entries[1:])
    params = [e.cost.params for e in res.gallery]
    assert params == sorted(params, reverse=True) and len(set(params)) == len(params)
    assert params[-1] <= 0.6 * base_params < params[-2]  # stopped at the first step within budget
    assert count_params(res.model) <= 0.6 * base_params
    assert res.model.head.out_features == 10  # the classifier keeps its classes
    x = next(iter(val_l))[0]
    for e in res.gallery.entries[1:]:
        m = res.model_of(e)  # replays Torch-Pruning's history on the unpruned model, loads weights
        assert count_params(m) == e.cost.params
        assert evaluate(m, val_l)["accuracy"] == pytest.approx(1 - e.val_error)
    assert torch.equal(run_eval(res.model_of(res.best), x), run_eval(res.model, x))
    assert [h["ratio"] for h in res.history] == pytest.approx([0.15 * i for i in range(1, len(res.history) + 1)])


def test_channel_pruning_matches_torch_pruning_used_directly(digits, trained):
    train_l, val_l = digits
    res = growkit.prune(trained, train_l, val_l, method="channels", steps=3, max_ratio=0.6, finetune_epochs=0,
                        progress=False)
    direct = copy.deepcopy(trained)
    x = next(iter(val_l))[0]
    pruner = tp.pruner.BasePruner(direct, x[:1], importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.6,
                                  iterative_steps=3, ignored_layers=[direct.head])
    for e in res.gallery.entries[1:]:
        pruner.step()
        assert count_params(direct) == e.cost.params
        assert torch.equal(run_eval(res.model_of(e), x), run_eval(direct, x))


def test_channel_pruning_of_a_grown_model(digits, grown, tmp_path):
    train_l, val_l = digits
    res = growkit.prune(grown, train_l, val_l, method="channels", budget=0.8, steps=3, max_ratio=0.5, seed=0,
                        progress=False)
    assert count_params(res.model) <= 0.8 * count_params(grown)
    assert len(res.model.growkit_branches) == len(growkit.plan_of(grown).edits)  # branches pruned, not removed
    x = next(iter(val_l))[0]
    assert run_eval(res.model, x).shape == (x.shape[0], 10)
    # a channel-pruned model no longer fits its growth plan: save refuses it instead of writing a bad file
    with pytest.raises(growkit.InputError):
        growkit.save(res.model, tmp_path / "p")


def test_pruned_models_join_the_grow_gallery(digits, trained):
    train_l, val_l = digits
    res = growkit.grow(trained, train_l, val_l, rounds=1, budget=growkit.Budget(params=1.6), seed=1, progress=False)
    if not growkit.plan_of(res.model).edits:
        pytest.skip("grow kept the base model")
    n, best_id = len(res.gallery), res.best.id  # res.best is the gallery's best: pruning may change it
    pr = growkit.prune(res.model, train_l, val_l, method="branches", gallery=res.gallery, steps=2, progress=False)
    assert pr.gallery is res.gallery and len(res.gallery) == n + 2
    assert pr.base.id == best_id  # found in the gallery by plan and weights, not added again
    assert [e.kind for e in res.gallery][n:] == ["pruned", "pruned"]
    assert res.gallery[n].parent == best_id and res.gallery[n + 1].parent == n
    assert {e.kind for e in res.gallery.hull()} <= {"base", "grown", "pruned"}
    x = next(iter(val_l))[0]
    for e in res.gallery:  # every entry, grown or pruned, rebuilds from the same base
        m = pr.model_of(e)
        assert count_params(m) == e.cost.params
    assert torch.equal(run_eval(pr.model_of(best_id), x), run_eval(res.model, x))


def test_prune_rejects_bad_input(digits, trained, grown):
    train_l, val_l = digits
    with pytest.raises(growkit.InputError, match="unknown pruning method"):
        growkit.prune(grown, train_l, method="nope")
    with pytest.raises(growkit.InputError, match="has none"):
        growkit.prune(trained, train_l, method="branches")
    with pytest.raises(growkit.InputError, match="fraction"):
        growkit.prune(trained, train_l, val_l, method="channels", budget=1.5)
    with pytest.raises(growkit.InputError, match="relative Budget"):
        growkit.prune(trained, train_l, val_l, method="channels", budget=growkit.Budget(params=1.2))
    with pytest.raises(growkit.InputError, match="importance"):
        growkit.prune(trained, train_l, method="channels", importance="taylor")
    with pytest.raises(growkit.InputError, match="ignored_layers"):
        growkit.prune(trained, train_l, val_l, method="channels", ignored_layers=["nope"], budget=0.5)
