"""Children trained per minute: grow(children=K) in process vs on 1 and 2 Ray workers.

One KMNIST base (the capacity-limited timm ``resnet10t`` of grow_vs_finetune.py, trained for a
few epochs) is grown for one round of K children (each child: a weak-learning epoch and a
fine-tuning epoch over the training split) with

  * ``executor="local"``  (the baseline: every job in this process, one after another),
  * ``executor="ray"`` with ``num_workers=1`` and ``num_workers=2`` (one CPU and one torch
    thread per worker; on a GPU machine ``--device cuda`` gives each worker a GPU share).

Wall time includes starting the Ray workers (a fresh actor pool per grow() call; the Ray runtime
itself is started once per worker count, outside the timing); "after start" excludes the
workers' start-up (process, imports, tracing the base), which a longer search amortises. Each configuration runs
``--repeats`` times; medians are reported, and the ratios are medians of per-repeat ratios against
the local run of the same repeat. Every run uses the same seed, so every gallery must be the
same: the report checks that the best validation accuracy is identical across executors.

    python benchmarks/parallel_search.py --quick          # smoke run, ~2 min
    python benchmarks/parallel_search.py                  # the reported run (~15 min on 2 cores)

Writes benchmarks/results/parallel_search.{json,md} (or --out PREFIX).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grow_vs_finetune as G  # noqa: E402  (shared data and model helpers)

import growkit  # noqa: E402
from growkit.train import train_steps  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def make_base(args: argparse.Namespace) -> tuple[torch.nn.Module, Any, Any]:
    data = G.make_data("kmnist", 0, args.batch_size, args.quick)
    if args.train_size:
        data["train"] = torch.utils.data.Subset(data["train"], range(min(args.train_size, len(data["train"]))))
    torch.manual_seed(0)
    base = G.make_model(G.DATASETS["kmnist"]["channels"])
    loader = G.train_loader(data, 0)
    opt = torch.optim.SGD(base.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    train_steps(base, loader, opt, epochs=args.base_epochs)
    return base, loader, data["val"]


def run_one(base, loader, val, executor: str, workers: int, args: argparse.Namespace) -> dict[str, Any]:
    opts = {"num_workers": workers, "num_gpus": args.gpus_per_worker} if executor == "ray" else None
    device = args.device if executor == "local" else None
    t = time.perf_counter()
    res = growkit.grow(base, loader, val, rounds=1, children=args.children, search_epochs=1, finetune_epochs=1,
                       lr=0.1, new_lr_mult=2.0, seed=0, progress=False, executor=executor, executor_options=opts,
                       device=device)
    wall = time.perf_counter() - t
    kids = [h for h in res.history[:-1] if "entry" in h]
    job_s = sum(h.get("search_s", 0.0) + h.get("finetune_s", 0.0) for h in kids)
    startup = res.history[-1].get("startup_s", 0.0)
    return {
        "executor": executor, "workers": workers, "wall_s": wall, "children": len(kids), "startup_s": startup,
        "children_per_min": 60.0 * len(kids) / wall, "children_per_min_running": 60.0 * len(kids) / (wall - startup),
        "job_s": job_s,
        "best_val_acc": 1 - res.best.val_error, "best_params": res.best.cost.params,
        "gallery": [(e.id, e.parent, e.val_error, e.cost.params) for e in res.gallery],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--children", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--train-size", type=int, default=3000, help="training samples used (0: the whole split)")
    ap.add_argument("--base-epochs", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda: workers get --gpus-per-worker each)")
    ap.add_argument("--gpus-per-worker", type=float, default=0.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "parallel_search"))
    args = ap.parse_args(argv)
    if args.quick:
        args.children, args.repeats, args.train_size, args.base_epochs = 2, 1, 400, 1
    if args.device == "cuda" and not args.gpus_per_worker:
        args.gpus_per_worker = 0.5
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import ray

    base, loader, val = make_base(args)
    if args.device == "cuda":
        base = base.cuda()
    runs: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        runs.append({**run_one(base, loader, val, "local", 1, args), "repeat": rep})
        print(f"repeat {rep}: local {runs[-1]['children_per_min']:.2f} children/min", flush=True)
    for workers in (1, 2):
        ray.init(num_cpus=workers, num_gpus=int(workers * args.gpus_per_worker + 0.999) or None,
                 include_dashboard=False, log_to_driver=False)
        try:
            for rep in range(args.repeats):
                runs.append({**run_one(base, loader, val, "ray", workers, args), "repeat": rep})
                print(f"repeat {rep}: ray x{workers} {runs[-1]['children_per_min']:.2f} children/min", flush=True)
        finally:
            ray.shutdown()

    def med(key: str, ex: str, w: int) -> float:
        return statistics.median(r[key] for r in runs if r["executor"] == ex and r["workers"] == w)

    def ratio(ex: str, w: int, ref: tuple[str, int], key: str = "children_per_min") -> float:
        vals = []
        for rep in range(args.repeats):
            a = next(r for r in runs if (r["executor"], r["workers"], r["repeat"]) == (ex, w, rep))
            b = next(r for r in runs if (r["executor"], r["workers"], r["repeat"]) == (*ref, rep))
            vals.append(a[key] / b[key])
        return statistics.median(vals)

    configs = [("local", 1), ("ray", 1), ("ray", 2)]
    summary = [{
        "executor": ex, "workers": w, "children_per_min": med("children_per_min", ex, w), "wall_s": med("wall_s", ex, w),
        "startup_s": med("startup_s", ex, w), "children_per_min_running": med("children_per_min_running", ex, w),
        "running_vs_local": ratio(ex, w, ("local", 1), "children_per_min_running"),
        "running_vs_ray1": ratio(ex, w, ("ray", 1), "children_per_min_running") if ex == "ray" else None,
        "job_s": med("job_s", ex, w), "vs_local": ratio(ex, w, ("local", 1)),
        "vs_ray1": ratio(ex, w, ("ray", 1)) if ex == "ray" else None,
    } for ex, w in configs]
    galleries_equal = len({json.dumps(r["gallery"]) for r in runs}) == 1
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "argv": sys.argv[1:], "args": vars(args),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "ray": ray.__version__, "device": args.device,
                    "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None},
        "summary": summary, "galleries_equal": galleries_equal, "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# Parallel search: children trained per minute ({args.device}, {os.cpu_count()} CPUs)",
        "",
        f"One round of {args.children} children (1 weak-learning + 1 fine-tuning epoch each, {args.train_size or 'all'} "
        f"KMNIST training samples, batch {args.batch_size}) from the same base, seed 0. Medians of {args.repeats} "
        "repeats; ratios are medians of per-repeat ratios. Wall time includes starting the workers.",
        "",
        "| executor | workers | children / min | vs local | vs ray x1 | wall s | worker start s | "
        "children / min after start | vs local | vs ray x1 | job s (sum) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def x(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}x"

    for s in summary:
        lines.append(f"| {s['executor']} | {s['workers']} | {s['children_per_min']:.2f} | {x(s['vs_local'])} | "
                     f"{x(s['vs_ray1'])} | {s['wall_s']:.1f} | {s['startup_s']:.1f} | "
                     f"{s['children_per_min_running']:.2f} | {x(s['running_vs_local'])} | {x(s['running_vs_ray1'])} | "
                     f"{s['job_s']:.1f} |")
    lines += ["", f"Galleries identical across executors and repeats (ids, parents, val error, params): "
              f"**{galleries_equal}**; best val acc {100 * runs[0]['best_val_acc']:.2f} %, "
              f"{runs[0]['best_params']:,} params.", ""]
    Path(f"{out}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if galleries_equal else 1


if __name__ == "__main__":
    sys.exit(main())
