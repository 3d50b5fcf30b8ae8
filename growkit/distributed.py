"""Data-parallel training of growkit models with ``torch.nn.parallel.DistributedDataParallel``.

DDP averages gradients, which reproduces single-process training on the global batch only when
nothing else in the step depends on the batch. Two things in a growkit model do:

* BatchNorm (the base model's, the candidate ops' and the candidates' non-affine feature norms)
  normalises with batch statistics. :func:`convert_batchnorm` makes every BatchNorm compute
  them over the global batch: torch's ``nn.SyncBatchNorm`` for plain BatchNorms on CUDA, and
  growkit's process-group BatchNorm (:func:`group_batch_norm`) elsewhere, which works with
  gloo on CPU (``nn.SyncBatchNorm`` needs CUDA tensors), for BatchNorm subclasses whose forward
  does more (growkit's op BatchNorms and token BatchNorm, timm's ``BatchNormAct2d``).
* Candidates rescale the gradient at their growth point to unit RMS and score their fit with a
  cosine; :func:`prepare_ddp` points them at a process group so that both use the global batch.

:func:`prepare_ddp` does both, decides ``find_unused_parameters`` and wraps the model::

    dist.init_process_group("gloo")          # or "nccl"; torchrun sets rank and world size
    cm = growkit.inject(model, example)      # same seed on every rank (DDP broadcasts rank 0's)
    ddp = prepare_ddp(cm, probe_batch=x)     # x: one local input batch
    loss = criterion(ddp(x), y) + ddp.module.extra_loss()

With the same global batch (every rank holding an equal share), the parameters, buffers and
candidate scores then match single-process training up to float rounding (``tests/test_ddp.py``).

Conversion is in place and keeps every module's eval-mode function, state_dict keys and
parameters; :func:`desync` reverts it. A deep copy (``growkit.finalize``, ``copy.deepcopy``) or
a pickle of a converted model is an ordinary single-process model.
"""
from __future__ import annotations

import copy
import copyreg
import logging
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from .core.candidates import Candidate
from .errors import InputError
from .core.ops import OpBatchNorm2d, TokenBN

__all__ = [
    "prepare_ddp",
    "unwrap",
    "desync",
    "convert_batchnorm",
    "new_stats_group",
    "unused_parameters",
    "group_batch_norm",
    "register_sync_forward",
]

logger = logging.getLogger(__name__)

TrainForward = Callable[[nn.Module, torch.Tensor, Any], torch.Tensor]
"""``f(bn, x, group) -> y``: a BatchNorm module's training-mode forward with global statistics."""


# ----------------------------------------------------------------------------------------------
# process-group BatchNorm


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum): the backward all-reduces the gradient.

    The same as ``torch.distributed.nn.functional.all_reduce``, which torch deprecates in favour
    of functional collectives without this autograd rule.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        y = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return _AllReduceSum.apply(g, ctx.group), None


def group_batch_norm(bn: _BatchNorm, x: torch.Tensor, group: Any) -> torch.Tensor:
    """Training-mode ``bn(x)`` (channels on dim 1) with statistics of the batch over ``group``.

    Every rank's count, mean and sum of squared deviations per channel are combined in one
    differentiable all-reduce (Chan's parallel variance, stable in float32), so autograd gives
    each rank the input gradients of the global batch. Running statistics are updated like
    ``nn.BatchNorm`` (unbiased variance, ``momentum``, ``num_batches_tracked``).
    """
    c = x.shape[1]
    acc = torch.promote_types(x.dtype, torch.float32)
    xa = x.to(acc)
    dims = [0, *range(2, x.dim())]
    shape = [1, c] + [1] * (x.dim() - 2)
    n = x.numel() // c if c else 0
    if n:
        mean = xa.mean(dims)
        m2 = (xa - mean.view(shape)).pow(2).sum(dims)
    else:  # an empty local batch still takes part in the reduction
        mean = m2 = xa.sum(dims)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    row = torch.cat([mean, m2, mean.new_full((1,), float(n))])
    onehot = torch.zeros(world, 1, dtype=acc, device=x.device)
    onehot[rank] = 1.0
    slots = _AllReduceSum.apply(onehot * row, group)  # (world, 2c + 1): an all-gather by sum
    means, m2s, counts = slots[:, :c], slots[:, c:2 * c], slots[:, 2 * c:]
    total = counts.sum()
    gmean = (counts * means).sum(0) / total
    var = (m2s.sum(0) + (counts * (means - gmean).pow(2)).sum(0)) / total  # biased
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(acc)
    y = (xa - gmean.view(shape)) * scale.view(shape)
    if bn.bias is not None:
        y = y + bn.bias.to(acc).view(shape)
    if bn.training and bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None:
        factor = 0.0 if bn.momentum is None else bn.momentum
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        with torch.no_grad():
            unbiased = var.detach() * (total / (total - 1))
            bn.running_mean.mul_(1 - factor).add_(gmean.detach().to(bn.running_mean.dtype), alpha=factor)
            bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)
    return y.to(x.dtype)


