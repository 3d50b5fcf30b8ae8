"""Resumable growth: SIGKILL a grow() run mid-phase, resume, and get the uninterrupted result."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import growkit
from growkit.checkpoint import CheckpointDir

ROOT = Path(__file__).resolve().parent.parent

WORKER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    import torch
    torch.set_num_threads(1)
    import growkit
    from growkit.data import digits_dataset, make_loaders, split
    from growkit.train import train_steps
    from tests.conftest import TinyResNet

    class Announcing:
        # Prints every training batch so the parent can kill at a chosen step.
        def __init__(self, loader):
            self.loader, self.generator, self.n = loader, loader.generator, 0
        def __len__(self):
            return len(self.loader)
        def __iter__(self):
            for b in self.loader:
                self.n += 1
                print("BATCH", self.n, flush=True)
                yield b

    ckpt, out, resume = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    tr, va = split(digits_dataset(16), [320, 160], seed=0)
    train_l, val_l = make_loaders([tr, va], batch_size=32, seed=0)
    torch.manual_seed(0)
    base = TinyResNet(widths=(4, 8, 16))
    train_steps(base, train_l, torch.optim.SGD(base.parameters(), lr=0.05, momentum=0.9), epochs=1)
    train_l.generator.manual_seed(1)
    res = growkit.grow(base, Announcing(train_l), val_l, rounds=2, search_epochs=2, finetune_epochs=2, seed=3,
                       budget=growkit.Budget(params=1.6), progress=False, checkpoint_dir=ckpt, resume=resume)
    growkit.save(res, out)
    print("DONE", flush=True)
    """
)


@pytest.fixture(scope="module")
def digits_small():
    from growkit.data import digits_dataset, make_loaders, split
    from growkit.train import train_steps

    from .conftest import TinyResNet

    tr, va = split(digits_dataset(16), [160, 96], seed=0)
    train_l, val_l = make_loaders([tr, va], batch_size=32, seed=0)
    torch.manual_seed(0)
    model = TinyResNet(widths=(4, 8, 16))
    train_steps(model, train_l, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), epochs=1)
    return train_l, val_l, model


def _run(tmp: Path, ckpt: Path, out: Path, resume: bool, kill_at: int | None) -> str:
    script = tmp / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(ckpt), str(out), "1" if resume else "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=str(tmp))
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if kill_at is not None and line.strip() == f"BATCH {kill_at}":
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=300)
    text = "".join(lines)
    if kill_at is None:
        assert proc.returncode == 0 and "DONE" in text, text[-3000:]
    else:
        assert proc.returncode == -signal.SIGKILL, text[-3000:]
    return text


def _result(out: Path) -> tuple[dict, dict, list]:
    plan = json.loads((out / "plan.json").read_text())
    weights = load_file(str(out / "weights.safetensors"))
    gallery = json.loads((out / "gallery.json").read_text())["gallery"]["entries"]
    return plan, weights, gallery


@pytest.mark.slow  # four subprocess runs; in-process resume stays in the default run (test_parallel, test_stream)
def test_sigkill_mid_phase_then_resume_is_bit_identical(tmp_path):
    # Reference: one uninterrupted run.
    _run(tmp_path, tmp_path / "ref_ckpt", tmp_path / "ref", resume=False, kill_at=None)
    ref_plan, ref_w, ref_gallery = _result(tmp_path / "ref")
    assert len(ref_plan["edits"]) >= 1

    # 10 training batches per epoch, 2 + 2 epochs per round, 2 rounds = 80 batches. Each run is
    # killed mid-epoch and resumes from the last epoch boundary: kills land in round 1 search
    # (batch 15 of run 1), round 1 fine-tune, round 2 search and round 2 fine-tune.
    kills = [15, 17, 23, 12, 14]
    ckpt = tmp_path / "ckpt"
    landed = []
    for i, k in enumerate(kills):
        out = _run(tmp_path, ckpt, tmp_path / "out", resume=i > 0, kill_at=k)
        assert "DONE" not in out
        got = CheckpointDir(ckpt).read()
        assert got is not None
        p = got[0]["progress"]
        landed.append((p["round"], p["phase"], p.get("epoch")))
    print("last checkpoint before each kill:", landed)
    assert {ph for _, ph, _ in landed} >= {"search", "finetune"} and {r for r, _, _ in landed} >= {1, 2}
    _run(tmp_path, ckpt, tmp_path / "out", resume=True, kill_at=None)
    plan, w, gallery = _result(tmp_path / "out")
    assert plan == ref_plan
    assert set(w) == set(ref_w) and all(torch.equal(w[k], ref_w[k]) for k in w)
    strip = ("search_s", "finetune_s")
    assert [{k: v for k, v in e.items() if k not in strip} for e in gallery] == \
        [{k: v for k, v in e.items() if k not in strip} for e in ref_gallery]


def test_resume_guards(tmp_path, digits_small):
    train_l, val_l, model = digits_small
    kw = dict(rounds=1, search_epochs=1, finetune_epochs=1, seed=0, progress=False)
    with pytest.raises(growkit.InputError, match="checkpoint_dir"):
        growkit.grow(model, train_l, val_l, resume=True, **kw)
    res = growkit.grow(model, train_l, val_l, checkpoint_dir=tmp_path / "c", **kw)
    with pytest.raises(growkit.InputError, match="resume=True"):
        growkit.grow(model, train_l, val_l, checkpoint_dir=tmp_path / "c", **kw)
    with pytest.raises(growkit.InputError, match="lr"):
        growkit.grow(model, train_l, val_l, checkpoint_dir=tmp_path / "c", resume=True, **{**kw, "lr": 0.5})
    # a finished run resumes to the same result without training again
    again = growkit.grow(model, train_l, val_l, checkpoint_dir=tmp_path / "c", resume=True, **kw)
    assert again.plan.to_dict() == res.plan.to_dict()
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(), res.model.state_dict().values()))
    # resume with more rounds extends the run
    more = growkit.grow(model, train_l, val_l, checkpoint_dir=tmp_path / "c", resume=True, **{**kw, "rounds": 2})
    assert len(more.gallery) >= len(res.gallery)
    # a torn pointer gives a clear error, never a half-loaded run
    (tmp_path / "c" / "LATEST").write_text('{"checkpoint": "ckpt-999999"}')
    with pytest.raises(growkit.PlanError, match="does not exist"):
        growkit.grow(model, train_l, val_l, checkpoint_dir=tmp_path / "c", resume=True, **kw)


def test_same_seed_same_result(digits_small):
    train_l, val_l, model = digits_small
    kw = dict(rounds=1, search_epochs=1, finetune_epochs=1, seed=7, progress=False)
    # The loader shuffles with its own generator, which is the caller's to seed.
    train_l.generator.manual_seed(0)
    a = growkit.grow(model, train_l, val_l, **kw)
    train_l.generator.manual_seed(0)
    b = growkit.grow(model, train_l, val_l, **kw)
    assert a.plan.to_dict() == b.plan.to_dict()
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert [e.val_error for e in a.gallery] == [e.val_error for e in b.gallery]
