"""Cell mode (issue 22): one growth pattern tied across the repeated blocks of a stage."""
from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import growkit
from growkit.core.cost import Budget, count_params, measure
from growkit.core.selection import branch_costs, choose_points
from growkit.core.tie import relative_inputs, tie_groups
from growkit.errors import InputError, PlanError

from .conftest import Block, run_eval

TIMM = {
    "resnet18": (lambda: timm.create_model("resnet18", pretrained=False, num_classes=10), (2, 3, 32, 32)),
    "resnet34": (lambda: timm.create_model("resnet34", pretrained=False, num_classes=10), (2, 3, 32, 32)),
    "convnext_atto": (lambda: timm.create_model("convnext_atto", pretrained=False, num_classes=10), (2, 3, 32, 32)),
    "vit_tiny": (lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=4,
                                           num_classes=10), (2, 3, 32, 32)),
}


class CellNet(nn.Module):
    """Two stages of ``depth`` identical residual blocks (the second downsamples first): tiny."""

    def __init__(self, depth: int = 4, widths: tuple[int, int] = (4, 8), in_chans: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]))
        c, stages = widths[0], []
        for i, w in enumerate(widths):
            stages.append(nn.Sequential(*(Block(c if j == 0 else w, w, 2 if (i and j == 0) else 1) for j in range(depth))))
            c = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


