"""growkit.grow end to end on a tiny model and real (bundled) data; save/load; CLI."""
from __future__ import annotations

import copy
import logging

import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

import growkit
from growkit.data import digits_dataset, split
from growkit.core.cost import count_params
from growkit.train import evaluate

from .conftest import run_eval


def test_grow_end_to_end(digits, trained):
    train_l, val_l = digits
    before = copy.deepcopy(trained.state_dict())
    budget = growkit.Budget(params=1.6)
    res = growkit.grow(trained, train_l, val_l, rounds=2, budget=budget, seed=0, progress=False)
    # the user's model is untouched
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in before.items())
    kinds = [e.kind for e in res.gallery]
    assert kinds[0] == "base" and kinds.count("grown") >= 1
    base = res.gallery[0]
    assert base.cost.params == count_params(trained)
    for e in res.gallery:
        if e.kind != "grown":
            continue
        m = growkit.apply_plan(trained, e.plan)
        added = sum(count_params(b) for b in m.growkit_branches.values())
        assert e.cost.params == base.cost.params + added
        assert e.cost.params <= 1.6 * base.cost.params
        assert e.cost.flops > base.cost.flops
    best = res.best
    # res.model is the best entry within budget: its plan replayed on the base with its weights
    within = [e for e in res.gallery if e.cost.params <= 1.6 * base.cost.params]
    assert best.val_error == min(e.val_error for e in within)
    assert res.plan.to_dict() == growkit.plan_of(res.model).to_dict() == best.plan.to_dict()
    sd = res.model.state_dict()
    assert sd.keys() == best.state.keys() and all(torch.equal(sd[k].cpu(), v) for k, v in best.state.items())
    ref = growkit.apply_plan(trained, best.plan)
    ref.load_state_dict(best.state)
    x = next(iter(val_l))[0]
    assert torch.equal(run_eval(res.model, x), run_eval(ref, x))
    assert evaluate(res.model, val_l)["accuracy"] == pytest.approx(1 - best.val_error)
    assert "base: val acc" in res.report() and "| id |" in res.report()
    # the hull: by increasing cost and strictly decreasing error, and no entry beats a hull point
    # at the same or lower cost
    hull = res.gallery.hull()
    assert hull[0].cost.params == min(e.cost.params for e in res.gallery)
    assert all(a.cost.params < b.cost.params and a.val_error > b.val_error for a, b in zip(hull, hull[1:]))
    for h in hull:
        assert not any(e.cost.params <= h.cost.params and e.val_error < h.val_error for e in res.gallery), h.id
    assert [h["round"] for h in res.history if "round" in h] == [1, 2]


@pytest.mark.slow  # two full grow() runs; same-seed reproducibility stays in the default run (test_resume.py)
def test_grow_reproducible_with_seed(trained):
    ds = digits_dataset(16)
    tr, va = split(ds, [320, 160], seed=0)
    kw = dict(rounds=1, seed=3, progress=False)
    # Loaders without their own generator draw shuffles from torch's global RNG, which seed= sets.
    a = growkit.grow(trained, DataLoader(tr, 32, shuffle=True), DataLoader(va, 64), **kw)
    b = growkit.grow(trained, DataLoader(tr, 32, shuffle=True), DataLoader(va, 64), **kw)
    assert a.plan.to_dict() == b.plan.to_dict()
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow  # five seeded grow() runs; random selection within budget stays in the default run through the Grower (test_stream)
def test_random_selection_grows_the_costed_edges_within_budget(digits, trained):
    # The random ablation once costed one random draw and grew another, so its children could
    # break the budget (and were then silently dropped for the base).
    train_l, val_l = digits
    base = count_params(trained)
    ops = ("identity", "sep_conv_3x3", "sep_conv_5x5", "max_pool_3x3")
    for seed in range(5):
        res = growkit.grow(trained, train_l, val_l, rounds=1, selection="random", budget=growkit.Budget(params=1.15),
                           seed=seed, progress=False, finetune_epochs=0, ops=ops)
        grown = [e for e in res.gallery if e.kind == "grown"]
        assert grown, f"seed {seed}: nothing grown"
        for e in grown:
            assert e.cost.params <= 1.15 * base, (seed, e.cost.params, base)
            m = growkit.apply_plan(trained, e.plan)
            assert e.cost.params == base + sum(count_params(b) for b in m.growkit_branches.values())


