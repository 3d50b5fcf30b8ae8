"""Petridish core: inject (Algorithm 1), finalize (Algorithm 2), growth plans."""
from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import growkit
from growkit.core.cost import measure
from growkit.core.finalize import selected_edges
from growkit.core.graph import outputs_equal
from growkit.core.ops import resolve_ops
from growkit.core.plan import Atom, Edge, ScoredEdge
from growkit.core.selection import branch_costs, choose_points

from .conftest import TinyResNet, run_eval

MODELS = {
    "tiny_resnet": (lambda: TinyResNet(), (4, 1, 16, 16)),
    "timm_resnet18": (lambda: timm.create_model("resnet18", num_classes=10), (4, 3, 32, 32)),
    "timm_convnext_atto": (lambda: timm.create_model("convnext_atto", num_classes=10), (4, 3, 32, 32)),
    "timm_mobilenetv3": (lambda: timm.create_model("mobilenetv3_small_050", num_classes=10), (4, 3, 32, 32)),
    "timm_vit_tiny": (lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, depth=4, num_classes=10), (4, 3, 32, 32)),
    "timm_swin_nhwc": (lambda: timm.create_model("swin_tiny_patch4_window7_224", img_size=56, depths=(1, 1), num_heads=(3, 6), drop_path_rate=0.0, num_classes=10), (4, 3, 56, 56)),
    "tv_resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (4, 3, 32, 32)),
}


def _make(name):
    torch.manual_seed(0)
    factory, shape = MODELS[name]
    model = factory()
    x = torch.randn(*shape)
    y = torch.randint(0, 10, (shape[0],))
    return model, x, y


