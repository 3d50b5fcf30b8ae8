"""Create a model from a text spec: ``timm:NAME`` or ``package.module:factory``.

:func:`create_model` serves specs the user typed (the CLI's ``--model``). A spec read from a file
goes through :func:`create_from_plan`, which builds only allow-listed architectures with
allow-listed, bounded constructor arguments: a file never chooses what gets imported or called.
"""
from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from .errors import InputError, PlanError

__all__ = ["create_model", "create_from_plan", "PLAN_KWARGS", "default_input_size"]


def create_model(spec: str, **kwargs: Any) -> nn.Module:
    """Instantiate ``spec`` (never downloads weights: timm models use ``pretrained=False``)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise InputError(f"model spec {spec!r} must look like 'timm:resnet18' or 'package.module:factory'")
    kind, name = spec.split(":", 1)
    if kind == "timm":
        import timm

        if name not in timm.list_models():
            raise InputError(f"timm has no model {name!r}; see timm.list_models('*{name[:4]}*')")
        return timm.create_model(name, pretrained=False, **kwargs)
    try:
        factory = getattr(importlib.import_module(kind), name)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"cannot import {name!r} from module {kind!r}: {exc}") from exc
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise InputError(f"{spec} returned {type(model).__name__}, not an nn.Module")
    return model


def _int_in(lo: int, hi: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _rate(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v < 1.0


def _img_size(v: Any) -> bool:
    ok = _int_in(8, 4096)
    return ok(v) or (isinstance(v, list) and len(v) == 2 and all(ok(x) for x in v))


PLAN_KWARGS: dict[str, dict[str, Any]] = {
    "timm": {
        "num_classes": _int_in(0, 100_000),
        "in_chans": _int_in(1, 64),
        "img_size": _img_size,
        "drop_rate": _rate,
        "drop_path_rate": _rate,
        "global_pool": lambda v: v in ("", "avg", "max", "avgmax", "catavgmax", "token", "map", "fast"),
    },
    "torchvision": {"num_classes": _int_in(1, 100_000), "dropout": _rate},
}
"""Constructor arguments a plan may pass, per model source, with the check each value must pass."""


def create_from_plan(source: Any, kwargs: Any, *, trust_source: bool = False) -> nn.Module:
    """Build the base model a plan file names, without importing or calling anything else.

    Only ``timm:NAME`` (``NAME`` in ``timm.list_models()``) and ``torchvision:NAME`` (in
    ``torchvision.models.list_models()``) are built, with ``kwargs`` limited to
    :data:`PLAN_KWARGS`. ``trust_source=True`` (written by the caller, never read from a file)
    lifts the allow-list and imports ``package.module:factory`` like :func:`create_model`: only
    for files you wrote yourself.
    """
    if not isinstance(kwargs, dict):
        raise PlanError("plan base kwargs must be an object")
    if not isinstance(source, str) or len(source) > 200:
        raise PlanError(f"plan base source {str(source)[:80]!r} is not a model spec")
    if trust_source:
        return create_model(source, **kwargs)
    kind, _, name = source.partition(":")
    fix = ("pass base_model= (the model the plan was grown from) to growkit.load, or trust_source=True if you "
           "wrote this file yourself")
    if kind == "timm":
        import timm

        known = name in timm.list_models()
    elif kind == "torchvision":
        import torchvision

        known = name in torchvision.models.list_models()
    else:
        raise PlanError(f"plan base source {source!r} is not an allow-listed 'timm:NAME' or 'torchvision:NAME' "
                        f"model; nothing was imported. {fix}")
    if not known:
        raise PlanError(f"plan base source {source!r}: {kind} has no model {name!r}; {fix}")
    allowed = PLAN_KWARGS[kind]
    for k, v in kwargs.items():
        if k not in allowed:
            raise PlanError(f"plan base kwarg {str(k)[:60]!r} is not allowed for {kind} models (allowed: "
                            f"{', '.join(allowed)}); {fix}")
        if not allowed[k](v):
            raise PlanError(f"plan base kwarg {k}={str(v)[:60]} is out of bounds; {fix}")
    if kind == "timm":
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
        return timm.create_model(name, pretrained=False, **kw)
    return torchvision.models.get_model(name, weights=None, **kwargs)


def default_input_size(model: nn.Module) -> tuple[int, ...] | None:
    """(C, H, W) from a timm model's ``pretrained_cfg``, else ``None``."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return tuple(int(v) for v in cfg["input_size"])
    return None
