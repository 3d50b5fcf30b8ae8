#!/usr/bin/env python
"""Stability grid: does growth ever turn a learning rate that trains into a failure?

Models {a residual user CNN with dict output, timm resnet10t, mobilenetv3_small_050, a small
ViT} x SGD learning rates x seeds, on sklearn's digits at 16 px, for three modes:

  grow            ``growkit.grow`` (1 round: 1 epoch weak learning + 1 epoch fine-tuning) from a
                  briefly pretrained model, against fine-tuning the same model for the same
                  2 epochs at the same lr (cosine, SGD momentum 0.9): the no-growth run
  stream          ``growkit.grow_stream`` over split digits (3 class-incremental experiences),
                  grow=True against grow=False, starting from the same freshly initialised model
  stream+replay   the same with a reservoir replay buffer

Per cell (model, mode, lr, seed): did the no-growth run stay finite, did the growth run stay
finite (no exception, finite outputs), and the test accuracy of each. A failure is a cell where
the no-growth run is finite and the growth run is not. Accuracy is flagged where the growth run's
mean over seeds is below the no-growth run's by more than the seed spread (the larger sample std
over seeds of the two).

    python benchmarks/stability.py --threads 1                     # the reported grid
    python benchmarks/stability.py --models rescnn --modes stream --lrs 0.05,0.2 --seeds 0

Writes benchmarks/results/stability.{json,md} (or --out PREFIX). Runs on any growkit version that
has ``grow`` and ``grow_stream`` (to reproduce failures of older code).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import growkit  # noqa: E402
from growkit import data as D  # noqa: E402
from growkit.train import evaluate, train_steps  # noqa: E402

logger = logging.getLogger("stability")


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResCNN(nn.Module):
    """A user's residual CNN: two-conv blocks, a downsampling conv, dict output."""

    def __init__(self, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block1 = _Block(width)
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())
        self.block2 = _Block(2 * width)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.block2(self.down(self.block1(self.stem(x))))
        return {"logits": self.head(x.mean((2, 3)))}


MODELS: dict[str, Callable[[], nn.Module]] = {
    "rescnn": lambda: ResCNN(8),
    "resnet10t": lambda: timm.create_model("resnet10t", pretrained=False, num_classes=10, in_chans=1,
                                           channels=(4, 8, 16, 32), stem_width=4),
    "mobilenetv3_small_050": lambda: timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10,
                                                       in_chans=1),
    "vit_small": lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, in_chans=1,
                                           img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2),
}
MODES = ("grow", "stream", "stream+replay")


def _finite_model(model: nn.Module, x: torch.Tensor) -> bool:
    if any(not torch.isfinite(p).all() for p in model.parameters()):
        return False
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train(was)
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    return all(bool(torch.isfinite(t).all()) for t in leaves)


def _data(seed: int, n: int) -> tuple[Any, ...]:
    ds = D.digits_dataset(size=16)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:n].tolist()
    return Subset(ds, idx)


def _loaders(seed: int, args: argparse.Namespace) -> tuple[DataLoader, DataLoader, DataLoader]:
    ds = _data(seed, args.samples)
    n = len(ds)
    n_val, n_test = n // 6, n // 4
    tr, va, te = D.split(ds, [n - n_val - n_test, n_val, n_test], seed=seed)
    g = torch.Generator().manual_seed(seed)
    return (DataLoader(tr, batch_size=args.batch_size, shuffle=True, generator=g),
            DataLoader(va, batch_size=256), DataLoader(te, batch_size=256))


def _sgd(model: nn.Module, lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)