def test_budget_nothing_fits_returns_base(digits, trained, caplog):
    train_l, val_l = digits
    with caplog.at_level(logging.WARNING, logger="growkit"):
        res = growkit.grow(trained, train_l, val_l, rounds=1, budget=growkit.Budget(params=1.0001), progress=False)
    assert len(res.plan.edits) == 0
    assert [e.kind for e in res.gallery] == ["base"]
    assert "budget" in caplog.text


def test_save_load_round_trip(tmp_path, digits, trained):
    train_l, val_l = digits
    res = growkit.grow(trained, train_l, val_l, rounds=1, progress=False, seed=0)
    growkit.save(res, tmp_path / "g")
    assert {p.name for p in (tmp_path / "g").iterdir()} >= {"plan.json", "weights.safetensors", "gallery.json"}
    loaded = growkit.load(tmp_path / "g", base_model=trained)
    x = next(iter(val_l))[0]
    assert torch.equal(run_eval(loaded, x), run_eval(res.model, x))


def test_load_recreates_timm_base_from_plan(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10, in_chans=1)
    x = torch.randn(2, 1, 16, 16)
    cm = growkit.inject(model, x[:1], ops=("identity",))
    grown = growkit.finalize(cm)
    with torch.no_grad():
        for b in grown.growkit_branches.values():
            b.eta.fill_(0.5)
    growkit.save(grown, tmp_path / "m")
    loaded = growkit.load(tmp_path / "m")  # base re-created from "timm:resnet10t" + kwargs
    assert growkit.plan_of(loaded).base["source"] == "timm:resnet10t"
    assert torch.equal(run_eval(loaded, x), run_eval(grown, x))


def test_dict_batches_and_bad_inputs(digits, trained):
    train_l, val_l = digits
    x, y = next(iter(train_l))
    dict_loader = [{"image": x, "label": y}]
    res = growkit.grow(trained, dict_loader, dict_loader, rounds=1, progress=False)
    assert res.gallery[0].kind == "base"
    with pytest.raises(growkit.InputError, match="no batches"):
        growkit.grow(trained, DataLoader(TensorDataset(torch.zeros(0, 1, 16, 16), torch.zeros(0).long())), rounds=1)
    with pytest.raises(growkit.InputError, match="torch.Tensor"):
        growkit.grow(trained, [([1, 2], [0, 1])], rounds=1)
    with pytest.raises(growkit.InputError, match="do not match the loader"):
        growkit.grow(trained, train_l, val_l, example_input=torch.randn(1, 1, 8, 8), rounds=1)
    with pytest.raises(growkit.InputError, match="unknown method"):
        growkit.grow(trained, train_l, method="nope")
    with pytest.raises(growkit.BudgetError):
        growkit.Budget(params=0.5)
    with pytest.raises(growkit.BudgetError):
        growkit.Budget.parse("widgets=2")


def test_nan_loss_stops_round_and_keeps_last_good(digits, trained, caplog):
    train_l, val_l = digits
    calls = {"n": 0}

    def loss_fn(out, y):
        calls["n"] += 1
        loss = torch.nn.functional.cross_entropy(out, y)
        return loss * float("nan") if calls["n"] > 3 and torch.is_grad_enabled() else loss

    before = copy.deepcopy(trained.state_dict())
    with caplog.at_level(logging.WARNING, logger="growkit"):
        res = growkit.grow(trained, train_l, val_l, rounds=1, loss_fn=loss_fn, progress=False)
    assert "stopped" in res.history[0]["note"] and "nan" in res.history[0]["note"]
    assert [e.kind for e in res.gallery] == ["base"]
    assert "rolled back to the last good model" in caplog.text
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in before.items())


