"""Candidate op registry: the paper's feature-map ops, token ops, and user-registered ops.

An op maps one eligible input ``z`` onto the growth point's shape. Each factory receives an
:class:`OpSpec` (input / output channels, integer downsampling factor, layout) and returns an
``nn.Module`` that works in the layout's canonical form: NCHW for feature maps (NHWC points are
permuted at the candidate's boundary) and (B, N, C) for tokens.

Registries are instances of :class:`OpRegistry`; ``DEFAULT_REGISTRY`` holds the built-in ops.
A user adds an op with ``growkit.register_op("name", layouts=("nchw",))(factory)`` or builds their
own registry and passes it around.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import OpError

__all__ = [
    "OpSpec",
    "OpRegistry",
    "DEFAULT_REGISTRY",
    "register_op",
    "PAPER_OPS",
    "WIDE_OPS",
    "OP_SETS",
    "ops_from_text",
    "DEFAULT_OPS",
    "TOKEN_OPS",
    "default_ops",
    "feature_norm",
]


@dataclass(frozen=True)
class OpSpec:
    """What an op must do: map ``c_in`` channels at ``factor`` x the spatial size to ``c_out``."""

    c_in: int
    c_out: int
    factor: int = 1
    layout: str = "nchw"  # canonical layout the op sees: "nchw" or "tokens"


OpFactory = Callable[[OpSpec], nn.Module]


class OpRegistry:
    """Name -> factory, per layout family (``"nchw"`` feature maps, ``"tokens"``)."""

    def __init__(self) -> None:
        self._ops: dict[str, tuple[OpFactory, tuple[str, ...]]] = {}

    def register(self, name: str, factory: OpFactory, layouts: Iterable[str] = ("nchw",)) -> OpFactory:
        layouts = tuple(layouts)
        bad = [lay for lay in layouts if lay not in ("nchw", "tokens")]
        if bad:
            raise OpError(f"op {name!r}: unknown layouts {bad}; use 'nchw' and/or 'tokens'")
        self._ops[name] = (factory, layouts)
        return factory

    def names(self, layout: str | None = None) -> list[str]:
        return [n for n, (_, lays) in self._ops.items() if layout is None or layout in lays]

    def __contains__(self, name: str) -> bool:
        return name in self._ops

    def copy(self) -> "OpRegistry":
        new = OpRegistry()
        new._ops = dict(self._ops)
        return new

    def build(self, name: str, spec: OpSpec) -> nn.Module:
        """Instantiate op ``name`` for ``spec``; raises :class:`OpError` if unknown or unfit."""
        if name not in self._ops:
            raise OpError(f"unknown op {name!r}; registered ops: {', '.join(self._ops)}")
        factory, layouts = self._ops[name]
        if spec.layout not in layouts:
            raise OpError(
                f"op {name!r} is for {'/'.join(layouts)} tensors and cannot be used at a "
                f"{spec.layout} growth point; choose from {', '.join(self.names(spec.layout))}"
            )
        return factory(spec)


DEFAULT_REGISTRY = OpRegistry()


def register_op(name: str, layouts: Iterable[str] = ("nchw",), registry: OpRegistry | None = None):
    """Decorator registering an op factory ``f(spec: OpSpec) -> nn.Module``."""

    def deco(factory: OpFactory) -> OpFactory:
        return (registry or DEFAULT_REGISTRY).register(name, factory, layouts)

    return deco


# ----------------------------------------------------------------------------------------------
# feature-map ops (DARTS / Petridish op set)


def _bn_inference(x: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm, shape: tuple[int, ...]) -> torch.Tensor:
    """BatchNorm with running statistics, written out elementwise.

    The TorchScript ONNX exporter cannot export ``batch_norm`` when dynamic reshapes hide the
    channel count (hiera, nest: growth points behind permutes); this form needs neither that
    count nor a channel-first layout.
    """
    scale = torch.rsqrt(bn.running_var + bn.eps)  # type: ignore[operator]
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale  # type: ignore[operator]
    if bn.bias is not None:
        shift = shift + bn.bias
    return x * scale.view(shape) + shift.view(shape)


class OpBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose inference form exports to ONNX without a known channel count."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.training or not self.track_running_stats:
            return super().forward(x)
        return _bn_inference(x, self, (1, -1, 1, 1))


class SepConv(nn.Module):
    """ReLU-dwconv-pwconv-BN applied twice (DARTS separable conv); the first dwconv strides."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int) -> None:
        super().__init__()
        p = k // 2
        self.net = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(c_in, c_in, k, stride, p, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_in, 1, bias=False),
            OpBatchNorm2d(c_in),
            nn.ReLU(),
            nn.Conv2d(c_in, c_in, k, 1, p, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            OpBatchNorm2d(c_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DilConv(nn.Sequential):
    """ReLU-dilated dwconv-pwconv-BN (DARTS dilated conv, dilation 2)."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int, dilation: int = 2) -> None:
        super().__init__(
            nn.ReLU(),
            nn.Conv2d(c_in, c_in, k, stride, dilation * (k - 1) // 2, dilation=dilation, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            OpBatchNorm2d(c_out),
        )


class MBConv(nn.Sequential):
    """Inverted bottleneck (MobileNetV2 / ProxylessNAS MBConv): 1x1 expand, kxk depthwise, 1x1 project.

    The paper's ops keep a branch as narrow as its growth point; this op computes in
    ``expand * max(c_in, c_out)`` hidden channels, so a grown shortcut can add width, not only a
    path. ReLU first, BN last, as the DARTS ops, so the candidate's feature norm sees the same form.
    """

    def __init__(self, c_in: int, c_out: int, k: int, stride: int, expand: int = 4) -> None:
        hidden = expand * max(c_in, c_out)
        super().__init__(
            nn.ReLU(),
            nn.Conv2d(c_in, hidden, 1, bias=False),
            OpBatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, k, stride, k // 2, groups=hidden, bias=False),
            OpBatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            OpBatchNorm2d(c_out),
        )


class PoolProj(nn.Sequential):
    """3x3 pooling (stride = factor) followed by a 1x1 projection when channels differ."""

    def __init__(self, kind: str, c_in: int, c_out: int, stride: int) -> None:
        pool = (
            nn.MaxPool2d(3, stride, 1)
            if kind == "max"
            else nn.AvgPool2d(3, stride, 1, count_include_pad=False)
        )
        layers: list[nn.Module] = [pool]
        if c_in != c_out:
            layers += [nn.Conv2d(c_in, c_out, 1, bias=False)]
        super().__init__(*layers)


class Skip(nn.Sequential):
    """Identity; average-pools by ``factor`` and projects 1x1 when shapes differ."""

    def __init__(self, c_in: int, c_out: int, factor: int) -> None:
        layers: list[nn.Module] = []
        if factor > 1:
            layers.append(nn.AvgPool2d(factor, factor))
        if c_in != c_out:
            layers.append(nn.Conv2d(c_in, c_out, 1, bias=False))
        super().__init__(*layers)  # empty Sequential is the identity


for _k in (3, 5):
    DEFAULT_REGISTRY.register(f"sep_conv_{_k}x{_k}", lambda s, k=_k: SepConv(s.c_in, s.c_out, k, s.factor))
    DEFAULT_REGISTRY.register(f"dil_conv_{_k}x{_k}", lambda s, k=_k: DilConv(s.c_in, s.c_out, k, s.factor))
    DEFAULT_REGISTRY.register(f"mb_conv_{_k}x{_k}", lambda s, k=_k: MBConv(s.c_in, s.c_out, k, s.factor))
DEFAULT_REGISTRY.register("max_pool_3x3", lambda s: PoolProj("max", s.c_in, s.c_out, s.factor))
DEFAULT_REGISTRY.register("avg_pool_3x3", lambda s: PoolProj("avg", s.c_in, s.c_out, s.factor))


# ----------------------------------------------------------------------------------------------
# token ops, (B, N, C)


class TokenDWConv(nn.Module):
    """Depthwise conv over the token axis (k=3), then a linear map to ``c_out``."""

    def __init__(self, c_in: int, c_out: int, k: int = 3) -> None:
        super().__init__()
        self.dw = nn.Conv1d(c_in, c_in, k, padding=k // 2, groups=c_in, bias=False)
        self.act = nn.GELU()
        self.proj = nn.Linear(c_in, c_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.dw(x.transpose(1, 2)).transpose(1, 2)))


def _token_mlp(s: OpSpec) -> nn.Module:
    hidden = max(s.c_in, s.c_out)
    return nn.Sequential(nn.LayerNorm(s.c_in), nn.Linear(s.c_in, hidden), nn.GELU(), nn.Linear(hidden, s.c_out))


def _skip(s: OpSpec) -> nn.Module:
    if s.layout == "tokens":
        return nn.Identity() if s.c_in == s.c_out else nn.Linear(s.c_in, s.c_out, bias=False)
    return Skip(s.c_in, s.c_out, s.factor)


DEFAULT_REGISTRY.register("identity", _skip, layouts=("nchw", "tokens"))
DEFAULT_REGISTRY.register("linear", lambda s: nn.Linear(s.c_in, s.c_out), layouts=("tokens",))
DEFAULT_REGISTRY.register("mlp", _token_mlp, layouts=("tokens",))
DEFAULT_REGISTRY.register("dwconv_tokens", lambda s: TokenDWConv(s.c_in, s.c_out), layouts=("tokens",))


PAPER_OPS: tuple[str, ...] = (
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
    "max_pool_3x3",
    "avg_pool_3x3",
    "identity",
)
"""The paper's feature-map op set (Petridish / DARTS)."""

WIDE_OPS: tuple[str, ...] = PAPER_OPS + ("mb_conv_3x3", "mb_conv_5x5")
"""The paper's set plus inverted bottlenecks (expansion 4), for bases too narrow for a shortcut
of the point's own width to add capacity; ``ops="wide"``."""

DEFAULT_OPS: tuple[str, ...] = ("sep_conv_3x3", "identity")
"""The default for feature maps: one spatial op and the skip, about 1.5x a plain train step
(see benchmarks/results/weak_learning_overhead.md); ``ops="paper"`` for the full set."""

TOKEN_OPS: tuple[str, ...] = ("linear", "mlp", "dwconv_tokens", "identity")
"""The full token op set."""

DEFAULT_TOKEN_OPS: tuple[str, ...] = ("dwconv_tokens", "identity")
"""The default for tokens: token mixing plus the skip."""


OP_SETS: dict[str, tuple[str, ...]] = {"paper": PAPER_OPS, "all": PAPER_OPS, "wide": WIDE_OPS}
"""Named feature-map op sets ``ops=`` accepts (tokens use :data:`TOKEN_OPS` for each)."""


def ops_from_text(text: str | None) -> str | tuple[str, ...] | None:
    """The command-line form of ``ops=``: a named set (``paper``, ``wide``), ``default`` for the
    cheap default, or comma-separated op names."""
    if text is None or text == "default":
        return None
    if text in OP_SETS:
        return text
    return tuple(t for t in (s.strip() for s in text.split(",")) if t)


def default_ops(layout: str) -> tuple[str, ...]:
    """The op set used when ``ops=None``."""
    return DEFAULT_TOKEN_OPS if layout == "tokens" else DEFAULT_OPS


def resolve_ops(ops: Iterable[str] | str | None, layout: str) -> tuple[str, ...]:
    """``None`` -> default, ``"paper"`` / ``"all"`` -> the full set, ``"wide"`` -> the paper's
    set plus inverted bottlenecks, else the given names."""
    if ops is None:
        return default_ops(layout)
    if isinstance(ops, str):
        if ops in OP_SETS:
            return TOKEN_OPS if layout == "tokens" else OP_SETS[ops]
        ops = (ops,)
    out = tuple(ops)
    if not out:
        raise OpError("ops must name at least one op")
    return out


def feature_norm(channels: int, layout: str) -> nn.Module:
    """BatchNorm without affine parameters, so |alpha| alone carries an op's importance."""
    if layout == "tokens":
        return TokenBN(channels)
    return OpBatchNorm2d(channels, affine=False)


class TokenBN(nn.BatchNorm1d):
    """BatchNorm1d over the channel axis of (B, N, C) tokens."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.training or not self.track_running_stats:
            return super().forward(x.transpose(1, 2)).transpose(1, 2)
        return _bn_inference(x, self, (-1,))


# ----------------------------------------------------------------------------------------------
# building an op for one (input, point) pair


def canonical(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The layout ops compute in: NHWC feature maps are permuted to NCHW."""
    return x.permute(0, 3, 1, 2) if layout == "nhwc" else x


def decanonical(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Inverse of :func:`canonical`."""
    return x.permute(0, 2, 3, 1) if layout == "nhwc" else x


def add_keep_strides(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``x + delta`` laid out in memory like ``x``.

    Kernels downstream (e.g. depthwise convolutions) pick their algorithm from the input strides,
    so a sum with different strides can round differently even when ``delta`` is exactly 0;
    keeping ``x``'s strides keeps insertion bit-exact.
    """
    out = x + delta
    # ONNX has no strides (and the TorchScript exporter has no aten::copy): nothing to keep there.
    if out.stride() != x.stride() and x.numel() > 0 and not torch.onnx.is_in_onnx_export():
        out = torch.empty_like(x).copy_(out)
    return out


def _family(layout: str) -> str:
    return "tokens" if layout == "tokens" else "nchw"


def build_edge_op(registry: OpRegistry, op: str, z, point) -> nn.Module:
    """Instantiate ``op`` mapping eligible input ``z`` onto growth point ``point``.

    The op is checked on a zero tensor of batch 2 (BatchNorm needs > 1 sample in training) so
    an op that cannot produce the point's shape fails here, with a clear message.
    """
    spec = OpSpec(z.channels, point.channels, z.factor, _family(point.layout))
    module = registry.build(op, spec)
    zshape = list(canonical(torch.empty(z.shape, device="meta"), point.layout).shape)
    want = list(canonical(torch.empty(point.shape, device="meta"), point.layout).shape)
    zshape[0] = want[0] = 2
    try:
        with torch.no_grad():
            got = list(module.eval()(torch.zeros(zshape)).shape)
    except Exception as exc:
        raise OpError(
            f"op {op!r} cannot map input {z.name} {tuple(z.shape)} onto point {point.name} "
            f"{tuple(point.shape)}: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        module.train()
    if got != want:
        raise OpError(
            f"op {op!r} maps input {z.name} {tuple(z.shape)} to {tuple(got)} but point "
            f"{point.name} needs {tuple(want)} (canonical layout); pick another op"
        )
    return module
