"""Issue 16: loading runs nothing from a file, saving never destroys user files, bad plans are bounded.

Every test here failed on the code before issue 16 (a command ran, a raw error, a silent overwrite).
"""
from __future__ import annotations

import json
import time
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

import growkit
from growkit.growth.gallery import Gallery

from .conftest import TinyResNet, run_eval


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = TinyResNet()
    x = torch.randn(2, 1, 16, 16)
    grown = growkit.finalize(growkit.inject(model, x[:1], ops=("identity", "sep_conv_3x3")))
    path = growkit.save(grown, tmp_path / "g")
    return model, grown, x, path


def _edit_plan(path, fn):
    d = json.loads((path / "plan.json").read_text())
    fn(d)
    (path / "plan.json").write_text(json.dumps(d))


# ---------------------------------------------------------------- item 1: nothing from a file runs
HOSTILE_SOURCES = [
    ("os:system", lambda m: {"command": f"touch {m}"}),
    ("subprocess:run", lambda m: {"args": f"touch {m}", "shell": True}),
    ("subprocess:check_call", lambda m: {"args": ["touch", str(m)]}),
    ("tests.test_security:_touch", lambda m: {"path": str(m)}),
]


def _touch(path: str) -> torch.nn.Module:
    open(path, "w").close()
    return TinyResNet()


@pytest.mark.parametrize("source, kwargs", HOSTILE_SOURCES, ids=[s for s, _ in HOSTILE_SOURCES])
def test_plan_source_is_never_imported_or_called(saved, tmp_path, source, kwargs):
    _, _, _, path = saved
    marker = tmp_path / "pwned"
    _edit_plan(path, lambda d: d.update(base={"source": source, "kwargs": kwargs(marker)}))
    with pytest.raises(growkit.PlanError, match="allow-listed|base_model="):
        growkit.load(path)
    assert not marker.exists(), "the plan ran code"


def test_cli_export_runs_nothing(saved, tmp_path, capsys):
    from growkit.cli import main

    _, _, _, path = saved
    marker = tmp_path / "pwned"
    _edit_plan(path, lambda d: d.update(base={"source": "os:system", "kwargs": {"command": f"touch {marker}"}}))
    assert main(["export", str(path), "--out", str(tmp_path / "m.onnx")]) == 2
    assert not marker.exists()
    assert "allow-listed" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, match", [
    ({"num_classes": 1_000_000_000}, "out of bounds"),
    ({"num_classes": "10"}, "out of bounds"),
    ({"pretrained": True}, "not allowed"),
    ({"pretrained_cfg_overlay": {"file": "/etc/passwd"}}, "not allowed"),
    ({"in_chans": -3}, "out of bounds"),
], ids=["huge_num_classes", "str_num_classes", "pretrained", "cfg_overlay", "negative_in_chans"])
def test_plan_kwargs_are_allow_listed_and_bounded(saved, kwargs, match):
    _, _, _, path = saved
    _edit_plan(path, lambda d: d.update(base={"source": "timm:resnet10t", "kwargs": kwargs}))
    t = time.perf_counter()
    with pytest.raises(growkit.PlanError, match=match):
        growkit.load(path)
    assert time.perf_counter() - t < 5  # refused before anything was allocated


def test_allow_listed_timm_model_loads_without_base_model(tmp_path):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=5, in_chans=1)
    x = torch.randn(2, 1, 32, 32)
    grown = growkit.finalize(growkit.inject(model, x[:1], ops=("identity",)))
    path = growkit.save(grown, tmp_path / "g")
    assert json.loads((path / "plan.json").read_text())["base"]["source"] == "timm:test_resnet"
    assert torch.equal(run_eval(growkit.load(path), x), run_eval(grown, x))


def test_trust_source_is_an_explicit_opt_in(saved):
    _, grown, x, path = saved
    _edit_plan(path, lambda d: d.update(base={"source": "tests.conftest:TinyResNet", "kwargs": {}}))
    with pytest.raises(growkit.PlanError, match="trust_source=True"):
        growkit.load(path)
    torch.manual_seed(123)  # the weights come from the file, not from this initialisation
    assert torch.equal(run_eval(growkit.load(path, trust_source=True), x), run_eval(grown, x))


@pytest.mark.parametrize("shapes", [
    [[1, 3, 2048, 2048]],
    [[1, 65536, 65536, 65536]],
    [[1] * 40],
    [[1, 1, 16, 16]] * 100,
    [[1, True, 16, 16]],
], ids=["12M_elements", "terabytes", "40_dims", "100_inputs", "bool_dim"])
def test_plan_input_shapes_are_bounded(saved, shapes):
    model, _, _, path = saved
    _edit_plan(path, lambda d: d.update(input_shapes=shapes))
    t = time.perf_counter()
    with pytest.raises(growkit.PlanError, match="input"):
        growkit.load(path, base_model=model)
    assert time.perf_counter() - t < 2


def test_plan_dtype_must_be_a_plain_tensor_dtype(saved):
    model, _, _, path = saved
    _edit_plan(path, lambda d: d.update(input_dtypes=["qint8"]))
    with pytest.raises(growkit.PlanError, match="dtype"):
        growkit.load(path, base_model=model)


