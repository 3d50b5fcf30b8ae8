"""Growth never destabilises training: the new-parameter rule, the eta guard, rollback on NaN."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

import growkit
from growkit.data import digits_dataset
from growkit.newparams import NewParamGroups, NewParamRule

from .conftest import TinyResNet, run_eval


def test_nonfinite_loss_is_a_growkit_error():
    assert issubclass(growkit.NonFiniteLoss, growkit.GrowkitError)
    assert issubclass(growkit.NonFiniteLoss, RuntimeError)
    assert growkit.train.NonFiniteLoss is growkit.NonFiniteLoss


def test_rule_caps_warms_up_clips_and_guards_eta():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    eta = torch.nn.Parameter(torch.zeros(()))
    opt = torch.optim.SGD([{"params": [a]}], lr=0.1)
    opt.add_param_group({"params": [b, eta]})
    rule = NewParamRule(mult=10.0, max_lr=0.05, warmup=0.5, clip=1.0, max_eta=2.0)
    mgr = NewParamGroups(opt, rule, steps_per_epoch=4)  # warm-up: 2 steps
    mgr.add(opt.param_groups[1], {"p": eta})
    assert opt.param_groups[1]["lr"] == 0.0
    rates = []
    for ref in (0.1, 0.1, 0.1, 0.05):
        opt.param_groups[0]["lr"] = ref  # a schedule on the reference group
        b.grad = torch.full((3,), 100.0)
        eta.grad = torch.zeros(())
        opt.step()
        rates.append(opt.param_groups[1]["lr"])
        # the group's gradient norm was clipped to 1 before the step
        assert torch.linalg.vector_norm(b.grad) == pytest.approx(1.0, rel=1e-5)
    # capped at 0.05 (not 10 x 0.1), ramped over 2 steps, then following the reference schedule
    assert rates == pytest.approx([0.025, 0.05, 0.05, 0.025])
    assert opt.param_groups[0]["lr"] == 0.05  # the reference group is untouched
    assert NewParamRule().retry().scale == 0.5
    mgr.check()
    with torch.no_grad():
        eta.fill_(3.0)
    with pytest.raises(growkit.NonFiniteLoss, match="eta"):
        mgr.check()
    with pytest.raises(growkit.InputError):
        NewParamRule(max_lr=-1.0)


def test_grow_refuses_a_model_with_nonfinite_outputs(digits, trained):
    import copy

    train_l, val_l = digits
    bad = copy.deepcopy(trained)
    with torch.no_grad():
        bad.head.bias.fill_(float("nan"))
    with pytest.raises(growkit.NonFiniteLoss, match="diverged"):
        growkit.grow(bad, train_l, val_l, rounds=1, progress=False)


def test_nan_right_after_growth_in_grow_is_rolled_back_and_retried(digits, trained):
    """A non-finite step injected once, at the first fine-tuning step after the growth: the child
    is rolled back to before it, retried at half the new parameters' rate, and kept."""
    train_l, val_l = digits
    calls = {"train": 0, "nan_at": len(train_l) + 1}  # weak learning takes len(train_l) steps

    def loss_fn(out, y):
        loss = F.cross_entropy(out, y)
        if torch.is_grad_enabled():
            calls["train"] += 1
            if calls["train"] == calls["nan_at"]:
                return loss * float("nan")
        return loss

    before = {k: v.clone() for k, v in trained.state_dict().items()}
    res = growkit.grow(trained, train_l, val_l, rounds=1, loss_fn=loss_fn, seed=0, progress=False)
    note = res.history[0]["note"]
    assert "rolled back to before the growth and retried" in note and "nan" in note
    assert [e.kind for e in res.gallery] == ["base", "grown"]
    assert all(torch.isfinite(p).all() for p in res.gallery[1].state.values())
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in before.items())  # the user's model


@pytest.fixture(scope="module")
def stream3():
    ds = digits_dataset(16)
    ds = Subset(ds, torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:600].tolist())
    return growkit.class_incremental(ds, 3, batch_size=32, seed=0)


def test_nan_right_after_growth_in_grow_stream_is_rolled_back(stream3):
    torch.manual_seed(0)
    model = TinyResNet(widths=(4, 8, 16))
    steps = len(stream3[0].train)
    seen = {"train": 0}

    def loss_fn(out, y):
        loss = F.cross_entropy(out, y)
        if torch.is_grad_enabled():
            seen["train"] += 1
            if seen["train"] == steps + 1:  # the first step of experience 1, right after the growth
                return loss * float("nan")
        return loss

    res = growkit.grow_stream(model, stream3, epochs=1, lr=0.05, seed=0, progress=False, loss_fn=loss_fn,
                              grower_options={"warmup_steps": 2, "min_steps": 4})
    first = res.events[0]
    assert first.chosen and "rolled back" in first.note and "halved" in first.note and "nan" in first.note
    assert "rolled back" in res.history[0]["note"]
    assert len(res.matrix.rows) == 3  # the run finished
    assert all(torch.isfinite(p).all() for p in res.model.parameters())