@pytest.mark.slow  # CLI end to end: base training + grow + report
def test_cli_grow_and_report(tmp_path, capsys):
    from growkit.cli import main

    out = tmp_path / "run"
    rc = main(["grow", "--model", "tests.conftest:TinyResNet", "--data", "digits", "--out", str(out),
               "--base-epochs", "1", "--rounds", "1", "--budget", "params=2.0", "--num-classes", "10",
               "--ops", "mb_conv_3x3,identity"])
    assert rc == 0
    assert (out / "plan.json").is_file() and (out / "gallery.png").is_file()
    ops = {e.op for ed in growkit.GrowthPlan.load(out / "plan.json").edits for e in ed.edges}
    assert ops and ops <= {"mb_conv_3x3", "identity"}
    assert main(["report", str(out)]) == 0
    assert "| id |" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_exploding_eta_rolls_back(digits, trained):
    train_l, val_l = digits
    res = growkit.grow(trained, train_l, val_l, rounds=1, max_eta=1e-6, seed=0, progress=False)
    assert "eta" in res.history[0]["note"] and "rolled back" in res.history[0]["note"]
    assert [e.kind for e in res.gallery] == ["base"]
    x = next(iter(val_l))[0]
    assert torch.equal(run_eval(res.model, x), run_eval(trained, x))  # the last good model: the base


def test_out_of_memory_names_the_candidates(digits, trained):
    train_l, val_l = digits
    calls = {"n": 0}

    def loss_fn(out, y):
        calls["n"] += 1
        if calls["n"] > 1 and torch.is_grad_enabled():
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return torch.nn.functional.cross_entropy(out, y)

    with pytest.raises(growkit.ResourceError, match=r"out of memory while training \d+ candidates.*points=") as ei:
        growkit.grow(trained, train_l, val_l, rounds=1, loss_fn=loss_fn, progress=False)
    assert isinstance(ei.value.__cause__, torch.OutOfMemoryError)


def test_compare_finetune_reports_fine_tuning_for_the_same_time(digits, trained):
    train_l, val_l = digits
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    res = growkit.grow(trained, train_l, val_l, rounds=1, seed=0, progress=False, compare_finetune=True)
    ft = res.finetune
    assert isinstance(ft, growkit.growth.baseline.FinetuneBaseline) and ft.steps >= 1 and ft.seconds > 0
    # the baseline trained a copy of the base: its weights moved, the user's model did not
    sd = ft.model.state_dict()
    assert any(not torch.equal(sd[k], v) for k, v in before.items() if v.is_floating_point())
    assert all(torch.equal(trained.state_dict()[k], v) for k, v in before.items())
    assert ft.val_accuracy == evaluate(ft.model, val_l)["accuracy"]
    rep = res.report()
    assert "fine-tuned for the same time" in rep and f"{100 * ft.val_accuracy:.2f} %" in rep
    assert ("growth beat it" in rep) == (1 - res.best.val_error > ft.val_accuracy)
    assert growkit.grow(trained, train_l, val_l, rounds=0, progress=False).finetune is None
    with pytest.raises(growkit.InputError, match="compare_finetune"):
        growkit.grow(trained, train_l, val_l, rounds=1, progress=False, compare_finetune="yes")


def test_finetune_baseline_trains_in_train_mode_even_from_an_eval_mode_base():
    # A base handed over in eval mode must not fine-tune with frozen norm statistics.
    from growkit.growth.baseline import finetune_for
    from growkit.runsetup import set_up_run

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    data = torch.utils.data.TensorDataset(torch.randn(32, 1, 8, 8) + 3.0, torch.randint(0, 3, (32,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    setup = set_up_run(base, loader, loader)
    ft = finetune_for(base, setup, growkit.GrowConfig(lr=0.01), seconds=0.2)
    assert ft.steps >= 1
    # running statistics only move in train mode (the inputs' mean is ~3, the initial estimate 0)
    assert not torch.equal(ft.model[1].running_mean, base[1].running_mean)
    assert not base.training and torch.equal(base[1].running_mean, torch.zeros(4))
