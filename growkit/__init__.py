"""growkit: grow trained PyTorch models with Petridish instead of retraining them.

The names below are grouped by who uses them. Sub-packages hold the rest: ``growkit.core`` (the
trace -> inject -> finalize -> plan pipeline), ``growkit.growth`` (grow runs), ``growkit.search``
(alternative passes, loaded when ``grow(method=...)`` first asks for one), ``growkit.lifelong``,
``growkit.adapters`` (Lightning, Avalanche) and ``growkit.data`` (local data sets).
"""
from __future__ import annotations

import importlib
from typing import Any

from torch import nn

# --- one-call API: grow, prune, save / load, export --------------------------------------------
from .core.cost import Budget, Cost
from .growth.grow import GrowResult, grow
from .growth.gallery import Entry, Gallery
from .prune import prune
from .io import load, save
from .export import ExportReport, export_onnx

# --- core primitives: the pipeline by hand ----------------------------------------------------
from .core.graph import EligibleInput, GrowthPoint, LayerGraph, trace
from .core.candidates import Candidate, CandidateModel, inject
from .core.branch import GrownBranch
from .core.finalize import finalize
from .core.plan import Edge, Edit, GrowthPlan
from .core.surgery import apply_plan, state_of
from .core.widen import widen
from .core.deepen import deepen

# --- extension points: ops, growth methods, configuration -------------------------------------
from .core.ops import DEFAULT_OPS, PAPER_OPS, TOKEN_OPS, WIDE_OPS, OpRegistry, OpSpec, register_op
from .growth.config import GrowConfig
from .growth.methods import GrowthMethod, register_method

# --- lifelong: growth inside a training loop and over streams ---------------------------------
from .lifelong.grower import Grower, GrowthEvent
from .lifelong.metrics import AccuracyMatrix
from .lifelong.streams import Experience, Stream, class_incremental, domain_incremental
from .lifelong.stream import ReplayBuffer, StreamResult, grow_stream

# --- errors -----------------------------------------------------------------------------------
from .errors import (
    BudgetError,
    ExportError,
    GrowkitError,
    InputError,
    NonFiniteLoss,
    OpError,
    PlanError,
    PointError,
    LockError,
    ResourceError,
    TraceError,
)


def plan_of(model: nn.Module) -> GrowthPlan | None:
    """The :class:`GrowthPlan` of a model grown (or traced) by growkit, else ``None``."""
    st = state_of(model.module if isinstance(model, CandidateModel) else model)
    return None if st is None else st.plan


# Sub-packages reached as attributes (growkit.search.Darts, growkit.distributed.prepare_ddp,
# growkit.cost.count_flops) are imported on first use: `import growkit` stays light.
_LAZY = {"search": "growkit.search", "distributed": "growkit.distributed", "cost": "growkit.core.cost",
         "data": "growkit.data", "adapters": "growkit.adapters"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(_LAZY[name])
    raise AttributeError(f"module 'growkit' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    # one-call API
    "grow", "GrowResult", "prune", "Budget", "Cost", "Gallery", "Entry", "save", "load", "export_onnx", "ExportReport",
    # core primitives
    "trace", "LayerGraph", "GrowthPoint", "EligibleInput", "inject", "CandidateModel", "Candidate", "finalize",
    "GrownBranch", "GrowthPlan", "Edit", "Edge", "apply_plan", "plan_of", "widen", "deepen",
    # extension points
    "register_op", "OpRegistry", "OpSpec", "DEFAULT_OPS", "PAPER_OPS", "TOKEN_OPS", "WIDE_OPS",
    "GrowthMethod", "register_method", "GrowConfig", "search", "distributed", "cost",
    # lifelong
    "Grower", "GrowthEvent", "grow_stream", "StreamResult", "ReplayBuffer", "Stream", "Experience",
    "class_incremental", "domain_incremental", "AccuracyMatrix",
    # errors
    "GrowkitError", "InputError", "BudgetError", "ExportError", "OpError", "PlanError", "PointError", "ResourceError",
    "TraceError", "NonFiniteLoss", "LockError",
]
