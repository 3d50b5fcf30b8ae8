"""growkit.widen: exact on real timm models, symmetry broken, plan replay / save / load / ONNX exact,
bad input rejected."""
from __future__ import annotations

import json

import pytest
import timm
import torch

import growkit
from growkit.core.plan import GrowthPlan
from growkit.core.surgery import apply_plan
from growkit.core.widen import REPORT_KEY, width_groups

from .conftest import TinyResNet, run_eval


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _timm(name: str, **kw):
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=10, **kw).eval()


@pytest.mark.parametrize("name,kw,size", [
    ("resnet10t", {}, 64),
    ("mobilenetv3_small_050", {}, 64),
    ("vit_tiny_patch16_224", {"img_size": 32, "depth": 2}, 32),
])
@pytest.mark.parametrize("init", ["split", "zero"])
def test_widen_is_exact_on_timm_models(name, kw, size, init):
    m = _timm(name, **kw)
    x = torch.randn(2, 3, size, size)
    w = growkit.widen(m, x[:1], ratio=1.5, init=init, seed=0)
    report = w.meta[REPORT_KEY]
    assert report["widened"], report
    assert sum(p.numel() for p in w.parameters()) > sum(p.numel() for p in m.parameters())
    assert _rel(run_eval(w, x), run_eval(m, x)) <= 1e-5
    # the model given is untouched
    assert all(not k.startswith("growkit") for k in m.state_dict())


def test_vit_widens_mlp_hidden_and_residual_stream_with_reasons_for_the_rest():
    m = _timm("vit_tiny_patch16_224", img_size=32, depth=2)
    groups = {g.layer: g for g in width_groups(m, torch.randn(1, 3, 32, 32))}
    assert not groups["blocks.0.mlp.fc1"].reason and groups["blocks.0.mlp.fc1"].norm == ""
    assert "attention heads" in groups["blocks.0.attn.qkv"].reason
    # the residual stream is LayerNorm-normalised: it widens by LEMON's average expansion
    stream = [g for g in groups.values() if "patch_embed.proj" in g.layers]
    assert stream and stream[0].reason == "" and stream[0].norm == "layer"


def _layer_norm_calls(gm: torch.fx.GraphModule) -> list[tuple[tuple[int, ...], float]]:
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and getattr(n.target, "__name__", "") == "layer_norm":
            out.append((tuple(n.args[1]), n.args[4] if len(n.args) > 4 else n.kwargs.get("eps", 1e-5)))
    return out


def test_layer_norm_stream_takes_lemons_average_expansion_exactly():
    """ViT residual stream 192 -> 288: every writer adds the mean channel, every LayerNorm gets
    gamma x sqrt(C / d*), new bias 0, eps x C / d*; the output is unchanged, and after one step the
    new channels learn different things (symmetry broken)."""
    m = _timm("vit_tiny_patch16_224", img_size=32, depth=2)
    x = torch.randn(4, 3, 32, 32)
    w = growkit.widen(m, x[:1], layers=["blocks.1.mlp.fc2"], ratio=1.5, seed=0)
    assert w.meta[REPORT_KEY]["widened"] == {"blocks.1.mlp.fc2": 96}
    assert _rel(run_eval(w, x), run_eval(m, x)) <= 1e-5
    c, d = 192, 288
    calls = _layer_norm_calls(w)
    assert len(calls) == 5 and all(shape == (d,) and eps == pytest.approx(1e-6 * c / d, rel=1e-12)
                                   for shape, eps in calls)
    old_g, old_b = m.blocks[0].norm1.weight.detach(), m.blocks[0].norm1.bias.detach()
    g, b = w.get_submodule("blocks.0.norm1").weight.detach(), w.get_submodule("blocks.0.norm1").bias.detach()
    assert torch.allclose(g[:c], old_g * (c / d) ** 0.5, rtol=1e-6) and torch.equal(b[:c], old_b)
    assert torch.equal(b[c:], torch.zeros(d - c))
    # the writers' new rows are the mean of the old ones: every new stream channel carries the mean
    fc2 = w.get_submodule("blocks.0.mlp.fc2").weight.detach()
    assert torch.allclose(fc2[c:], m.blocks[0].mlp.fc2.weight.detach().mean(0, keepdim=True).expand(d - c, -1),
                          rtol=1e-6, atol=1e-7)
    assert w.get_submodule("blocks.0.mlp.fc1").in_features == d and w.get_submodule("head").in_features == d
    # train mode: gradients reach the new units and differ between them
    w.train()
    loss = torch.nn.functional.cross_entropy(w(x), torch.randint(0, 10, (4,)))
    loss.backward()
    gb = w.get_submodule("blocks.0.norm1").bias.grad[c:]
    grows = w.get_submodule("blocks.0.mlp.fc2").weight.grad[c:]
    assert gb.abs().max() > 0 and grows.abs().max() > 0
    assert not torch.allclose(grows[0], grows[1])


