"""Search passes (darts, enas, pnas, random, evolution) over growkit's candidate space."""
from __future__ import annotations

import copy
import json
import logging
import random

import pytest
import torch
import torch.nn.functional as F

import growkit
from growkit.data import digits_dataset, make_loaders, split
from growkit.core.cost import count_params, measure
from growkit.growth.methods import METHOD_REGISTRY, get_method, method_names
from growkit.search import (
    Controller, DartsCell, Enas, EnasCell, MLPEnsemble, SearchMethod, SearchSpace, mutate, spearman,
)
from growkit.search.cells import SEARCH_CELLS, cells_of, derive_from_cells, insert_cells
from growkit.search.common import grow_proposal
from growkit.search.darts import derive
from growkit.core.surgery import growable

from .conftest import TinyResNet, run_eval

PASSES = ["darts", "enas", "pnas", "random", "evolution"]
# Small settings: 10 training batches of search per round, split over at most 5 children.
OPTIONS = {
    "darts": {},
    "enas": {"controller_every": 5, "controller_steps": 3, "final_samples": 3},
    "pnas": {"k": 2, "levels": 2, "surrogate_epochs": 50},
    "random": {"samples": 3},
    "evolution": {"population": 3, "tournament": 2, "cycles": 2},
}


def _space(model, x, **kw):
    gm = growable(model, x[:1])
    return gm, SearchSpace(gm, **kw)


@pytest.mark.parametrize("method", PASSES)
def test_pass_end_to_end_within_budget_and_replays(method, digits, trained, tmp_path):
    train_l, val_l = digits
    before = copy.deepcopy(trained.state_dict())
    budget = growkit.Budget(params=1.6)
    res = growkit.grow(trained, train_l, val_l, method=method, method_options=OPTIONS[method], rounds=1,
                       budget=budget, seed=0, progress=False)
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in before.items())  # user's model untouched
    base = res.gallery[0]
    grown = [e for e in res.gallery if e.kind == "grown"]
    assert len(grown) == 1
    e = grown[0]
    rec = res.history[0]
    assert rec["method"] == method and rec["round"] == 1 and rec["entry"] == e.id
    # the training budget of the search: one epoch = 10 batches
    assert 0 < rec["search_steps"] <= 10
    # within budget, and the recorded cost is the base plus exactly the grown branches
    assert e.cost.params <= 1.6 * base.cost.params
    replay = growkit.apply_plan(trained, e.plan)
    assert e.cost.params == base.cost.params + sum(count_params(b) for b in replay.growkit_branches.values())
    # the plan is growkit's format: one edit per point, <= max_ops edges, the atoms the pass chose
    atoms = {a for ed in e.plan.edits for a in ed.atoms()}
    assert atoms == {tuple(a) for a in rec["atoms"]}
    points = [ed.point for ed in e.plan.edits]
    assert len(points) == len(set(points)) and all(len(ed.edges) <= 3 for ed in e.plan.edits)
    # the plan replays: weights loaded onto a fresh replay reproduce the entry's model exactly
    replay.load_state_dict(e.state)
    x = next(iter(val_l))[0]
    if res.best.id == e.id:
        assert torch.equal(run_eval(replay, x), run_eval(res.model, x))
    growkit.save(replay, tmp_path / "g")
    loaded = growkit.load(tmp_path / "g", base_model=trained)
    assert torch.equal(run_eval(loaded, x), run_eval(replay, x))


@pytest.mark.parametrize("cell_cls", [DartsCell, EnasCell])
def test_supernet_cells_insert_exactly(cell_cls):
    torch.manual_seed(0)
    model = TinyResNet()
    x = torch.randn(6, 1, 16, 16)
    y = torch.randint(0, 10, (6,))
    gm, space = _space(model, x, ops="paper")
    sup = insert_cells(gm, space, lambda p, ins, ops: cell_cls(p, ins, ops, space.registry))
    cells = cells_of(sup)
    assert len(cells) == len(space.points)
    if cell_cls is EnasCell:
        for c in cells.values():
            c.active = [0, 3, len(c.ops) - 1]
    ref = copy.deepcopy(model)
    assert torch.equal(run_eval(sup, x), run_eval(ref, x))
    # train mode: the loss and every gradient of the original parameters are unchanged
    sup.train()
    ref.train()
    loss = F.cross_entropy(sup(x), y)
    ref_loss = F.cross_entropy(ref(x), y)
    assert torch.equal(loss, ref_loss)
    loss.backward()
    ref_loss.backward()
    grads = dict(ref.named_parameters())
    checked = 0
    for n, p in sup.named_parameters():
        if n.startswith(SEARCH_CELLS):
            continue
        assert torch.equal(p.grad, grads[n].grad), n
        checked += 1
    assert checked == len(grads)
    # the gates get a gradient (so the cells can switch on); alphas wait for eta to move
    assert all(c.eta.grad is not None and c.eta.grad != 0 for c in cells.values())


