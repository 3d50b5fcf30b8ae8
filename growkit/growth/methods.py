"""Growth methods: passes over growkit's candidate space that ``grow(method=NAME)`` runs.

A method implements one growth round on a :class:`growkit.growth.grow.GrowRun` (the run context: gallery,
parent sampling, materialisation of gallery entries, fine-tuning, checkpoints). Petridish is the
default; other passes (DARTS, ENAS, PNAS, random search, evolution) register the same way::

    @register_method
    class MyPass(GrowthMethod):
        name = "mine"

        def round(self, run, rnd, saved):
            parent = run.gallery.sample_parent(run.rng, run.budget, run.base_cost)
            ...                                   # search, then finalize to a grown model
            run.finetune(rnd, grown, parent, rec, None)   # trains, evaluates, adds the entry
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from .grow import GrowRun

__all__ = ["GrowthMethod", "register_method", "get_method", "METHOD_REGISTRY", "Petridish"]

METHOD_REGISTRY: dict[str, type["GrowthMethod"]] = {}


class GrowthMethod:
    """Base class of growth methods (see the module docstring).

    ``options`` are the method's own settings (``grow(..., method_options={...})``).
    ``state_dict`` / ``load_state_dict`` carry JSON-able method state (a controller, a
    population) through checkpoints, so a resumed run continues the same search.
    """

    name: ClassVar[str] = ""

    def __init__(self, **options: Any) -> None:
        self.options = options

    def round(self, run: "GrowRun", rnd: int, saved: Any) -> None:
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


def get_method(name: str, **options: Any) -> GrowthMethod:
    """Instantiate the registered method ``name``."""
    if name not in METHOD_REGISTRY:
        raise InputError(f"unknown method {name!r}; available: {', '.join(sorted(METHOD_REGISTRY))}")
    return METHOD_REGISTRY[name](**options)


@register_method
class Petridish(GrowthMethod):
    """Petridish (the default): weak learning of candidates while the model trains, L1 selection,
    concat + projection finalization, fine-tuning."""

    name = "petridish"

    def __init__(self, **options: Any) -> None:
        if options:
            raise InputError(f"petridish takes its settings as grow() arguments, not method_options {sorted(options)}")
        super().__init__()

    def round(self, run: "GrowRun", rnd: int, saved: Any) -> None:
        run.petridish_round(rnd, saved)
