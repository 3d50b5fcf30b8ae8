"""Growth methods: passes over growkit's candidate space that ``grow(method=NAME)`` runs.

A method implements one growth round on a :class:`growkit.growth.run.GrowRun` (the run context:
gallery, parent sampling, materialisation of gallery entries, fine-tuning, checkpoints). Petridish
is the default; the search passes (DARTS, ENAS, PNAS, random search, evolution) register the same
way::

    @register_method
    class MyPass(GrowthMethod):
        name = "mine"

        def round(self, run, rnd, saved):
            parent = run.gallery.sample_parent(run.rng, run.budget, run.base_cost)
            ...                                   # search, then finalize to a grown model
            run.finetune(rnd, grown, parent, rec, None)   # trains, evaluates, adds the entry

The built-in methods are imported the first time one of them is asked for (:data:`BUILTIN`), so
``import growkit`` does not load every search pass.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from .run import GrowRun, Saved

__all__ = ["GrowthMethod", "register_method", "get_method", "method_names", "METHOD_REGISTRY", "BUILTIN"]

METHOD_REGISTRY: dict[str, type["GrowthMethod"]] = {}

BUILTIN: dict[str, str] = {
    "petridish": "growkit.growth.petridish",
    "darts": "growkit.search.darts",
    "enas": "growkit.search.enas",
    "pnas": "growkit.search.pnas",
    "random": "growkit.search.random_search",
    "evolution": "growkit.search.evolution",
    "widen": "growkit.growth.resize",
    "deepen": "growkit.growth.resize",
    "mixed": "growkit.growth.resize",
}
"""Built-in method name -> the module that registers it (imported on first use)."""


class GrowthMethod:
    """Base class of growth methods (see the module docstring).

    ``options`` are the method's own settings (``grow(..., method_options={...})``).
    ``state_dict`` / ``load_state_dict`` carry JSON-able method state (a controller, a
    population) through checkpoints, so a resumed run continues the same search.
    """

    name: ClassVar[str] = ""

    def __init__(self, **options: Any) -> None:
        self.options = options

    def round(self, run: "GrowRun", rnd: int, saved: "Saved | None") -> None:
        """Run growth round ``rnd``; ``saved`` is the checkpoint to resume from, or ``None``."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


def register_method(cls: type[GrowthMethod]) -> type[GrowthMethod]:
    """Class decorator: make ``cls`` available as ``grow(method=cls.name)``."""
    if not cls.name:
        raise InputError(f"{cls.__name__} needs a non-empty class attribute 'name'")
    METHOD_REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    """Every method ``grow(method=...)`` accepts: the built-in ones and those registered since."""
    return sorted(set(METHOD_REGISTRY) | set(BUILTIN))


def get_method(name: str, **options: Any) -> GrowthMethod:
    """Instantiate the method ``name`` (importing a built-in one on first use)."""
    if name not in METHOD_REGISTRY and isinstance(name, str) and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name not in METHOD_REGISTRY:
        raise InputError(f"unknown method {name!r}; available: {', '.join(method_names())}")
    return METHOD_REGISTRY[name](**options)
