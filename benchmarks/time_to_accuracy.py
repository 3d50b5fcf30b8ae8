#!/usr/bin/env python
"""Time-to-accuracy of width / depth growth, as LEMON measures it.

For each full-width timm model M and each operator (``widen``: ``growkit.widen(ratio)``;
``deepen``: ``growkit.deepen(block="identity")`` at every growth point), on MNIST (the 10k test
set from ../shared/data, split into train / test):

1. the base: M trained from scratch for ``--base-epochs`` (its cost is not counted: growth starts
   from a trained base, as in LEMON);
2. from scratch: the larger architecture L = op(M) with every parameter re-initialised, trained
   for ``--epochs`` (SGD + momentum, cosine schedule); its final test accuracy is the target;
3. grown: L = op(trained base) (exactly the base's function), trained with the same recipe (new
   blocks under growkit's new-parameter rule), evaluated every ``--eval-every`` batches.

Reported per (model, op): the training compute (wall-clock of the training steps, and FLOPs =
3 x forward FLOPs per example x examples seen) the grown model needs to first reach the target,
against the from-scratch run's compute for the whole schedule. Evaluation time is not counted.
Writes ``benchmarks/results/time_to_accuracy.{json,md,png}``.

    python benchmarks/time_to_accuracy.py [--models resnet10t,mobilenetv3_small_050] [--epochs 6]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import growkit  # noqa: E402
from growkit.core.cost import count_flops  # noqa: E402
from growkit.core.deepen import DEPTH  # noqa: E402
from growkit.data import make_loaders, mnist_dataset, split  # noqa: E402
from growkit.newparams import NewParamRule, growth_optimizer  # noqa: E402
from growkit.train import cosine_schedule, evaluate  # noqa: E402


def build(name: str) -> nn.Module:
    import timm

    return timm.create_model(name, num_classes=10, in_chans=1)


def reinit(model: nn.Module, seed: int) -> None:
    """Every parameter re-drawn (the architecture trained from scratch)."""
    torch.manual_seed(seed)
    for m in model.modules():
        if m is not model and hasattr(m, "reset_parameters"):
            m.reset_parameters()


def train_curve(model: nn.Module, train_l, test_l, epochs: int, lr: float, eval_every: int, fwd_flops: int,
                new_params: list[nn.Parameter] | None = None, target: float | None = None,
                stop_at_target: bool = False) -> dict[str, Any]:
    """Train with SGD + cosine; test accuracy every ``eval_every`` batches with the compute so far."""
    steps_per_epoch = len(train_l)
    opt, _mgr = growth_optimizer(model, new_params or [], rule=NewParamRule(), lr=lr, momentum=0.9,
                                 weight_decay=5e-4, steps_per_epoch=steps_per_epoch)
    sched = cosine_schedule(opt, epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    curve: list[dict[str, float]] = []
    wall, seen, step = 0.0, 0, 0
    acc0 = evaluate(model, test_l)["accuracy"]
    curve.append({"step": 0, "epoch": 0.0, "wall_s": 0.0, "flops": 0.0, "test_acc": acc0})
    reached = None
    for ep in range(epochs):
        for x, y in train_l:
            model.train()
            t = time.perf_counter()
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            wall += time.perf_counter() - t
            seen += int(x.shape[0])
            step += 1
            if step % eval_every == 0 or step == epochs * steps_per_epoch:
                acc = evaluate(model, test_l)["accuracy"]
                curve.append({"step": step, "epoch": step / steps_per_epoch, "wall_s": wall,
                              "flops": 3.0 * fwd_flops * seen, "test_acc": acc})
                if target is not None and reached is None and acc >= target:
                    reached = curve[-1]
                    if stop_at_target:
                        return {"curve": curve, "reached": reached, "final_acc": acc}
    return {"curve": curve, "reached": reached, "final_acc": curve[-1]["test_acc"]}


def run(name: str, op: str, args: argparse.Namespace, loaders: tuple[Any, Any], base: nn.Module,
        base_acc: float) -> dict[str, Any]:
    train_l, test_l = loaders
    x1 = next(iter(test_l))[0][:1]
    grow_op = (lambda m: growkit.widen(m, x1, ratio=args.ratio, seed=0)) if op == "widen" else \
        (lambda m: growkit.deepen(m, x1, block="identity"))
    # from scratch: the same larger architecture, every weight re-drawn
    torch.manual_seed(args.seed + 1)
    scratch = grow_op(build(name))
    reinit(scratch, args.seed + 1)
    flops_l = count_flops(scratch, x1)
    torch.manual_seed(args.seed + 2)
    s = train_curve(scratch, train_l, test_l, args.epochs, args.lr, args.eval_every, flops_l)
    target = s["final_acc"]
    # grown from the trained base
    grown = grow_op(base)
    assert torch.equal(grown.eval()(x1), base.eval()(x1)) or op == "widen"
    new = [p for b in getattr(grown, DEPTH, {}).values() for p in b.parameters()]
    torch.manual_seed(args.seed + 2)
    g = train_curve(grown, train_l, test_l, args.epochs, args.lr, args.eval_every, flops_l, new_params=new,
                    target=target)
    scratch_total = s["curve"][-1]
    out = {"model": name, "op": op, "params_base": sum(p.numel() for p in base.parameters()),
           "params_large": sum(p.numel() for p in scratch.parameters()), "fwd_flops_large": flops_l,
           "base_test_acc": base_acc, "target_acc": target, "scratch": s, "grown": g,
           "grown_final_acc": g["final_acc"], "scratch_wall_s": scratch_total["wall_s"],
           "scratch_flops": scratch_total["flops"]}
    if g["reached"] is not None:
        out["grown_wall_s_to_target"] = g["reached"]["wall_s"]
        out["grown_flops_to_target"] = g["reached"]["flops"]
        out["wall_fraction"] = g["reached"]["wall_s"] / scratch_total["wall_s"]
        out["flops_fraction"] = g["reached"]["flops"] / scratch_total["flops"]
    return out


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = ["# Time to accuracy: width / depth growth vs the larger model from scratch", "",
             f"{meta['date']}, {meta['threads']} thread(s), torch {meta['torch']}. MNIST (10k test set split "
             f"{meta['n_train']} train / {meta['n_test']} test, 28 px, 1 channel), batch {meta['batch']}, SGD "
             f"lr {meta['lr']} momentum 0.9, cosine over {meta['epochs']} epochs for both runs; base trained "
             f"{meta['base_epochs']} epochs (not counted); test accuracy every {meta['eval_every']} batches; "
             f"widen ratio {meta['ratio']}, deepen = identity blocks at every growth point; seed {meta['seed']} "
             "(one seed: no spread measured).", "",
             "Compute to target = training wall-clock / FLOPs (3 x forward FLOPs x examples) until the grown model "
             "first reaches the from-scratch model's final test accuracy; fraction = that / the from-scratch run's "
             "whole schedule. Goal (issue 21): at most 50 %.", "",
             "| model | op | params base -> large | base acc | scratch final acc (target) | grown final acc | "
             "grown: wall s to target | scratch wall s | wall fraction | FLOPs fraction |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        reached = r.get("wall_fraction") is not None
        lines.append(
            f"| {r['model']} | {r['op']} | {r['params_base'] / 1e6:.2f}M -> {r['params_large'] / 1e6:.2f}M | "
            f"{100 * r['base_test_acc']:.2f} | {100 * r['target_acc']:.2f} | {100 * r['grown_final_acc']:.2f} | "
            f"{r['grown_wall_s_to_target']:.1f} | {r['scratch_wall_s']:.1f} | " if reached else
            f"| {r['model']} | {r['op']} | {r['params_base'] / 1e6:.2f}M -> {r['params_large'] / 1e6:.2f}M | "
            f"{100 * r['base_test_acc']:.2f} | {100 * r['target_acc']:.2f} | {100 * r['grown_final_acc']:.2f} | "
            f"not reached | {r['scratch_wall_s']:.1f} | ")
        lines[-1] += (f"{100 * r['wall_fraction']:.1f} % | {100 * r['flops_fraction']:.1f} % |" if reached else "- | - |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 3.6), squeeze=False)
    for ax, r in zip(axes[0], rows):
        for key, label in (("scratch", "large from scratch"), ("grown", f"{r['op']} from base")):
            c = r[key]["curve"]
            ax.plot([p["flops"] / 1e12 for p in c], [100 * p["test_acc"] for p in c], label=label)
        ax.axhline(100 * r["target_acc"], color="grey", ls=":", lw=1)
        ax.set_title(f"{r['model']} {r['op']}", fontsize=9)
        ax.set_xlabel("training TFLOPs")
        ax.set_ylabel("test accuracy %")
        lo = min(100 * p["test_acc"] for p in r["grown"]["curve"][1:] + r["scratch"]["curve"][-3:])
        ax.set_ylim(max(0.0, lo - 2), 100)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet10t,mobilenetv3_small_050")
    ap.add_argument("--ops", default="widen,deepen")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--base-epochs", type=int, default=3)
    ap.add_argument("--n-train", type=int, default=6000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--ratio", type=float, default=1.5)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "results" / "time_to_accuracy"))
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ds = mnist_dataset()
    tr, te = split(ds, [args.n_train, args.n_test], seed=args.seed)
    train_l, test_l = make_loaders([tr, te], batch_size=args.batch, seed=args.seed)
    rows = []
    t0 = time.perf_counter()
    out = Path(args.out)
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "threads": torch.get_num_threads(),
            "torch": torch.__version__, **{k: v for k, v in vars(args).items() if k != "out"}}
    for name in args.models.split(","):
        torch.manual_seed(args.seed)
        base = build(name)
        x1 = next(iter(test_l))[0][:1]
        b = train_curve(base, train_l, test_l, args.base_epochs, args.lr, 10**9, count_flops(base, x1))
        base_acc = b["final_acc"]
        print(f"{name}: base test acc {100 * base_acc:.2f} % ({time.perf_counter() - t0:.0f} s)", flush=True)
        for op in args.ops.split(","):
            r = run(name, op, args, (train_l, test_l), base, base_acc)
            rows.append(r)
            print(f"{name} {op}: target {100 * r['target_acc']:.2f} %, grown final {100 * r['grown_final_acc']:.2f} %, "
                  f"wall fraction {r.get('wall_fraction')}, FLOPs fraction {r.get('flops_fraction')} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            meta["wall_s"] = time.perf_counter() - t0
            out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
            out.with_suffix(".md").write_text(markdown(rows, meta))
            plot(rows, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
