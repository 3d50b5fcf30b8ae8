"""Alternative growth and pruning passes over growkit's candidate space.

Importing this package registers the search passes with :func:`growkit.grow`:
``method="darts" | "enas" | "pnas" | "random" | "evolution"`` (``"petridish"`` is the default).
Every pass searches the same space (:class:`SearchSpace`: growth points x eligible inputs x ops),
keeps insertion function-preserving, respects the run's budget, and ends in a growth plan that
is fine-tuned and entered in the gallery the same way. :func:`prune` removes grown branches or
channels and enters its models in a gallery too. A new pass is one class: subclass
:class:`SearchMethod`, set ``name``, implement ``search`` and decorate it with
:func:`growkit.register_method`.
"""
from __future__ import annotations

from .common import AtomCell, BatchStream, Child, SearchContext, SearchMethod
from .darts import Darts, DartsCell
from .enas import Controller, Enas, EnasCell
from .evolution import Evolution, mutate
from .pnas import MLPEnsemble, Pnas, spearman
from .random_search import RandomSearch
from .space import Atom, SearchSpace, plan_from_list, plan_to_list

__all__ = [
    "Atom", "SearchSpace", "plan_to_list", "plan_from_list", "SearchMethod", "SearchContext", "Child", "BatchStream",
    "AtomCell", "Darts", "DartsCell", "Enas", "EnasCell", "Controller", "Pnas", "MLPEnsemble", "spearman",
    "RandomSearch", "Evolution", "mutate",
]