def _cosine(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def run_grow(model_name: str, lr: float, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """grow() vs fine-tuning for the same epochs, from one briefly pretrained model."""
    tr, va, te = _loaders(seed, args)
    torch.manual_seed(seed)
    base = MODELS[model_name]()
    train_steps(base, tr, _sgd(base, args.pretrain_lr), epochs=args.pretrain_epochs)
    x0 = next(iter(te))[0][:8]
    out: dict[str, Any] = {}
    # No growth: the same model fine-tuned for search_epochs + finetune_epochs at lr.
    t0 = time.perf_counter()
    ft = _copy(base)
    torch.manual_seed(seed)
    opt = _sgd(ft, lr)
    epochs = 2
    try:
        train_steps(ft, tr, opt, epochs=epochs, scheduler=_cosine(opt, epochs * len(tr)))
        finite = _finite_model(ft, x0)
        out["nogrow"] = {"finite": finite, "accuracy": evaluate(ft, te)["accuracy"] if finite else None}
    except Exception as exc:  # noqa: BLE001 - the benchmark records every way a run can end
        out["nogrow"] = {"finite": False, "accuracy": None, "error": f"{type(exc).__name__}: {exc}"}
    out["nogrow"]["wall_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        with _warnings() as caught:
            res = growkit.grow(base, tr, va, rounds=1, search_epochs=1, finetune_epochs=1, lr=lr, seed=seed,
                               progress=False, ops=args.ops, **args.grow_options)
        finite = _finite_model(res.model, x0)
        children = [h for h in res.history if "round" in h]
        out["grow"] = {"finite": finite, "accuracy": evaluate(res.model, te)["accuracy"] if finite else None,
                       "returned": res.best.kind, "val_accuracy": 1 - res.best.val_error,
                       "base_val_accuracy": 1 - res.base.val_error,
                       "children": [{k: h.get(k) for k in ("val_accuracy", "note", "etas", "chosen")} for h in children],
                       "warnings": caught}
    except Exception as exc:  # noqa: BLE001
        out["grow"] = {"finite": False, "accuracy": None, "error": f"{type(exc).__name__}: {exc}",
                       "trace": traceback.format_exc(limit=3)}
    out["grow"]["wall_s"] = time.perf_counter() - t0
    assert all(torch.isfinite(p).all() for p in base.parameters()), "grow() modified the user's model"
    return out


def run_stream(model_name: str, lr: float, seed: int, replay: bool, args: argparse.Namespace) -> dict[str, Any]:
    """grow_stream with and without growth over split digits, from one freshly initialised model."""
    ds = _data(seed, args.samples)
    torch.manual_seed(seed)
    base = MODELS[model_name]()
    out: dict[str, Any] = {}
    for key, grow in (("nogrow", False), ("grow", True)):
        stream = growkit.class_incremental(ds, args.experiences, batch_size=args.batch_size, seed=seed,
                                           val_fraction=0.1, test_fraction=0.2)
        x0 = next(iter(stream[0].test))[0][:8]
        steps = len(stream[0].train) * args.stream_epochs
        warm = max(1, steps // 4)
        opts = {"ops": args.ops, "warmup_steps": warm, "min_steps": 2 * warm, **args.grower_options}
        t0 = time.perf_counter()
        try:
            with _warnings() as caught:
                res = growkit.grow_stream(base, stream, grow=grow, epochs=args.stream_epochs, lr=lr,
                                          replay=args.replay if replay else 0, seed=seed, progress=False,
                                          budget=growkit.Budget(params=args.budget), grower_options=opts)
            finite = _finite_model(res.model, x0)
            out[key] = {"finite": finite, "accuracy": res.matrix.average_accuracy() if finite else None,
                        "events": [{"experience": e.experience, "chosen": e.chosen, "note": e.note} for e in res.events],
                        "warnings": caught}
        except Exception as exc:  # noqa: BLE001
            out[key] = {"finite": False, "accuracy": None, "error": f"{type(exc).__name__}: {exc}",
                        "error_type": [c.__name__ for c in type(exc).__mro__]}
        out[key]["wall_s"] = time.perf_counter() - t0
    return out


class _warnings:
    """Collect growkit's warning log lines (the user-facing 'say so' messages) of one run."""

    def __enter__(self) -> list[str]:
        self.lines: list[str] = []
        lines = self.lines

        class H(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                lines.append(record.getMessage()[:300])

        self.h = H(logging.WARNING)
        logging.getLogger("growkit").addHandler(self.h)
        return self.lines

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger("growkit").removeHandler(self.h)


def _copy(m: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(m)


def _rollbacks(run: dict[str, Any]) -> int:
    """Growths rolled back in one growth run (from the children's notes / the stream's events)."""
    notes = [h.get("note") or "" for h in run.get("children", [])] + [e.get("note") or "" for e in run.get("events", [])]
    return sum("learning rate halved" in n for n in notes)


def summarize(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, mode, lr) over seeds."""
    rows: dict[tuple, list[dict[str, Any]]] = {}
    for c in cells:
        rows.setdefault((c["model"], c["mode"], c["lr"]), []).append(c)
    out = []
    for (model, mode, lr), cs in rows.items():
        ng = [c["nogrow"] for c in cs]
        gr = [c["grow"] for c in cs]
        failures = sum(1 for a, b in zip(ng, gr) if a["finite"] and not b["finite"])
        pairs = [(a["accuracy"], b["accuracy"]) for a, b in zip(ng, gr) if a["finite"] and b["finite"]]
        row: dict[str, Any] = {"model": model, "mode": mode, "lr": lr, "seeds": len(cs),
                               "nogrow_finite": sum(a["finite"] for a in ng), "grow_finite": sum(b["finite"] for b in gr),
                               "failures": failures, "pairs": len(pairs), "rollbacks": sum(_rollbacks(b) for b in gr)}
        if pairs:
            a = [p[0] for p in pairs]
            b = [p[1] for p in pairs]
            spread = max(statistics.stdev(a), statistics.stdev(b)) if len(pairs) > 1 else 0.0
            row.update(nogrow_acc=statistics.mean(a), grow_acc=statistics.mean(b), spread=spread,
                       diff=statistics.mean(b) - statistics.mean(a),
                       acc_flag=statistics.mean(b) < statistics.mean(a) - spread - 1e-12)
        out.append(row)
    return out


def markdown(result: dict[str, Any]) -> str:
    a = result["args"]
    rows = result["summary"]
    fails = sum(r["failures"] for r in rows)
    flags = [r for r in rows if r.get("acc_flag")]
    lines = [
        "# Stability grid: growth vs no growth at the same learning rate",
        "",
        f"{result['date']}, growkit at `{result.get('commit', '?')}`, torch {torch.__version__}, timm {timm.__version__}, "
        f"CPU, {a['threads']} thread(s); total wall time {result['wall_s'] / 60:.1f} min.",
        "",
        *([("Merged from runs over disjoint parts of the grid: " + "; ".join(
            f"{m['args']['models']} x {m['args']['modes']} ({m['date']}, `{m['commit']}`)" for m in result["merged"])
            + "."), ""] if result.get("merged") else []),
        f"Data: sklearn digits at 16 px, {a['samples']} samples per seed. `grow`: pretrained {a['pretrain_epochs']} "
        f"epoch(s) at lr {a['pretrain_lr']}, then `growkit.grow` (1 round, 1 + 1 epochs, ops {a['ops']}) vs "
        f"fine-tuning 2 epochs (SGD momentum 0.9, cosine) at the row's lr; accuracy on a held-out test split. "
        f"`stream`: `growkit.grow_stream` over {a['experiences']} class-incremental experiences, "
        f"{a['stream_epochs']} epoch(s) each, grow=True vs grow=False from the same fresh model, budget params "
        f"x{a['budget']}; `+replay`: reservoir of {a['replay']}; accuracy = average accuracy after the last "
        f"experience. Batch {a['batch_size']}, seeds {a['seeds']}. grow options {a['grow_options']}, grower options "
        f"{a['grower_options']}.",
        "",
        f"**Failures (no-growth finite, growth not): {fails}** over {sum(r['seeds'] for r in rows)} cells; "
        f"accuracy below the no-growth run by more than the seed spread: {len(flags)} of {len(rows)} rows. "
        "Rollbacks: growths undone after a divergence (retried at half the new parameters' rate, or dropped). "
        "Seed spread: the larger sample std over seeds of the two runs' accuracies.",
        "",
        "| model | mode | lr | no-growth finite | growth finite | failures | rollbacks | no-growth acc % | "
        "growth acc % | diff (points) | seed spread | flag |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = (f"{100 * r['nogrow_acc']:.1f} | {100 * r['grow_acc']:.1f} | {100 * r['diff']:+.1f} | "
               f"{100 * r['spread']:.1f} | {'BELOW' if r['acc_flag'] else ''}") if "diff" in r else "- | - | - | - | "
        lines.append(f"| {r['model']} | {r['mode']} | {r['lr']} | {r['nogrow_finite']}/{r['seeds']} | "
                     f"{r['grow_finite']}/{r['seeds']} | {r['failures']} | {r.get('rollbacks', 0)} | {acc} |")
    errs = sorted({(c['model'], c['mode'], c['lr'], c['seed'], c[k].get('error', '')[:160])
                   for c in result["cells"] for k in ("nogrow", "grow") if c[k].get("error")})
    if errs:
        lines += ["", "Errors (model, mode, lr, seed, error):", ""]
        lines += [f"- {e}" for e in errs]
    return "\n".join(lines) + "\n"


def merge(paths: list[Path], out: Path) -> int:
    """One result from runs over disjoint parts of the grid (cells are concatenated; the summary and
    the table are recomputed; ``wall_s`` is the sum of the parts' times)."""
    parts = [json.loads(p.read_text()) for p in paths]
    cells = [c for r in parts for c in r["cells"]]
    keys = [(c["model"], c["mode"], c["lr"], c["seed"]) for c in cells]
    if len(set(keys)) != len(keys):
        raise SystemExit("--merge: the runs overlap (a cell appears twice)")
    result = {**parts[0], "cells": cells, "summary": summarize(cells), "wall_s": sum(r["wall_s"] for r in parts),
              # a part that is itself a merge lists its own parts
              "merged": [m for r in parts for m in (r.get("merged") or [{"date": r["date"], "commit": r["commit"],
                                                                        "args": r["args"]}])]}
    Path(f"{out}.json").write_text(json.dumps(result, indent=1, default=str))
    Path(f"{out}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--lrs", default="0.01,0.03,0.05,0.1,0.2")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--samples", type=int, default=720, help="digits samples per seed (of 1,797)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--pretrain-epochs", type=int, default=2)
    p.add_argument("--pretrain-lr", type=float, default=0.03)
    p.add_argument("--experiences", type=int, default=3)
    p.add_argument("--stream-epochs", type=int, default=2)
    p.add_argument("--replay", type=int, default=100)
    p.add_argument("--budget", type=float, default=1.5)
    p.add_argument("--ops", default="default")
    p.add_argument("--grow-options", default="{}", help="JSON: extra growkit.grow keyword arguments")
    p.add_argument("--grower-options", default="{}", help="JSON: extra growkit.Grower options")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/stability")
    p.add_argument("--merge", nargs="+", type=Path, default=None,
                   help="JSON results of runs over disjoint parts of the grid (e.g. split by mode): write one result")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out))
    args.grow_options = json.loads(args.grow_options)
    args.grower_options = json.loads(args.grower_options)
    args.ops = None if args.ops == "default" else args.ops
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("growkit").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = [float(v) for v in args.lrs.split(",")]
    t0 = time.perf_counter()
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(growkit.__file__).parent).stdout.strip()
    result: dict[str, Any] = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "args": vars(args),
                              "commit": commit, "cells": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for model in args.models.split(","):
        for mode in args.modes.split(","):
            for lr in lrs:
                for seed in seeds:
                    t = time.perf_counter()
                    r = run_grow(model, lr, seed, args) if mode == "grow" else \
                        run_stream(model, lr, seed, mode == "stream+replay", args)
                    cell = {"model": model, "mode": mode, "lr": lr, "seed": seed, **r, "wall_s": time.perf_counter() - t}
                    result["cells"].append(cell)
                    logger.info("%s %s lr %g seed %d: no-growth %s %s | growth %s %s %s (%.0f s)", model, mode, lr, seed,
                                r["nogrow"]["finite"], r["nogrow"].get("accuracy"), r["grow"]["finite"],
                                r["grow"].get("accuracy"), r["grow"].get("error", ""), cell["wall_s"])
                result["summary"] = summarize(result["cells"])
                result["wall_s"] = time.perf_counter() - t0
                Path(f"{out}.json").write_text(json.dumps(result, indent=1, default=str))
                Path(f"{out}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
