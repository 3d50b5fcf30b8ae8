"""Issue 16 item 3: checkpoint directories are locked, verified by hash and tied to their data.

Each test failed on the code before issue 16 (two writers both "succeeded", edits resumed silently,
other data was accepted, a corrupt RNG state was a raw RuntimeError).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import growkit
from growkit.checkpoint import CheckpointDir

from .conftest import TinyResNet

ROOT = Path(__file__).resolve().parent.parent


def _grow(digits, ckpt, **kw):
    train_l, val_l = digits
    torch.manual_seed(0)
    return growkit.grow(TinyResNet(widths=(4, 8, 16)), kw.pop("train", train_l), val_l, rounds=0, seed=0,
                        progress=False, checkpoint_dir=ckpt, **kw)


def _rehash(ckpt: Path) -> None:
    """Re-record LATEST's hashes, as a careful attacker would after an edit."""
    latest = json.loads((ckpt / "LATEST").read_text())
    d = ckpt / latest["checkpoint"]
    latest["sha256"] = {f: hashlib.sha256((d / f).read_bytes()).hexdigest() for f in latest["sha256"]}
    (ckpt / "LATEST").write_text(json.dumps(latest))


def _state_path(ckpt: Path) -> Path:
    return ckpt / json.loads((ckpt / "LATEST").read_text())["checkpoint"] / "state.json"


def test_a_held_checkpoint_dir_gets_a_lock_error_naming_the_holder(digits, tmp_path):
    ckpt = tmp_path / "c"
    with CheckpointDir(ckpt).lock():
        with pytest.raises(growkit.LockError, match=f"in use by another run.*pid.*{os.getpid()}"):
            _grow(digits, ckpt)
    assert not (ckpt / "LATEST").exists()  # the refused run wrote nothing
    _grow(digits, ckpt)


@pytest.mark.slow
def test_second_process_on_a_checkpoint_dir_gets_a_lock_error_naming_the_holder(digits, tmp_path):
    ckpt = tmp_path / "c"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            sys.path.insert(0, {str(ROOT)!r})
            from growkit.checkpoint import CheckpointDir
            with CheckpointDir({str(ckpt)!r}).lock():
                print("locked", flush=True)
                time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(growkit.LockError, match=f"in use by another run.*{holder.pid}"):
            _grow(digits, ckpt)
    finally:
        holder.kill()
        holder.wait()
    _grow(digits, ckpt)  # the lock died with its holder


def test_a_flipped_float_in_a_checkpoint_is_a_plan_error(digits, tmp_path):
    ckpt = tmp_path / "c"
    _grow(digits, ckpt)
    path = ckpt / "entries" / "0.safetensors"
    w = load_file(str(path))
    k = next(k for k, v in w.items() if v.is_floating_point() and v.numel() > 1)
    w[k].view(-1)[0] += 1.0
    save_file(w, str(path))
    with pytest.raises(growkit.PlanError, match="SHA-256"):
        _grow(digits, ckpt, resume=True)


def test_an_edited_state_json_is_a_plan_error(digits, tmp_path):
    ckpt = tmp_path / "c"
    _grow(digits, ckpt)
    p = _state_path(ckpt)
    state = json.loads(p.read_text())
    state["gallery"]["entries"][0]["val_error"] = 0.0
    p.write_text(json.dumps(state))
    with pytest.raises(growkit.PlanError, match="SHA-256"):
        _grow(digits, ckpt, resume=True)


def test_a_corrupt_rng_state_is_a_plan_error(digits, tmp_path):
    ckpt = tmp_path / "c"
    _grow(digits, ckpt)
    p = _state_path(ckpt)
    state = json.loads(p.read_text())
    state["rng"]["torch"] = "AAAA"
    p.write_text(json.dumps(state))
    _rehash(ckpt)
    with pytest.raises(growkit.PlanError, match="random states are corrupt"):
        _grow(digits, ckpt, resume=True)


def test_resume_on_other_data_is_refused_unless_asked(digits, tmp_path):
    ckpt = tmp_path / "c"
    _grow(digits, ckpt)
    train_l, _ = digits
    other = [(x.flip(-1), y) for x, y in train_l]
    with pytest.raises(growkit.InputError, match="other data"):
        _grow(digits, ckpt, resume=True, train=other)
    _grow(digits, ckpt, resume=True, train=other, allow_new_data=True)
    _grow(digits, ckpt, resume=True)  # the same data resumes as before


def test_checkpoint_without_hashes_is_refused(digits, tmp_path):
    ckpt = tmp_path / "c"
    _grow(digits, ckpt)
    name = json.loads((ckpt / "LATEST").read_text())["checkpoint"]
    (ckpt / "LATEST").write_text(json.dumps({"checkpoint": name}))
    with pytest.raises(growkit.PlanError, match="no file hashes"):
        CheckpointDir(ckpt).read()