def test_layer_scale_in_a_layer_norm_stream_is_folded_into_its_writer():
    """deit3 scales each branch per channel (LayerScale): the writer's new rows become
    mean(gamma_c W_c) and the scale's new entries 1, so the branch adds the mean channel."""
    m = _timm("deit3_small_patch16_224", img_size=32, depth=2)
    x = torch.randn(2, 3, 32, 32)
    w = growkit.widen(m, x[:1], layers=["blocks.1.mlp.fc2"], ratio=1.5, seed=0)
    assert w.meta[REPORT_KEY]["layer_norm"] == ["blocks.1.mlp.fc2"]
    assert _rel(run_eval(w, x), run_eval(m, x)) <= 1e-5
    c = m.blocks[0].ls2.gamma.numel()
    assert torch.equal(w.get_submodule("blocks.0.ls2").gamma.detach()[c:], torch.ones(c // 2))
    gamma, fc2 = m.blocks[0].ls2.gamma.detach(), m.blocks[0].mlp.fc2.weight.detach()
    want = (gamma[:, None] * fc2).mean(0)
    assert torch.allclose(w.get_submodule("blocks.0.mlp.fc2").weight.detach()[c], want, rtol=1e-5, atol=1e-8)


class _RawReader(torch.nn.Module):
    """A LayerNorm module (an fx leaf) and a layer reading the raw, un-normalised sum."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.ln, self.norm_reader, self.raw_reader = (
            torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3), torch.nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.norm_reader(self.ln(h)) + self.raw_reader(h)


def test_layer_norm_module_and_a_raw_reader_widen_exactly():
    torch.manual_seed(0)
    m = _RawReader().eval()
    x = torch.randn(16, 4)
    w = growkit.widen(m, x[:1], layers=["inp"], ratio=1.5, seed=0)
    assert _rel(run_eval(w, x), run_eval(m, x)) <= 1e-5
    ln = w.get_submodule("ln")
    assert ln.normalized_shape == (12,) and ln.eps == pytest.approx(1e-5 * 8 / 12, rel=1e-12)
    raw, normed = w.get_submodule("raw_reader").weight.detach(), w.get_submodule("norm_reader").weight.detach()
    assert torch.equal(raw[:, 8:], torch.zeros(3, 4))  # it sees the mean: new weights must start at 0
    assert normed[:, 8:].abs().min() > 0  # it sees exact zeros: new weights are free (random)


def _source_of(w_new: torch.Tensor, w_old: torch.Tensor, row: int) -> int:
    """The original row the new ``row`` copies (split init)."""
    hits = [i for i in range(w_old.shape[0]) if torch.equal(w_new[row], w_old[i])]
    assert hits, "a split unit must start as an exact copy of an original unit"
    return hits[0]


@pytest.mark.parametrize("noise,broken", [(0.01, True), (0.0, False)])
def test_split_gets_gradients_and_breaks_symmetry_after_one_step(noise, broken):
    torch.manual_seed(0)
    m = TinyResNet()
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    w = growkit.widen(m, x[:1], layers=["stages.0.0.conv1"], ratio=1.5, noise=noise, seed=0)
    conv = w.get_submodule("stages.0.0.conv1")
    old = m.stages[0][0].conv1.weight
    c = old.shape[0]
    assert conv.weight.shape[0] == c + 4
    src = _source_of(conv.weight.detach(), old.detach(), c)
    w.train()
    opt = torch.optim.SGD(w.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(w(x), y).backward()
    assert conv.weight.grad[c:].abs().sum() > 0  # gradients reach the new units
    opt.step()
    differ = not torch.allclose(conv.weight[c], conv.weight[src], rtol=0, atol=1e-7)
    # With noise=0 the copies get equal gradients and stay copies (Net2Net's symmetry problem):
    # the check has teeth. The opposite-signed perturbation of the split breaks it.
    assert differ is broken


def test_zero_init_new_columns_start_zero_and_learn():
    torch.manual_seed(0)
    m = TinyResNet()
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    w = growkit.widen(m, x[:1], layers=["stages.0.0.conv1"], ratio=1.5, init="zero", seed=0)
    reader = w.get_submodule("stages.0.0.conv2")
    assert torch.equal(reader.weight[:, 8:], torch.zeros_like(reader.weight[:, 8:]))
    writer = w.get_submodule("stages.0.0.conv1")
    assert not torch.equal(writer.weight[8], writer.weight[9])  # new units differ from the start
    w.train()
    torch.nn.functional.cross_entropy(w(x), y).backward()
    assert reader.weight.grad[:, 8:].abs().sum() > 0


def test_residual_stream_widens_together():
    torch.manual_seed(0)
    m = TinyResNet()
    x = torch.randn(2, 1, 16, 16)
    w = growkit.widen(m, x[:1], layers=["stages.1.0.short.0"], ratio=1.25, seed=0)
    # the shortcut, both blocks' outputs of stage 1 and the readers of stage 2 grow as one group
    assert w.get_submodule("stages.1.0.conv2").out_channels == 20
    assert w.get_submodule("stages.1.1.conv2").out_channels == 20
    assert w.get_submodule("stages.1.1.conv1").in_channels == 20
    assert w.get_submodule("stages.2.0.conv1").in_channels == 20
    assert _rel(run_eval(w, x), run_eval(m, x)) <= 1e-5


def test_plan_replay_save_load_and_onnx_are_exact(tmp_path):
    m = _timm("resnet10t")
    x = torch.randn(2, 3, 64, 64)
    w = growkit.widen(m, x[:1], ratio=1.25, seed=0)
    w = growkit.widen(w, ratio=1.25, layers=["layer1.0.conv1"], init="zero", seed=1)  # twice: order matters
    plan = growkit.plan_of(w)
    assert [r.kind for r in plan.resizes] == ["widen", "widen"]
    d = json.loads(plan.to_json())
    assert d["version"] == 2 and len(d["resizes"]) == 2
    again = apply_plan(m, GrowthPlan.from_json(plan.to_json()), x[:1])
    again.load_state_dict(w.state_dict())
    assert torch.equal(run_eval(again, x), run_eval(w, x))
    growkit.save(w, tmp_path / "w")
    back = growkit.load(tmp_path / "w", base_model=m)
    assert torch.equal(run_eval(back, x), run_eval(w, x))
    report = growkit.export_onnx(w, tmp_path / "w.onnx", x[:1])
    assert report.max_rel_diff <= 1e-5


def test_layer_norm_widening_replays_exactly_twice_over(tmp_path):
    """The LayerNorm shapes and eps are code, not weights: replay must redo them, and a second
    widening of the same stream scales from the first one's values."""
    m = _timm("vit_tiny_patch16_224", img_size=32, depth=2)
    x = torch.randn(2, 3, 32, 32)
    w = growkit.widen(m, x[:1], layers=["blocks.1.mlp.fc2"], ratio=1.25, seed=0)
    w = growkit.widen(w, layers=["blocks.1.mlp.fc2"], ratio=1.2, seed=1)
    assert _rel(run_eval(w, x), run_eval(m, x)) <= 1e-5
    assert {shape for shape, _ in _layer_norm_calls(w)} == {(288,)}
    assert all(eps == pytest.approx(1e-6 * 192 / 288, rel=1e-9) for _, eps in _layer_norm_calls(w))
    again = apply_plan(m, GrowthPlan.from_json(growkit.plan_of(w).to_json()), x[:1])
    again.load_state_dict(w.state_dict())
    assert torch.equal(run_eval(again, x), run_eval(w, x))
    growkit.save(w, tmp_path / "w")
    back = growkit.load(tmp_path / "w", base_model=m)
    assert torch.equal(run_eval(back, x), run_eval(w, x))
    assert growkit.export_onnx(w, tmp_path / "w.onnx", x[:1]).max_rel_diff <= 1e-5


def test_widen_after_petridish_branch_replays(tiny_resnet, tmp_path):
    x = torch.randn(2, 1, 16, 16)
    cm = growkit.inject(tiny_resnet, x[:1], ops=["identity"], max_inputs=1)
    grown = growkit.finalize(cm)
    with torch.no_grad():  # switch the branches on so widening must carry them exactly
        for b in grown.growkit_branches.values():
            b.eta.fill_(0.5)
    w = growkit.widen(grown, ratio=1.5, seed=0)
    assert _rel(run_eval(w, x), run_eval(grown, x)) <= 1e-5
    growkit.save(w, tmp_path / "g")
    back = growkit.load(tmp_path / "g", base_model=tiny_resnet)
    assert torch.equal(run_eval(back, x), run_eval(w, x))
    # and Petridish grows on the widened model: the points' shapes follow the new widths
    cm2 = growkit.inject(w, ops=["identity"], max_inputs=1)
    assert torch.equal(run_eval(cm2, x), run_eval(w, x))


def test_channel_pruning_still_works_on_a_widened_model(digits):
    train_l, val_l = digits
    torch.manual_seed(0)
    m = TinyResNet(widths=(4, 8, 16))
    w = growkit.widen(m, torch.randn(1, 1, 16, 16), ratio=1.5, seed=0)
    res = growkit.prune(w, train_l, val_l, method="channels", budget=0.9, finetune_epochs=0, steps=2,
                        progress=False)
    assert res.gallery[-1].cost.params < res.gallery[0].cost.params


def test_bad_input_gives_growkit_errors(tiny_resnet):
    x = torch.randn(1, 1, 16, 16)
    with pytest.raises(growkit.InputError, match="ratio"):
        growkit.widen(tiny_resnet, x, ratio=0.5)
    with pytest.raises(growkit.InputError, match="init"):
        growkit.widen(tiny_resnet, x, init="lemon")
    with pytest.raises(growkit.PointError, match="no_such"):
        growkit.widen(tiny_resnet, x, layers=["no_such.layer"])
    with pytest.raises(growkit.InputError, match="logits"):
        growkit.widen(tiny_resnet, x, layers=["head"])
    rms = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.RMSNorm(8), torch.nn.Linear(8, 3))
    with pytest.raises(growkit.InputError, match="RMSNorm"):
        growkit.widen(rms, torch.randn(1, 4), layers=["0"])
    assert isinstance(growkit.widen(tiny_resnet, x, ratio=1), torch.nn.Module)  # ratio 1: nothing to add


def test_plan_resize_records_are_validated():
    base = {"format": "growkit.plan", "version": 2, "edits": []}
    good = {"kind": "widen", "key": "w0", "after": 0, "layers": [["layer1.0.conv1", 4]], "init": "split"}
    assert GrowthPlan.from_dict({**base, "resizes": [good]}).resizes[0].layers == (("layer1.0.conv1", 4),)
    bad = [
        {**good, "layers": [["__import__('os')", 4]]},
        {**good, "layers": [["layer1", -1]]},
        {**good, "layers": [["layer1", True]]},
        {**good, "init": "exec"},
        {**good, "after": 3},
        {**good, "kind": "shrink"},
        {"kind": "deepen", "key": "d0", "after": 0, "point": "layer1_0_act2", "block": "anything"},
        {"kind": "deepen", "key": "d0", "after": 0, "point": "layer1.0", "block": "copy"},
    ]
    for r in bad:
        with pytest.raises(growkit.PlanError):
            GrowthPlan.from_dict({**base, "resizes": [r]})
    with pytest.raises(growkit.PlanError, match="version"):  # resizes need version 2
        GrowthPlan.from_dict({**base, "version": 1, "resizes": [good]})
    with pytest.raises(growkit.PlanError, match="twice"):
        GrowthPlan.from_dict({**base, "resizes": [good, good]})
    # a plan without resizes is still written and read as version 1
    assert GrowthPlan().to_dict()["version"] == 1 and "resizes" not in GrowthPlan().to_dict()
