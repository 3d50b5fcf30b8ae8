#!/usr/bin/env python
"""Lifelong streams: growkit growth vs fine-tuning, with and without replay.

Streams (real data): Split-digits and Split-KMNIST (class-incremental, 5 experiences of 2
classes each, class order drawn per seed) and Permuted-KMNIST (domain-incremental, 5
experiences: the original images, then 4 fixed pixel permutations). Per stream and seed, one
capacity-limited timm ``resnet10t`` (``pretrained=False``, narrow channels) is pretrained on the
first experience; from that same model, ``growkit.grow_stream`` runs four variants with the same
optimizer, epochs and batch order:

  finetune          naive fine-tuning through the stream (grow=False)
  finetune+replay   the same with a reservoir replay buffer
  grow              growkit growth at every experience boundary (budget params x2)
  grow+replay       growth with the same replay buffer

Reported: average accuracy and forgetting after the last experience (class-incremental: single
head over all 10 classes), BWT, final params and FLOPs, wall time; mean +- std over seeds, and
the paired difference of each growth variant to its fine-tuning counterpart.

    python benchmarks/stream.py --quick                    # smoke run
    python benchmarks/stream.py --seeds 0,1,2 --threads 1  # the reported run

Writes benchmarks/results/stream.{json,md} (or --out PREFIX).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch.utils.data import Subset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import growkit  # noqa: E402
from growkit import data as D  # noqa: E402
from growkit.train import train_steps  # noqa: E402

logger = logging.getLogger("stream")


def pad32(ds: TensorDataset) -> TensorDataset:
    x, y = ds.tensors
    return TensorDataset(F.pad(x, (2, 2, 2, 2), value=float(x.min())), y)


STREAMS: dict[str, dict[str, Any]] = {
    "split-digits": {"load": lambda: D.digits_dataset(size=16), "kind": "class", "channels": (2, 4, 8, 16)},
    "split-kmnist": {"load": lambda: pad32(D.kmnist_dataset()), "kind": "class", "channels": (2, 4, 8, 16)},
    "permuted-kmnist": {"load": lambda: pad32(D.kmnist_dataset()), "kind": "permuted", "channels": (2, 4, 8, 16)},
}
VARIANTS = [("finetune", False, False), ("finetune+replay", False, True), ("grow", True, False),
            ("grow+replay", True, True)]


def make_model(channels: tuple[int, ...]) -> torch.nn.Module:
    return timm.create_model("resnet10t", pretrained=False, num_classes=10, in_chans=1, channels=tuple(channels),
                             stem_width=4)


def build_stream(name: str, seed: int, args: argparse.Namespace) -> growkit.Stream:
    spec = STREAMS[name]
    ds = spec["load"]()
    if args.quick:
        g = torch.Generator().manual_seed(seed)
        ds = Subset(ds, torch.randperm(len(ds), generator=g)[:600].tolist())
    if spec["kind"] == "class":
        return growkit.class_incremental(ds, 5, batch_size=args.batch_size, seed=seed, val_fraction=0.1,
                                         test_fraction=0.2)
    return growkit.domain_incremental(ds, 5, kind="permuted", batch_size=args.batch_size, seed=seed)


def pretrain(stream: growkit.Stream, channels: tuple[int, ...], seed: int, args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = make_model(channels)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    train_steps(model, stream[0].train, opt, epochs=args.pretrain_epochs)
    return model


def run_variant(model: torch.nn.Module, name: str, seed: int, grow: bool, replay: bool,
                args: argparse.Namespace) -> dict[str, Any]:
    stream = build_stream(name, seed, args)  # fresh loaders: every variant sees the same batch order
    # Candidates warm up for a quarter of an experience and may grow after half of one.
    steps = len(stream[1].train) * args.epochs
    warmup = max(1, int(steps * args.warmup))
    t0 = time.perf_counter()
    res = growkit.grow_stream(
        model, stream, grow=grow, epochs=args.epochs, lr=args.lr, replay=args.replay if replay else 0,
        budget=growkit.Budget(params=args.budget), seed=seed, progress=False,
        grower_options={"ops": args.ops, "warmup_steps": warmup, "min_steps": 2 * warmup},
    )
    m = res.matrix
    return {"avg_acc": m.average_accuracy(), "forgetting": m.forgetting(), "bwt": m.bwt(), "fwt": m.fwt(),
            "params": m.costs[-1]["params"], "flops": m.costs[-1]["flops"], "wall_s": time.perf_counter() - t0,
            "matrix": m.rows, "initial": m.initial,
            "events": [{"experience": e.experience, "chosen": e.chosen, "params_after": e.params_after,
                        "exact": e.exact, "note": e.note} for e in res.events]}


def _ms(xs: list[float], scale: float = 100.0) -> str:
    xs = [scale * x for x in xs]
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.2f}"


def markdown(result: dict[str, Any]) -> str:
    a = result["args"]
    lines = [
        "# Lifelong streams: growkit growth vs fine-tuning",
        "",
        f"{result['date']}, torch {torch.__version__}, timm {timm.__version__}, CPU, {a['threads']} thread(s); "
        f"total wall time {result['wall_s'] / 60:.1f} min.",
        "",
        f"Model: timm `resnet10t` (pretrained=False, stem_width 4, channels (2, 4, 8, 16)), pretrained "
        f"{a['pretrain_epochs']} epochs on experience 0, then every variant runs the whole stream (5 experiences, "
        f"{a['epochs']} epoch(s) each, SGD lr {a['lr']}, momentum 0.9, batch {a['batch_size']}). Replay: reservoir of "
        f"{a['replay']} samples, as many replayed samples appended to each batch. Growth: budget params x{a['budget']}, "
        f"ops {a['ops'] or 'default'}, candidate warm-up {a['warmup']:g} of an experience, growth allowed after "
        f"{2 * a['warmup']:g}. Single head over 10 classes. Metrics after the last "
        "experience on each experience's held-out test split: average accuracy (%), forgetting (points), BWT (points); "
        f"mean ± std over seeds {a['seeds']}.",
        "",
    ]
    for name, rows in result["streams"].items():
        lines += [f"## {name}", "", "| variant | avg acc % | forgetting | BWT | params (final) | MFLOPs | wall s |",
                  "|---|---|---|---|---|---|---|"]
        for v, _, _ in VARIANTS:
            runs = rows[v]
            lines.append(
                f"| {v} | {_ms([r['avg_acc'] for r in runs])} | {_ms([r['forgetting'] for r in runs])} | "
                f"{_ms([r['bwt'] for r in runs])} | {statistics.mean(r['params'] for r in runs):,.0f} | "
                f"{statistics.mean(r['flops'] for r in runs) / 1e6:.3f} | {statistics.mean(r['wall_s'] for r in runs):.0f} |")
        lines += ["", "| paired difference (avg acc, points) | per seed | mean ± std |", "|---|---|---|"]
        for g, f in (("grow", "finetune"), ("grow+replay", "finetune+replay")):
            d = [100 * (x["avg_acc"] - y["avg_acc"]) for x, y in zip(rows[g], rows[f])]
            lines.append(f"| {g} - {f} | {', '.join(f'{v:+.2f}' for v in d)} | "
                         f"{statistics.mean(d):+.2f} ± {statistics.stdev(d) if len(d) > 1 else 0.0:.2f} |")
        ev = [", ".join(f"e{e['experience']}: {len(e['chosen'])} pts" for e in r["events"]) for r in rows["grow"]]
        lines += ["", "Growth events of `grow` per seed (points grown at each boundary): " + " | ".join(ev), ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", default=",".join(STREAMS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--pretrain-epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--replay", type=int, default=200)
    p.add_argument("--budget", type=float, default=2.0)
    p.add_argument("--ops", default=None)
    p.add_argument("--warmup", type=float, default=0.25,
                   help="candidate warm-up as a fraction of an experience's steps (growth needs twice that)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="600-sample subsets, 2 seeds: a smoke run")
    p.add_argument("--out", default="benchmarks/results/stream")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("growkit").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.seeds = "0,1"
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    result: dict[str, Any] = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "args": vars(args),
                              "streams": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.streams.split(","):
        rows: dict[str, list[dict[str, Any]]] = {v: [] for v, _, _ in VARIANTS}
        for seed in seeds:
            stream = build_stream(name, seed, args)
            base = pretrain(stream, STREAMS[name]["channels"], seed, args)
            for v, grow, replay in VARIANTS:
                r = run_variant(base, name, seed, grow, replay, args)
                rows[v].append(r)
                logger.info("%s seed %d %s: avg acc %.4f forgetting %.4f params %d (%.0f s)", name, seed, v,
                            r["avg_acc"], r["forgetting"], r["params"], r["wall_s"])
        result["streams"][name] = rows
        result["wall_s"] = time.perf_counter() - t0
        Path(f"{out}.json").write_text(json.dumps(result, indent=1, default=str))
        Path(f"{out}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
