"""Create a model from a text spec: ``timm:NAME`` or ``package.module:factory``."""
from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from .errors import InputError

__all__ = ["create_model", "default_input_size"]


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


def default_input_size(model: nn.Module) -> tuple[int, ...] | None:
    """(C, H, W) from a timm model's ``pretrained_cfg``, else ``None``."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return tuple(int(v) for v in cfg["input_size"])
    return None