def test_grower_rolls_back_in_a_user_loop_and_keeps_model_and_optimizer_consistent(stream3):
    torch.manual_seed(0)
    model = TinyResNet(widths=(4, 8, 16))
    g = growkit.Grower(model, torch.zeros(1, 1, 16, 16), warmup_steps=2, min_steps=4, seed=0)
    opt = torch.optim.SGD(g.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    g.attach(opt, [sched])

    def step(x, y, poison=False):
        loss = F.cross_entropy(g.model(x), y) + g.extra_loss()
        if poison:
            loss = loss * float("nan")
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        return g.after_step(loss)

    for x, y in stream3[0].train:
        step(x, y)
    x, y = next(iter(stream3[0].test))
    before = run_eval(g.model, x)
    ev = g.end_experience(0)
    assert ev.chosen
    n_groups, n_edits = len(opt.param_groups), len(g.plan.edits)
    batches = iter(stream3[1].train)
    ev2 = step(*next(batches), poison=True)  # NaN gradients: the step writes NaN into the weights
    assert ev2 is g.events[-1] and "rolled back" in ev2.note and ev2.chosen == ev.chosen
    # back to the state right after the (exact) growth: finite, same function as before it
    assert torch.equal(run_eval(g.model, x), before)
    assert all(torch.isfinite(p).all() for p in g.model.parameters())
    assert len(opt.param_groups) == n_groups and len(g.plan.edits) == n_edits
    assert {id(p) for gr in opt.param_groups for p in gr["params"]} == {id(p) for p in g.parameters()}
    assert all(torch.isfinite(t).all() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
    assert len(sched.base_lrs) == len(opt.param_groups)
    # a second divergence after the retried growth: continue without it
    ev3 = step(*next(batches), poison=True)
    assert ev3.chosen == [] and "continued without it" in ev3.note
    assert len(g.plan.edits) == n_edits - len(ev.chosen)
    assert len(opt.param_groups) == n_groups - 1 and len(sched.base_lrs) == n_groups - 1
    assert {id(p) for gr in opt.param_groups for p in gr["params"]} == {id(p) for p in g.parameters()}
    assert torch.equal(run_eval(g.model, x), before)
    for xb, yb in batches:  # training goes on
        step(xb, yb)
    assert all(torch.isfinite(p).all() for p in g.model.parameters())
    # a divergence with no growth to undo is the caller's
    with pytest.raises(growkit.NonFiniteLoss):
        step(x, y, poison=True)


def test_every_child_collapsed_warns_about_the_learning_rate(digits, trained, caplog):
    train_l, val_l = digits
    with caplog.at_level(logging.WARNING, logger="growkit"):
        res = growkit.grow(trained, train_l, val_l, rounds=1, max_eta=1e-6, seed=0, progress=False)
    assert [e.kind for e in res.gallery] == ["base"]
    assert "every grown child collapsed" in caplog.text and "learning rate" in caplog.text


def test_new_param_groups_follow_an_optimizer_reloaded_from_its_state():
    """Optimizer.load_state_dict replaces every param-group dict (Lightning resumes this way): the
    rule must keep driving the new group, at the step it had reached."""
    p0, p1 = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p0], lr=0.01)
    opt.add_param_group({"params": [p1], "lr": 1.0})
    rule = NewParamRule()
    mgr = NewParamGroups(opt, rule, steps_per_epoch=16)  # warm-up: 4 steps

    def step() -> None:
        opt.zero_grad()
        (p0.sum() + p1.sum()).backward()
        opt.step()

    mgr.add(opt.param_groups[1])
    step()
    step()
    opt.load_state_dict(opt.state_dict())
    opt.param_groups[1]["lr"] = 123.0  # whatever the file said: the rule sets it before the step
    step()
    assert mgr.entry_of(opt.param_groups[1]) is not None and mgr.state_dict()[0]["step"] == 3
    assert opt.param_groups[1]["lr"] == pytest.approx(rule.lr(0.01, 0.01, 3, 4))


def test_old_frozen_freezes_for_its_steps_then_releases():
    from growkit.newparams import OldFrozen

    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    c.requires_grad_(False)  # a parameter the user froze stays frozen
    f = OldFrozen([a, b, c], 2)
    assert not a.requires_grad and not b.requires_grad
    f.after_step()
    assert not a.requires_grad
    f.after_step()
    assert a.requires_grad and b.requires_grad and not c.requires_grad
    f.release()  # idempotent
    assert a.requires_grad and not c.requires_grad
    assert OldFrozen([a], 0).params == [] and a.requires_grad


# 0.0 is the control (the spy sees old weights move); slow, to keep the default suite under 3 minutes
@pytest.mark.parametrize("new_only", [1.0, pytest.param(0.0, marks=pytest.mark.slow)])
def test_new_only_trains_the_new_parameters_alone_after_a_growth(digits, trained, monkeypatch, new_only):
    """grow(new_only=1): over the fine-tuning after a growth the old weights do not move while the
    new ones train; new_only=0 moves both. Every parameter trains again afterwards."""
    from growkit.growth import jobs

    train_l, val_l = digits
    seen = []
    real = jobs.train_steps

    def spy(model, loader, opt, **kw):
        if not kw.get("desc", "").endswith("fine-tune"):
            return real(model, loader, opt, **kw)
        new = {id(p) for p in opt.param_groups[-1]["params"]}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        st = real(model, loader, opt, **kw)
        seen.append({n: (id(p) in new, not torch.equal(before[n], p.detach())) for n, p in model.named_parameters()})
        return st

    monkeypatch.setattr(jobs, "train_steps", spy)
    res = growkit.grow(trained, train_l, val_l, rounds=1, seed=0, progress=False, new_only=new_only)
    assert seen and res.history[0]["chosen"]
    moved_old = [n for n, (is_new, moved) in seen[0].items() if not is_new and moved]
    moved_new = [n for n, (is_new, moved) in seen[0].items() if is_new and moved]
    assert moved_new
    assert (moved_old == []) if new_only == 1.0 else len(moved_old) > 10
    assert all(p.requires_grad for p in res.model.parameters())


def test_new_only_out_of_range_is_an_input_error(digits, trained):
    train_l, val_l = digits
    with pytest.raises(growkit.InputError, match="new_only"):
        growkit.grow(trained, train_l, val_l, rounds=1, progress=False, new_only=1.5)
