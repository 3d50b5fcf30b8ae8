"""ONNX export of grown models with an onnxruntime parity gate.

The torch exporter runs first in its default (dynamo) mode, then the TorchScript exporter if that
fails; the report says which one wrote the file. The file is checked with
``onnx.checker.check_model(full_check=True)`` and run in onnxruntime on the example input and on a
second batch size; outputs are compared with PyTorch's (eval mode).
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .errors import ExportError
from .core.graph import as_args
from .core.safecopy import copy_module

__all__ = ["ExportReport", "export_onnx"]

logger = logging.getLogger(__name__)


@dataclass
class ExportReport:
    """Outcome of :func:`export_onnx`.

    ``max_abs_diff`` / ``max_rel_diff`` are over all outputs and checked batch sizes;
    ``max_rel_diff`` is relative to the largest |output| (the scale the tolerance uses).
    """

    path: str
    exporter: str
    opset: int | None
    batch_sizes: list[int]
    max_abs_diff: float
    max_rel_diff: float
    tolerance: dict[str, float]
    passed: bool
    fallback_reason: str | None = None
    per_batch: dict[int, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"ONNX export ({self.exporter} exporter, opset {self.opset}) -> {self.path}: "
            f"max |diff| {self.max_abs_diff:.3g}, max rel diff {self.max_rel_diff:.3g} at batch sizes "
            f"{self.batch_sizes}: {'PASS' if self.passed else 'FAIL'}"
        )


def _prepare(model: nn.Module, remove_candidates: bool) -> nn.Module:
    from .core.candidates import CANDIDATES, CandidateModel
    from .core.surgery import remove_inserted

    if isinstance(model, CandidateModel):
        if not remove_candidates:
            raise ExportError(
                "the model still carries un-finalized Petridish candidates: call growkit.finalize(model) "
                "first, or export_onnx(..., remove_candidates=True) to export the model without them"
            )
        gm = copy_module(model.module)
        remove_inserted(gm, CANDIDATES)
        return gm
    return model


@contextlib.contextmanager
def _eval_on_cpu(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode on the CPU for the export, the caller's module left as it was.

    A model already on the CPU is used in place (its modes are restored afterwards) rather than
    copied: a copy doubles the memory, which decides whether a large model exports at all.
    """
    tensors = [*model.parameters(), *model.buffers()]
    if any(t.device.type != "cpu" for t in tensors):
        yield copy_module(model).cpu().eval()
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


class _Skip(Exception):
    """Skip the dynamo exporter (``exporter='torchscript'``)."""


def _export(model: nn.Module, args: tuple[torch.Tensor, ...], path: Path, opset: int | None, dynamic_batch: bool,
            exporter: str = "auto") -> tuple[str, str | None]:
    names = [f"input{i}" if len(args) > 1 else "input" for i in range(len(args))]
    reason = "exporter='torchscript' requested" if exporter == "torchscript" else None
    try:
        if exporter == "torchscript":
            raise _Skip()
        kw: dict[str, Any] = {"dynamo": True, "input_names": names}
        if dynamic_batch:
            batch = torch.export.Dim("batch", min=1, max=4096)
            kw["dynamic_shapes"] = tuple({0: batch} for _ in args)
        if opset is not None:
            kw["opset_version"] = opset
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(model, args, **kw)
        prog.save(str(path))
        return "dynamo", None
    except _Skip:
        pass
    except Exception as exc:  # the exporters raise many types; any failure means: try the other
        if exporter == "dynamo":
            raise ExportError(f"the dynamo ONNX exporter failed: {type(exc).__name__}: {exc}") from exc
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        logger.warning("dynamo ONNX exporter failed (%s); falling back to the TorchScript exporter", reason)
    kw = {"dynamo": False, "input_names": names, "output_names": ["output"]}
    if dynamic_batch:
        kw["dynamic_axes"] = {n: {0: "batch"} for n in names}
    if opset is not None:
        kw["opset_version"] = opset
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, args, str(path), **kw)
    except Exception as exc:
        raise ExportError(f"both ONNX exporters failed: dynamo ({reason}); TorchScript ({type(exc).__name__}: {exc})") from exc
    return "torchscript", reason


