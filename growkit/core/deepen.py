"""``growkit.deepen``: insert new blocks after existing ones without changing the model's function.

At a growth point ``x_k`` (a block's output) the new block is one of

* ``"copy"`` (Net2DeeperNet's idea, LLaMA Pro's block copy): a copy of the block that computes
  ``x_k`` (its fx subgraph, with its current weights), applied to ``x_k`` behind a zero gate:
  ``x_k + eta * (copy(x_k) - x_k)`` with ``eta = 0``. The block must map its input shape to the
  same output shape and read one tensor from outside. As ``eta`` grows the model approaches the
  block applied twice. Only ``eta`` gets gradient until it leaves 0 (as Petridish's branches).
* ``"identity"``: a residual block whose output projection is zero (LLaMA Pro): for NCHW
  ``x + proj(relu(bn(conv3x3(x))))``, for tokens / NHWC ``x + fc2(gelu(fc1(ln(x))))``, with
  ``proj`` / ``fc2`` zero. Gradients reach the zero projection from the first step.

Both are exact: the output is bit-identical (``x + 0``). The new block is a module under
``growkit_depth`` of the grown GraphModule and a ``deepen`` :class:`Resize` in its plan, so
``growkit.save`` / ``load`` / ``export_onnx`` handle it like a grown branch.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata

from ..errors import InputError, PlanError, PointError
from .graph import GrowthPoint, eval_outputs, outputs_equal
from .plan import DEEPEN_BLOCKS, Resize
from .safecopy import copy_module
from .surgery import growable, growable_with_args, insert_at_point, register_resize, state_of

__all__ = ["deepen", "DEPTH", "GatedBlock", "IdentityBlock", "deepenable_points", "new_parameters"]

logger = logging.getLogger(__name__)

DEPTH = "growkit_depth"
"""Name of the ModuleDict holding inserted blocks inside a deepened GraphModule."""


class GatedBlock(nn.Module):
    """``x + eta * (block(x) - x)`` with ``eta = 0``: a copied block that starts switched off."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.eta = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.eta * (self.block(x) - x)


class IdentityBlock(nn.Module):
    """A residual block with a zero output projection (see the module docstring)."""

    def __init__(self, channels: int, layout: str) -> None:
        super().__init__()
        self.layout = layout
        if layout == "nchw":
            self.body: nn.Module = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                                 nn.BatchNorm2d(channels), nn.ReLU())
            self.proj: nn.Module = nn.Conv2d(channels, channels, 1)
        else:
            self.body = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, channels), nn.GELU())
            self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(self.body(x))


def new_parameters(block: nn.Module) -> list[nn.Parameter]:
    """The parameters of an inserted block that start untrained, which train under the
    new-parameter rule: an identity block's body and projection are new; a copied block's weights
    are trained copies that train like the rest of the model, and only its gate is new."""
    if isinstance(block, GatedBlock):
        return [block.eta]
    return list(block.parameters())


def _members(gm: torch.fx.GraphModule, path: str) -> list[torch.fx.Node]:
    out = []
    for n in gm.graph.nodes:
        stack = n.meta.get("nn_module_stack") or {}
        if any(p == path for p, _ in stack.values()):
            out.append(n)
    return out


def _block_copy(gm: torch.fx.GraphModule, p: GrowthPoint) -> tuple[nn.Module | None, str]:
    """A standalone copy of the block computing point ``p`` (its fx subgraph), or why not."""
    if not p.module:
        return None, f"point {p.name!r} is not the output of a block module"
    inside = _members(gm, p.module)
    named = {n.name: n for n in inside}
    if p.name not in named:
        return None, f"the block {p.module!r} does not compute point {p.name!r} in this graph"
    inset = set(inside)
    ext = {a for n in inside for a in n.all_input_nodes if a not in inset and a.op != "get_attr"}
    if len(ext) != 1:
        return None, f"the block {p.module!r} reads {len(ext)} tensors from outside; a copy needs exactly one"
    (x_in,) = ext
    m_in, m_out = x_in.meta.get("tensor_meta"), named[p.name].meta.get("tensor_meta")
    if not (isinstance(m_in, TensorMetadata) and isinstance(m_out, TensorMetadata)) or m_in.shape != m_out.shape:
        shapes = (getattr(m_in, "shape", None), getattr(m_out, "shape", None))
        return None, (f"the block {p.module!r} maps shape {tuple(shapes[0] or ())} to {tuple(shapes[1] or ())}; "
                      "a copy stacked after it needs equal shapes")
    g = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {x_in: g.placeholder("x")}
    for n in gm.graph.nodes:  # graph order is a topological order
        if n in inset or (n.op == "get_attr" and any(u in inset for u in n.users)):
            if n in env:
                continue
            env[n] = g.node_copy(n, lambda a: env[a])
        if n.name == p.name:
            break
    g.output(env[named[p.name]])
    try:
        sub = torch.fx.GraphModule(gm, g, class_name="CopiedBlock")
    except Exception as exc:  # noqa: BLE001 - any failure to cut the subgraph means: not copyable
        return None, f"the block {p.module!r} cannot be cut out of the graph ({type(exc).__name__}: {exc})"
    return copy_module(sub), ""


