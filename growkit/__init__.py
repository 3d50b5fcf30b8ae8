"""growkit: grow trained PyTorch models with Petridish instead of retraining them."""
from __future__ import annotations

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
from .graph import EligibleInput, GrowthPoint, LayerGraph, trace
from .ops import DEFAULT_OPS, PAPER_OPS, TOKEN_OPS, WIDE_OPS, OpRegistry, OpSpec, register_op
from .candidates import Candidate, CandidateModel, inject
from .branch import GrownBranch
from .finalize import finalize
from .plan import Edge, Edit, GrowthPlan, apply_plan
from .surgery import state_of
from .cost import Budget, Cost
from .gallery import Entry, Gallery
from .grow import GrowResult, grow
from .methods import GrowthMethod, register_method
from .io import load, save
from .grower import Grower, GrowthEvent
from .cl_metrics import AccuracyMatrix
from .streams import Experience, Stream, class_incremental, domain_incremental
from .lifelong import ReplayBuffer, StreamResult, grow_stream
from .export import ExportReport, export_onnx
from . import distributed
from . import search  # registers the search passes (darts, enas, pnas, random, evolution)
from .search import prune
from . import cost


def plan_of(model):
    """The :class:`GrowthPlan` of a model grown (or traced) by growkit, else ``None``."""
    st = state_of(model.module if isinstance(model, CandidateModel) else model)
    return None if st is None else st.plan

__version__ = "0.1.0"

__all__ = [
    "BudgetError", "ExportError", "GrowkitError", "InputError", "NonFiniteLoss", "OpError", "PlanError",
    "PointError", "TraceError", "EligibleInput", "GrowthPoint", "LayerGraph", "trace",
    "DEFAULT_OPS", "PAPER_OPS", "TOKEN_OPS", "WIDE_OPS", "OpRegistry", "OpSpec", "register_op",
    "Candidate", "CandidateModel", "inject", "GrownBranch", "finalize",
    "Edge", "Edit", "GrowthPlan", "apply_plan", "plan_of",
    "Budget", "Cost", "Entry", "Gallery", "GrowResult", "grow", "GrowthMethod", "register_method", "load", "save", "cost",
    "ExportReport", "export_onnx", "prune", "search", "distributed", "Grower", "GrowthEvent", "AccuracyMatrix", "Experience", "Stream",
    "class_incremental", "domain_incremental", "ReplayBuffer", "StreamResult", "grow_stream", "ResourceError", "LockError",
]
