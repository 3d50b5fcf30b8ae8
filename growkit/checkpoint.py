"""Resumable run state: atomic checkpoint directories with weights, optimizer and RNG states.

A checkpoint is a directory ``ckpt-<seq>`` holding ``state.json`` (progress, history, gallery
metadata, RNG states, optimizer/scheduler scalars) and ``tensors.safetensors`` (the working model,
optimizer buffers). It is written as ``ckpt-<seq>.tmp`` and renamed when complete, then
``LATEST`` (a small JSON file, itself replaced atomically) is pointed at it, so a process killed at
any instant leaves either the previous or the new checkpoint, never a torn one. Gallery entry
weights are immutable and live once in ``entries/<id>.safetensors``.

Everything is data (JSON + safetensors): reading a checkpoint never unpickles or evaluates code.
``LATEST`` also records the SHA-256 of every file of the checkpoint and of the gallery entries it
refers to; :meth:`CheckpointDir.read` and :meth:`CheckpointDir.read_entry` check them, so a
flipped bit or an edited ``state.json`` is a :class:`~growkit.PlanError`, not a silently
different run (this detects corruption and careless edits; it is not a signature). A run holds
an exclusive lock on the directory (:meth:`CheckpointDir.lock`) while it writes.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from .errors import InputError, LockError, PlanError
from .io import atomic_write, write_json_atomic

__all__ = [
    "capture_rng",
    "restore_rng",
    "snapshot",
    "restore_training",
    "check_same_settings",
    "full_state",
    "load_full_state",
    "optimizer_to_flat",
    "optimizer_from_flat",
    "CheckpointDir",
    "data_fingerprint",
    "file_sha256",
]

logger = logging.getLogger(__name__)

LATEST = "LATEST"
STATE = "state.json"
TENSORS = "tensors.safetensors"
ENTRIES = "entries"
LOCK = ".lock"


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def loader_generators(loaders: Iterable[Any]) -> list[torch.Generator | None]:
    """The torch generators a DataLoader shuffles / samples with, when it has its own."""
    out: list[torch.Generator | None] = []
    for ld in loaders:
        gens = [getattr(ld, "generator", None), getattr(getattr(ld, "sampler", None), "generator", None)]
        for g in gens:
            if isinstance(g, torch.Generator) and not any(g is h for h in out):
                out.append(g)
    return out


def capture_rng(rng: random.Random, loaders: Iterable[Any] = ()) -> dict[str, Any]:
    """Every random state a growth run consumes: growkit's, torch's, numpy's, Python's, loaders'."""
    pystate = rng.getstate()
    gstate = random.getstate()
    np_state = np.random.get_state()
    out: dict[str, Any] = {
        "growkit": [pystate[0], list(pystate[1]), pystate[2]],
        "python": [gstate[0], list(gstate[1]), gstate[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": _b64(torch.get_rng_state()),
        "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_initialized() else [],
        "loaders": [_b64(g.get_state()) if g is not None else None for g in loader_generators(loaders)],
    }
    return out


def restore_rng(state: dict[str, Any], rng: random.Random, loaders: Iterable[Any] = ()) -> None:
    """Inverse of :func:`capture_rng`; a malformed state is a :class:`PlanError`."""
    try:
        _restore_rng(state, rng, loaders)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise PlanError(f"the checkpoint's random states are corrupt ({type(exc).__name__}: {str(exc)[:200]}); "
                        "delete the checkpoint directory to start over") from exc


def _restore_rng(state: dict[str, Any], rng: random.Random, loaders: Iterable[Any]) -> None:
    g = state["growkit"]
    rng.setstate((g[0], tuple(g[1]), g[2]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(_unb64(state["torch"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])
    for gen, s in zip(loader_generators(loaders), state.get("loaders", [])):
        if gen is not None and s is not None:
            gen.set_state(_unb64(s))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``model.state_dict()`` (what gallery entries and job results keep)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def restore_training(state: dict[str, Any], tensors: dict[str, torch.Tensor], work: nn.Module | None,
                     opts: dict[str, torch.optim.Optimizer], sched: Any, rng: random.Random,
                     loaders: Iterable[Any] = ()) -> None:
    """Continue a training phase from a checkpoint: the working model, the optimizers saved under
    the names in ``opts`` (absent at a phase's start: a fresh optimizer stays fresh), the
    scheduler and every RNG state (``rng`` is the run's own generator)."""
    if work is not None:
        load_full_state(work, tensors, "work.")
    for name, opt in opts.items():
        if name in state["optimizers"]:
            optimizer_from_flat(opt, state["optimizers"][name], tensors)
    if sched is not None and state.get("scheduler") is not None:
        sched.load_state_dict(state["scheduler"])
    restore_rng(state["rng"], rng, loaders)


def check_same_settings(old: dict[str, Any], new: dict[str, Any], *, api: str, cli: str | None = None) -> None:
    """Raise :class:`InputError` naming every setting that differs between a checkpointed run
    (``old``) and the call that resumes it (``new``); ``api`` / ``cli`` say what to do instead."""
    old = json.loads(json.dumps(old, default=str))
    new = json.loads(json.dumps(new, default=str))
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if not diff:
        return
    changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
    raise InputError(
        f"resume=True with settings that differ from the checkpointed run: {changes}; {api}",
        cli=None if cli is None else f"--resume with settings that differ from the interrupted run: {changes}; {cli}",
    )


def full_state(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """``state_dict`` plus non-persistent buffers (running candidate scores), detached on CPU."""
    out = {f"{prefix}{k}": v for k, v in model.state_dict().items()}
    out.update({f"{prefix}{k}": v for k, v in model.named_buffers()})
    return {k: v.detach().cpu().contiguous().clone() for k, v in out.items()}


def load_full_state(model: nn.Module, tensors: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Inverse of :func:`full_state`; raises :class:`PlanError` when keys or shapes differ."""
    mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    want = full_state(model)
    if set(mine) != set(want):
        diff = sorted(set(mine) ^ set(want))
        raise PlanError(f"checkpoint does not match the model being resumed: keys differ ({diff[:5]})")
    sd = {k: mine[k] for k in model.state_dict()}
    model.load_state_dict(sd)
    with torch.no_grad():
        for k, b in model.named_buffers():
            b.copy_(mine[k])


def optimizer_to_flat(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Split an optimizer ``state_dict`` into JSON-able scalars and named tensors."""
    sd = opt.state_dict()
    meta: dict[str, Any] = {"param_groups": sd["param_groups"], "state": {}}
    tensors: dict[str, torch.Tensor] = {}
    for pid, st in sd["state"].items():
        entry: dict[str, Any] = {}
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                key = f"{prefix}.{pid}.{name}"
                tensors[key] = v.detach().cpu().contiguous().clone()
                entry[name] = {"tensor": key}
            else:
                entry[name] = v
        meta["state"][str(pid)] = entry
    return meta, tensors


def optimizer_from_flat(opt: torch.optim.Optimizer, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Load what :func:`optimizer_to_flat` wrote into ``opt`` (built over the same parameters)."""
    state: dict[int, dict[str, Any]] = {}
    for pid, entry in meta["state"].items():
        state[int(pid)] = {
            name: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v for name, v in entry.items()
        }
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _feed(h: Any, obj: Any, depth: int = 0) -> None:
    """Hash tensors, arrays, numbers and strings inside ``obj`` (other objects by type name only)."""
    if depth > 4:
        return
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, np.ndarray):
        h.update(f"{obj.shape}{obj.dtype}".encode() + np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, (bool, int, float, str, bytes)):
        h.update(repr(obj).encode())
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _feed(h, obj[k], depth + 1)
    elif isinstance(obj, (tuple, list)):
        for v in obj[:16]:
            _feed(h, v, depth + 1)
    else:
        h.update(type(obj).__name__.encode())


def data_fingerprint(loader: Any, batch_fn: Any = None, first: Any = None) -> dict[str, Any]:
    """Sizes plus a hash of a few examples of ``loader``: tells one data set from another.

    With a map-style ``loader.dataset`` it hashes the first, middle and last examples (whatever
    the shuffling); otherwise ``first`` (the first batch, which the caller has read anyway) or,
    without it, the first batch read here. Every random state (torch, Python, numpy, the
    loader's generators) is seeded for the read and restored after it, so taking a fingerprint
    changes nothing in the run.
    """
    from .train import default_batch_fn

    out: dict[str, Any] = {"batches": None, "examples": None}
    with contextlib.suppress(TypeError):
        out["batches"] = len(loader)
    ds = getattr(loader, "dataset", None)
    with contextlib.suppress(TypeError):
        out["examples"] = len(ds) if ds is not None else None
    h = hashlib.sha256()
    gens = [g for g in loader_generators([loader]) if g is not None]
    saved = [g.get_state() for g in gens]
    py, nps = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            random.seed(0)
            np.random.seed(0)
            n = out["examples"]
            if n and hasattr(ds, "__getitem__"):
                for i in sorted({0, n // 2, n - 1}):
                    _feed(h, ds[i])
            elif first is not None:
                _feed(h, first)
            else:
                for batch in loader:
                    _feed(h, (batch_fn or default_batch_fn)(batch))
                    break
    finally:
        for g, st in zip(gens, saved):
            g.set_state(st)
        random.setstate(py)
        np.random.set_state(nps)
    out["sha256"] = h.hexdigest()[:32]
    return out


class CheckpointDir:
    """The on-disk layout described in the module docstring."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.entry_hashes: dict[str, str] = {}

    @contextlib.contextmanager
    def lock(self) -> Any:
        """Hold the directory exclusively (``fcntl.flock``: released when the process dies).

        A second run on the same directory gets a :class:`LockError` naming the holder.
        """
        try:
            import fcntl
        except ImportError:  # no flock on this platform: run unlocked
            logger.warning("file locking is not available here; do not run two jobs on %s", self.root)
            yield
            return
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown"
                raise LockError(
                    f"checkpoint directory {self.root} is in use by another run ({holder}); wait for it to "
                    "finish or stop it, or choose another checkpoint_dir"
                ) from None
            info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                               "since": time.strftime("%Y-%m-%d %H:%M:%S")})
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def entry_path(self, entry_id: int) -> Path:
        return self.root / ENTRIES / f"{entry_id}.safetensors"

    def write_entry(self, entry_id: int, state: dict[str, torch.Tensor]) -> None:
        """Gallery entry weights (replaced atomically: a resumed run rewrites what a killed one left)."""
        from safetensors.torch import save_file

        path = self.entry_path(entry_id)
        tensors = {k: v.contiguous() for k, v in state.items()}
        atomic_write(path, lambda tmp: save_file(tensors, tmp))
        self.entry_hashes[str(entry_id)] = file_sha256(path)

    def read_entry(self, entry_id: int) -> dict[str, torch.Tensor]:
        """Gallery entry weights, checked against the hash the latest checkpoint recorded."""
        path = self.entry_path(entry_id)
        self._verify(path, self.entry_hashes.get(str(entry_id)))
        return self._read_tensors(path)

    @staticmethod
    def _verify(path: Path, want: Any) -> None:
        if not isinstance(want, str):
            raise PlanError(f"checkpoint file {path} has no recorded hash (written by an older growkit, or LATEST "
                            "was edited); delete the checkpoint directory to start over")
        try:
            got = file_sha256(path)
        except OSError as exc:
            raise PlanError(f"checkpoint file {path} is unreadable ({exc})") from exc
        if got != want:
            raise PlanError(f"checkpoint file {path} was changed after it was written (SHA-256 mismatch); it is "
                            "corrupt or edited: delete the checkpoint directory to start over")

    @staticmethod
    def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise PlanError(f"checkpoint file {path} is unreadable ({exc})") from exc

    def write(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
        """Write a complete checkpoint, point ``LATEST`` at it and drop older ones."""
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        prev = self.latest_name()
        seq = int(prev.split("-")[1]) + 1 if prev else 1
        name = f"ckpt-{seq:06d}"
        tmp = self.root / f"{name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / TENSORS))
        with open(tmp / STATE, "w") as f:
            json.dump(state, f, default=str)
            f.flush()
            os.fsync(f.fileno())
        hashes = {TENSORS: file_sha256(tmp / TENSORS), STATE: file_sha256(tmp / STATE)}
        final = self.root / name
        os.replace(tmp, final)
        write_json_atomic(self.root / LATEST, {"checkpoint": name, "sha256": hashes, "entries": self.entry_hashes})
        for old in self.root.glob("ckpt-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def latest_name(self) -> str | None:
        p = self.root / LATEST
        if not p.is_file():
            return None
        try:
            name = json.loads(p.read_text())["checkpoint"]
        except (ValueError, KeyError, TypeError) as exc:
            raise PlanError(f"{p} is corrupt ({exc}); delete the checkpoint directory to start over") from exc
        if (not isinstance(name, str) or not name.startswith("ckpt-") or "/" in name or "\\" in name or ".." in name
                or not (self.root / name).is_dir()):
            raise PlanError(f"{p} names a checkpoint {str(name)[:80]!r} that does not exist")
        return name

    def read(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        """The latest complete checkpoint, or ``None`` when there is none."""
        name = self.latest_name()
        if name is None:
            return None
        d = self.root / name
        try:
            latest = json.loads((self.root / LATEST).read_text())
        except (OSError, ValueError) as exc:
            raise PlanError(f"{self.root / LATEST} is unreadable ({exc})") from exc
        hashes = latest.get("sha256") if isinstance(latest, dict) else None
        entries = latest.get("entries") if isinstance(latest, dict) else None
        if not isinstance(hashes, dict) or not isinstance(entries, dict):
            raise PlanError(f"{self.root / LATEST} records no file hashes (written by an older growkit, or edited); "
                            "delete the checkpoint directory to start over")
        for f in (STATE, TENSORS):
            self._verify(d / f, hashes.get(f))
        self.entry_hashes = {str(k): v for k, v in entries.items()}
        try:
            state = json.loads((d / STATE).read_text())
        except (OSError, ValueError, RecursionError) as exc:
            raise PlanError(f"checkpoint {d} is unreadable ({exc})") from exc
        if not isinstance(state, dict):
            raise PlanError(f"checkpoint {d} is malformed: {STATE} is not an object")
        return state, self._read_tensors(d / TENSORS)
