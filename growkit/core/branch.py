"""The grown branch that finalization writes into the graph (Algorithm 2 of Petridish).

``x_k <- x_k + eta * proj(concat(BN(op_e(z_e)) for each kept edge e))`` with ``eta`` a scalar
initialised to 0, so the grown model computes exactly the parent's function until it trains.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .graph import EligibleInput, GrowthPoint
from .ops import OpRegistry, add_keep_strides, build_edge_op, canonical, decanonical, feature_norm

__all__ = ["GrownBranch"]


class GrownBranch(nn.Module):
    """Concat + 1x1 projection shortcut gated by a zero-initialised scalar ``eta``."""

    def __init__(self, point: GrowthPoint, edges: Sequence[tuple[EligibleInput, str]], registry: OpRegistry) -> None:
        super().__init__()
        self.layout = point.layout
        self.op_names = [op for _, op in edges]
        self.input_names = [z.name for z, _ in edges]
        c = point.channels
        self.ops = nn.ModuleList(build_edge_op(registry, op, z, point) for z, op in edges)
        self.norms = nn.ModuleList(feature_norm(c, self.layout) for _ in edges)
        k = len(edges)
        if self.layout == "tokens":
            self.proj: nn.Module = nn.Linear(k * c, c, bias=False)
        else:
            self.proj = nn.Conv2d(k * c, c, 1, bias=False)
        self.eta = nn.Parameter(torch.zeros(()))

    @torch.no_grad()
    def init_proj_from_alphas(self, alphas: Sequence[float]) -> None:
        """Set the projection so that ``proj(concat(b_e)) = sum_e alpha_e * b_e``."""
        w = self.proj.weight
        w.zero_()
        c = w.shape[0]
        eye = torch.eye(c, dtype=w.dtype, device=w.device)
        for e, a in enumerate(alphas):
            block = eye * float(a)
            if w.dim() == 4:
                w[:, e * c:(e + 1) * c, 0, 0] = block
            else:
                w[:, e * c:(e + 1) * c] = block

    def forward(self, x: torch.Tensor, *zs: torch.Tensor) -> torch.Tensor:
        ys = [norm(op(canonical(z, self.layout))) for op, norm, z in zip(self.ops, self.norms, zs)]
        y = self.proj(torch.cat(ys, dim=-1 if self.layout == "tokens" else 1))
        return add_keep_strides(x, self.eta * decanonical(y, self.layout))

    def extra_repr(self) -> str:
        return ", ".join(f"{op}({z})" for z, op in zip(self.input_names, self.op_names))