def _plain(bn: nn.Module, x: torch.Tensor, group: Any) -> torch.Tensor:
    return group_batch_norm(bn, x, group)  # type: ignore[arg-type]


def _tokens(bn: nn.Module, x: torch.Tensor, group: Any) -> torch.Tensor:
    return group_batch_norm(bn, x.transpose(1, 2), group).transpose(1, 2)  # type: ignore[arg-type]


_TRAIN_FORWARDS: dict[type, TrainForward] = {
    _BatchNorm: _plain,
    nn.SyncBatchNorm: _plain,
    OpBatchNorm2d: _plain,  # its own forward differs only in eval mode
    TokenBN: _tokens,
}

try:  # timm's BatchNorm + activation, leaf modules in timm models
    from timm.layers.norm_act import BatchNormAct2d as _BatchNormAct2d

    _TRAIN_FORWARDS[_BatchNormAct2d] = lambda bn, x, group: bn.act(bn.drop(group_batch_norm(bn, x, group)))
except ImportError:  # pragma: no cover - timm is a dependency
    pass


def register_sync_forward(cls: type, train_forward: TrainForward) -> None:
    """Teach :func:`convert_batchnorm` a BatchNorm subclass whose ``forward`` is its own.

    ``train_forward(bn, x, group)`` must compute the module's training-mode output using
    :func:`group_batch_norm` for the normalisation; eval mode keeps ``cls.forward``.
    """
    if not (isinstance(cls, type) and issubclass(cls, _BatchNorm)):
        raise InputError(f"register_sync_forward expects a BatchNorm subclass, got {cls!r}")
    if not callable(train_forward):
        raise InputError(f"train_forward must be callable (bn, x, group) -> tensor, got {train_forward!r}")
    _TRAIN_FORWARDS[cls] = train_forward


class _Converted:
    """Mixin of converted BatchNorms: copies and pickles are the original, unconverted module."""

    _growkit_base: type  # the class before conversion
    _growkit_key: str  # the instance attribute holding the process group

    def __reduce_ex__(self, protocol: Any) -> Any:
        state = self.__getstate__()  # type: ignore[attr-defined]
        state.pop(self._growkit_key, None)
        return copyreg.__newobj__, (self._growkit_base,), state


class _GroupSync(_Converted):
    """Mixin: training-mode forward over the process group; eval mode is the original forward."""

    _growkit_train: TrainForward

    _growkit_key = "_growkit_group"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.__dict__.get("_growkit_group")
        if group is None or not self.training:  # type: ignore[attr-defined]
            return super().forward(x)  # type: ignore[misc]
        return type(self)._growkit_train(self, x, group)  # type: ignore[arg-type]


_CLASSES: dict[tuple[type, str], type] = {}


def _converted_class(base: type, kind: str, train: TrainForward | None = None) -> type:
    key = (base, kind)
    if key not in _CLASSES:
        if kind == "group":
            bases: tuple[type, ...] = (_GroupSync, base)
            attrs: dict[str, Any] = {"_growkit_train": staticmethod(train)}  # type: ignore[arg-type]
            name = f"GroupSync{base.__name__}"
        else:
            bases, attrs, name = (_Converted, nn.SyncBatchNorm), {"_growkit_key": "process_group"}, f"Sync{base.__name__}"
        attrs.update(_growkit_base=base, __module__=__name__, __qualname__=name)
        _CLASSES[key] = type(name, bases, attrs)
    return _CLASSES[key]


_PLAIN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _forward_owner(cls: type) -> type:
    return next(c for c in cls.__mro__ if "forward" in vars(c))


def _device_of(module: nn.Module) -> torch.device | None:
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        return t.device
    return None


