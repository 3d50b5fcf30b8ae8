"""growkit.trace: exact traced-vs-eager equality, growth points, clear errors."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from torch import nn

import growkit
from growkit.core.graph import outputs_equal

from .conftest import run_eval

# (factory, input shape, expected layouts among growth points)
ARCHS = {
    "timm_resnet18": (lambda: timm.create_model("resnet18", num_classes=10), (2, 3, 32, 32), {"nchw"}),
    "timm_resnetv2_18": (lambda: timm.create_model("resnetv2_18", num_classes=10), (2, 3, 32, 32), {"nchw"}),
    "timm_convnext_atto": (lambda: timm.create_model("convnext_atto", num_classes=10), (2, 3, 32, 32), {"nchw"}),
    "timm_mobilenetv3": (lambda: timm.create_model("mobilenetv3_small_050", num_classes=10), (2, 3, 32, 32), {"nchw"}),
    "timm_efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", num_classes=10), (2, 3, 32, 32), {"nchw"}),
    "timm_regnetx_002": (lambda: timm.create_model("regnetx_002", num_classes=10), (2, 3, 32, 32), {"nchw"}),
    "timm_densenet121": (lambda: timm.create_model("densenet121", num_classes=10), (2, 3, 32, 32), {"nchw"}),
    "timm_vit_tiny": (lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10), (2, 3, 32, 32), {"tokens"}),
    "timm_deit_tiny": (lambda: timm.create_model("deit_tiny_patch16_224", img_size=32, num_classes=10), (2, 3, 32, 32), {"tokens"}),
    "timm_mobilevit_xxs": (lambda: timm.create_model("mobilevit_xxs", num_classes=10), (2, 3, 64, 64), {"nchw"}),
    "timm_repvgg_a0": (lambda: timm.create_model("repvgg_a0", num_classes=10), (2, 3, 32, 32), {"nchw"}),
    "timm_ghostnet_050": (lambda: timm.create_model("ghostnet_050", num_classes=10), (2, 3, 32, 32), {"nchw"}),
    "tv_resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 32, 32), {"nchw"}),
    "tv_mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), (2, 3, 32, 32), {"nchw"}),
}


class DictBranchNet(nn.Module):
    """Hand-written: dict output and a Python-side branch on a config flag."""

    def __init__(self, use_aux: bool = True) -> None:
        super().__init__()
        self.use_aux = use_aux
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()) for c in (3, 8, 8)
        )
        self.head = nn.Linear(8, 5)
        self.aux = nn.Linear(8, 2)

    def forward(self, x):
        for i, b in enumerate(self.blocks):
            x = b(x) + x if i > 0 else b(x)
        feat = x.mean((2, 3))
        out = {"logits": self.head(feat)}
        if self.use_aux:
            out["aux"] = self.aux(feat)
        return out


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_trace_exact_and_points(arch):
    factory, shape, layouts = ARCHS[arch]
    torch.manual_seed(0)
    model = factory()
    x = torch.randn(*shape)
    before = copy.deepcopy(model.state_dict())
    training = model.training
    lg = growkit.trace(model, x[:1])
    assert outputs_equal(run_eval(lg.graph_module, x), run_eval(copy.deepcopy(model), x))
    assert lg.points, f"{arch}: no growth points ({lg.skipped})"
    assert {p.layout for p in lg.points} <= layouts | {"nchw"}
    assert layouts & {p.layout for p in lg.points}
    # every point after the first has an eligible input, and inputs come earlier
    names = [p.name for p in lg.points]
    for p in lg.points[1:]:
        assert p.inputs, f"{p.name} has no eligible input"
        for z in p.inputs:
            assert z.name not in names or names.index(z.name) < names.index(p.name)
            assert z.relation in ("same", "down") and z.factor >= 1
    # the original object is untouched
    assert model.training == training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert str(lg).startswith("LayerGraph(")


def test_block_granularity_names():
    lg = growkit.trace(timm.create_model("resnet18"), torch.randn(1, 3, 32, 32))
    assert [p.module for p in lg.points] == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    p = lg.point("layer2.1")
    rel = {z.name: (z.relation, z.factor, z.channels) for z in p.inputs}
    assert rel[lg.point("layer1.1").name] == ("down", 2, 64)
    assert rel[lg.point("layer2.0").name] == ("same", 1, 128)
    lg2 = growkit.trace(timm.create_model("convnext_atto"), torch.randn(1, 3, 32, 32))
    assert lg2.points[0].module == "stages.0.blocks.0"


def test_hand_written_dict_output_branch():
    torch.manual_seed(0)
    model = DictBranchNet()
    x = torch.randn(2, 3, 8, 8)
    lg = growkit.trace(model, x[:1])
    out = run_eval(lg.graph_module, x)
    assert set(out) == {"logits", "aux"}
    assert outputs_equal(out, run_eval(copy.deepcopy(model), x))
    assert [p.module for p in lg.points] == ["blocks.0", "blocks.1", "blocks.2"]
    d = lg.to_dict()
    assert d["points"][1]["inputs"][0]["name"] == lg.points[0].name


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow: fx cannot trace this
            return x * 2
        return x


class Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = DataDependent()

    def forward(self, x):
        return self.gate(self.conv(x))


def test_untraceable_module_message_and_leaf_remedy():
    model = Wrapper()
    with pytest.raises(growkit.TraceError) as ei:
        growkit.trace(model, torch.randn(1, 3, 8, 8))
    msg = str(ei.value)
    assert "'gate'" in msg and "DataDependent" in msg
    assert "if x.sum() > 0" in msg and "test_trace.py" in msg
    assert "leaf" in msg
    lg = growkit.trace(model, torch.randn(1, 3, 8, 8), leaf_modules=[DataDependent])
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(run_eval(lg.graph_module, x), run_eval(model, x))


def test_bad_example_input():
    model = timm.create_model("resnet18")
    with pytest.raises(growkit.InputError, match="torch.Tensor"):
        growkit.trace(model, [[1.0, 2.0]])
    with pytest.raises(growkit.InputError, match="rejected example_input of shape"):
        growkit.trace(model, torch.randn(1, 5, 32, 32))
    with pytest.raises(growkit.InputError):
        growkit.trace("resnet18", torch.randn(1, 3, 32, 32))


def test_cli_trace(capsys):
    from growkit.cli import main

    assert main(["trace", "timm:resnet18", "--input-size", "3", "32", "32"]) == 0
    out = capsys.readouterr().out
    assert "layer2_1_act2" in out and "growth points" in out
    assert main(["trace", "timm:not_a_model"]) == 2
    assert "no model" in capsys.readouterr().err
    assert main(["trace", "tests.test_trace:DictBranchNet", "--input-size", "3", "8", "8"]) == 0
