"""Save and load grown models as ``plan.json`` + ``weights.safetensors`` (no pickle).

Loading replays the plan onto the base model (passed in, or re-created from an allow-listed
``timm:NAME`` / ``torchvision:NAME`` recorded in the plan: nothing a file names is imported or
called) and loads the weights; the files are validated first (bounds before allocation, tensor
names, shapes and dtypes before reading the data), so a bad file raises a
:class:`~growkit.PlanError` and never yields a half-built model. :func:`save` writes only into a
new directory or one it wrote before (marked by ``.growkit-save.json``).
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

__all__ = ["save", "load", "write_json_atomic", "PLAN_FILE", "WEIGHTS_FILE", "SAVE_MARKER"]

PLAN_FILE = "plan.json"
WEIGHTS_FILE = "weights.safetensors"
GALLERY_FILE = "gallery.json"
SAVE_MARKER = ".growkit-save.json"
"""Written by :func:`save`: a directory holding it may be saved into again."""
_SAVE_FILES = (WEIGHTS_FILE, PLAN_FILE, GALLERY_FILE, SAVE_MARKER)


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


def _prepare_dir(out: Path, overwrite: bool) -> set[str]:
    """Check ``out`` may be written; return the files an earlier save left there (to replace or drop)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"save path {out} is a file; pass a directory path (growkit.save writes {PLAN_FILE} and "
                         f"{WEIGHTS_FILE} into it)")
    if not out.exists():
        return set()
    marker = out / SAVE_MARKER
    if marker.is_file():
        try:
            files = json.loads(marker.read_text()).get("files", [])
        except (OSError, ValueError, AttributeError):
            files = []
        return {f for f in files if f in _SAVE_FILES}
    mine = {p.name for p in out.iterdir()}
    if mine and not overwrite:
        raise InputError(
            f"{out} already holds files growkit.save did not write ({', '.join(sorted(mine)[:5])}"
            f"{'...' if len(mine) > 5 else ''}); choose a new directory, or pass overwrite=True to replace "
            f"{', '.join(_SAVE_FILES[:-1])} there"
        )
    return set(_SAVE_FILES) & mine


def save(model_or_result: Any, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``path/plan.json`` and ``path/weights.safetensors`` for a growkit model or GrowResult.

    ``path`` must be new, empty, or a directory an earlier :func:`save` wrote (it leaves a marker
    file there); anything else is refused unless ``overwrite=True``, which replaces only the files
    :func:`save` writes. Files of an earlier save that this one does not write are removed.
    """
    from safetensors.torch import save_file

    model = getattr(model_or_result, "model", model_or_result)
    st = state_of(model) if isinstance(model, nn.Module) else None
    if st is None:
        raise InputError(
            "save() needs a model traced or grown by growkit (growkit.finalize / grow result); "
            "for a CandidateModel call growkit.finalize first"
        )
    out = Path(path)
    stale = _prepare_dir(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    written = [WEIGHTS_FILE, PLAN_FILE]
    atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", "growkit": "1"}))
    atomic_write(out / PLAN_FILE, lambda tmp: Path(tmp).write_text(st.plan.to_json()))
    gallery = getattr(model_or_result, "gallery", None)
    if gallery is not None:
        write_json_atomic(out / GALLERY_FILE, {"gallery": gallery.to_dict(), "history": getattr(model_or_result, "history", [])})
        written.append(GALLERY_FILE)
    for name in stale - set(written):
        (out / name).unlink(missing_ok=True)
    write_json_atomic(out / SAVE_MARKER, {"format": "growkit.save", "files": written})
    return out


def load(path: str | Path, base_model: nn.Module | None = None, example_input: Any = None, *,
         trust_source: bool = False) -> torch.fx.GraphModule:
    """Re-create a grown model saved by :func:`save`.

    Args:
        path: directory written by :func:`save`.
        base_model: the base model the plan was grown from; default: re-created from the plan's
            recorded source, which must be an allow-listed ``timm:NAME`` / ``torchvision:NAME``
            with allow-listed kwargs (see :func:`growkit.modelspec.create_from_plan`);
            ``pretrained=False``.
        example_input: input for re-tracing (default: zeros of the recorded shape, batch 1).
        trust_source: build any ``package.module:factory`` the plan names (imports and calls
            it). Only for plans you wrote yourself; never set it for a file from elsewhere.
    """
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not (p / PLAN_FILE).is_file() or not (p / WEIGHTS_FILE).is_file():
        raise PlanError(f"{p} must contain {PLAN_FILE} and {WEIGHTS_FILE} (written by growkit.save)")
    plan = GrowthPlan.load(p / PLAN_FILE)
    try:
        with safe_open(str(p / WEIGHTS_FILE), framework="pt") as f:
            header = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise PlanError(f"{p / WEIGHTS_FILE} is not a readable safetensors file ({exc}); it may be truncated") from exc
    if base_model is None:
        src = plan.base.get("source")
        if not src:
            raise PlanError("the plan records no base model source; pass base_model=")
        from .modelspec import create_from_plan

        base_model = create_from_plan(src, plan.base.get("kwargs", {}), trust_source=trust_source)
    model = apply_plan(base_model, plan, example_input)
    want = model.state_dict()
    missing = sorted(set(want) - set(header))
    extra = sorted(set(header) - set(want))
    if missing or extra:
        raise PlanError(
            f"weights do not match the plan: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
    for k, v in want.items():
        shape, dt = header[k]
        if shape != tuple(v.shape) or dt != _ST_DTYPES.get(v.dtype):
            raise PlanError(f"weight {k!r} has shape {shape} {dt}, the plan's model needs {tuple(v.shape)} {v.dtype}")
    from safetensors.torch import load_file

    try:
        weights = load_file(str(p / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise PlanError(f"{p / WEIGHTS_FILE} is not a readable safetensors file ({exc}); it may be truncated") from exc
    # NaN is never a trained value; +-inf may be a buffer (masks), never a parameter.
    params = {k for k, _ in model.named_parameters()}
    bad = [k for k, w in weights.items() if w.is_floating_point()
           and (bool(w.isnan().any()) or (k in params and not bool(torch.isfinite(w).all())))]
    if bad:
        raise PlanError(f"{p / WEIGHTS_FILE} holds non-finite values in {bad[:5]}; the file is corrupt")
    model.load_state_dict(weights)
    return model


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