@pytest.mark.parametrize("key", ["__class__", "training", "_modules", "update", "x" * 10_000])
def test_plan_edit_keys_are_checked(saved, key):
    model, _, _, path = saved
    _edit_plan(path, lambda d: d["edits"][0].update(key=key))
    with pytest.raises(growkit.PlanError, match="key"):
        growkit.load(path, base_model=model)


def test_deeply_nested_plan_json(saved):
    model, _, _, path = saved
    (path / "plan.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(growkit.PlanError, match="JSON"):
        growkit.load(path, base_model=model)


def test_old_plan_with_a_training_batch_loads_at_batch_1(saved):
    model, grown, x, path = saved
    _edit_plan(path, lambda d: d.update(input_shapes=[[64, 1, 16, 16]]))
    assert growkit.plan_of(growkit.load(path, base_model=model)).input_shapes == [[1, 1, 16, 16]]


def test_nan_weights_are_refused(saved):
    model, _, _, path = saved
    w = load_file(str(path / "weights.safetensors"))
    k = next(k for k in w if k.endswith("conv1.weight"))
    w[k].view(-1)[0] = float("nan")
    save_file(w, str(path / "weights.safetensors"))
    with pytest.raises(growkit.PlanError, match="non-finite"):
        growkit.load(path, base_model=model)


# ---------------------------------------------------------------- item 4: save never destroys user files
def test_save_refuses_a_directory_it_did_not_write(saved, tmp_path):
    _, grown, _, _ = saved
    d = tmp_path / "mine"
    d.mkdir()
    (d / "plan.json").write_text("my own plan")
    with pytest.raises(growkit.InputError, match="overwrite=True"):
        growkit.save(grown, d)
    assert (d / "plan.json").read_text() == "my own plan"
    growkit.save(grown, d, overwrite=True)
    assert json.loads((d / "plan.json").read_text())["format"] == "growkit.plan"


def test_save_to_a_file_path_is_a_growkit_error(saved, tmp_path):
    _, grown, _, _ = saved
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    with pytest.raises(growkit.InputError, match="is a file"):
        growkit.save(grown, f)
    assert f.read_text() == "keep me"


def test_save_again_leaves_no_stale_files(saved, tmp_path):
    model, grown, x, _ = saved
    d = tmp_path / "again"
    growkit.save(types.SimpleNamespace(model=grown, gallery=Gallery(), history=[]), d)
    assert (d / "gallery.json").exists()
    growkit.save(grown, d)  # a directory save wrote: allowed, and the old gallery goes
    assert not (d / "gallery.json").exists()
    assert torch.equal(run_eval(growkit.load(d, base_model=model), x), run_eval(grown, x))


# ---------------------------------------------------------------- item 2: half precision never poisons weights
def _weak_steps(cm, x, y, steps, autocast=None):
    opt = torch.optim.SGD(cm.base_parameters(), lr=0.01)
    copt = torch.optim.Adam(cm.candidate_parameters(), lr=3e-3)
    for _ in range(steps):
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            out = cm(x)
            loss = torch.nn.functional.cross_entropy(out.float(), y) + cm.extra_loss()
        opt.zero_grad()
        copt.zero_grad()
        loss.backward()
        opt.step()
        copt.step()


def test_autocast_fp16_weak_learning_keeps_base_weights_finite():
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 16, 16), torch.randint(0, 10, (64,))
    cm = growkit.inject(TinyResNet(), x[:1], ops=("identity", "sep_conv_3x3"), normalize_grad=True)
    _weak_steps(cm, x, y, 8, autocast=torch.float16)
    bad = [n for n, p in cm.module.named_parameters() if not torch.isfinite(p).all()]
    assert not bad, f"{len(bad)} non-finite parameters, e.g. {bad[:3]}"
    assert all(c.alpha.dtype == torch.float32 for c in cm.candidates.values())
    grown = growkit.finalize(cm)
    assert all(torch.isfinite(t).all() for t in grown.state_dict().values() if t.is_floating_point())


def test_half_model_with_half_inputs_stays_exact_and_finite():
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 16, 16).half(), torch.randint(0, 10, (64,))
    model = TinyResNet().half()
    cm = growkit.inject(model, x[:1], ops=("identity", "sep_conv_3x3"), normalize_grad=True)
    assert torch.equal(run_eval(cm, x), run_eval(model, x))
    _weak_steps(cm, x, y, 1)
    assert all(torch.isfinite(p).all() for p in cm.module.parameters())
    assert torch.isfinite(run_eval(cm, x)).all()


def test_overflowing_candidate_never_reaches_the_output():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 16, 16)
    model = TinyResNet()
    cm = growkit.inject(model, x[:1], ops=("identity",))
    with torch.no_grad():
        for c in cm.candidates.values():
            c.alpha.fill_(float("inf"))
    assert torch.equal(run_eval(cm, x), run_eval(model, x))
    grown = growkit.finalize(cm)  # nothing non-finite is copied into the grown model
    assert all(torch.isfinite(t).all() for t in grown.state_dict().values() if t.is_floating_point())
    assert torch.equal(run_eval(grown, x), run_eval(model, x))