def _perturb_alphas(cm: growkit.CandidateModel, seed: int = 0) -> None:
    """Distinct, non-trivial alphas (shared ones stay shared: each Parameter is set once)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in {id(c.alpha): c.alpha for c in cm.candidates.values()}.values():
            p.copy_(torch.randn(p.shape, generator=g))


def _relative_patterns(cm: growkit.CandidateModel, plan: growkit.GrowthPlan) -> dict[str, set]:
    """Tie id -> the set of relative edge patterns its edits grow (one pattern when tied right)."""
    st = cm.state
    out: dict[str, set] = {}
    for e in plan.edits:
        if not e.tie:
            continue
        p = st.point(e.point)
        rel = dict(zip([z.name for z in p.inputs], relative_inputs(st.points, p, p.inputs)))
        out.setdefault(e.tie, set()).add(tuple((rel[d.input], d.op) for d in e.edges))
    return out


@pytest.mark.parametrize("name,tie", [("resnet18", "stage"), ("resnet18", "all"), ("resnet34", "stage"),
                                      ("convnext_atto", "stage"), ("vit_tiny", "stage")])
def test_inject_and_finalize_with_tie_are_exact_and_grow_one_pattern_per_group(name, tie):
    torch.manual_seed(0)
    factory, shape = TIMM[name]
    model = factory().eval()
    x = torch.randn(*shape)
    cm = growkit.inject(model, x[:1], tie=tie)
    if (name, tie) == ("resnet18", "stage"):
        # Two blocks per stage, and the first one downsamples: two cell types, nothing to tie.
        assert cm.ties == []
    else:
        assert cm.ties, "this model has repeated blocks: some points must be tied"
    for g in cm.ties:
        alphas = {id(cm.candidates[p].alpha) for p in g.points}
        assert len(alphas) == 1  # one alpha per relative edge, shared by the group
        assert len({id(cm.candidates[p].ops[0]) for p in g.points}) == len(g.points)  # own ops per copy
        if tie == "stage":
            assert len({cm.state.point(p).stage for p in g.points}) == 1
    assert torch.equal(run_eval(cm, x), run_eval(copy.deepcopy(model), x))
    _perturb_alphas(cm)
    grown = growkit.finalize(cm, max_ops=2)
    assert torch.equal(run_eval(grown, x), run_eval(copy.deepcopy(model), x))
    plan = growkit.plan_of(grown)
    groups = {g.points[0]: g for g in cm.ties}
    ties = {e.tie for e in plan.edits if e.tie}
    assert len(ties) == len(cm.ties)
    assert sum(len(g.points) for g in cm.ties) == sum(1 for e in plan.edits if e.tie)
    for tie_id, patterns in _relative_patterns(cm, plan).items():
        assert len(patterns) == 1, f"tie {tie_id} grows different relative edges: {patterns}"
    for e in plan.edits:
        if e.tie:
            first = next(f for f in plan.edits if f.key == e.tie)
            assert e.point in groups[first.point].points
    # each copy has its own weights (same starting values where they come from a shared alpha)
    branches = dict(grown.growkit_branches.items())
    by_tie: dict[str, list] = {}
    for e in plan.edits:
        by_tie.setdefault(e.tie, []).append(branches[e.key])
    for t, bs in by_tie.items():
        if t:
            assert len({id(b.proj.weight) for b in bs}) == len(bs)
            same = [b for b in bs if b.proj.weight.shape == bs[0].proj.weight.shape]
            assert all(torch.equal(b.proj.weight, bs[0].proj.weight) for b in same)


def test_tied_weak_learning_keeps_base_gradients_and_pools_alpha_gradient():
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=10)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    tied = growkit.inject(model, x[:1], tie="stage", l1=0.0).train()
    free = growkit.inject(model, x[:1], tie="none", l1=0.0).train()
    free.module.load_state_dict(tied.module.state_dict())  # same weights, alphas no longer shared
    base = copy.deepcopy(model).train()
    F.cross_entropy(base(x), y).backward()
    F.cross_entropy(tied(x), y).backward()
    F.cross_entropy(free(x), y).backward()
    cand = {id(p) for p in tied.candidate_parameters()}
    base_grads = dict(base.named_parameters())
    checked = 0
    for n, p in tied.module.named_parameters():
        if id(p) not in cand and base_grads[n].grad is not None:
            assert torch.equal(p.grad, base_grads[n].grad), n
            checked += 1
    assert checked > 10
    # The shared alpha's gradient pools the evidence of every copy: it is the sum of the
    # gradients the copies' own alphas get in macro mode from the same weights and batch.
    assert tied.ties
    for g in tied.ties:
        shared = tied.candidates[g.points[0]].alpha.grad
        parts = [free.candidates[p].alpha.grad for p in g.points]
        assert all(not torch.equal(parts[0], q) for q in parts[1:])
        torch.testing.assert_close(shared, torch.stack(parts).sum(0), rtol=1e-5, atol=1e-8)
    for k, c in tied.candidates.items():  # untied points learn as in macro mode
        if all(k not in g.points for g in tied.ties):
            assert torch.equal(c.alpha.grad, free.candidates[k].alpha.grad)


@pytest.fixture(scope="module")
def cellnet(digits):
    """A CellNet trained one epoch on digits (a real, unconverged base)."""
    from growkit.train import train_steps

    torch.manual_seed(0)
    m = CellNet()
    train_steps(m, digits[0], torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), epochs=1)
    return m.eval()


@pytest.fixture(scope="module")
def grown_cells(digits, cellnet):
    train_l, val_l = digits
    res = growkit.grow(cellnet, train_l, val_l, rounds=1, tie="stage", ops=("sep_conv_3x3", "identity"),
                       seed=0, progress=False)
    # The grown child (whether or not it beat this weak base): rebuilt from its plan and weights.
    child = next(e for e in res.gallery if e.kind != "base")
    model = growkit.apply_plan(cellnet, child.plan)
    model.load_state_dict(child.state)
    return model.eval()


def test_grow_with_tie_records_the_tie_and_save_load_replays_exactly(digits, cellnet, grown_cells, tmp_path):
    plan = growkit.plan_of(grown_cells)
    tied = [e for e in plan.edits if e.tie]
    assert tied, f"expected a tied growth, got {plan.edits}"
    cm = growkit.inject(cellnet, torch.zeros(1, 1, 16, 16), tie="stage", max_inputs=growkit.GrowConfig().max_inputs)
    groups = {frozenset(g.points) for g in cm.ties}
    by_tie: dict[str, set] = {}
    for e in tied:
        by_tie.setdefault(e.tie, set()).add(e.point)
    assert all(frozenset(pts) in groups for pts in by_tie.values())  # whole groups only
    assert all(len(p) == 1 for p in _relative_patterns(cm, plan).values())
    d = json.loads(plan.to_json())
    assert {e.get("tie") for e in d["edits"]} - {None} == set(by_tie)
    assert growkit.GrowthPlan.from_dict(d).edits == plan.edits
    # save / load: the tie travels with the plan; the replayed model is the grown one
    growkit.save(grown_cells, tmp_path / "m")
    loaded = growkit.load(tmp_path / "m", base_model=cellnet)
    assert growkit.plan_of(loaded).edits == plan.edits
    x = next(iter(digits[1]))[0]
    etas = [float(b.eta.detach()) for b in grown_cells.growkit_branches.values()]
    assert any(e != 0.0 for e in etas)
    assert torch.equal(run_eval(loaded, x), run_eval(copy.deepcopy(grown_cells), x))


@pytest.mark.slow
def test_export_onnx_of_a_tied_growth(digits, grown_cells, tmp_path):
    assert any(e.tie for e in growkit.plan_of(grown_cells).edits)
    x = next(iter(digits[1]))[0]
    report = growkit.export_onnx(grown_cells, tmp_path / "m.onnx", x[:1])
    assert report.max_abs_diff < 1e-4


def test_prune_removes_a_tied_group_at_once(digits, cellnet, grown_cells):
    train_l, val_l = digits
    plan = growkit.plan_of(grown_cells)
    ties: dict[str, set] = {}
    for e in plan.edits:
        ties.setdefault(e.tie or e.key, set()).add(e.key)
    res = growkit.prune(grown_cells, train_l, val_l, method="branches", finetune_epochs=0, seed=0,
                        progress=False)
    keys = [{e.key for e in entry.plan.edits} for entry in res.gallery]
    assert keys[0] == {e.key for e in plan.edits} and keys[-1] == set()
    removed = [a - b for a, b in zip(keys, keys[1:])]
    assert sorted(map(sorted, removed)) == sorted(map(sorted, ties.values()))  # one unit per step
    assert any(len(r) > 1 for r in removed)
    for entry in res.gallery.entries[1:]:
        growkit.GrowthPlan.from_dict(entry.plan.to_dict())  # what is left still validates (ties intact)


def test_budget_counts_every_copy(digits, cellnet):
    x = torch.zeros(1, 1, 16, 16)
    cm = growkit.inject(cellnet, x, tie="stage", ops=("sep_conv_3x3", "identity"))
    _perturb_alphas(cm)
    group = cm.ties[1]  # the wider stage's cell: its copies together cost more than any point
    for k, c in cm.candidates.items():  # every point fits the gradient, the group best
        c.score_sum.fill_(1.0 if k in group.points else 1e-3)
        c.score_count.fill_(1.0)
    base = measure(cellnet, (x,))
    full = branch_costs(growkit.finalize(cm, max_ops=3), (x,))
    one_copy = full[group.points[0]][0]
    assert all(full[p][0] == one_copy for p in group.points)

    def choose(extra: int):
        return choose_points(cm, (x,), current=base, base=base, max_ops=3, partial=False,
                             budget=Budget(params=base.params + extra, relative=False))

    # a budget that holds one copy but not all of them grows none of the group
    pick = choose(one_copy * len(group.points) - 1)
    assert not set(group.points) & set(pick.points)
    # a budget that holds every copy grows all of them, and the grown model's measured size is
    # the base plus the sum over copies
    pick = choose(sum(full[p][0] for p in group.points))
    assert pick.points == list(group.points)  # ranked first, and it uses up the budget
    grown = growkit.finalize(cm, edges=pick.edges)
    assert count_params(grown) == base.params + sum(full[p][0] for p in group.points)
    # with room for more, tie groups are still all-or-nothing
    pick = choose(10 * sum(full[p][0] for p in group.points))
    for g in cm.ties:
        assert len(set(g.points) & set(pick.points)) in (0, len(g.points))
    assert count_params(growkit.finalize(cm, edges=pick.edges)) == base.params + sum(full[p][0] for p in pick.points)


def test_bad_tie_values_get_a_growkit_error(digits, cellnet):
    x = torch.zeros(1, 1, 16, 16)
    for bad in ("cell", "", None, 1, "Stage"):
        with pytest.raises(InputError, match="tie must be one of"):
            growkit.inject(cellnet, x, tie=bad)
        with pytest.raises(InputError, match="tie must be one of"):
            growkit.grow(cellnet, digits[0], digits[1], rounds=0, tie=bad, progress=False)
        with pytest.raises(InputError, match="tie must be one of"):
            growkit.Grower(cellnet, x, tie=bad)
    cm = growkit.inject(cellnet, x, tie="stage", ops=("identity",))
    g = cm.ties[0]
    edges = growkit.core.finalize.selected_edges(cm, max_ops=1)
    with pytest.raises(InputError, match="tied with"):
        growkit.finalize(cm, edges={g.points[0]: edges[g.points[0]]})
    wrong = dict(edges)
    wrong[g.points[1]] = [(cm.candidates[g.points[1]].input_names[0] if edges[g.points[1]][0][0] !=
                           cm.candidates[g.points[1]].input_names[0] else cm.candidates[g.points[1]].input_names[1],
                           "identity", 1.0)]
    with pytest.raises(InputError, match="same relative edges"):
        growkit.finalize(cm, edges=wrong)


def test_plan_tie_field_is_validated_and_old_plans_still_load(cellnet):
    x = torch.zeros(1, 1, 16, 16)
    cm = growkit.inject(cellnet, x, tie="stage", ops=("identity",))
    _perturb_alphas(cm)
    d = growkit.plan_of(growkit.finalize(cm, max_ops=1)).to_dict()
    assert any("tie" in e for e in d["edits"])
    old = json.loads(json.dumps(d))
    for e in old["edits"]:
        e.pop("tie", None)
    assert all(e.tie == "" for e in growkit.GrowthPlan.from_dict(old).edits)  # plans from before cell mode
    for bad in ("g99", "x" * 600, 3, "", "__class__", ["g0"]):
        broken = json.loads(json.dumps(d))
        next(e for e in broken["edits"] if "tie" in e)["tie"] = bad
        with pytest.raises(PlanError):
            growkit.GrowthPlan.from_dict(broken)
    forward = json.loads(json.dumps(d))
    forward["edits"][0]["tie"] = forward["edits"][-1]["key"]  # a tie names this or an earlier edit
    with pytest.raises(PlanError, match="not the key of this or an earlier edit"):
        growkit.GrowthPlan.from_dict(forward)


def test_tie_none_is_macro_search():
    torch.manual_seed(0)
    model = CellNet()
    x = torch.randn(1, 1, 16, 16)
    torch.manual_seed(1)
    a = growkit.inject(model, x)
    torch.manual_seed(1)
    b = growkit.inject(model, x, tie="none")
    assert b.ties == [] and len({id(c.alpha) for c in b.candidates.values()}) == len(b.candidates)
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    groups = tie_groups(b.state.points, b.state.points, {p.name: p.inputs for p in b.state.points}, "none")
    assert groups == []


def test_grower_grows_tied_groups_exactly(digits, cellnet):
    train_l, val_l = digits
    g = growkit.Grower(cellnet, torch.zeros(1, 1, 16, 16), tie="stage", ops=("sep_conv_3x3", "identity"),
                       warmup_steps=2, min_steps=5, seed=0)
    assert g.model.ties and g.tie == "stage"
    opt = torch.optim.SGD(g.parameters(), lr=0.05, momentum=0.9)
    g.attach(opt)
    for i, (x, y) in enumerate(train_l):
        if i == 6:
            break
        loss = F.cross_entropy(g.model(x), y) + g.extra_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        g.after_step()
    for c in g.model.candidates.values():  # every point fits: the budget-free growth takes them all
        c.score_sum.fill_(1.0)
        c.score_count.fill_(1.0)
    x = next(iter(val_l))[0]
    before = run_eval(g.model, x)
    ev = g.end_experience(1)
    assert ev.chosen and ev.exact, ev.note
    assert torch.equal(run_eval(g.model, x), before)
    ties = {e.tie for e in g.plan.edits if e.tie}
    assert len(ties) == 2  # both stages' cells grew, each as one pattern
    assert g.model.ties  # fresh tied candidates on the grown model
    # a checkpoint round trip keeps the cells: same plan, still one alpha per group, same outputs
    meta, tensors = g.state_dict()
    g2 = growkit.Grower.from_state(cellnet, torch.zeros(1, 1, 16, 16), meta, tensors, tie="stage",
                                   ops=("sep_conv_3x3", "identity"), warmup_steps=2, min_steps=5, seed=0)
    assert g2.plan.edits == g.plan.edits
    for grp in g2.model.ties:
        assert len({id(g2.model.candidates[p].alpha) for p in grp.points}) == 1
    assert torch.equal(run_eval(g2.model, x), run_eval(g.model, x))


# ------------------------------------------------------------------------------ search passes
SEARCH_OPTIONS = {
    "darts": {},
    "enas": {"controller_every": 5, "controller_steps": 3, "final_samples": 3},
    "pnas": {"k": 2, "levels": 2, "surrogate_epochs": 50},
}


def test_search_space_ties_atoms_costs_every_copy_and_grows_exactly():
    import random

    from growkit.core.surgery import growable
    from growkit.search.common import grow_proposal
    from growkit.search.space import SearchSpace

    torch.manual_seed(0)
    model = CellNet().eval()
    x = torch.randn(2, 1, 16, 16)
    gm = growable(model, x[:1])
    macro = SearchSpace(gm, ops=("sep_conv_3x3", "identity"))
    space = SearchSpace(gm, ops=("sep_conv_3x3", "identity"), tie="stage")
    assert macro.ties == [] and len(space.ties) == 2
    followers = {p for g in space.ties for p in g.points[1:]}
    assert {a.point for a in space.atoms} == {p.name for p in space.decision_points}
    assert not followers & {a.point for a in space.atoms}
    assert len(space.atoms) == len(macro.atoms) - sum(1 for a in macro.atoms if a.point in followers)
    base = measure(gm, x[:1])
    space.parent_cost = base
    rng = random.Random(0)
    for size in (1, 3, 6):
        proposal = space.random_proposal(rng, size=size)
        atoms = space.expand(proposal)
        assert space.added_cost(proposal) == macro.added_cost(atoms)  # every copy counted
        child = grow_proposal(gm, space, proposal, 0)
        assert space.cost(proposal) == measure(child, x[:1])
        assert torch.equal(run_eval(child, x), run_eval(gm, x))
        plan = growkit.plan_of(child)
        assert {(e.point, d.input, d.op) for e in plan.edits for d in e.edges} == {(a.point, a.input, a.op) for a in atoms}
        for g in space.ties:
            grown = [e for e in plan.edits if e.point in g.points]
            assert len(grown) in (0, len(g.points))
            assert len({e.tie for e in grown}) <= 1 and all(e.tie for e in grown)
    # a budget that holds one copy of a tied atom but not all of them refuses it
    g = space.ties[1]
    a = next(a for a in space.atoms if a.point == g.points[0])
    one = macro.added_cost([a])[0]
    space.budget, space.base_cost = Budget(params=base.params + one * len(g.points) - 1, relative=False), base
    assert macro.added_cost([a])[0] * len(g.points) == space.added_cost([a])[0]
    assert not space.feasible([a])
    with pytest.raises(InputError, match="tie must be one of"):
        SearchSpace(gm, tie="cells")


@pytest.mark.parametrize("method", sorted(SEARCH_OPTIONS))
def test_search_passes_grow_cells(method, digits, cellnet):
    train_l, val_l = digits
    res = growkit.grow(cellnet, train_l, val_l, method=method, method_options=SEARCH_OPTIONS[method], rounds=1,
                       tie="stage", ops=("sep_conv_3x3", "identity"), seed=0, progress=False)
    grown = [e for e in res.gallery if e.kind == "grown"]
    assert len(grown) == 1
    plan = grown[0].plan
    # tie groups as grow() forms them: with its max_inputs (relative inputs are part of a group's pattern)
    cm = growkit.inject(cellnet, torch.zeros(1, 1, 16, 16), tie="stage", max_inputs=growkit.GrowConfig().max_inputs)
    groups = {g.points[0]: set(g.points) for g in cm.ties}
    for e in plan.edits:
        if e.point in {p for g in cm.ties for p in g.points}:
            first = next(f for f in plan.edits if f.key == e.tie)
            assert e.point in groups[first.point]
    by_tie: dict[str, set] = {}
    for e in plan.edits:
        if e.tie:
            by_tie.setdefault(e.tie, set()).add(e.point)
    if method != "pnas":  # (pnas at these tiny settings, seed 0, keeps one untied atom)
        assert by_tie, [(e.point, e.tie) for e in plan.edits]
    assert all(pts in groups.values() for pts in by_tie.values())
    assert all(len(p) == 1 for p in _relative_patterns(cm, plan).values())
    if method == "darts":  # one architecture per cell type: members' mixture weights are the same
        arch = res.history[0]["arch_weights"]
        for g in cm.ties:
            assert all([list(w.values()) for w in arch[p].values()] == [list(w.values()) for w in arch[g.points[0]].values()]
                       for p in g.points)
    replay = growkit.apply_plan(cellnet, plan)
    assert grown[0].cost.params == count_params(cellnet) + sum(count_params(b) for b in replay.growkit_branches.values())
