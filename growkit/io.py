"""Save and load grown models as ``plan.json`` + ``weights.safetensors`` (no pickle).

Loading replays the plan onto the base model (re-created from the name recorded in the plan, or
passed in) and loads the weights; the files are validated first, so a bad file raises a
:class:`~growkit.PlanError` and never yields a half-built model.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InputError, PlanError
from .core.plan import GrowthPlan
from .core.surgery import apply_plan, state_of

__all__ = ["save", "load", "write_json_atomic", "PLAN_FILE", "WEIGHTS_FILE"]

PLAN_FILE = "plan.json"
WEIGHTS_FILE = "weights.safetensors"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600; give the file the mode an ordinary open() would (0666 less the umask).
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON via a temp file and rename, so readers never see a partial file."""

    def w(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=str)

    atomic_write(Path(path), w)


def save(model_or_result: Any, path: str | Path) -> Path:
    """Write ``path/plan.json`` and ``path/weights.safetensors`` for a growkit model or GrowResult."""
    from safetensors.torch import save_file

    model = getattr(model_or_result, "model", model_or_result)
    st = state_of(model) if isinstance(model, nn.Module) else None
    if st is None:
        raise InputError(
            "save() needs a model traced or grown by growkit (growkit.finalize / grow result); "
            "for a CandidateModel call growkit.finalize first"
        )
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", "growkit": "1"}))
    atomic_write(out / PLAN_FILE, lambda tmp: Path(tmp).write_text(st.plan.to_json()))
    gallery = getattr(model_or_result, "gallery", None)
    if gallery is not None:
        write_json_atomic(out / "gallery.json", {"gallery": gallery.to_dict(), "history": getattr(model_or_result, "history", [])})
    return out


def load(path: str | Path, base_model: nn.Module | None = None, example_input: Any = None) -> torch.fx.GraphModule:
    """Re-create a grown model saved by :func:`save`.

    Args:
        path: directory written by :func:`save`.
        base_model: the base model the plan was grown from; default: re-created from the plan's
            recorded source (``timm:NAME`` with its recorded kwargs, ``pretrained=False``).
        example_input: input for re-tracing (default: zeros of the recorded shape).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not (p / PLAN_FILE).is_file() or not (p / WEIGHTS_FILE).is_file():
        raise PlanError(f"{p} must contain {PLAN_FILE} and {WEIGHTS_FILE} (written by growkit.save)")
    plan = GrowthPlan.load(p / PLAN_FILE)
    try:
        weights = load_file(str(p / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise PlanError(f"{p / WEIGHTS_FILE} is not a readable safetensors file ({exc}); it may be truncated") from exc
    if base_model is None:
        src = plan.base.get("source")
        if not src:
            raise PlanError("the plan records no base model source; pass base_model=")
        from .modelspec import create_model

        kwargs = plan.base.get("kwargs", {})
        if not isinstance(kwargs, dict):
            raise PlanError("plan base kwargs must be an object")
        base_model = create_model(src, **kwargs)
    model = apply_plan(base_model, plan, example_input)
    want = model.state_dict()
    missing = sorted(set(want) - set(weights))
    extra = sorted(set(weights) - set(want))
    if missing or extra:
        raise PlanError(
            f"weights do not match the plan: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
    for k, v in want.items():
        w = weights[k]
        if w.shape != v.shape or w.dtype != v.dtype:
            raise PlanError(f"weight {k!r} has shape {tuple(w.shape)} {w.dtype}, the plan's model needs {tuple(v.shape)} {v.dtype}")
    model.load_state_dict(weights)
    return model
