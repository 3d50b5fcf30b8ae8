"""growkit.deepen and the width / depth growth methods: exact, trainable, replayable, exportable,
within budget, bad input rejected."""
from __future__ import annotations

import math

import pytest
import timm
import torch

import growkit
from growkit.core.deepen import DEPTH, GatedBlock, IdentityBlock
from growkit.core.plan import GrowthPlan
from growkit.core.surgery import apply_plan

from .conftest import run_eval


def _timm(name: str, **kw):
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=10, **kw).eval()


@pytest.mark.parametrize("name,kw,size", [
    ("resnet10t", {}, 64),
    ("mobilenetv3_small_050", {}, 64),
    ("vit_tiny_patch16_224", {"img_size": 32, "depth": 2}, 32),
])
@pytest.mark.parametrize("block", ["copy", "identity"])
def test_deepen_is_bit_exact_on_timm_models(name, kw, size, block):
    m = _timm(name, **kw)
    x = torch.randn(2, 3, size, size)
    d = growkit.deepen(m, x[:1], block=block)
    assert d.meta["growkit_deepen_report"]["deepened"]
    assert len(getattr(d, DEPTH)) == len(growkit.plan_of(d).resizes)
    assert torch.equal(run_eval(d, x), run_eval(m, x))


def test_copy_block_starts_as_the_trained_block_and_learns_through_its_gate(tiny_resnet):
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    d = growkit.deepen(tiny_resnet, x[:1], points=["stages.1.1"], block="copy")
    (new,) = getattr(d, DEPTH).values()
    assert isinstance(new, GatedBlock)
    orig = dict(tiny_resnet.stages[1][1].named_parameters())
    copied = dict(new.block.named_parameters())
    assert copied and all(torch.equal(copied[k], orig[k.replace(".", ".", 1)]) for k in copied if k in orig)
    d.train()
    opt = torch.optim.SGD(d.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(d(x), y).backward()
    assert new.eta.grad is not None and new.eta.grad.abs() > 0  # the gate learns first
    opt.step()
    opt.zero_grad()
    torch.nn.functional.cross_entropy(d(x), y).backward()
    assert sum(float(p.grad.abs().sum()) for p in new.block.parameters() if p.grad is not None) > 0
    opt.step()
    # the copy and the block it copied train apart
    w_copy = new.block.get_submodule("stages.1.1.conv1").weight
    assert not torch.equal(w_copy, d.get_submodule("stages.1.1.conv1").weight)


def test_identity_block_gets_gradient_at_its_zero_projection(tiny_resnet):
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    d = growkit.deepen(tiny_resnet, x[:1], points=["stages.0.1", "stages.2.0"], block="identity")
    blocks = list(getattr(d, DEPTH).values())
    assert len(blocks) == 2 and all(isinstance(b, IdentityBlock) for b in blocks)
    d.train()
    torch.nn.functional.cross_entropy(d(x), y).backward()
    assert all(b.proj.weight.grad.abs().sum() > 0 for b in blocks)


def test_plan_replay_save_load_and_onnx_are_exact(tmp_path):
    m = _timm("resnet10t")
    x = torch.randn(2, 3, 64, 64)
    d = growkit.deepen(m, x[:1], points=["layer1_0_act2"], block="copy")
    d = growkit.deepen(d, block="identity", points=["layer3_0_act2"])
    d = growkit.widen(d, ratio=1.25, seed=0)  # depth, then width: replay keeps the order
    with torch.no_grad():
        for b in getattr(d, DEPTH).values():  # switch the new blocks on
            for p in b.parameters():
                p.add_(0.01 * torch.randn_like(p))
    plan = growkit.plan_of(d)
    assert [r.kind for r in plan.resizes] == ["deepen", "deepen", "widen"]
    again = apply_plan(m, GrowthPlan.from_json(plan.to_json()), x[:1])
    again.load_state_dict(d.state_dict())
    assert torch.equal(run_eval(again, x), run_eval(d, x))
    growkit.save(d, tmp_path / "d")
    back = growkit.load(tmp_path / "d", base_model=m)
    assert torch.equal(run_eval(back, x), run_eval(d, x))
    report = growkit.export_onnx(d, tmp_path / "d.onnx", x[:1])
    assert report.max_rel_diff <= 1e-5


def test_consecutive_block_copies_replay_exactly(tiny_resnet):
    """Copies after two consecutive blocks: replaying the plan cuts the second block while the
    first copy already sits at its input (that node must carry the shape of what it replaces)."""
    x = torch.randn(2, 1, 16, 16)
    d = growkit.deepen(tiny_resnet, x[:1], block="copy")
    assert len(d.meta["growkit_deepen_report"]["deepened"]) >= 2
    with torch.no_grad():
        for b in getattr(d, DEPTH).values():
            b.eta.fill_(0.5)
    again = apply_plan(tiny_resnet, growkit.plan_of(d), x[:1])
    again.load_state_dict(d.state_dict())
    assert torch.equal(run_eval(again, x), run_eval(d, x))


def test_bad_input_gives_growkit_errors(tiny_resnet):
    x = torch.randn(1, 1, 16, 16)
    with pytest.raises(growkit.InputError, match="block"):
        growkit.deepen(tiny_resnet, x, block="twice")
    with pytest.raises(growkit.PointError, match="no_such"):
        growkit.deepen(tiny_resnet, x, points=["no_such"])
    with pytest.raises(growkit.InputError, match="equal shapes"):  # a downsampling block cannot be stacked
        growkit.deepen(tiny_resnet, x, points=["stages.1.0"], block="copy")


# ------------------------------------------------------------------------------- growth methods
@pytest.mark.parametrize("method", ["widen", "deepen", ["petridish", "widen", "deepen"]])
def test_grow_methods_stay_within_budget_and_replay(digits, trained, method):
    train_l, val_l = digits
    budget = growkit.Budget(params=1.3)
    res = growkit.grow(trained, train_l, val_l, method=method, rounds=2, seed=0, progress=False, budget=budget,
                       search_epochs=1, finetune_epochs=1, ops=["identity"], max_inputs=1)
    grown = [e for e in res.gallery if e.kind == "grown"]
    assert grown, res.history
    base = res.gallery[0].cost
    assert all(budget.allows(e.cost, base) for e in grown)
    if method == "widen":
        assert all(e.plan.resizes and e.plan.resizes[-1].kind == "widen" for e in grown)
    if method == "deepen":
        assert all(e.plan.resizes and e.plan.resizes[-1].kind == "deepen" for e in grown)
    if isinstance(method, list):
        assert all(h.get("method") in ("petridish", "widen", "deepen") for h in res.history if "round" in h)
    # the result replays from its plan
    x = next(iter(val_l))[0]
    back = apply_plan(trained, res.plan, x[:1])
    back.load_state_dict(res.model.state_dict())
    assert torch.equal(run_eval(back, x), run_eval(res.model, x))


def test_grow_where_random_and_tight_budget(digits, trained):
    train_l, val_l = digits
    res = growkit.grow(trained, train_l, val_l, method="widen", rounds=1, seed=0, progress=False,
                       method_options={"where": "random", "ratio": 1.25})
    assert res.history[0]["chosen"]
    tiny = growkit.grow(trained, train_l, val_l, method="deepen", rounds=1, seed=0, progress=False,
                        budget=growkit.Budget(params=1.0001))
    assert "budget" in tiny.history[0]["note"] and tiny.model is not None
    with pytest.raises(growkit.InputError, match="where"):
        growkit.grow(trained, train_l, val_l, method="widen", method_options={"where": "everywhere"}, rounds=1)


@pytest.mark.parametrize("method", ["widen", "deepen"])
def test_a_round_grows_every_location_that_fits_the_budget(digits, trained, method):
    """Like Petridish, a widen / deepen round spends its budget (greedy in score order); count caps it."""
    train_l, val_l = digits
    kw = dict(method=method, rounds=1, seed=0, progress=False, search_epochs=1, finetune_epochs=1)
    budget = growkit.Budget(params=1.6)
    res = growkit.grow(trained, train_l, val_l, budget=budget, **kw)
    one = growkit.grow(trained, train_l, val_l, budget=budget, method_options={"count": 1}, **kw)
    many, single = res.history[0]["chosen"], one.history[0]["chosen"]
    assert len(single) == 1 and len(many) >= 2, (single, many)
    assert many[0] == single[0]  # the same best-scored location leads both
    grown = [e for e in res.gallery if e.kind == "grown"]
    assert grown and all(budget.allows(e.cost, res.gallery[0].cost) for e in grown)
    assert grown[-1].cost.params > [e for e in one.gallery if e.kind == "grown"][-1].cost.params
    with pytest.raises(growkit.InputError, match="count"):
        growkit.grow(trained, train_l, val_l, method_options={"count": 0}, **kw)


def test_mixed_method_resumes_with_the_same_draws(trained, tmp_path):
    from growkit.data import digits_dataset, make_loaders, split

    def loaders():  # every run sees the same batches (a shared loader's generator would move on)
        return make_loaders(split(digits_dataset(16), [320, 160], seed=0), batch_size=32, seed=0)

    kw = dict(method=["widen", "deepen"], seed=3, progress=False, finetune_epochs=1)
    full = growkit.grow(trained, *loaders(), rounds=3, **kw)
    growkit.grow(trained, *loaders(), rounds=2, checkpoint_dir=tmp_path / "c", **kw)
    # a run stopped after round 2 continues to round 3 with the draws and models of the full run
    part = growkit.grow(trained, *loaders(), rounds=3, checkpoint_dir=tmp_path / "c", resume=True, **kw)
    assert [h.get("method") for h in part.history] == [h.get("method") for h in full.history]
    assert part.plan.to_dict() == full.plan.to_dict()


def test_re_warmed_cosine_schedule_by_hand():
    """The expanded model's schedule (LEMON: same peak, re-warmed, shorter): linear ramp, then cosine to 0."""
    from growkit.train import cosine_schedule

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = cosine_schedule(opt, 10, warmup_steps=2)
    lrs = []
    for _ in range(11):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    want = [0.05, 0.1] + [0.05 * (1 + math.cos(math.pi * k / 8)) for k in range(9)]
    assert lrs == pytest.approx(want, rel=1e-12, abs=1e-15)
    plain = cosine_schedule(torch.optim.SGD([p], lr=0.1), 4)
    assert plain.get_last_lr() == [0.1]
    with pytest.raises(growkit.InputError, match="warmup_steps"):
        cosine_schedule(opt, 10, warmup_steps=-1)


# identity blocks were always trained as new (slow: the default suite stays under 3 minutes)
@pytest.mark.parametrize("block", ["copy", pytest.param("identity", marks=pytest.mark.slow)])
def test_only_untrained_block_parameters_train_as_new(digits, trained, monkeypatch, block):
    """After deepening, the new-parameter rule (10x rate, warm-up, clip) gets an identity block's
    body and projection, but of a copied block only its gate: the copy's weights are trained."""
    from growkit.growth import jobs

    groups = []
    real = jobs.growth_optimizer

    def spy(model, new, **kw):
        new = list(new)
        groups.append((model, new))
        return real(model, new, **kw)

    monkeypatch.setattr(jobs, "growth_optimizer", spy)
    train_l, val_l = digits
    growkit.grow(trained, train_l, val_l, method="deepen", method_options={"block": block}, rounds=1, seed=0,
                 progress=False)
    model, new = groups[-1]
    blocks = list(getattr(model, DEPTH).values())
    assert blocks and all(isinstance(b, GatedBlock if block == "copy" else IdentityBlock) for b in blocks)
    want = [b.eta for b in blocks] if block == "copy" else [p for b in blocks for p in b.parameters()]
    assert {id(p) for p in new} == {id(p) for p in want}
