"""Alternative growth passes over growkit's candidate space, one per module.

``grow(method="darts" | "enas" | "pnas" | "random" | "evolution")`` imports the pass it needs
(:data:`growkit.growth.methods.BUILTIN`); importing this package loads all of them. Every pass
searches the same space (:class:`SearchSpace`: growth points x eligible inputs x ops), keeps
insertion function-preserving, respects the run's budget, and ends in a growth plan that is
fine-tuned and entered in the gallery the same way (:mod:`growkit.search.common`). A new pass is
one class: subclass :class:`SearchMethod`, set ``name``, implement ``search`` and decorate it with
:func:`growkit.register_method`. Pruning is a separate entry point: :func:`growkit.prune`.
"""
from __future__ import annotations

from .cells import AtomCell
from .common import BatchStream, Child, SearchContext, SearchMethod
from .darts import Darts, DartsCell
from .enas import Controller, Enas, EnasCell
from .evolution import Evolution, mutate
from .pnas import MLPEnsemble, Pnas, spearman
from .random_search import RandomSearch
from ..core.plan import Atom
from .space import SearchSpace, proposal_from_list, proposal_to_list

__all__ = [
    "Atom", "SearchSpace", "proposal_to_list", "proposal_from_list", "SearchMethod", "SearchContext", "Child", "BatchStream",
    "AtomCell", "Darts", "DartsCell", "Enas", "EnasCell", "Controller", "Pnas", "MLPEnsemble", "spearman",
    "RandomSearch", "Evolution", "mutate",
]