def _new_block(gm: torch.fx.GraphModule, p: GrowthPoint, block: str) -> tuple[nn.Module | None, str]:
    if block == "identity":
        if p.layout not in ("nchw", "nhwc", "tokens"):
            return None, f"point {p.name!r} has layout {p.layout!r}"
        return IdentityBlock(p.channels, p.layout), ""
    sub, why = _block_copy(gm, p)
    return (GatedBlock(sub), "") if sub is not None else (None, why)


def _insert(gm: torch.fx.GraphModule, p: GrowthPoint, mod: nn.Module, key: str) -> None:
    insert_at_point(gm, p.name, [], mod, DEPTH, key)


def deepenable_points(model: nn.Module, example_input: Any = None, block: str = "copy") -> dict[str, str]:
    """Every growth point of ``model`` -> ``""`` if :func:`deepen` can insert ``block`` there, else why not."""
    gm = growable(model, example_input)
    st = state_of(gm)
    assert st is not None
    return {p.name: _new_block(gm, p, block)[1] for p in st.points}


def deepen(model: nn.Module, example_input: Any = None, *, points: Iterable[str] | str | None = None,
           block: str = "copy") -> torch.fx.GraphModule:
    """A copy of ``model`` with a new ``block`` after each of ``points``, computing the same function.

    Args:
        model: any traceable ``nn.Module`` (or a model growkit grew; it is not modified).
        example_input: one batch-1 input (not needed for a growkit model that records its inputs).
        points: growth points (fx node names or block module paths, see ``growkit.trace``);
            ``None``: every point where ``block`` fits.
        block: ``"copy"`` (a copy of the block behind a zero gate) or ``"identity"`` (a residual
            block with a zero output projection).

    Raises:
        InputError: an unknown ``block``, a named point where it does not fit, or no point at all.
        PointError: a named point that the model does not have.
    """
    if block not in DEEPEN_BLOCKS:
        raise InputError(f"block must be one of {', '.join(DEEPEN_BLOCKS)}, got {block!r}")
    gm, args, named = growable_with_args(model, example_input, points, "points (growth point names)")
    st = state_of(gm)
    assert st is not None
    if named is None:
        chosen = list(st.points)
    else:
        chosen = []
        for name in named:
            p = st.point(name)  # PointError lists the model's points
            if p not in chosen:
                chosen.append(p)
    blocks: list[tuple[GrowthPoint, nn.Module]] = []
    skipped: dict[str, str] = {}
    for p in chosen:  # all blocks first: each copies the original block, not one deepened already
        mod, why = _new_block(gm, p, block)
        if mod is None:
            if named is not None:
                raise InputError(f"cannot deepen at {p.name!r}: {why}")
            skipped[p.name] = why
            continue
        blocks.append((p, mod))
    if not blocks:
        raise InputError("no growth point of this model can take a new block: "
                         + "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:10]) if skipped else
                         "this model has no growth points (see growkit.trace(model, x).skipped)")
    ref = eval_outputs(gm, args)
    for p, mod in blocks:
        rec = Resize("deepen", f"d{len(st.plan.resizes)}", len(st.plan.edits), point=p.name, block=block)
        _insert(gm, p, mod, rec.key)
        st.plan.resizes.append(rec)
    gm.graph.lint()
    gm.recompile()
    if not outputs_equal(eval_outputs(gm, args), ref):
        # x + 0 * (copy(x) - x) is x unless the copy overflows on this input
        raise InputError("deepening changed the output on the example input (a copied block returns non-finite "
                         "values?); try block='identity'")
    gm.meta["growkit_deepen_report"] = {"deepened": [p.name for p, _ in blocks], "skipped": skipped}
    logger.info("deepened at %d points (%d skipped)", len(blocks), len(skipped))
    return gm


def _replay(gm: torch.fx.GraphModule, rec: Resize, example_input: Any) -> None:
    """Insert a recorded block into growable ``gm`` in place (the state dict brings its weights)."""
    st = state_of(gm)
    assert st is not None
    try:
        p = st.point(rec.point)
    except PointError as exc:
        raise PlanError(f"plan resize {rec.key!r} names growth point {rec.point!r} that the base model does not "
                        "have") from exc
    mod, why = _new_block(gm, p, rec.block)
    if mod is None:
        raise PlanError(f"plan resize {rec.key!r}: cannot deepen at {rec.point!r}: {why}")
    _insert(gm, p, mod, rec.key)
    st.plan.resizes.append(rec)
    gm.graph.lint()
    gm.recompile()


register_resize("deepen", _replay)
