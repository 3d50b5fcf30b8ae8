#!/usr/bin/env python
"""Hostile and malformed inputs against growkit: plans, weights, checkpoints, loaders, arguments,
concurrent writers.

Each case builds its input in a fresh temporary directory, then makes one growkit call and records:
the exception raised (growkit or raw), whether any code named by the input ran (payloads try to
create a canary file), whether any protected user file changed or vanished, and whether the user's
model changed. Cases whose right answer is a result (not an error) check the result, so a silent
wrong answer is counted as such. Writes ``benchmarks/results/hostile_inputs.{json,md}``.

    OMP_NUM_THREADS=1 python benchmarks/hostile_inputs.py [--out NAME] [--only SUBSTRING] [--timeout S]

Run it with ``PYTHONPATH`` pointing at an older checkout to get that checkout's figures (cases
that need an API it lacks then show the raw error it gives).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import growkit

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


class SilentWrong(AssertionError):
    """A call returned, but its result is wrong."""


class CaseTimeout(BaseException):
    """A case ran past ``--timeout`` seconds (a hang or a runaway allocation)."""


def _alarm(signum, frame):
    raise CaseTimeout()


# ------------------------------------------------------------------------------------ fixtures
class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = None
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.short is None else self.short(x)))


class Net(nn.Module):
    """Small residual CNN (1x16x16 digits, 10 classes)."""

    def __init__(self, widths=(4, 8, 16)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, c = [], widths[0]
        for i, w in enumerate(widths):
            layers += [Block(c, w, 1 if i == 0 else 2), Block(w, w, 1)]
            c = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


class TwoHeads(Net):
    def forward(self, x):
        f = self.body(self.stem(x)).mean((2, 3))
        return f, self.head(f)


def digits():
    from growkit.data import digits_dataset, make_loaders, split

    tr, va = split(digits_dataset(16), [320, 160], seed=0)
    return make_loaders([tr, va], batch_size=32, seed=0)


class World:
    """Shared, read-only fixtures (each case copies what it writes to)."""

    def __init__(self, tmp: Path) -> None:
        self.train, self.val = digits()
        self.batches = [(x, y) for x, y in self.train]
        torch.manual_seed(0)
        self.model = Net()
        self.x = self.batches[0][0]
        grown = growkit.finalize(growkit.inject(self.model, self.x[:1], ops=("identity", "sep_conv_3x3")))
        self.saved = growkit.save(grown, tmp / "saved")
        import timm

        tm = timm.create_model("test_resnet", num_classes=10, in_chans=1)
        tg = growkit.finalize(growkit.inject(tm, torch.randn(1, 1, 32, 32), ops=("identity",)))
        self.saved_timm = growkit.save(tg, tmp / "saved_timm")
        self.ckpt = tmp / "ckpt"
        self.grow(self.ckpt)

    def grow(self, ckpt: Path | None = None, model: nn.Module | None = None, **kw: Any):
        torch.manual_seed(0)
        args = {"rounds": 0, "seed": 0, "progress": False, **kw}
        if ckpt is not None:
            args["checkpoint_dir"] = ckpt
        train = args.pop("train", self.train)
        val = args.pop("val", self.val)
        return growkit.grow(model if model is not None else self.model, train, val, **args)


class Case:
    def __init__(self, kind: str, name: str, build: Callable, expect: str = "error", slow: bool = False) -> None:
        self.kind, self.name, self.build, self.expect, self.slow = kind, name, build, expect, slow


CASES: list[Case] = []


def case(kind: str, name: str, expect: str = "error", slow: bool = False):
    """Register a case; ``slow`` ones (that start Python processes) get 4x the timeout."""
    def deco(fn: Callable) -> Callable:
        CASES.append(Case(kind, name, fn, expect, slow))
        return fn
    return deco


class Ctx:
    """What a case sees: its directory, a canary path for payloads, protection of user state."""

    def __init__(self, world: World, tmp: Path) -> None:
        self.w, self.tmp = world, tmp
        self.canary = tmp / "CANARY"
        self.files: dict[Path, str | None] = {}
        self.models: list[tuple[nn.Module, dict[str, torch.Tensor]]] = []

    def protect(self, *paths: Path) -> None:
        for p in paths:
            for f in ([p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file() and q.name != ".lock")):
                self.files[f] = hashlib.sha256(f.read_bytes()).hexdigest()

    def watch(self, model: nn.Module) -> nn.Module:
        self.models.append((model, copy.deepcopy(model.state_dict())))
        return model

    def copy_saved(self, which: str = "saved") -> Path:
        dst = self.tmp / "model"
        shutil.copytree(getattr(self.w, which), dst)
        return dst

    def copy_ckpt(self) -> Path:
        dst = self.tmp / "ckpt"
        shutil.copytree(self.w.ckpt, dst)
        return dst

    def lost_files(self) -> list[str]:
        out = []
        for f, h in self.files.items():
            if not f.is_file() or hashlib.sha256(f.read_bytes()).hexdigest() != h:
                out.append(f.name)
        return out

    def model_changed(self) -> bool:
        for m, before in self.models:
            now = m.state_dict()
            if set(now) != set(before) or any(not torch.equal(now[k], v) for k, v in before.items()):
                return True
        return False


def edit_plan(path: Path, fn: Callable[[dict], None]) -> None:
    d = json.loads((path / "plan.json").read_text())
    fn(d)
    (path / "plan.json").write_text(json.dumps(d))


def edit_weights(path: Path, fn: Callable[[dict], dict | None]) -> None:
    from safetensors.torch import load_file, save_file

    w = load_file(str(path / "weights.safetensors"))
    w = fn(w) or w
    save_file(w, str(path / "weights.safetensors"))


def rehash(ckpt: Path) -> None:
    latest = json.loads((ckpt / "LATEST").read_text())
    if isinstance(latest.get("sha256"), dict):
        d = ckpt / latest["checkpoint"]
        latest["sha256"] = {f: hashlib.sha256((d / f).read_bytes()).hexdigest() for f in latest["sha256"]}
        (ckpt / "LATEST").write_text(json.dumps(latest))


def state_path(ckpt: Path) -> Path:
    return ckpt / json.loads((ckpt / "LATEST").read_text())["checkpoint"] / "state.json"


# ------------------------------------------------------------------------------------ plan cases
def _source_case(source: str, kwargs: Callable[[Ctx], dict]):
    def build(c: Ctx):
        p = c.copy_saved()
        edit_plan(p, lambda d: d.update(base={"source": source, "kwargs": kwargs(c)}))
        return lambda: growkit.load(p)
    return build


def _evil_module(c: Ctx) -> dict:
    """A module on sys.path whose import alone creates the canary (a plan naming it must not import it)."""
    (c.tmp / "hostile_module.py").write_text(f"open({str(c.canary)!r}, 'w').close()\nfactory = lambda: None\n")
    sys.path.insert(0, str(c.tmp))
    sys.modules.pop("hostile_module", None)
    return {}


def _user_dir(c: Ctx) -> Path:
    u = c.tmp / "user"
    u.mkdir(exist_ok=True)
    (u / "thesis.txt").write_text("years of work")
    return u


for _src, _kw in [
    ("os:system", lambda c: {"command": f"touch {c.canary}"}),
    ("subprocess:run", lambda c: {"args": f"touch {c.canary}", "shell": True}),
    ("subprocess:check_call", lambda c: {"args": ["touch", str(c.canary)]}),
    ("subprocess:Popen", lambda c: {"args": ["touch", str(c.canary)]}),
    ("os:makedirs", lambda c: {"name": str(c.canary)}),
    ("pathlib:Path.touch", lambda c: {"self": str(c.canary)}),
    ("shutil:rmtree", lambda c: {"path": str(_user_dir(c))}),
    ("builtins:exec", lambda c: {"source": f"open({str(c.canary)!r}, 'w')"}),
    ("hostile_module:factory", lambda c: _evil_module(c)),
    ("timm.models:_registry", lambda c: {}),
]:
    case("plan", f"base source {_src}")(_source_case(_src, _kw))

for _src, _kw, _name in [
    ("timm:resnet10t", {"num_classes": 1_000_000_000}, "timm num_classes 1e9 (gigabytes)"),
    ("timm:resnet10t", {"pretrained": True}, "timm pretrained=True (download)"),
    ("timm:resnet10t", {"pretrained_cfg_overlay": {"file": "/etc/passwd"}}, "timm pretrained_cfg_overlay file"),
    ("timm:resnet10t", {"in_chans": -3}, "timm in_chans -3"),
    ("timm:resnet10t", {"num_classes": "10"}, "timm num_classes as text"),
    ("timm:../../etc/passwd", {}, "timm name with a path"),
    ("torchvision:resnet18", {"num_classes": 10 ** 9}, "torchvision num_classes 1e9"),
    ("torchvision:resnet18", {"weights": "IMAGENET1K_V1"}, "torchvision weights= (download)"),
]:
    case("plan", _name)(_source_case(_src, lambda c, _kw=_kw: _kw))


@case("plan", "base source not a string")
def _(c):
    p = c.copy_saved()
    edit_plan(p, lambda d: d.update(base={"source": ["os", "system"], "kwargs": {}}))
    return lambda: growkit.load(p)


@case("plan", "base kwargs not an object")
def _(c):
    p = c.copy_saved()
    edit_plan(p, lambda d: d.update(base={"source": "timm:resnet10t", "kwargs": ["--num_classes", "10"]}))
    return lambda: growkit.load(p)


def _plan_case(name: str, fn: Callable[[dict], None]):
    def build(c: Ctx):
        p = c.copy_saved()
        edit_plan(p, fn)
        return lambda: growkit.load(p, base_model=c.watch(c.w.model))
    case("plan", name)(build)


_plan_case("input_shapes terabytes", lambda d: d.update(input_shapes=[[1, 65536, 65536, 65536]]))
_plan_case("input_shapes 3x2048x2048 (12 s load)", lambda d: d.update(input_shapes=[[1, 3, 2048, 2048]]))
_plan_case("input_shapes 40 dims", lambda d: d.update(input_shapes=[[1] * 40]))
_plan_case("input_shapes negative", lambda d: d.update(input_shapes=[[1, -1, 16, 16]]))
_plan_case("input_shapes 100 inputs", lambda d: d.update(input_shapes=[[1, 1, 16, 16]] * 100))
_plan_case("input_dtypes qint8", lambda d: d.update(input_dtypes=["qint8"]))
_plan_case("input_dtypes not a dtype", lambda d: d.update(input_dtypes=["Tensor"]))
_plan_case("edit key __class__", lambda d: d["edits"][0].update(key="__class__"))
_plan_case("edit key training", lambda d: d["edits"][0].update(key="training"))
_plan_case("edit key 100k chars", lambda d: d["edits"][0].update(key="k" * 100_000))
_plan_case("duplicate edit keys", lambda d: d["edits"].append(dict(d["edits"][0])))
_plan_case("op is a python expression", lambda d: d["edits"][0]["edges"][0].update(op="__import__('os').system('id')"))
_plan_case("unknown op", lambda d: d["edits"][0]["edges"][0].update(op="warp_drive"))
_plan_case("unknown growth point", lambda d: d["edits"][0].update(point="no_such_node"))
_plan_case("10,000 edges on one edit", lambda d: d["edits"][0].update(edges=d["edits"][0]["edges"] * 5000))
_plan_case("200,000 edits", lambda d: d.update(edits=[d["edits"][0]] * 200_000))
_plan_case("plan version 99", lambda d: d.update(version=99))
_plan_case("not a growkit plan", lambda d: d.update(format="pickle"))
_plan_case("fingerprint of another model", lambda d: d.update(fingerprint="0" * 16))


@case("plan", "deeply nested JSON")
def _(c):
    p = c.copy_saved()
    (p / "plan.json").write_text("[" * 200_000 + "]" * 200_000)
    return lambda: growkit.load(p, base_model=c.watch(c.w.model))


@case("plan", "binary garbage plan.json")
def _(c):
    p = c.copy_saved()
    (p / "plan.json").write_bytes(os.urandom(4096))
    return lambda: growkit.load(p, base_model=c.watch(c.w.model))


@case("plan", "plan.json is a directory")
def _(c):
    p = c.copy_saved()
    (p / "plan.json").unlink()
    (p / "plan.json").mkdir()
    return lambda: growkit.load(p, base_model=c.watch(c.w.model))


# ------------------------------------------------------------------------------------ weights
def _weights_case(name: str, fn: Callable[[dict], dict | None]):
    def build(c: Ctx):
        p = c.copy_saved()
        edit_weights(p, fn)
        return lambda: growkit.load(p, base_model=c.watch(c.w.model))
    case("weights", name)(build)


def _first(w: dict, suffix: str = "weight") -> str:
    return next(k for k, v in w.items() if k.endswith(suffix) and v.is_floating_point() and v.numel() > 1)


_weights_case("NaN in a conv weight", lambda w: w[_first(w)].view(-1).__setitem__(0, math.nan))
_weights_case("inf in a parameter", lambda w: w[_first(w)].view(-1).__setitem__(0, math.inf))
_weights_case("float64 weights", lambda w: {k: v.double() if v.is_floating_point() else v for k, v in w.items()})
_weights_case("wrong shape", lambda w: w.__setitem__(_first(w), torch.zeros(3, 3)))
_weights_case("extra tensor", lambda w: w.__setitem__("evil", torch.zeros(1)))
_weights_case("missing tensor", lambda w: {k: v for k, v in w.items() if k != _first(w)})


@case("weights", "truncated file")
def _(c):
    p = c.copy_saved()
    f = p / "weights.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return lambda: growkit.load(p, base_model=c.watch(c.w.model))


@case("weights", "header claims 2^60 bytes")
def _(c):
    p = c.copy_saved()
    (p / "weights.safetensors").write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    return lambda: growkit.load(p, base_model=c.watch(c.w.model))


@case("weights", "header offsets past the end")
def _(c):
    p = c.copy_saved()
    header = json.dumps({"stem.0.weight": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 1 << 42]}})
    (p / "weights.safetensors").write_bytes(struct.pack("<Q", len(header)) + header.encode())
    return lambda: growkit.load(p, base_model=c.watch(c.w.model))


@case("weights", "a pickle instead of safetensors")
def _(c):
    p = c.copy_saved()
    payload = f"cos\nsystem\n(S'touch {c.canary}'\ntR.".encode()
    (p / "weights.safetensors").write_bytes(payload)
    return lambda: growkit.load(p, base_model=c.watch(c.w.model))


# ------------------------------------------------------------------------------------ checkpoints
def _ckpt_case(name: str, fn: Callable[[Ctx, Path], None], **grow_kw: Any):
    def build(c: Ctx):
        k = c.copy_ckpt()
        fn(c, k)
        return lambda: c.w.grow(k, model=c.watch(c.w.model), resume=True, **grow_kw)
    case("checkpoint", name)(build)


def _flip_entry(c: Ctx, k: Path) -> None:
    from safetensors.torch import load_file, save_file

    f = k / "entries" / "0.safetensors"
    w = load_file(str(f))
    w[_first(w)].view(-1)[0] += 1.0
    save_file(w, str(f))


def _edit_state(fn: Callable[[dict], None], rehash_after: bool = False):
    def go(c: Ctx, k: Path) -> None:
        p = state_path(k)
        s = json.loads(p.read_text())
        fn(s)
        p.write_text(json.dumps(s))
        if rehash_after:
            rehash(k)
    return go


_ckpt_case("one float flipped in a gallery entry", _flip_entry)
_ckpt_case("state.json val_error set to 0", _edit_state(lambda s: s["gallery"]["entries"][0].update(val_error=0.0)))
_ckpt_case("corrupt torch RNG state (re-hashed)", _edit_state(lambda s: s["rng"].update(torch="AAAA"), True))
_ckpt_case("corrupt python RNG state (re-hashed)", _edit_state(lambda s: s["rng"].update(python=[3, [1, 2], None]), True))
_ckpt_case("LATEST names ../../etc", lambda c, k: (k / "LATEST").write_text(json.dumps({"checkpoint": "../../etc"})))
_ckpt_case("LATEST is garbage", lambda c, k: (k / "LATEST").write_bytes(os.urandom(64)))
_ckpt_case("LATEST without hashes (edited)", lambda c, k: (k / "LATEST").write_text(
    json.dumps({"checkpoint": json.loads((k / "LATEST").read_text())["checkpoint"]})))
_ckpt_case("gallery entry file deleted", lambda c, k: (k / "entries" / "0.safetensors").unlink())
_ckpt_case("state.json deeply nested (re-hashed)", lambda c, k: (state_path(k).write_text("[" * 200_000 + "]" * 200_000),
                                                                 rehash(k)))
_ckpt_case("resume with flipped training images", lambda c, k: None,
           train=None)  # replaced below: needs the world's batches


def _other_data(c: Ctx):
    k = c.copy_ckpt()
    other = [(x.flip(-1), y) for x, y in c.w.batches]
    return lambda: c.w.grow(k, model=c.watch(c.w.model), resume=True, train=other)


CASES[-1].build = _other_data


# ------------------------------------------------------------------------------------ loaders
def _loader_case(name: str, make: Callable[[World], Any], expect: str = "error", **kw: Any):
    def build(c: Ctx):
        loader = make(c.w)
        return lambda: c.w.grow(None, model=c.watch(c.w.model), train=loader, val=kw.get("val", loader))
    case("loader", name, expect)(build)


_loader_case("one-shot generator", lambda w: (b for b in w.batches))
_loader_case("empty list", lambda w: [])
_loader_case("labels out of range", lambda w: [(x, y + 10) for x, y in w.batches])
_loader_case("negative labels", lambda w: [(x, y - 20) for x, y in w.batches])
_loader_case("float labels", lambda w: [(x, y.float()) for x, y in w.batches])
_loader_case("one wrong-shaped batch midway",
             lambda w: [(x[:, :, :8] if i == 2 else x, y) for i, (x, y) in enumerate(w.batches)])
_loader_case("batches are strings", lambda w: ["x", "y"])
_loader_case("loader is a dict", lambda w: {"x": 1})
_loader_case("loader is None", lambda w: None)
_loader_case("inputs are numpy arrays", lambda w: [(x.numpy(), y) for x, y in w.batches])


@case("loader", "(features, logits) model without output=")
def _(c):
    torch.manual_seed(0)
    m = c.watch(TwoHeads())
    return lambda: c.w.grow(None, model=m)


@case("loader", "(features, logits) model with output=1", expect="ok")
def _(c):
    torch.manual_seed(0)
    m = c.watch(TwoHeads())

    def go():
        res = c.w.grow(None, model=m, output=1)
        plain = Net()
        plain.load_state_dict(m.state_dict())
        want = growkit.train.evaluate(plain, c.w.val)["accuracy"]
        if abs((1 - res.gallery[0].val_error) - want) > 1e-9:
            raise SilentWrong(f"val accuracy {1 - res.gallery[0].val_error:.4f}, logits give {want:.4f}")
    return go


@case("loader", "output= selects the features")
def _(c):
    torch.manual_seed(0)
    m = c.watch(TwoHeads())
    return lambda: c.w.grow(None, model=m, output=lambda out: out[0][:, :1].squeeze(1))


# ------------------------------------------------------------------------------------ arguments
def _arg_case(name: str, **kw: Any):
    def build(c: Ctx):
        return lambda: c.w.grow(None, model=c.watch(c.w.model), **{"rounds": 1, **kw})
    case("argument", name)(build)


_arg_case("lr=-0.1", lr=-0.1)
_arg_case("lr='0.01'", lr="0.01")
_arg_case("candidate_lr=nan", candidate_lr=math.nan)
_arg_case("cost_axis='bogus'", cost_axis="bogus")
_arg_case("max_eta=nan", max_eta=math.nan)
_arg_case("finetune_epochs=-1", finetune_epochs=-1)
_arg_case("rounds=True", rounds=True)
_arg_case("momentum=5", momentum=5.0)
_arg_case("budget=1.2 (not a Budget)", budget=1.2)
_arg_case("example_input of another shape", example_input=torch.zeros(1, 3, 32, 32))


@case("argument", "Budget(params=inf)")
def _(c):
    return lambda: growkit.Budget(params=math.inf)


@case("argument", "Budget(latency_ms=nan)")
def _(c):
    return lambda: growkit.Budget(latency_ms=math.nan)


@case("argument", "example_input with batch 64", expect="ok")
def _(c):
    def go():
        x = torch.cat([c.w.batches[0][0], c.w.batches[1][0]])
        res = c.w.grow(None, model=c.watch(c.w.model), example_input=x)
        want = growkit.core.cost.count_flops(c.w.model, x[:1])
        if res.gallery[0].cost.flops != want or res.plan.input_shapes[0][0] != 1:
            raise SilentWrong(f"flops {res.gallery[0].cost.flops:,} (batch-1: {want:,}), plan shape {res.plan.input_shapes}")
    return go


@case("argument", "save() into a directory with the user's plan.json")
def _(c):
    u = _user_dir(c)
    (u / "plan.json").write_text("my notes")
    c.protect(u)
    grown = growkit.load(c.w.saved, base_model=c.w.model)
    return lambda: growkit.save(grown, u)


@case("argument", "save() to a path that is a file")
def _(c):
    u = _user_dir(c)
    c.protect(u)
    grown = growkit.load(c.w.saved, base_model=c.w.model)
    return lambda: growkit.save(grown, u / "thesis.txt")


@case("argument", "save() again leaves no stale gallery.json", expect="ok")
def _(c):
    from types import SimpleNamespace

    grown = growkit.load(c.w.saved, base_model=c.w.model)
    d = c.tmp / "out"
    growkit.save(SimpleNamespace(model=grown, gallery=growkit.Gallery(), history=[]), d)

    def go():
        growkit.save(grown, d)
        if (d / "gallery.json").exists():
            raise SilentWrong("gallery.json of the earlier save is still beside the new model")
    return go


# ------------------------------------------------------------------------------------ concurrent writers
HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from growkit.checkpoint import CheckpointDir
    d = CheckpointDir(sys.argv[1])
    lock = getattr(d, "lock", None)
    if lock is None:  # a growkit without locks: just write checkpoints
        print("locked", flush=True)
        for i in range(200):
            d.write({"format": "growkit.grow-checkpoint", "i": i}, {})
        time.sleep(60)
    with lock():
        print("locked", flush=True)
        time.sleep(60)
""")


