"""Weak-learning overhead: train-step time and activation memory with candidates vs without.

For each model, the plain model and its candidate model (candidates at every growth point) run
the same SGD train step on the same batch. Time is the median over repeats of interleaved
measurements (plain, candidates, plain, ...), so machine load affects both alike; memory is the
bytes of tensors autograd saves for backward (unique storages, via saved_tensors_hooks), which is
what grows with candidates; parameters are counted separately. Ratios are candidates / plain.

    python benchmarks/weak_learning_overhead.py            # CPU, default + all-ops configs
    python benchmarks/weak_learning_overhead.py --device cuda --batch 64
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import timm
import torch
import torch.nn.functional as F
from torch import nn

import growkit

logger = logging.getLogger("weak_learning_overhead")

MODELS: dict[str, Callable[[], tuple[nn.Module, tuple[int, ...]]]] = {
    "resnet18@64px": lambda: (timm.create_model("resnet18", num_classes=10), (3, 64, 64)),
    "mobilenetv3_small_100@64px": lambda: (timm.create_model("mobilenetv3_small_100", num_classes=10), (3, 64, 64)),
    "vit_tiny@96px": lambda: (timm.create_model("vit_tiny_patch16_224", img_size=96, num_classes=10), (3, 96, 96)),
}

_GROW = growkit.GrowConfig()
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    # what grow() injects for its weak learning, whatever its defaults are at the time
    "grow-default": {"ops": _GROW.ops, "max_inputs": _GROW.max_inputs, "normalize_grad": True},
    "paper-ops-all-inputs": {"ops": "paper", "max_inputs": None},
}


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the unique storages autograd saves for backward while ``fn`` runs forward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return sum(seen.values())


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, extra: Callable[[], torch.Tensor] | None):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def loss_fn() -> torch.Tensor:
        loss = F.cross_entropy(model(x), y)
        return loss + extra() if extra is not None else loss

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    return step, loss_fn


def timed(step: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(name: str, cfg_name: str, cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, size = MODELS[name]()
    x = torch.randn(args.batch, *size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    cm = growkit.inject(model, x[:1].cpu(), **cfg)
    model.to(device).train()
    cm.to(device).train()
    plain_step, plain_loss = step_fn(model, x, y, None)
    cand_step, cand_loss = step_fn(cm, x, y, cm.extra_loss)
    for _ in range(args.warmup):
        plain_step()
        cand_step()
    tp, tc = [], []
    for _ in range(args.repeats):
        tp.append(timed(plain_step, device))
        tc.append(timed(cand_step, device))
    mem_p = saved_bytes(plain_loss)
    mem_c = saved_bytes(cand_loss)
    n_base = sum(p.numel() for p in model.parameters())
    n_cand = sum(p.numel() for p in cm.candidate_parameters())
    n_edges = sum(c.alpha.numel() for c in cm.candidates.values())
    row = {
        "model": name,
        "config": cfg_name,
        "points": len(cm.candidates),
        "edges": n_edges,
        "plain_ms": 1e3 * statistics.median(tp),
        "candidates_ms": 1e3 * statistics.median(tc),
        "time_ratio": statistics.median(c / p for c, p in zip(tc, tp)),
        "plain_saved_mb": mem_p / 2**20,
        "candidates_saved_mb": mem_c / 2**20,
        "memory_ratio": mem_c / mem_p,
        "base_params_m": n_base / 1e6,
        "candidate_params_m": n_cand / 1e6,
    }
    logger.info("%s", row)
    return row


def to_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    head = (
        f"# Weak-learning overhead ({meta['device']}, batch {meta['batch']}, "
        f"median of {meta['repeats']} interleaved repeats, torch {meta['torch']}, {meta['threads']} threads)\n\n"
        "| model | config | points | edges | plain step ms | with candidates ms | time ratio | "
        "saved-activation MB plain | with candidates | memory ratio | candidate params (M) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['model']} | {r['config']} | {r['points']} | {r['edges']} | {r['plain_ms']:.1f} | "
        f"{r['candidates_ms']:.1f} | **{r['time_ratio']:.2f}x** | {r['plain_saved_mb']:.1f} | "
        f"{r['candidates_saved_mb']:.1f} | {r['memory_ratio']:.2f}x | {r['candidate_params_m']:.2f} |\n"
        for r in rows
    )
    return head + body


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="", help="suffix for the result files (e.g. _cuda)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = [
        measure(m, c, CONFIGS[c], args)
        for m in args.models.split(",")
        for c in args.configs.split(",")
    ]
    meta = {
        "device": args.device if args.device != "cuda" else torch.cuda.get_device_name(),
        "batch": args.batch,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"weak_learning_overhead{args.tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    md = to_markdown(rows, meta)
    (out / f"weak_learning_overhead{args.tag}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