def convert_batchnorm(model: nn.Module, group: Any, *, torch_sync: bool | None = None) -> list[str]:
    """Make every BatchNorm of ``model`` (in place) normalise over the batch of ``group``.

    Plain ``nn.BatchNorm1d/2d/3d`` on CUDA become ``nn.SyncBatchNorm`` (``torch_sync=True``
    forces that, ``False`` never); everything else, and everything on CPU, gets growkit's
    process-group BatchNorm (:func:`group_batch_norm`). Modules keep their identity,
    parameters, buffers, state_dict keys and exact eval-mode forward. Returns the converted
    module names; a converted module is re-pointed at ``group``.
    """
    todo = [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    bad = [
        f"{name or '(root)'} ({type(m).__module__}.{type(m).__qualname__})"
        for name, m in todo
        if not isinstance(m, _Converted) and _forward_owner(type(m)) not in _TRAIN_FORWARDS
    ]
    if bad:
        raise InputError(
            "cannot synchronise BatchNorm subclasses with a forward of their own: " + ", ".join(bad)
            + "; register their training forward with growkit.distributed.register_sync_forward(cls, fn), "
            "or pass sync_batchnorm=False to keep per-process statistics (no longer single-process equivalent)"
        )
    for name, m in todo:
        if isinstance(m, _Converted):
            m.__dict__[m._growkit_key] = group
            continue
        base = type(m)
        dev = _device_of(m)
        if base in _PLAIN and (torch_sync if torch_sync is not None else (dev is not None and dev.type == "cuda")):
            m.__class__ = _converted_class(base, "torch")
        else:
            m.__class__ = _converted_class(base, "group", _TRAIN_FORWARDS[_forward_owner(base)])
        m.__dict__[m._growkit_key] = group
    return [name for name, _ in todo]


def _point_candidates(model: nn.Module, group: Any) -> int:
    n = 0
    for m in model.modules():
        if isinstance(m, Candidate):
            m.stats_group = group
            n += 1
    return n


def desync(model: nn.Module) -> nn.Module:
    """Undo :func:`prepare_ddp`'s conversions in place (BatchNorm classes, candidate groups).

    Accepts the DDP wrapper or the module; returns the module, now an ordinary single-process
    model (call it before ``growkit.trace`` / ``inject`` on a model trained under DDP).
    """
    module = unwrap(model)
    for m in module.modules():
        if isinstance(m, _Converted):
            m.__dict__.pop(m._growkit_key, None)
            m.__class__ = m._growkit_base
    _point_candidates(module, None)
    return module


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (``model`` itself otherwise)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


# ----------------------------------------------------------------------------------------------
# find_unused_parameters probe


def _output_sum(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out.sum() if out.is_floating_point() else None
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        parts = [s for s in (_output_sum(o) for o in out) if s is not None]
        return sum(parts[1:], parts[0]) if parts else None
    return None


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _move(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _move(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_move(v, device) for v in batch)
    return batch


def unused_parameters(model: nn.Module, probe_batch: Any, loss: Callable[[Any], torch.Tensor] | None = None) -> list[str]:
    """Names of trainable parameters that get no gradient from one training step on ``probe_batch``.

    Runs forward and backward on a deep copy in training mode (the model, its gradients and the
    RNG states are left as they were; no collective is called). The loss is ``loss(output)``
    (default: the sum of every floating-point output) plus ``extra_loss()`` when the model has
    one, as in a growkit training step. ``probe_batch``: the model's input (a tensor, a tuple of
    positional inputs or a dict of keyword inputs).
    """
    probe = desync(copy.deepcopy(unwrap(model)))
    probe.train()
    params = list(probe.parameters())
    device = params[0].device if params else torch.device("cpu")
    cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    for p in params:
        p.grad = None
    with torch.random.fork_rng(devices=cuda):
        out = _call(probe, _move(probe_batch, device))
        total = loss(out) if loss is not None else _output_sum(out)
        if total is None:
            raise InputError(
                f"the model returned {type(out).__name__} with no floating-point tensor; pass "
                "probe_loss=lambda out: <scalar loss> (or find_unused_parameters=True/False)"
            )
        extra = getattr(probe, "extra_loss", None)
        if callable(extra):
            total = total + extra()
        total.backward()
    return [n for n, p in probe.named_parameters() if p.requires_grad and p.grad is None]


# ----------------------------------------------------------------------------------------------
# DDP


def new_stats_group(process_group: Any = None) -> Any:
    """A new process group over the ranks of ``process_group`` (default: all ranks).

    growkit's statistic all-reduces (BatchNorm, candidate RMS and scores) run on it so that they
    never interleave with DDP's gradient buckets. Collective: every rank of the default group
    must call it, in the same order.
    """
    _require_initialized("new_stats_group")
    ranks = None if process_group is None else dist.get_process_group_ranks(process_group)
    return dist.new_group(ranks=ranks)


def _require_initialized(what: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise InputError(
            f"{what} needs an initialized torch.distributed process group: call "
            "torch.distributed.init_process_group('gloo' on CPU, 'nccl' on GPUs) in every process "
            "first (torchrun sets RANK, WORLD_SIZE and MASTER_ADDR/PORT for init_method='env://')"
        )


def prepare_ddp(
    model: nn.Module,
    *,
    device_ids: Iterable[int | torch.device] | None = None,
    process_group: Any = None,
    stats_group: Any = None,
    find_unused_parameters: bool | None = None,
    probe_batch: Any = None,
    probe_loss: Callable[[Any], torch.Tensor] | None = None,
    sync_batchnorm: bool = True,
    **ddp_kwargs: Any,
) -> DistributedDataParallel:
    """Wrap a growkit model (or any model) in DDP so that it trains like one process on the global batch.

    Converts every BatchNorm to global-batch statistics (:func:`convert_batchnorm`), points the
    candidates (if any) at ``stats_group``, decides ``find_unused_parameters`` and returns
    ``DistributedDataParallel(model, ...)``. ``model`` is converted in place (see
    :func:`desync`); move it to its device first. Its training step stays the usual one, with
    ``ddp.module.extra_loss()`` for a candidate model.

    Args:
        device_ids: for DDP; default ``[device]`` for a model on one CUDA device, else ``None``.
        process_group: DDP's gradient group (default: all ranks).
        stats_group: group for growkit's statistics; default a new group over the same ranks
            (:func:`new_stats_group`, a collective call).
        find_unused_parameters: ``None`` decides it with :func:`unused_parameters` on
            ``probe_batch`` (True on any rank if a trainable parameter gets no gradient), or
            ``True`` when no ``probe_batch`` is given (always works, costs a graph traversal).
        probe_batch: one local input batch of the model (tensor, tuple or dict of inputs).
        probe_loss: ``f(output) -> scalar`` for the probe (default: sum of the outputs).
        sync_batchnorm: ``False`` keeps per-process BatchNorm statistics.
        **ddp_kwargs: further ``DistributedDataParallel`` arguments.
    """
    _require_initialized("prepare_ddp")
    if isinstance(model, DistributedDataParallel):
        raise InputError("model is already wrapped in DistributedDataParallel; pass ddp.module to prepare it again")
    if not isinstance(model, nn.Module):
        raise InputError(f"prepare_ddp expects an nn.Module, got {type(model).__name__}")
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    if device_ids is None and device.type == "cuda" and len({p.device for p in params}) == 1:
        device_ids = [device]
    why = "given"
    unused: list[str] = []
    if find_unused_parameters is None:
        if probe_batch is None:
            find_unused_parameters, why = True, "no probe_batch given; pass one to decide"
        else:
            unused = unused_parameters(model, probe_batch, probe_loss)
            find_unused_parameters = bool(unused)
            why = "probe"
    if stats_group is None:
        stats_group = new_stats_group(process_group)
    if why == "probe":  # every rank must pass the same flag to DDP
        flag = torch.tensor([float(find_unused_parameters)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=stats_group)
        find_unused_parameters = bool(flag.item() > 0)
    synced = convert_batchnorm(model, stats_group) if sync_batchnorm else []
    n_cand = _point_candidates(model, stats_group)
    ddp = DistributedDataParallel(
        model,
        device_ids=list(device_ids) if device_ids is not None else None,
        process_group=process_group,
        find_unused_parameters=find_unused_parameters,
        **ddp_kwargs,
    )
    detail = why
    if why == "probe":
        detail = (
            f"probe: {len(unused)} parameter(s) without gradient on this rank"
            + (f" ({', '.join(unused[:5])}{', ...' if len(unused) > 5 else ''})" if unused else "")
        )
    logger.info(
        "prepare_ddp: rank %d of %d, %d BatchNorm(s) synchronised, %d candidate(s) on the stats group, "
        "find_unused_parameters=%s (%s)",
        dist.get_rank(), dist.get_world_size(), len(synced), n_cand, find_unused_parameters, detail,
    )
    return ddp