def test_children_are_function_preserving():
    torch.manual_seed(0)
    model = TinyResNet()
    x = torch.randn(4, 1, 16, 16)
    gm, space = _space(model, x, ops=("sep_conv_3x3", "identity", "avg_pool_3x3"))
    rng = random.Random(0)
    for _ in range(3):
        proposal = space.random_proposal(rng, size=5)
        child = grow_proposal(gm, space, proposal, 0)
        assert torch.equal(run_eval(child, x), run_eval(gm, x))  # fresh branches: eta = 0, exact
        # a donor that trained (non-zero gates and weights), then a child adding one atom to it
        with torch.no_grad():
            for b in child.growkit_branches.values():
                b.eta.fill_(0.7)
                for p in b.proj.parameters():
                    p.add_(0.1 * torch.randn_like(p))
        bigger = space.expansions(proposal)[0]
        grandchild = grow_proposal(gm, space, bigger, 0, donor=child)
        # same function up to the summation order of the wider 1x1 projection (zero block added)
        assert torch.allclose(run_eval(grandchild, x), run_eval(child, x), rtol=1e-5, atol=1e-6)
        assert not torch.equal(run_eval(grandchild, x), run_eval(gm, x))


def test_plan_cost_is_the_measured_cost():
    torch.manual_seed(0)
    model = TinyResNet()
    x = torch.randn(2, 1, 16, 16)
    gm, space = _space(model, x, ops="paper", max_inputs=None)
    base = measure(gm, x[:1])
    space.parent_cost = base
    rng = random.Random(1)
    for size in (1, 3, 8):
        proposal = space.random_proposal(rng, size=size)
        assert space.cost(proposal) == measure(grow_proposal(gm, space, proposal, 0), x[:1])


def test_space_constraints_and_budget():
    torch.manual_seed(0)
    model = TinyResNet()
    x = torch.randn(2, 1, 16, 16)
    gm = growable(model, x[:1])
    base = measure(gm, x[:1])
    space = SearchSpace(gm, max_ops=2, points_per_round=2, budget=growkit.Budget(params=1.1), base_cost=base,
                        parent_cost=base)
    rng = random.Random(0)
    for _ in range(20):
        proposal = space.random_proposal(rng)
        assert space.feasible(proposal)
        assert space.cost(proposal).params <= 1.1 * base.params
        per = space.by_point(proposal)
        assert len(per) <= 2 and all(len(v) <= 2 for v in per.values())
        # full: nothing more fits
        assert not space.expansions(proposal)
    assert not space.feasible(frozenset())
    with pytest.raises(growkit.PointError):
        SearchSpace(gm, points=["no_such_point"])


def test_darts_derivation_reproduces_the_mixture_and_ranks_by_weight():
    torch.manual_seed(0)
    model = TinyResNet()
    x = torch.randn(4, 1, 16, 16)
    ops = ("sep_conv_3x3", "identity", "max_pool_3x3")
    gm, space = _space(model, x, ops=ops, max_ops=6)
    sup = insert_cells(gm, space, lambda p, ins, o: DartsCell(p, ins, o, space.registry))
    cells = cells_of(sup)
    with torch.no_grad():
        for c in cells.values():
            c.alpha.normal_()
            c.eta.fill_(0.5)
    # keeping every non-zero op of every edge gives back the supernet (the zero op adds nothing)
    full = space.greedy(derive(list(cells.values()), ops_per_edge=3))
    assert full == frozenset(space.atoms)
    derived = derive_from_cells(sup, space, full, 0)
    assert torch.allclose(run_eval(derived, x), run_eval(sup, x), rtol=1e-5, atol=1e-6)
    assert not hasattr(derived, SEARCH_CELLS) and len(growkit.plan_of(derived).edits) == len(space.points)
    # ranking: strongest non-zero op per edge, edges by softmax weight
    ranked = derive(list(cells.values()), ops_per_edge=1)
    weights = []
    for a in ranked:
        c = cells[a.point]
        w = c.weights().detach()
        i = c.input_names.index(a.input)
        j = c.op_names.index(a.op)
        assert w[i, j] == w[i, :len(ops)].max()
        weights.append(float(w[i, j]))
    assert weights == sorted(weights, reverse=True)
    assert len(ranked) == sum(len(c.input_names) for c in cells.values())