def _with_batch(a: torch.Tensor, b: int) -> torch.Tensor:
    """``a`` with its leading (batch) dimension cycled to size ``b``."""
    reps = -(-b // a.shape[0])
    return a.repeat(reps, *[1] * (a.dim() - 1))[:b]


def _flat(out: Any) -> list[np.ndarray]:
    leaves, _ = tree_flatten(out)
    return [t.detach().cpu().numpy() for t in leaves if isinstance(t, torch.Tensor)]


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example_input: Any,
    *,
    dynamic_batch: bool = True,
    opset: int | None = None,
    check: bool = True,
    remove_candidates: bool = False,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    second_batch: int = 3,
    exporter: str = "auto",
) -> ExportReport:
    """Export ``model`` to ONNX at ``path`` and compare onnxruntime with PyTorch.

    Args:
        model: a grown (or any) ``nn.Module``; a ``CandidateModel`` is refused unless
            ``remove_candidates=True``.
        example_input: a tensor or tuple of tensors.
        dynamic_batch: export with a dynamic batch axis and also check ``second_batch``.
        check: raise :class:`growkit.ExportError` when ``|diff| > atol + rtol * max|y|``.
        exporter: ``"auto"`` (torch's dynamo exporter, the TorchScript one if it fails),
            ``"dynamo"`` or ``"torchscript"`` (much faster on CPU; what a quick check needs).
    """
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ExportError("ONNX export needs the 'onnx' extra: pip install 'growkit[onnx]'") from exc
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise ExportError(f"exporter must be 'auto', 'dynamo' or 'torchscript', got {exporter!r}")
    args = tuple(a.detach().cpu() for a in as_args(example_input))
    with _eval_on_cpu(_prepare(model, remove_candidates)) as m:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # torch.export specialises a size-1 dimension to the constant 1 even when it is declared
        # dynamic, so a batch-1 example would silently produce a batch-1-only file: trace at batch 2.
        export_args = tuple(_with_batch(a, 2) for a in args) if dynamic_batch and args[0].shape[0] == 1 else args
        exporter, reason = _export(m, export_args, path, opset, dynamic_batch, exporter)
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except Exception as exc:
            raise ExportError(f"onnx.checker rejected {path}: {exc}") from exc
        proto = onnx.load(str(path), load_external_data=False)
        opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        in_names = [i.name for i in sess.get_inputs()]
        batches = [int(args[0].shape[0])]
        if dynamic_batch and second_batch not in batches:
            batches.append(second_batch)
        gen = torch.Generator().manual_seed(0)
        max_abs, max_rel, per, passed = 0.0, 0.0, {}, True
        for b in batches:
            xs = args if b == batches[0] else tuple(
                torch.randn((b, *a.shape[1:]), generator=gen, dtype=a.dtype) if a.is_floating_point() else _with_batch(a, b)
                for a in args
            )
            with torch.no_grad():
                ref = _flat(m(*xs))
            got = sess.run(None, {n: x.numpy() for n, x in zip(in_names, xs)})
            if len(got) != len(ref):
                raise ExportError(f"onnxruntime returned {len(got)} outputs, PyTorch {len(ref)}")
            b_abs, b_rel = 0.0, 0.0
            for r, g in zip(ref, got):
                if r.shape != g.shape:
                    raise ExportError(f"output shape {g.shape} from onnxruntime, {r.shape} from PyTorch at batch {b}")
                d = float(np.max(np.abs(r.astype(np.float64) - g.astype(np.float64)))) if r.size else 0.0
                scale = float(np.max(np.abs(r))) if r.size else 0.0
                b_abs = max(b_abs, d)
                b_rel = max(b_rel, d / max(scale, 1e-12))
                within = d <= atol + rtol * scale
                passed = passed and within
                if check and not within:
                    raise ExportError(
                        f"onnxruntime output differs from PyTorch at batch {b}: max |diff| {d:.3g} > "
                        f"{atol} + {rtol} * {scale:.3g} ({exporter} exporter, {path})"
                    )
            per[b] = {"max_abs_diff": b_abs, "max_rel_diff": b_rel}
            max_abs, max_rel = max(max_abs, b_abs), max(max_rel, b_rel)
    report = ExportReport(str(path), exporter, opset_used, batches, max_abs, max_rel, {"atol": atol, "rtol": rtol},
                          passed, reason, per)
    logger.info("%s", report)
    return report
