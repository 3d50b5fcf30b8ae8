"""growkit: grow trained PyTorch models with Petridish instead of retraining them."""
from __future__ import annotations

from .errors import (
    BudgetError,
    ExportError,
    GrowkitError,
    InputError,
    OpError,
    PlanError,
    PointError,
    ResourceError,
    TraceError,
)
from .core.graph import EligibleInput, GrowthPoint, LayerGraph, trace
from .core.ops import DEFAULT_OPS, PAPER_OPS, TOKEN_OPS, WIDE_OPS, OpRegistry, OpSpec, register_op
from .core.candidates import Candidate, CandidateModel, inject
from .core.branch import GrownBranch
from .core.finalize import finalize
from .core.plan import Edge, Edit, GrowthPlan, apply_plan
from .core.surgery import state_of
from .core.cost import Budget, Cost
from .growth.gallery import Entry, Gallery
from .growth.grow import GrowResult, grow
from .growth.methods import GrowthMethod, register_method
from .io import load, save
from .lifelong.grower import Grower, GrowthEvent
from .lifelong.metrics import AccuracyMatrix
from .lifelong.streams import Experience, Stream, class_incremental, domain_incremental
from .lifelong.stream import ReplayBuffer, StreamResult, grow_stream
from .export import ExportReport, export_onnx
from . import distributed
from . import search  # registers the search passes (darts, enas, pnas, random, evolution)
from .prune import prune
from .core import cost


def plan_of(model):
    """The :class:`GrowthPlan` of a model grown (or traced) by growkit, else ``None``."""
    st = state_of(model.module if isinstance(model, CandidateModel) else model)
    return None if st is None else st.plan

__version__ = "0.1.0"

__all__ = [
    "BudgetError", "ExportError", "GrowkitError", "InputError", "OpError", "PlanError",
    "PointError", "TraceError", "EligibleInput", "GrowthPoint", "LayerGraph", "trace",
    "DEFAULT_OPS", "PAPER_OPS", "TOKEN_OPS", "WIDE_OPS", "OpRegistry", "OpSpec", "register_op",
    "Candidate", "CandidateModel", "inject", "GrownBranch", "finalize",
    "Edge", "Edit", "GrowthPlan", "apply_plan", "plan_of",
    "Budget", "Cost", "Entry", "Gallery", "GrowResult", "grow", "GrowthMethod", "register_method", "load", "save", "cost",
    "ExportReport", "export_onnx", "prune", "search", "distributed", "Grower", "GrowthEvent", "AccuracyMatrix", "Experience", "Stream",
    "class_incremental", "domain_incremental", "ReplayBuffer", "StreamResult", "grow_stream", "ResourceError",
]