def test_enas_derived_model_is_the_supernet_under_the_sample():
    torch.manual_seed(0)
    model = TinyResNet()
    x = torch.randn(4, 1, 16, 16)
    gm, space = _space(model, x)
    sup = insert_cells(gm, space, lambda p, ins, o: EnasCell(p, ins, o, space.registry))
    cells = cells_of(sup)
    proposal = space.random_proposal(random.Random(3), size=4)
    with torch.no_grad():
        for c in cells.values():
            c.eta.fill_(0.8)
            c.active = sorted(c.atom_index(a) for a in proposal if a.point == c.point)
            for p in c.projs.parameters():
                p.add_(0.2 * torch.randn_like(p))
    derived = derive_from_cells(sup, space, proposal, 0)
    assert torch.allclose(run_eval(derived, x), run_eval(sup, x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(run_eval(derived, x), run_eval(gm, x))
    atoms = {a for e in growkit.plan_of(derived).edits for a in e.atoms()}
    assert atoms == set(proposal)


def test_enas_controller_learns_a_toy_reward():
    torch.manual_seed(0)
    target = [2, 0, 1, 2]
    enas = Enas(controller_lr=0.05, entropy_weight=1e-4)
    ctrl = Controller(len(target), 3, hidden=32, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(ctrl.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    first = []
    for step in range(300):
        choices, logp, ent = ctrl.sample(g)
        r = sum(a == b for a, b in zip(choices, target)) / len(target)
        if step < 20:
            first.append(r)
        enas.reinforce(opt, r, logp, ent)
    greedy, _, _ = ctrl.sample(greedy=True)
    assert greedy == target
    assert sum(first) / len(first) < 0.6 and enas.baseline > 0.8
    # masked choices are never sampled
    masked = Controller(2, 4, hidden=8, valid=[2, 4], generator=torch.Generator().manual_seed(0))
    assert all(masked.sample(g)[0][0] < 2 for _ in range(50))


def test_pnas_surrogate_ranks_unseen_plans():
    g = torch.Generator().manual_seed(0)
    w = torch.linspace(-1, 1, 12)
    xs = (torch.rand(80, 12, generator=g) < 0.4).float()
    ys = 0.5 + 0.05 * (xs @ w)
    model = MLPEnsemble(12, n_models=5, hidden=32, epochs=300, generator=torch.Generator().manual_seed(1))
    model.fit(xs[:40], ys[:40])
    mean, spread = model.predict(xs[40:])
    assert spearman(mean.tolist(), ys[40:].tolist()) > 0.8
    assert spread.shape == (40,) and (spread >= 0).all()
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [1, 1, 2]) == pytest.approx(1.0)
    assert spearman([1, 1], [2, 3]) is None


def test_evolution_mutations_change_one_edit():
    torch.manual_seed(0)
    model = TinyResNet()
    x = torch.randn(2, 1, 16, 16)
    gm = growable(model, x[:1])
    base = measure(gm, x[:1])
    space = SearchSpace(gm, budget=growkit.Budget(params=1.3), base_cost=base, parent_cost=base)
    rng = random.Random(0)
    kinds = set()
    for _ in range(60):
        proposal = space.random_proposal(rng, size=rng.randint(1, 4))
        child, kind = mutate(space, proposal, rng)
        kinds.add(kind)
        assert space.feasible(child)
        if kind == "add":
            assert proposal < child and len(child) == len(proposal) + 1
        elif kind == "remove":
            assert child < proposal and len(child) == len(proposal) - 1
        else:
            assert len(child) == len(proposal) and len(child ^ proposal) == 2
    assert kinds == {"add", "remove", "swap"}
    # size caps additions
    one = space.random_proposal(rng, size=1)
    for _ in range(10):
        child, kind = mutate(space, one, rng, size=1)
        assert kind == "swap" and len(child) == 1


def test_one_class_registers_a_pass(digits, trained):
    train_l, val_l = digits

    @growkit.register_method
    class FirstFit(SearchMethod):
        name = "test-first-fit"
        defaults = {"atoms": 2}

        def search(self, ctx):
            proposal = ctx.space.greedy(ctx.space.atoms, self.opts["atoms"])
            model = ctx.build(proposal)
            ctx.train(model, ctx.steps)
            return ctx.child(proposal, model, ctx.evaluate(model))

    try:
        assert set(PASSES) | {"petridish", "test-first-fit"} <= set(method_names())
        for name in PASSES:  # built-in passes are imported on first use and registered then
            assert type(get_method(name)).name == name and name in METHOD_REGISTRY
        res = growkit.grow(trained, train_l, val_l, method="test-first-fit", method_options={"atoms": 2}, rounds=1,
                           seed=0, progress=False)
        assert [len(e.plan.edits) for e in res.gallery] == [0, 1]  # two atoms of the first point
        assert len(res.gallery[1].plan.edits[0].edges) == 2
        with pytest.raises(growkit.InputError, match="unknown method_options.*valid options"):
            growkit.grow(trained, train_l, method="test-first-fit", method_options={"nope": 1})
    finally:
        METHOD_REGISTRY.pop("test-first-fit")
    with pytest.raises(growkit.InputError, match="samples"):
        growkit.grow(trained, train_l, method="random", method_options={"samples": 0})
    with pytest.raises(growkit.InputError, match="arch_lr"):
        growkit.grow(trained, train_l, method="darts", method_options={"arch_lr": -1.0})


def test_nothing_fits_the_budget(digits, trained, caplog):
    train_l, val_l = digits
    with caplog.at_level(logging.WARNING, logger="growkit"):
        res = growkit.grow(trained, train_l, val_l, method="random", rounds=1, budget=growkit.Budget(params=1.0001),
                           progress=False)
    assert [e.kind for e in res.gallery] == ["base"]
    assert res.history[0]["note"] == "no shortcut fits the budget"


def test_nan_loss_in_a_search_rolls_back(digits, trained):
    train_l, val_l = digits
    calls = {"n": 0}

    def loss_fn(out, y):
        calls["n"] += 1
        loss = F.cross_entropy(out, y)
        return loss * float("nan") if calls["n"] > 3 and torch.is_grad_enabled() else loss

    res = growkit.grow(trained, train_l, val_l, method="evolution", rounds=1, loss_fn=loss_fn, progress=False)
    assert "stopped" in res.history[0]["note"] and "nan" in res.history[0]["note"]
    assert [e.kind for e in res.gallery] == ["base"]


# A search pass's resume stays in the default run through evolution; enas repeats it (6 s).
@pytest.mark.parametrize("method", [pytest.param("enas", marks=pytest.mark.slow), "evolution"])
def test_resume_between_rounds_matches_uninterrupted_run(method, tmp_path, trained):
    tr, va = split(digits_dataset(16), [160, 96], seed=0)
    train_l, val_l = make_loaders([tr, va], batch_size=32, seed=0)
    kw = dict(method=method, method_options=OPTIONS[method], search_epochs=1, finetune_epochs=1, seed=5,
              budget=growkit.Budget(params=1.6), progress=False)
    train_l.generator.manual_seed(0)
    ref = growkit.grow(trained, train_l, val_l, rounds=2, checkpoint_dir=tmp_path / "ref", **kw)
    train_l.generator.manual_seed(0)
    growkit.grow(trained, train_l, val_l, rounds=1, checkpoint_dir=tmp_path / "c", **kw)
    state = json.loads((tmp_path / "c" / "gallery.json").read_text())
    assert len(state["history"]) == 1
    train_l.generator.manual_seed(123)  # restored from the checkpoint, whatever it is now
    res = growkit.grow(trained, train_l, val_l, rounds=2, checkpoint_dir=tmp_path / "c", resume=True, **kw)
    assert res.plan.to_dict() == ref.plan.to_dict()
    assert [e.plan for e in res.gallery] == [e.plan for e in ref.gallery]
    a, b = res.model.state_dict(), ref.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = ("search_s", "finetune_s")
    assert [{k: v for k, v in h.items() if k not in strip} for h in res.history[:-1]] == \
        [{k: v for k, v in h.items() if k not in strip} for h in ref.history[:-1]]


@pytest.mark.slow  # CLI end to end with a search pass
def test_cli_grow_with_a_search_pass(tmp_path, capsys):
    from growkit.cli import main

    out = tmp_path / "run"
    rc = main(["grow", "--model", "tests.conftest:TinyResNet", "--data", "digits", "--out", str(out), "--base-epochs",
               "1", "--rounds", "1", "--budget", "params=1.5", "--method", "random", "--method-options",
               '{"samples": 2}'])
    assert rc == 0
    history = json.loads((out / "gallery.json").read_text())["history"]
    assert history[0]["method"] == "random" and len(history[0]["children"]) == 2
    assert main(["grow", "--model", "tests.conftest:TinyResNet", "--data", "digits", "--out", str(tmp_path / "x"),
                 "--method", "random", "--method-options", '{"nope": 1}']) == 2
    assert "unknown method_options" in capsys.readouterr().err
    assert main(["grow", "--model", "tests.conftest:TinyResNet", "--data", "digits", "--out", str(tmp_path / "y"),
                 "--method", "random", "--method-options", "[1]"]) == 2
