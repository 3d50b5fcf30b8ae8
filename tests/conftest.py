"""Shared fixtures: small real models (pretrained=False) and helpers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

# Test tensors are tiny: one intra-op thread is faster than two and avoids OpenMP spin contention
# when other processes share the two cores.
torch.set_num_threads(1)


class TinyResNet(nn.Module):
    """A 3-stage residual CNN small enough for exactness tests in milliseconds."""

    def __init__(self, widths=(8, 16, 32), num_classes: int = 10, in_chans: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages = []
        c = widths[0]
        for i, w in enumerate(widths):
            stages.append(nn.Sequential(Block(c, w, 1 if i == 0 else 2), Block(w, w, 1)))
            c = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.head(x.mean((2, 3)))


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = None
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.short is None else self.short(x)))


@pytest.fixture
def tiny_resnet() -> nn.Module:
    torch.manual_seed(0)
    return TinyResNet()


@pytest.fixture(scope="module")
def digits():
    """Train / val loaders over 320 / 160 real digits (16x16), seeded."""
    from growkit.data import digits_dataset, make_loaders, split

    tr, va = split(digits_dataset(16), [320, 160], seed=0)
    return make_loaders([tr, va], batch_size=32, seed=0)


@pytest.fixture(scope="module")
def trained(digits):
    """A TinyResNet trained 2 epochs on ``digits`` (a real, not converged, base)."""
    from growkit.train import train_steps

    train_l, _ = digits
    torch.manual_seed(0)
    m = TinyResNet(widths=(4, 8, 16))
    train_steps(m, train_l, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), epochs=2)
    return m


def run_eval(model: nn.Module, x):
    model.eval()
    with torch.no_grad():
        return model(x)
