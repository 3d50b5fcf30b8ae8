"""Any model grows: plain CNNs (layer points), models that already ran forward (safe copy),
forward branches on ``self.training`` (train / eval graph pair), user-named points, user zoo."""
from __future__ import annotations

import copy
import threading

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import growkit
from growkit.core.dualgraph import DualGraphModule
from growkit.core.graph import outputs_equal

from .conftest import TinyResNet, run_eval
from .zoo import ZOO, PlainCNN, build


def _base_grads(model: nn.Module, params: list[nn.Parameter], args, y, seed: int = 123) -> list[torch.Tensor | None]:
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)  # same dropout masks / noise in both models
    out = model(*args)
    out = out["logits"] if isinstance(out, dict) else out[0] if isinstance(out, tuple) else out
    F.cross_entropy(out, y).backward()
    return [None if p.grad is None else p.grad.clone() for p in params]


def _randomise_alphas(cm: growkit.CandidateModel) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for c in cm.candidates.values():
            c.alpha.copy_(torch.randn(c.alpha.shape, generator=gen))


# ---------------------------------------------------------------------------------------- layers


def test_plain_cnn_gets_layer_points_and_grows_on_digits(digits):
    """Blocks of one weight layer: the old code found 0 growth points and inject raised."""
    train_l, val_l = digits
    torch.manual_seed(0)
    model = PlainCNN(in_chans=1)
    x = next(iter(train_l))[0][:1]
    lg = growkit.trace(model, x)
    assert lg.granularity == "layer"  # automatic fallback: no block has two weight layers
    assert [p.module for p in lg.points] == ["conv1.0", "conv2.0", "conv3.0", "conv4.0"]
    # each point is the unit's output after its norm and activation
    assert [lg.nodes[p.name]["module"] for p in lg.points] == ["conv1.2", "conv2.2", "conv3.2", "conv4.2"]
    by_name = {p.module: p for p in lg.points}
    # same stage, then exact down-sampling from the previous stage
    assert {z.relation for z in by_name["conv3.0"].inputs} == {"down"}
    assert all(z.factor == 2 for z in by_name["conv3.0"].inputs)
    assert by_name["conv3.0"].stage == by_name["conv2.0"].stage + 1
    before = copy.deepcopy(model.state_dict())
    res = growkit.grow(model, train_l, val_l, rounds=1, budget=growkit.Budget(params=1.6), seed=0, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    grown = [e for e in res.gallery if e.kind == "grown"]
    assert grown and all(e.plan.edits for e in grown)
    assert all(e.plan.base["trace"]["granularity"] == "block" for e in grown)  # fell back on its own


def test_vgg_stack_grows_exactly():
    model, args = build("vgg_stack")
    model.eval()
    cm = growkit.inject(model, args)
    assert len(cm.candidates) >= 3
    _randomise_alphas(cm)
    g = growkit.finalize(cm).eval()
    with torch.no_grad():
        assert torch.equal(g(*args), model(*args))


def test_layer_granularity_on_request_and_replay(tmp_path):
    torch.manual_seed(0)
    model = TinyResNet().eval()
    x = torch.randn(2, 1, 16, 16)
    blocks = growkit.trace(model, x[:1])
    layers = growkit.trace(model, x[:1], granularity="layer")
    assert blocks.granularity == "block" and layers.granularity == "layer"
    assert len(layers.points) > len(blocks.points)
    assert {p.module for p in layers.points} >= {"stages.0.0.conv1", "stages.1.0.short.0"}
    cm = growkit.inject(model, x[:1], granularity="layer", max_inputs=None)
    assert len(cm.candidates) == sum(1 for p in layers.points if p.inputs)
    _randomise_alphas(cm)
    g = growkit.finalize(cm)
    g.eval()
    with torch.no_grad():
        assert torch.equal(g(x), model(x))
        for b in g.growkit_branches.values():
            b.eta.fill_(0.1)
        y = g(x)
    assert not torch.equal(y, model(x))
    # the plan records the granularity, so load re-traces the same points
    growkit.save(g, tmp_path / "g")
    loaded = growkit.load(tmp_path / "g", base_model=model).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
    with pytest.raises(growkit.InputError, match="granularity"):
        growkit.trace(model, x[:1], granularity="layers")


# ----------------------------------------------------------------------------------- user points


def test_user_named_points_by_module_path_and_node_name():
    torch.manual_seed(0)
    model = TinyResNet().eval()
    x = torch.randn(2, 1, 16, 16)
    heuristic = {p.name for p in growkit.trace(model, x[:1]).points}
    lg = growkit.trace(model, x[:1], points=["stages.1.0.bn1", "add_1"])
    extra = [p for p in lg.points if p.name not in heuristic]
    assert {p.name for p in extra} == {"stages_1_0_bn1", "add_1"}
    assert all(p.inputs for p in extra)
    cm = growkit.inject(model, x[:1], points=["stages.1.0.bn1"])
    assert list(cm.candidates) == ["stages_1_0_bn1"]
    _randomise_alphas(cm)
    g = growkit.finalize(cm).eval()
    with torch.no_grad():
        assert torch.equal(g(x), model(x))


@pytest.mark.parametrize(
    "name, why",
    [
        ("nope", "neither a module path nor an fx node name"),
        ("head", "2-D output"),  # a module whose output is not a feature map / tokens
        ("size", "not a growth point"),  # an fx node whose value is not a tensor
    ],
)
def test_bad_point_names_raise_point_error(name, why):
    class SizeUser(TinyResNet):
        def forward(self, x):
            n = x.size(0)
            x = self.stages(self.stem(x))
            return self.head(x.mean((2, 3))).reshape(n, -1)

    torch.manual_seed(0)
    model = SizeUser()
    x = torch.randn(1, 1, 16, 16)
    with pytest.raises(growkit.PointError) as err:
        growkit.inject(model, x, points=[name])
    msg = str(err.value)
    assert repr(name) in msg and why in msg
    assert "Growth points found: relu_1 (stages.0.0)" in msg and "valid names include: stem_0" in msg


# ------------------------------------------------------------------------------------- safe copy


def test_trace_after_forward_levit_grows_and_leaves_model_untouched():
    """levit caches attention biases computed from parameters: deepcopy used to raise."""
    torch.manual_seed(0)
    model = timm.create_model("levit_128s", num_classes=10)
    x = torch.randn(1, 3, 224, 224)
    model.eval()
    model(x)  # autograd on, as a quick script does: the caches hold non-leaf tensors
    caches = {n: dict(m.attention_bias_cache) for n, m in model.named_modules() if hasattr(m, "attention_bias_cache")}
    assert any(t.grad_fn is not None for c in caches.values() for t in c.values())
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lg = growkit.trace(model, x)
    assert len(lg.points) >= 10
    cm = growkit.inject(model, x)
    cm.eval()
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(cm(x), ref)
    cm(x)  # the candidate model's own attention modules fill their caches too
    _randomise_alphas(cm)
    g = growkit.finalize(cm).eval()
    with torch.no_grad():
        assert torch.equal(g(x), ref)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    after = {n: dict(m.attention_bias_cache) for n, m in model.named_modules() if hasattr(m, "attention_bias_cache")}
    assert after.keys() == caches.keys()
    assert all(after[n].keys() == caches[n].keys() and all(after[n][k] is caches[n][k] for k in caches[n]) for n in caches)


def test_weight_norm_and_uncopyable_hooks_are_copied_safely():
    class Logger:
        def __init__(self) -> None:
            self.lock = threading.Lock()  # deepcopy cannot copy a lock
            self.calls = 0

        def hook(self, module, inputs, output) -> None:
            self.calls += 1

    torch.manual_seed(0)
    model = TinyResNet()
    model.stages[0][0].conv1 = torch.nn.utils.weight_norm(model.stages[0][0].conv1)
    model.stages[1][0].conv1 = torch.nn.utils.parametrizations.weight_norm(model.stages[1][0].conv1)
    log = Logger()
    model.head.register_forward_hook(log.hook)
    x = torch.randn(2, 1, 16, 16)
    model.eval()
    model(x)  # weight_norm's computed weight is now a non-leaf attribute
    with pytest.raises(Exception):
        copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cm = growkit.inject(model, x[:1])
    cm.eval()
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(cm(x), ref)
    _randomise_alphas(cm)
    g = growkit.finalize(cm).eval()
    with torch.no_grad():
        assert torch.equal(g(x), ref)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # weight_norm's parameters still train in the grown model
    g.train()
    F.cross_entropy(g(x), torch.tensor([1, 2])).backward()
    wn = dict(g.named_parameters())
    assert wn["stages.0.0.conv1.weight_g"].grad is not None
    assert wn["stages.1.0.conv1.parametrizations.weight.original0"].grad is not None


# ----------------------------------------------------------------------------- train/eval graphs


def test_ghostnet_train_mode_gradients_equal_the_originals():
    """ghostnet's F.dropout(training=self.training) used to be frozen in its eval branch: 13 of
    272 parameter gradients matched the original's in train mode."""
    torch.manual_seed(0)
    model = timm.create_model("ghostnet_050", num_classes=10, drop_rate=0.2)
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([1, 2, 3, 4])
    cm = growkit.inject(model, x[:1])
    assert isinstance(cm.module, DualGraphModule)
    ref = copy.deepcopy(model)
    params = list(ref.parameters())
    g_ref = _base_grads(ref, params, (x,), y)
    base = list(cm.base_parameters())
    assert len(base) == len(params) == 272
    g_cm = _base_grads(cm, base, (x,), y)
    assert all(torch.equal(a, b) for a, b in zip(g_ref, g_cm))
    # eval mode still switches to the eval graph (no dropout): exact
    cm.eval()
    ref.eval()
    with torch.no_grad():
        assert torch.equal(cm(x), ref(x))
    # the grown model (and its deep copies) keep both graphs
    grown = copy.deepcopy(growkit.finalize(cm))
    assert isinstance(grown, DualGraphModule)
    g_grown = _base_grads(grown, [p for n, p in grown.named_parameters() if not n.startswith("growkit_")], (x,), y)
    g_ref = _base_grads(ref, params, (x,), y)
    assert all(torch.equal(a, b) for a, b in zip(g_ref, g_grown))


def test_flag_branch_keeps_points_after_a_train_only_branch():
    model, args = build("flag_branch", batch=4)
    y = torch.tensor([0, 1, 2, 3])
    lg = growkit.trace(model, args)
    assert isinstance(lg.graph_module, DualGraphModule)
    # the train-only noise shifts fx's node names; points after it are still found
    assert [p.module for p in lg.points] == ["a.0", "b.0", "c.0"]
    cm = growkit.inject(model, args)
    params = list(model.parameters())
    g_ref = _base_grads(model, params, args, y)
    g_cm = _base_grads(cm, list(cm.base_parameters()), args, y)
    assert all(torch.equal(a, b) for a, b in zip(g_ref, g_cm))
    # candidates train in train mode (their parameters get gradients at every point)
    assert all(c.alpha.grad is not None for c in cm.candidates.values())


# ----------------------------------------------------------------------------------------- zoo


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_inject_finalize_exact(name):
    model, args = build(name, batch=2)
    model.eval()
    with torch.no_grad():
        ref = model(*args)
    cm = growkit.inject(model, args)
    assert cm.candidates
    cm.eval()
    with torch.no_grad():
        assert outputs_equal(cm(*args), ref)
    _randomise_alphas(cm)
    g = growkit.finalize(cm).eval()
    with torch.no_grad():
        assert outputs_equal(g(*args), ref)


def test_grower_takes_granularity_and_user_named_points():
    """Grower (and grow_stream through grower_options) find points the way grow() does."""
    torch.manual_seed(0)
    model = TinyResNet()
    x = torch.randn(1, 1, 16, 16)
    layer = growkit.Grower(model, x, granularity="layer")
    assert list(layer.model.candidates) == [p.name for p in growkit.trace(model, x, granularity="layer").points
                                            if p.inputs]
    assert len(layer.model.candidates) > len(growkit.Grower(model, x).model.candidates)
    named = growkit.Grower(model, x, points=["relu_2"])  # inside a block: not a heuristic point
    assert list(named.model.candidates) == ["relu_2"]
    assert torch.equal(run_eval(named.model, x), run_eval(model, x))
    with pytest.raises(growkit.PointError, match="nope"):
        growkit.Grower(model, x, points=["nope"])
