"""User-style models, written the way people write them by hand (no timm / torchvision blocks).

Each entry of :data:`ZOO` builds ``(model, example_input)`` for ``in_chans`` input channels and
``size`` x ``size`` images; the tests and ``benchmarks/trace_coverage.py`` run them all.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class PlainCNN(nn.Module):
    """One weight layer per block, residual adds written in ``forward``."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(in_chans, width)
        self.conv2 = conv_bn_relu(width, width)
        self.conv3 = conv_bn_relu(width, 2 * width, 2)
        self.conv4 = conv_bn_relu(2 * width, 2 * width)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = x + self.conv2(x)
        x = self.conv3(x)
        x = x + self.conv4(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class VGGStack(nn.Module):
    """A VGG-style stack: conv-bn-relu layers and max pools in one Sequential, no residuals."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(2 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class TokenMLP(nn.Module):
    """Patches -> tokens (B, N, C) -> residual MLPs over tokens -> mean-pooled classifier."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10, patch: int = 4, dim: int = 16) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(in_chans * patch * patch, dim)
        self.mlp1 = nn.Linear(dim, dim)
        self.mlp2 = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = F.unfold(x, self.patch, stride=self.patch).transpose(1, 2)  # (B, N, C*p*p)
        t = self.embed(t)
        t = t + F.gelu(self.mlp1(t))
        t = t + F.gelu(self.mlp2(t))
        return self.head(self.norm(t).mean(1))


class DictOut(nn.Module):
    """Returns a dict of logits and pooled features."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn_relu(in_chans, width), conv_bn_relu(width, width), conv_bn_relu(width, width, 2))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.body(x).mean((2, 3))
        return {"logits": self.fc(f), "features": f}


class TupleOut(nn.Module):
    """Returns (logits, auxiliary logits) like Inception's training head."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.a = conv_bn_relu(in_chans, width)
        self.b = conv_bn_relu(width, width)
        self.c = conv_bn_relu(width, width)
        self.fc = nn.Linear(width, num_classes)
        self.aux = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.a(x)
        b = self.b(a)
        c = self.c(b + a)
        return self.fc(c.mean((2, 3))), self.aux(b.mean((2, 3)))


class TwoInputs(nn.Module):
    """Two images (e.g. two views) through shared-free branches, fused by addition."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.left = nn.Sequential(conv_bn_relu(in_chans, width), conv_bn_relu(width, width))
        self.right = nn.Sequential(conv_bn_relu(in_chans, width), conv_bn_relu(width, width))
        self.fuse = conv_bn_relu(width, width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.fc(self.fuse(self.left(x) + self.right(y)).mean((2, 3)))


class FlagBranch(nn.Module):
    """``forward`` branches on ``self.training`` (dropout before the head, noise in training) and
    on a constructor flag."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10, width: int = 8, extra: bool = True) -> None:
        super().__init__()
        self.extra = extra
        self.a = conv_bn_relu(in_chans, width)
        self.b = conv_bn_relu(width, width)
        self.c = conv_bn_relu(width, width) if extra else None
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        if self.training:
            x = x + 0.01 * torch.randn_like(x)
        x = x + self.b(x)
        if self.extra:
            x = x + self.c(x)
        f = x.mean((2, 3))
        f = F.dropout(f, p=0.25, training=self.training)
        return self.fc(f)


ZOO: dict[str, Callable[..., nn.Module]] = {
    "plain_cnn": PlainCNN,
    "vgg_stack": VGGStack,
    "token_mlp": TokenMLP,
    "dict_out": DictOut,
    "tuple_out": TupleOut,
    "two_inputs": TwoInputs,
    "flag_branch": FlagBranch,
}


def build(name: str, in_chans: int = 1, size: int = 16, batch: int = 1) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """``(model, example_args)`` for zoo entry ``name`` (seeded)."""
    torch.manual_seed(0)
    model = ZOO[name](in_chans=in_chans)
    n_inputs = 2 if name == "two_inputs" else 1
    return model, tuple(torch.randn(batch, in_chans, size, size) for _ in range(n_inputs))
