"""ONNX export of grown models: parity with onnxruntime, refusal of un-finalized models."""
from __future__ import annotations

import pytest
import timm
import torch

import growkit

from .conftest import TinyResNet, run_eval

pytest.importorskip("onnxruntime")


def _grown(model, x, ops=None):
    cm = growkit.inject(model, x, ops=ops or ("paper" if isinstance(model, TinyResNet) else None))
    grown = growkit.finalize(cm)
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero gates and random projections: the branches matter
        for b in grown.growkit_branches.values():
            b.eta.fill_(0.5)
            b.proj.weight.normal_(0, 0.1)
    return grown


# The inverted-bottleneck ops are the slowest to export (11 s); parity stays in the default run
# through "cnn" (the paper's ops) and "tokens".
@pytest.mark.parametrize("kind", ["cnn", pytest.param("cnn_inverted_bottleneck", marks=pytest.mark.slow), "tokens"])
def test_export_grown_model_parity(tmp_path, kind):
    torch.manual_seed(0)
    ops = None
    if kind.startswith("cnn"):
        model, x = TinyResNet(), torch.randn(1, 1, 16, 16)
        if kind == "cnn_inverted_bottleneck":
            ops = ("mb_conv_3x3", "mb_conv_5x5")
    else:
        model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=10)
        x = torch.randn(1, 3, 32, 32)
    grown = _grown(model, x, ops)
    assert not torch.equal(run_eval(grown, x), run_eval(model, x))  # growth is active
    rep = growkit.export_onnx(grown, tmp_path / "m.onnx", x)
    assert rep.passed and rep.batch_sizes == [1, 3]
    assert rep.exporter in ("dynamo", "torchscript")
    assert rep.max_abs_diff <= 1e-4 + 1e-3 * run_eval(grown, x).abs().max().item()
    assert (tmp_path / "m.onnx").stat().st_size > 0


def test_refuses_unfinalized_and_exports_without_candidates(tmp_path):
    torch.manual_seed(0)
    model, x = TinyResNet(), torch.randn(1, 1, 16, 16)
    cm = growkit.inject(model, x)
    with pytest.raises(growkit.ExportError, match="finalize"):
        growkit.export_onnx(cm, tmp_path / "c.onnx", x)
    rep = growkit.export_onnx(cm, tmp_path / "c.onnx", x, remove_candidates=True)
    assert rep.passed


@pytest.mark.slow  # save -> load -> export; parity itself stays in the default run (test_export_grown_model_parity)
def test_saved_and_loaded_exports_the_same(tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    model, x = TinyResNet(), torch.randn(1, 1, 16, 16)
    grown = _grown(model, x)
    growkit.save(grown, tmp_path / "g")
    loaded = growkit.load(tmp_path / "g", base_model=model)
    growkit.export_onnx(grown, tmp_path / "a.onnx", x)
    growkit.export_onnx(loaded, tmp_path / "b.onnx", x)
    xb = torch.randn(3, 1, 16, 16).numpy()
    outs = [ort.InferenceSession(str(tmp_path / f"{n}.onnx")).run(None, {"input": xb})[0] for n in "ab"]
    assert (outs[0] == outs[1]).all()


@pytest.mark.slow  # CLI end to end (subprocess-free but a full grow + export)
def test_cli_export(tmp_path, capsys):
    from growkit.cli import main

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10, in_chans=1)
    grown = _grown(model, torch.randn(1, 1, 16, 16))
    growkit.save(grown, tmp_path / "g")
    assert main(["export", str(tmp_path / "g"), "--out", str(tmp_path / "g.onnx")]) == 0
    assert "PASS" in capsys.readouterr().out


def test_batch1_example_exports_a_dynamic_batch(tmp_path):
    # convit's attention is shape-dependent; exporting from a batch-1 example used to bake in
    # batch 1 (torch.export specialises size-1 dims), so onnxruntime rejected batch 3.
    torch.manual_seed(0)
    model = timm.create_model("convit_tiny", img_size=32, depth=2, num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    rep = growkit.export_onnx(_grown(model, x), tmp_path / "c.onnx", x)
    assert rep.passed and rep.batch_sizes == [1, 3] and rep.exporter == "dynamo"


def test_export_leaves_the_model_as_it_was(tmp_path):
    """A CPU model is exported in place (no copy: memory) and handed back with its modes and weights."""
    torch.manual_seed(0)
    model, x = TinyResNet(), torch.randn(1, 1, 16, 16)
    grown = _grown(model, x, None)
    grown.train()
    next(m for m in grown.modules() if isinstance(m, torch.nn.BatchNorm2d)).eval()  # mixed modes, as a user may
    modes = [m.training for m in grown.modules()]
    before = {k: v.clone() for k, v in grown.state_dict().items()}
    rep = growkit.export_onnx(grown, tmp_path / "m.onnx", x, exporter="torchscript")
    assert rep.passed
    assert [m.training for m in grown.modules()] == modes
    assert all(torch.equal(v, grown.state_dict()[k]) for k, v in before.items())