@pytest.mark.parametrize("name", sorted(MODELS))
def test_inject_is_exact_and_trains_candidates(name):
    model, x, y = _make(name)
    ref = copy.deepcopy(model)
    cm = growkit.inject(model, x[:1], ops="paper" if name == "tiny_resnet" else None)
    assert cm.candidates
    assert outputs_equal(run_eval(cm, x), run_eval(copy.deepcopy(model), x))
    # the user's model is untouched
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))

    # one training step: base gradients identical to training without candidates
    base = copy.deepcopy(model).train()
    cm.train()
    torch.manual_seed(1)
    F.cross_entropy(base(x), y).backward()
    torch.manual_seed(1)
    seen: dict[str, tuple] = {}
    grads: dict[str, torch.Tensor] = {}

    def keep(k):
        def hook(mod, args, out):
            seen[k] = args
            out.register_hook(lambda g: grads.__setitem__(k, g))
        return hook

    hooks = [c.register_forward_hook(keep(k)) for k, c in cm.candidates.items()]
    (F.cross_entropy(cm(x), y) + cm.extra_loss()).backward()
    for h in hooks:
        h.remove()
    base_grads = dict(base.named_parameters())
    cand_ids = {id(p) for p in cm.candidate_parameters()}
    checked = 0
    for n, p in cm.module.named_parameters():
        if id(p) in cand_ids:
            continue
        g0 = base_grads[n].grad
        assert (p.grad is None) == (g0 is None), n
        if g0 is not None:
            assert torch.equal(p.grad, g0), f"gradient of {n} changed"
            checked += 1
    assert checked == len([p for p in base.parameters() if p.grad is not None])
    cps = list(cm.candidate_parameters())
    nonzero = [p for p in cps if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(nonzero) >= 0.8 * len(cps)
    for k, c in cm.candidates.items():
        assert c.alpha.grad is not None and (c.alpha.grad != 0).all()
        # The backward pass recorded exactly one score: cos(x_c, -dL/dx_k), recomputed here from
        # the candidate's inputs (a copy, so its BatchNorm statistics stay as they were).
        assert int(c.score_count) == 1, k
        with torch.no_grad():
            xc = copy.deepcopy(c).weak_learner(*(z.detach() for z in seen[k][1:])).double().flatten()
        g = -grads[k].double().flatten()
        want = float(xc @ g / (xc.norm() * g.norm()))
        assert c.score == pytest.approx(want, rel=1e-4, abs=1e-6), (k, c.score, want)


def test_gradient_identity_of_weak_learning():
    """d loss / d theta == d/dtheta <dL/dx_k, x_c> for candidate parameters (float64)."""
    torch.manual_seed(0)
    model = TinyResNet().double()
    x = torch.randn(6, 1, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 10, (6,))
    cm = growkit.inject(model, x[:1], ops=("sep_conv_3x3", "avg_pool_3x3", "identity"), l1=0.0)
    cm.train()
    cand = list(cm.candidates.values())[2]
    seen = {}
    handle = cand.register_forward_hook(lambda m, args, out: seen.update(args=args, out=out))
    loss = F.cross_entropy(cm(x), y)
    handle.remove()
    (g_k,) = torch.autograd.grad(loss, seen["out"], retain_graph=True)  # dL/dx_k
    params = [cand.alpha, *cand.ops.parameters()]
    got = torch.autograd.grad(loss, params)
    # Explicit boosting objective from the same inputs (train-mode BN: same batch statistics).
    probe = copy.deepcopy(cand)
    xc = probe.weak_learner(*(z.detach() for z in seen["args"][1:]))
    expect = torch.autograd.grad((g_k * xc).sum(), [probe.alpha, *probe.ops.parameters()])
    assert len(got) == len(expect) > 1
    for g, e in zip(got, expect):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
    assert any(g.abs().sum() > 0 for g in got[1:])


def _weak_learn(cm, x, y, steps=5, lr=0.05):
    opt = torch.optim.SGD(cm.parameters(), lr=lr, momentum=0.9)
    cm.train()
    for _ in range(steps):
        opt.zero_grad()
        (F.cross_entropy(cm(x), y) + cm.extra_loss()).backward()
        opt.step()


@pytest.mark.parametrize("name", ["tiny_resnet", "timm_vit_tiny", "timm_swin_nhwc"])
def test_finalize_exact_topk_and_eta_trains(name):
    model, x, y = _make(name)
    cm = growkit.inject(model, x[:1], ops="paper" if name == "tiny_resnet" else None)
    _weak_learn(cm, x, y)
    max_ops = 2
    grown = growkit.finalize(cm, max_ops=max_ops)
    assert outputs_equal(run_eval(grown, x), run_eval(cm, x))
    plan = growkit.plan_of(grown)
    assert len(plan.edits) == len(cm.candidates)
    for edit in plan.edits:
        cand = cm.candidates[edit.point]
        assert len(edit.edges) <= max_ops
        flat = sorted(((abs(a), (z, op)) for (z, op), a in zip(cand.edges(), cand.alpha.detach().flatten().tolist())), reverse=True)
        assert [(e.input, e.op) for e in edit.edges] == [k for _, k in flat[:max_ops]]
    # train mode too: same output (eta = 0) and gradients of the base parameters unchanged
    torch.manual_seed(3)
    out_g = grown.train()(x)
    torch.manual_seed(3)
    out_c = cm.module.train()(x)
    assert torch.equal(out_g, out_c)
    # a few fine-tuning steps move eta off zero
    opt = torch.optim.SGD(grown.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(grown(x), y).backward()
        opt.step()
    etas = [b.eta.item() for b in grown.growkit_branches.values()]
    assert any(e != 0.0 for e in etas)


def test_finalize_chosen_points_only_and_proj_init():
    model, x, y = _make("tiny_resnet")
    cm = growkit.inject(model, x[:1], ops=("sep_conv_3x3", "identity"))
    _weak_learn(cm, x, y, steps=2)
    pts = list(cm.candidates)
    grown = growkit.finalize(cm, max_ops=3, points=[pts[1]])
    plan = growkit.plan_of(grown)
    assert [e.point for e in plan.edits] == [pts[1]]
    branch = next(iter(grown.growkit_branches.values()))
    # the projection starts as the alpha-weighted sum: with eta = 1 the branch adds exactly x_c
    cand = cm.candidates[pts[1]]
    seen = {}
    h = branch.register_forward_hook(lambda m, a, o: seen.update(args=a))
    run_eval(grown, x)
    h.remove()
    branch.eval()
    cand.eval()
    with torch.no_grad():
        branch.eta.fill_(1.0)
        zs = seen["args"][1:]
        got = branch(torch.zeros_like(seen["args"][0]), *zs)
        by_name = dict(zip(branch.input_names, zs))
        kept = {(e.input, e.op) for e in plan.edits[0].edges}
        want = 0
        for (z, op), a, opm, norm in zip(cand.edges(), cand.alpha.flatten(), cand.ops, cand.norms):
            if (z, op) in kept:
                want = want + a * norm(opm(by_name[z]))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_random_selection_is_stable_and_finalize_grows_given_edges():
    model, x, y = _make("tiny_resnet")
    cm = growkit.inject(model, x[:1], ops="paper")
    _weak_learn(cm, x, y, steps=2)
    pts = list(cm.candidates)

    def draw(points=None):
        return selected_edges(cm, 3, points, "random", torch.Generator().manual_seed(7))

    full = draw()
    # a point's random edges do not depend on which other points are asked for
    assert draw([pts[2]]) == {pts[2]: full[pts[2]]}
    assert draw(pts[1:3]) == {p: full[p] for p in pts[1:3]}
    # finalize(edges=) grows exactly the given (costed) edges, whatever selection would pick now
    chosen = {p: full[p] for p in (pts[0], pts[2])}
    grown = growkit.finalize(cm, edges=chosen)
    plan = growkit.plan_of(grown)
    assert {e.point: [(g.input, g.op) for g in e.edges] for e in plan.edits} == {
        p: [(z, op) for z, op, _ in es] for p, es in chosen.items()}
    assert torch.equal(run_eval(grown, x), run_eval(cm, x))
    with pytest.raises(growkit.InputError, match="no candidate edge"):
        growkit.finalize(cm, edges={pts[0]: [("nope", "identity", 1.0)]})
    with pytest.raises(growkit.PointError, match="no candidate at point"):
        growkit.finalize(cm, edges={"nope": []})
    # One concept, named shapes: selection returns ScoredEdges, plain tuples grow the same model,
    # and the grown edits hand back the same edges as Atoms (what the search passes choose).
    assert all(isinstance(e, ScoredEdge) for es in full.values() for e in es)
    as_tuples = growkit.finalize(cm, edges={p: [tuple(e) for e in es] for p, es in chosen.items()})
    assert as_tuples.state_dict().keys() == grown.state_dict().keys()
    assert all(torch.equal(v, as_tuples.state_dict()[k]) for k, v in grown.state_dict().items())
    assert {a for e in plan.edits for a in e.atoms()} == {
        Atom(p, e.input, e.op) for p, es in chosen.items() for e in es}
    assert all(isinstance(g, Edge) for e in plan.edits for g in e.edges)


def test_budget_keeps_leading_edges_of_a_point_that_does_not_fit_whole():
    model, x, y = _make("tiny_resnet")
    cm = growkit.inject(model, x[:1], ops="paper")
    _weak_learn(cm, x, y, steps=5)
    ex = (x[:1],)
    c0 = measure(model, ex)
    free = choose_points(cm, ex, current=c0, base=c0, budget=None, max_ops=3)
    assert len(free.points) >= 2 and all(len(e) == 3 for e in free.edges.values())
    p1, p2 = free.points[:2]
    costs = branch_costs(growkit.finalize(cm, edges=free.edges), ex)
    one = branch_costs(growkit.finalize(cm, edges={p2: free.edges[p2][:1]}), ex)[p2]
    assert one[0] < costs[p2][0]
    # room for p1 whole and p2's first edge, not for p2 whole; absolute so that no ratio rounds
    budget = growkit.Budget(params=c0.params + costs[p1][0] + one[0], relative=False)
    got = choose_points(cm, ex, current=c0, base=c0, budget=budget, max_ops=3)
    assert got.points[:2] == [p1, p2]
    assert got.edges[p1] == free.edges[p1] and got.edges[p2] == free.edges[p2][:1]
    grown = growkit.finalize(cm, edges=got.edges)
    assert measure(grown, ex).params <= budget.params
    assert torch.equal(run_eval(grown, x), run_eval(cm, x))
    # all-or-nothing (partial=False) skips p2 instead
    whole = choose_points(cm, ex, current=c0, base=c0, budget=budget, max_ops=3, partial=False)
    assert p1 in whole.points and p2 not in whole.points
    assert all(whole.edges[p] == free.edges[p] for p in whole.points)


def test_plan_round_trip_replays_exactly(tmp_path):
    model, x, y = _make("tiny_resnet")
    cm = growkit.inject(model, x[:1], ops="paper", max_inputs=2)
    _weak_learn(cm, x, y)
    grown = growkit.finalize(cm)
    # train the grown model so eta and branches are non-trivial
    opt = torch.optim.SGD(grown.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(grown.train()(x), y).backward()
        opt.step()
    plan = growkit.plan_of(grown)
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = growkit.GrowthPlan.load(path)
    assert loaded.to_dict() == plan.to_dict()
    assert json.loads(path.read_text())["format"] == "growkit.plan"
    replayed = growkit.apply_plan(model, loaded)
    assert list(replayed.state_dict()) == list(grown.state_dict())
    replayed.load_state_dict(grown.state_dict())
    assert torch.equal(run_eval(replayed, x), run_eval(grown, x))
    # a second round of growth on the grown model also replays
    cm2 = growkit.inject(grown, ops=("identity",), points=[plan.edits[0].point])
    assert torch.equal(run_eval(cm2, x), run_eval(grown, x))
    grown2 = growkit.finalize(cm2)
    plan2 = growkit.plan_of(grown2)
    assert len(plan2.edits) == len(plan.edits) + 1
    replayed2 = growkit.apply_plan(model, growkit.GrowthPlan.from_json(plan2.to_json()))
    replayed2.load_state_dict(grown2.state_dict())
    assert torch.equal(run_eval(replayed2, x), run_eval(grown2, x))


def test_user_registered_op():
    reg = growkit.core.ops.DEFAULT_REGISTRY.copy()
    reg.register("conv1x1", lambda s: nn.Conv2d(s.c_in, s.c_out, 1, stride=s.factor))
    model, x, y = _make("tiny_resnet")
    cm = growkit.inject(model, x[:1], ops=("conv1x1",), registry=reg)
    assert outputs_equal(run_eval(cm, x), run_eval(model, x))
    grown = growkit.finalize(cm, registry=reg)
    assert {e.op for ed in growkit.plan_of(grown).edits for e in ed.edges} == {"conv1x1"}
    assert "conv1x1" not in growkit.core.ops.DEFAULT_REGISTRY


def test_bad_inputs_raise_clear_errors():
    model, x, y = _make("tiny_resnet")
    with pytest.raises(growkit.PointError, match="no growth point named 'nope'"):
        growkit.inject(model, x[:1], points=["nope"])
    with pytest.raises(growkit.OpError, match="unknown op 'sep_conv_9x9'"):
        growkit.inject(model, x[:1], ops=("sep_conv_9x9",))
    with pytest.raises(growkit.OpError, match="tokens"):
        growkit.inject(model, x[:1], ops=("mlp",))
    reg = growkit.core.ops.DEFAULT_REGISTRY.copy()
    reg.register("bad", lambda s: nn.Conv2d(s.c_in, s.c_out, 3))  # no padding: wrong shape
    with pytest.raises(growkit.OpError, match="op 'bad' maps input"):
        growkit.inject(model, x[:1], ops=("bad",), registry=reg)
    cm = growkit.inject(model, x[:1])
    with pytest.raises(growkit.InputError, match="max_ops"):
        growkit.finalize(cm, max_ops=0)
    with pytest.raises(growkit.PointError):
        growkit.finalize(cm, points=["nope"])
    with pytest.raises(growkit.InputError, match="finalize"):
        growkit.inject(cm, x[:1])
    with pytest.raises(growkit.InputError, match="example_input"):
        growkit.inject(model)
    with pytest.raises(growkit.InputError):
        growkit.inject(model, x[:1], max_inputs=0)
    with pytest.raises(growkit.PlanError, match="not a growkit plan"):
        growkit.GrowthPlan.from_json("{}")
    other = timm.create_model("resnet18")
    grown = growkit.finalize(cm)
    with pytest.raises(growkit.PlanError):
        growkit.apply_plan(other, growkit.plan_of(grown), torch.randn(1, 3, 32, 32))


def test_normalized_gradient_is_scaled_identity():
    """With normalize_grad the candidate receives d/dtheta mean(g / rms(g) * x_c): same direction."""
    torch.manual_seed(0)
    model = TinyResNet().double()
    x = torch.randn(6, 1, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 10, (6,))
    cm = growkit.inject(model, x[:1], ops=("sep_conv_3x3", "identity"), l1=0.0, normalize_grad=True)
    cm.train()
    cand = list(cm.candidates.values())[1]
    seen = {}
    h = cand.register_forward_hook(lambda m, a, o: seen.update(args=a, out=o))
    out = cm(x)
    h.remove()
    assert torch.equal(out, copy.deepcopy(model).train()(x))
    loss = F.cross_entropy(out, y)
    (g,) = torch.autograd.grad(loss, seen["out"], retain_graph=True)
    got = torch.autograd.grad(loss, [cand.alpha])
    probe = copy.deepcopy(cand)
    xc = probe.weak_learner(*(z.detach() for z in seen["args"][1:]))
    g_hat = g / (g.pow(2).mean().sqrt() * g.numel())
    (expect,) = torch.autograd.grad((g_hat * xc).sum(), [probe.alpha])
    torch.testing.assert_close(got[0], expect, rtol=1e-9, atol=1e-12)


class _ChannelsLastView(torch.nn.Module):
    """Token blocks whose NCHW view (batch stride C) meets channels-last candidate outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(8, 8, 1)
        self.blocks = torch.nn.Sequential(*[_TokenBlock() for _ in range(2)])
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)

    def forward(self, x):
        x = self.stem(x).contiguous(memory_format=torch.channels_last)
        return self.dw(self.blocks(x)).mean((2, 3))


class _TokenBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2).contiguous()
        t = t + self.fc2(torch.relu(self.fc1(t)))
        return t.transpose(1, 2).view(b, c, h, w)


def test_insertion_keeps_the_point_strides():
    # Kernels pick algorithms from strides (davit differed by 6e-7 before this was kept).
    torch.manual_seed(0)
    model, x = _ChannelsLastView(), torch.randn(1, 8, 5, 5)
    seen = []
    cm = growkit.inject(model, x, ops=["identity"])
    for c in cm.candidates.values():
        c.register_forward_hook(lambda mod, args, out: seen.append((args[0].stride(), out.stride())))
    assert torch.equal(run_eval(cm, x), run_eval(model, x))
    assert seen and all(a == b for a, b in seen), seen
    grown = growkit.finalize(cm)
    seen.clear()
    for b in grown.growkit_branches.values():
        b.eta.data.fill_(0.3)
        b.register_forward_hook(lambda mod, args, out: seen.append((args[0].stride(), out.stride())))
    run_eval(grown, x)
    assert seen and all(a == b for a, b in seen), seen


def test_token_norm_eval_form_matches_batch_norm():
    from growkit.core.ops import feature_norm

    torch.manual_seed(0)
    bn = feature_norm(6, "tokens")
    x = torch.randn(4, 5, 6) * 3 + 1
    bn.train()
    bn(x)  # running statistics
    bn.eval()
    ref = F.batch_norm(x.transpose(1, 2), bn.running_mean, bn.running_var, eps=bn.eps).transpose(1, 2)
    torch.testing.assert_close(bn(x), ref, rtol=1e-6, atol=1e-6)


def test_op_batchnorm_eval_form_matches_batch_norm():
    from growkit.core.ops import OpBatchNorm2d

    torch.manual_seed(0)
    bn = OpBatchNorm2d(5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
    x = torch.randn(4, 5, 3, 3) * 2 + 1
    bn.train()
    bn(x)
    bn.eval()
    ref = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps)
    torch.testing.assert_close(bn(x), ref, rtol=1e-6, atol=1e-6)


def test_wide_ops_add_hidden_width_and_grow_exactly(tmp_path):
    """``ops="wide"``: the inverted-bottleneck ops compute in 4 x the wider side's channels and
    inject / finalize / save / load keep the function exactly, as the paper's ops do."""
    model, x, y = _make("tiny_resnet")
    assert resolve_ops("wide", "nchw") == growkit.WIDE_OPS
    assert set(growkit.PAPER_OPS) < set(growkit.WIDE_OPS)
    cm = growkit.inject(model, x[:1], ops=("mb_conv_3x3", "mb_conv_5x5"), max_inputs=2)
    checked = 0
    for name, cand in cm.candidates.items():
        point = cm.state.point(name)
        for (z, op), m in zip(cand.edges(), cand.ops):
            zin = next(e for e in point.inputs if e.name == z)
            convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
            hidden = 4 * max(zin.channels, point.channels)
            assert [c.out_channels for c in convs] == [hidden, hidden, point.channels], (z, op)
            assert convs[1].groups == hidden and convs[1].kernel_size[0] == int(op[-1])
            assert convs[1].stride[0] == zin.factor
            checked += 1
    assert checked >= 4
    assert outputs_equal(run_eval(cm, x), run_eval(copy.deepcopy(model), x))
    _weak_learn(cm, x, y)
    grown = growkit.finalize(cm, max_ops=2)
    assert torch.equal(run_eval(grown, x), run_eval(cm, x))
    assert {e.op for ed in growkit.plan_of(grown).edits for e in ed.edges} <= {"mb_conv_3x3", "mb_conv_5x5"}
    opt = torch.optim.SGD(grown.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(grown.train()(x), y).backward()
        opt.step()
    growkit.save(grown, tmp_path / "g")
    loaded = growkit.load(tmp_path / "g", base_model=model)
    assert torch.equal(run_eval(loaded, x), run_eval(grown, x))
