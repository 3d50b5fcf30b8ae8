"""save / load validate what they read: corrupted or hostile files give clear growkit errors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import growkit

from .conftest import TinyResNet, run_eval


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = TinyResNet()
    x = torch.randn(2, 1, 16, 16)
    grown = growkit.finalize(growkit.inject(model, x[:1], ops=("identity", "sep_conv_3x3")))
    with torch.no_grad():
        for b in grown.growkit_branches.values():
            b.eta.fill_(0.25)
    path = growkit.save(grown, tmp_path / "g")
    return model, grown, x, path


def test_round_trip(saved):
    model, grown, x, path = saved
    loaded = growkit.load(path, base_model=model)
    assert torch.equal(run_eval(loaded, x), run_eval(grown, x))


def test_truncated_weights(saved):
    model, _, _, path = saved
    w = path / "weights.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(growkit.PlanError, match="truncated|safetensors"):
        growkit.load(path, base_model=model)


def _set_point(d, v):
    d["edits"][0]["point"] = v


def _set_op(d, v):
    d["edits"][0]["edges"][0]["op"] = v


@pytest.mark.parametrize(
    "edit, value, match",
    [
        (_set_point, "no_such_node", "no_such_node"),  # unknown node
        (_set_op, "__import__('os').system('echo pwned')", "not a node/op identifier"),  # code injection
        (_set_op, "warp_drive", "unknown op 'warp_drive'"),  # unknown op
    ],
    ids=["unknown_node", "python_expression", "unknown_op"],
)
def test_edited_plan_is_rejected(saved, edit, value, match):
    model, _, _, path = saved
    d = json.loads((path / "plan.json").read_text())
    edit(d, value)
    (path / "plan.json").write_text(json.dumps(d))
    with pytest.raises(growkit.PlanError, match=match):
        growkit.load(path, base_model=model)


@pytest.mark.parametrize("change", ["shape", "dtype", "missing", "extra"])
def test_weights_not_matching_plan(saved, change):
    model, _, _, path = saved
    w = load_file(str(path / "weights.safetensors"))
    key = next(k for k in w if k.endswith("proj.weight"))
    if change == "shape":
        w[key] = torch.zeros(3, 3)
    elif change == "dtype":
        w[key] = w[key].double()
    elif change == "missing":
        del w[key]
    else:
        w["evil.tensor"] = torch.zeros(1)
    save_file(w, str(path / "weights.safetensors"))
    with pytest.raises(growkit.PlanError, match="weight|weights do not match"):
        growkit.load(path, base_model=model)


def test_plan_on_wrong_base_and_bad_json(saved, tmp_path):
    import timm

    model, _, _, path = saved
    with pytest.raises(growkit.PlanError, match="different base graph"):
        growkit.load(path, base_model=timm.create_model("resnet10t", in_chans=1))
    (path / "plan.json").write_text("{not json")
    with pytest.raises(growkit.PlanError, match="not valid JSON"):
        growkit.load(path, base_model=model)
    with pytest.raises(growkit.PlanError, match="must contain"):
        growkit.load(tmp_path / "empty", base_model=model)


def test_save_refuses_plain_module(tmp_path):
    with pytest.raises(growkit.InputError, match="traced or grown by growkit"):
        growkit.save(TinyResNet(), tmp_path / "x")


def test_gallery_entries_hold_validated_growth_plans(saved):
    """A gallery entry's plan is a GrowthPlan in memory and validated when read from JSON."""
    from growkit import Gallery

    _, grown, _, _ = saved
    plan = growkit.plan_of(grown)
    gal = Gallery()
    gal.add(growkit.Entry(0, None, growkit.Cost(10, 20), 0.1, 0.3, plan.copy(), 0, "base"))
    back = Gallery.from_dict(json.loads(json.dumps(gal.to_dict())))
    assert isinstance(back[0].plan, growkit.GrowthPlan) and back[0].plan.to_dict() == plan.to_dict()
    # pruning rode inside the plan dict before Entry.pruning existed: such galleries still load
    old = gal.to_dict()
    old["entries"][0]["plan"]["pruning"] = {"method": "channels", "history": []}
    del old["entries"][0]["pruning"]
    assert Gallery.from_dict(old)[0].pruning == {"method": "channels", "history": []}
    bad = gal.to_dict()
    bad["entries"][0]["plan"]["edits"] = [{"point": "x", "key": "__class__", "edges": [{"input": "y", "op": "z"}]}]
    with pytest.raises(growkit.PlanError):
        Gallery.from_dict(bad)