def _holder(ckpt: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(ckpt), str(Path(growkit.__file__).parent.parent)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "locked"
    return p


@case("concurrent", "second grow() on a checkpoint_dir another process holds", slow=True)
def _(c):
    k = c.copy_ckpt()
    c.protect(k)

    def go():
        p = _holder(k)
        try:
            c.w.grow(k, model=c.watch(c.w.model), resume=True)
        finally:
            p.kill()
            p.wait()
    return go


@case("concurrent", "two processes writing checkpoints in a tight loop", slow=True)
def _(c):
    k = c.tmp / "ckpt2"
    script = textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[2])
        from growkit.checkpoint import CheckpointDir
        import contextlib
        d = CheckpointDir(sys.argv[1])
        try:
            with (d.lock() if hasattr(d, "lock") else contextlib.nullcontext()):
                for i in range(100):
                    d.write({"format": "growkit.grow-checkpoint", "i": i}, {})
        except Exception as exc:
            print(type(exc).__name__, flush=True)
            sys.exit(3)
    """)

    def go():
        root = str(Path(growkit.__file__).parent.parent)
        procs = [subprocess.Popen([sys.executable, "-c", script, str(k), root], stdout=subprocess.PIPE, text=True)
                 for _ in range(2)]
        outs = [(p.wait(), p.stdout.read().strip()) for p in procs]  # type: ignore[union-attr]
        from growkit.checkpoint import CheckpointDir

        CheckpointDir(k).read()  # the directory must stay readable whatever happened
        refused = [o for rc, o in outs if rc != 0]
        if not refused:
            raise SilentWrong("both writers 'succeeded' on one directory; the last writer won")
        if refused[0] != "LockError":
            raise RuntimeError(f"second writer failed with {refused[0]}")
        raise growkit.LockError("second writer refused: LockError")
    return go


# ------------------------------------------------------------------------------------ runner
def run_case(world: World, cs: Case, timeout: int = 60) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="hostile-"))
    ctx = Ctx(world, tmp)
    row: dict[str, Any] = {"kind": cs.kind, "case": cs.name, "expect": cs.expect}
    t = time.perf_counter()
    try:
        thunk = cs.build(ctx)
        ctx.protect(*(p for p in [tmp / "user"] if p.exists()))
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(timeout * (4 if cs.slow else 1))
        try:
            thunk()
            outcome, err = ("correct" if cs.expect == "ok" else "silently accepted"), ""
        except CaseTimeout:
            outcome, err = "raw error", f"hung: still running after {timeout} s (stopped)"
        except growkit.GrowkitError as exc:
            outcome, err = "growkit error", f"{type(exc).__name__}: {exc}"
        except SilentWrong as exc:
            outcome, err = "silent wrong result", str(exc)
        except Exception as exc:  # noqa: BLE001 - what the table is about
            outcome, err = "raw error", f"{type(exc).__name__}: {exc}"
            row["traceback"] = traceback.format_exc(limit=3)[-800:]
        finally:
            signal.alarm(0)
    except Exception as exc:  # noqa: BLE001
        outcome, err = "harness error", f"{type(exc).__name__}: {exc}"
    row.update(outcome=outcome, error=err[:300], seconds=round(time.perf_counter() - t, 3),
               code_ran=ctx.canary.exists(), lost_files=ctx.lost_files(), model_changed=ctx.model_changed())
    shutil.rmtree(tmp, ignore_errors=True)
    return row


def summarize(rows: list[dict[str, Any]]) -> dict[str, int]:
    return {
        "cases": len(rows),
        "growkit_errors": sum(r["outcome"] == "growkit error" for r in rows),
        "correct_results": sum(r["outcome"] == "correct" for r in rows),
        "code_executions": sum(r["code_ran"] for r in rows),
        "raw_errors": sum(r["outcome"] in ("raw error", "harness error") for r in rows),
        "silent_wrong": sum(r["outcome"] in ("silent wrong result", "silently accepted") for r in rows),
        "lost_user_files": sum(bool(r["lost_files"]) for r in rows),
        "user_model_changed": sum(r["model_changed"] for r in rows),
    }


def write(rows: list[dict[str, Any]], name: str, meta: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    s = summarize(rows)
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "summary": s, "cases": rows}, indent=1))
    lines = [f"# Hostile inputs ({meta['growkit']})", "",
             f"{meta['threads']} torch thread(s), {meta['python']}, torch {meta['torch']}; `{meta['command']}`", "",
             "| cases | growkit errors | correct results | code executions | raw errors | silent wrong | lost user files | user model changed |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| {s['cases']} | {s['growkit_errors']} | {s['correct_results']} | {s['code_executions']} | {s['raw_errors']} "
             f"| {s['silent_wrong']} | {s['lost_user_files']} | {s['user_model_changed']} |", "",
             "| kind | case | outcome | error raised | code ran | files lost | model changed | s |",
             "|---|---|---|---|---|---|---|---:|"]
    for r in rows:
        e = r["error"].replace("|", "\\|").replace("\n", " ")[:140]
        lines.append(f"| {r['kind']} | {r['case']} | {r['outcome']} | {e} | {'YES' if r['code_ran'] else 'no'} | "
                     f"{', '.join(r['lost_files']) or 'none'} | {'YES' if r['model_changed'] else 'no'} | {r['seconds']:.2f} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="hostile_inputs")
    ap.add_argument("--only", default=None)
    ap.add_argument("--timeout", type=int, default=60, help="seconds before a case counts as hung")
    ap.add_argument("--label", default=None, help="what growkit this is (default: its git commit)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import logging

    logging.disable(logging.WARNING)
    src = Path(growkit.__file__).resolve().parent.parent
    try:
        label = args.label or "growkit @ " + subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
                                                             capture_output=True, text=True).stdout.strip()
    except OSError:
        label = args.label or str(src)
    base = Path(tempfile.mkdtemp(prefix="hostile-world-"))
    world = World(base)
    rows = []
    for cs in CASES:
        if args.only and args.only not in cs.name:
            continue
        r = run_case(world, cs, args.timeout)
        rows.append(r)
        print(f"{r['kind']:10s} {r['outcome']:20s} {'CODE RAN ' if r['code_ran'] else ''}"
              f"{'LOST ' + ','.join(r['lost_files']) + ' ' if r['lost_files'] else ''}{cs.name}: {r['error'][:90]}",
              flush=True)
    shutil.rmtree(base, ignore_errors=True)
    meta = {"growkit": label, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "command": "OMP_NUM_THREADS=1 python benchmarks/hostile_inputs.py " + " ".join(argv or sys.argv[1:])}
    write(rows, args.out, meta)
    print(json.dumps(summarize(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
