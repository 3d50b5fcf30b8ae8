"""Growth methods on equal terms, and pruning curves, on the same pretrained bases.

Per dataset (digits, KMNIST) and seed, one capacity-limited base is trained to a plateau with the
recipe of ``grow_vs_finetune.py`` (narrow timm ``resnet10t``, ``pretrained=False``). From that same
base, data and budget, every growth method gets the same extra training: ``rounds`` rounds of
``search_epochs`` epochs of search (counted in training batches; each method spends them its own
way: weak learning, a supernet, briefly trained children) and ``finetune_epochs`` epochs of
fine-tuning of the chosen plan, with the same learning rates:

    petridish (the default), darts, enas, pnas, random (the baseline), evolution, widen, deepen
    (width / depth growth, issue 21) and mixed (petridish, widen and deepen, one drawn per round)

Reported per method: TEST accuracy of the model selected on validation (mean ± std and median over
seeds, and per seed), added params / FLOPs over the base, search wall time, total wall time, the
training batches the search used, and the plan size.

Pruning, in the same run and per seed (accuracy vs params curves, TEST accuracy after each step):

  * growkit.prune(method="channels", importance="l1") of the base,
  * Torch-Pruning used directly (BasePruner + MagnitudeImportance(p=1), the classifier ignored,
    the same ratios and the same fine-tuning after each step, written here with its own API),
  * growkit.prune(method="channels", importance="bn_scale"),
  * growkit.prune(method="branches") of the Petridish-grown model (backward elimination).

    python benchmarks/methods.py --quick --threads 1 --out /tmp/methods_quick    # smoke run, ~1-2 min
    python benchmarks/methods.py --threads 1                                     # the reported run

Cell mode (issue 22): ``--ties none,stage`` runs every method in macro mode (``tie="none"``, rows
named by the method) and in cell mode (rows ``method [tie=stage]``) from the same base, data order,
budget and extra training. resnet10t has one block per stage, so there is nothing to tie: give the
base repeated blocks with ``--layers`` (e.g. ``1,4,4,1``). The cell-mode result:

    python benchmarks/methods.py --threads 1 --methods petridish,darts,enas,pnas --ties none,stage \
        --layers 1,4,4,1 --no-prune --datasets digits --seeds 0,1,2,3,4 --out benchmarks/results/methods_cells

Width / depth growth (issue 21) beside Petridish, from the same bases:

    python benchmarks/methods.py --threads 1 --methods petridish,widen,deepen,mixed --no-prune \
        --datasets digits,kmnist --seeds 0,1,2 --out benchmarks/results/methods_resize

Writes benchmarks/results/methods.{json,md} (or --out PREFIX), after every seed.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grow_vs_finetune as gvf  # noqa: E402  (the same bases, data splits and training recipe)

import growkit  # noqa: E402
from growkit.core.cost import count_flops, count_params  # noqa: E402
from growkit.train import evaluate, train_steps  # noqa: E402
from growkit.core.ops import ops_from_text  # noqa: E402
from growkit.core.tie import TIES  # noqa: E402
from growkit.growth.methods import method_names  # noqa: E402

logger = logging.getLogger("methods")

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("petridish", "darts", "enas", "pnas", "random", "evolution", "widen", "deepen", "mixed")
MIXED_DEFAULT = {"methods": ["petridish", "widen", "deepen"]}
"""What the ``mixed`` row mixes unless ``--method-options`` says otherwise (one method drawn per round)."""
PRUNERS = (("growkit_l1", "growkit.prune channels, L1"), ("tp_direct_l1", "Torch-Pruning directly, L1"),
           ("growkit_bn", "growkit.prune channels, BN scale"))


# ----------------------------------------------------------------------------------------- growth
def run_method(method: str, base: nn.Module, data: dict[str, Any], seed: int, args: argparse.Namespace,
               tie: str = "none") -> dict[str, Any]:
    loader = gvf.train_loader(data, seed)  # the same batch order for every method of a seed
    torch.manual_seed(seed)
    t = time.perf_counter()
    res = growkit.grow(
        copy.deepcopy(base), loader, data["val"], method=method,
        method_options=(json.loads(args.method_options).get(method, {}) if args.method_options else {})
        or (dict(MIXED_DEFAULT) if method == "mixed" else {}),
        rounds=args.rounds, search_epochs=args.search_epochs, finetune_epochs=args.finetune_epochs,
        lr=args.lr, new_lr_mult=args.new_lr_mult, weight_decay=args.weight_decay,
        budget=growkit.Budget(params=args.budget), seed=seed, progress=False, ops=args.ops,
        max_ops=args.max_ops, max_inputs=args.max_inputs, tie=tie,
    )
    wall = time.perf_counter() - t
    best = res.best
    # The most accurate grown model of the gallery (validation), for branch pruning: it may differ
    # from the selected model when the base won.
    grown = [e for e in res.gallery if e.kind == "grown"]
    top = min(grown, key=lambda e: (e.val_error, e.id)) if grown else None
    top_model = None
    if top is not None:
        top_model = growkit.apply_plan(base, top.plan, data["example"])
        top_model.load_state_dict(top.state)
    rounds = [h for h in res.history if "round" in h]
    m = res.model
    out = {
        "test_acc": evaluate(m, data["test"])["accuracy"],
        "val_acc": 1 - best.val_error,
        "params": count_params(m),
        "flops": count_flops(m, data["example"]),
        "search_s": sum(h.get("search_s", 0.0) for h in rounds),
        "finetune_s": sum(h.get("finetune_s", 0.0) for h in rounds),
        "wall_s": wall,
        "search_steps": sum(h.get("search_steps", 0) for h in rounds) if method != "petridish"
        else args.rounds * args.search_epochs * len(loader),
        "selected_entry": best.id,
        "selected_kind": best.kind,
        "edits": len(best.plan.edits),
        "atoms": sum(len(e.edges) for e in best.plan.edits),
        "tied_edits": sum(1 for e in best.plan.edits if e.tie),
        "resizes": [r.to_dict() for r in best.plan.resizes],
        "plan": [{"point": e["point"], "edges": e["edges"], **({"tie": e["tie"]} if e.get("tie") else {})}
                 for e in best.plan.to_dict()["edits"]],
        "history": [{k: v for k, v in h.items() if k in (
            "round", "parent", "chosen", "atoms", "etas", "val_accuracy", "search_val_accuracy", "search_steps",
            "search_evaluations", "search_val_batches", "note", "levels", "controller_updates", "baseline")}
            for h in rounds],
    }
    return {"result": out, "model": m, "top_grown": top_model}


# ---------------------------------------------------------------------------------------- pruning
def _finetune(model: nn.Module, loader, args: argparse.Namespace) -> None:
    """The fine-tuning growkit.prune does after each step, written out for the direct baseline."""
    if args.prune_finetune_epochs <= 0:
        return
    opt = torch.optim.SGD(model.parameters(), lr=args.prune_lr, momentum=0.9, weight_decay=args.weight_decay)
    sched = gvf.cosine(opt, args.prune_finetune_epochs * len(loader))
    train_steps(model, loader, opt, epochs=args.prune_finetune_epochs, scheduler=sched)


def tp_direct(base: nn.Module, data: dict[str, Any], seed: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Torch-Pruning's own recipe: BasePruner with L1 magnitude importance, the classifier ignored."""
    import torch_pruning as tp

    torch.manual_seed(seed)
    loader = gvf.train_loader(data, seed)
    model = copy.deepcopy(base)
    pruner = tp.pruner.BasePruner(model, data["example"], importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=args.prune_ratio, iterative_steps=args.prune_steps,
                                  ignored_layers=[model.get_classifier()])
    curve = []
    t = time.perf_counter()
    for step in range(1, args.prune_steps + 1):
        pruner.step()
        _finetune(model, loader, args)
        curve.append({"step": step, "ratio": args.prune_ratio * step / args.prune_steps, "params": count_params(model),
                      "flops": count_flops(model, data["example"]), "test_acc": evaluate(model, data["test"])["accuracy"],
                      "wall_s": time.perf_counter() - t})
    return curve


def growkit_prune(model: nn.Module, data: dict[str, Any], seed: int, args: argparse.Namespace, **kw: Any) -> list[dict[str, Any]]:
    torch.manual_seed(seed)
    loader = gvf.train_loader(data, seed)
    t = time.perf_counter()
    res = growkit.prune(model, loader, data["val"], finetune_epochs=args.prune_finetune_epochs, lr=args.prune_lr,
                        weight_decay=args.weight_decay, seed=seed, progress=False, **kw)
    wall = time.perf_counter() - t
    curve = []
    for h in res.history:
        if "entry" not in h:
            continue  # a note (the pass stopped early)
        e = res.gallery[h["entry"]]
        m = res.model_of(e)
        curve.append({**{k: v for k, v in h.items() if k in ("step", "ratio", "removed", "point")},
                      "params": e.cost.params, "flops": e.cost.flops, "val_acc": 1 - e.val_error,
                      "test_acc": evaluate(m, data["test"])["accuracy"], "wall_s": wall})
    return curve


# ------------------------------------------------------------------------------------------- run
def run_seed(name: str, seed: int, args: argparse.Namespace, reuse: dict[str, Any] | None = None) -> dict[str, Any]:
    """One dataset and seed: base, every method row, pruning. ``reuse``: the same seed's run from an
    earlier result with the same settings; rows it holds are kept, not measured again."""
    spec = gvf.DATASETS[name]
    data = gvf.make_data(name, seed, args.batch_size, args.quick)
    torch.manual_seed(seed)
    t = time.perf_counter()
    base = gvf.make_model(spec["channels"], args.layers)
    gvf.train_from_scratch(base, data, seed, args.base_epochs, args.base_lr, args)
    out: dict[str, Any] = {"seed": seed, "sizes": data["sizes"]}
    out["base"] = {**gvf.metrics(base, data), "wall_s": time.perf_counter() - t, "channels": list(spec["channels"])}
    logger.info("%s seed %d base: train %.4f val %.4f test %.4f, %d params (%.0f s)", name, seed,
                out["base"]["train_acc"], out["base"]["val_acc"], out["base"]["test_acc"], out["base"]["params"],
                out["base"]["wall_s"])
    out["methods"] = {}
    if reuse is not None and reuse["base"]["test_acc"] != out["base"]["test_acc"]:
        raise SystemExit(f"--reuse: seed {seed}'s base differs from the reused run's; not the same settings")
    grown_petridish = None
    for method in args.methods:
        for tie in args.ties:
            row = method if tie == "none" else f"{method} [tie={tie}]"
            if reuse is not None and row in reuse["methods"]:
                out["methods"][row] = reuse["methods"][row]
                continue
            r = run_method(method, base, data, seed, args, tie)
            res = r["result"]
            res["added_params"] = res["params"] - out["base"]["params"]
            res["added_flops"] = res["flops"] - out["base"]["flops"]
            out["methods"][row] = res
            if method == "petridish" and tie == "none":
                grown_petridish = r["top_grown"]
            logger.info("%s seed %d %s: test %.4f val %.4f, +%d params, search %.0f s, total %.0f s, %d search steps, "
                        "%d atoms", name, seed, row, res["test_acc"], res["val_acc"], res["added_params"],
                        res["search_s"], res["wall_s"], res["search_steps"], res["atoms"])
    if args.prune:
        p: dict[str, Any] = {}
        kw = dict(method="channels", steps=args.prune_steps, max_ratio=args.prune_ratio)
        p["growkit_l1"] = growkit_prune(base, data, seed, args, importance="l1", **kw)
        p["tp_direct_l1"] = tp_direct(base, data, seed, args)
        p["growkit_bn"] = growkit_prune(base, data, seed, args, importance="bn_scale", **kw)
        if grown_petridish is not None:
            p["branches"] = growkit_prune(grown_petridish, data, seed, args, method="branches")
            p["branches_start"] = {"params": count_params(grown_petridish),
                                   "test_acc": evaluate(grown_petridish, data["test"])["accuracy"]}
        out["pruning"] = p
        for k, curve in p.items():
            if isinstance(curve, list):
                logger.info("%s seed %d pruning %s: %s", name, seed, k,
                            [(c["params"], round(c["test_acc"], 4)) for c in curve])
    return out


# ---------------------------------------------------------------------------------------- report
def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    s: dict[str, Any] = {"methods": {}}
    methods = [m for m in runs[0]["methods"] if all(m in r["methods"] for r in runs)]
    for m in methods:
        rows = [r["methods"][m] for r in runs]
        acc = [x["test_acc"] for x in rows]
        mean, std = _mean_std(acc)
        s["methods"][m] = {
            "test_acc_mean": mean, "test_acc_std": std, "test_acc_median": statistics.median(acc), "per_seed": acc,
            **{f"{k}_mean": statistics.mean(x[k] for x in rows)
               for k in ("val_acc", "added_params", "added_flops", "search_s", "wall_s", "search_steps", "atoms")},
            "minus_random": ([a - r["methods"]["random"]["test_acc"] for a, r in zip(acc, runs)]
                             if m != "random" and "random" in methods else None),
        }
    base_acc = [r["base"]["test_acc"] for r in runs]
    s["base"] = {"test_acc_mean": _mean_std(base_acc)[0], "test_acc_std": _mean_std(base_acc)[1],
                 "test_acc_median": statistics.median(base_acc), "per_seed": base_acc,
                 "params_mean": statistics.mean(r["base"]["params"] for r in runs),
                 "flops_mean": statistics.mean(r["base"]["flops"] for r in runs),
                 "train_acc_mean": statistics.mean(r["base"]["train_acc"] for r in runs)}
    if all("pruning" in r for r in runs):
        pr: dict[str, Any] = {}
        for key in [k for k, _ in PRUNERS] + ["branches"]:
            curves = [r["pruning"].get(key) for r in runs]
            if any(c is None for c in curves):
                continue
            n = min(len(c) for c in curves)
            pr[key] = [{
                "step": i + 1,
                "params_mean": statistics.mean(c[i]["params"] for c in curves),
                "flops_mean": statistics.mean(c[i]["flops"] for c in curves),
                "test_acc_mean": _mean_std([c[i]["test_acc"] for c in curves])[0],
                "test_acc_std": _mean_std([c[i]["test_acc"] for c in curves])[1],
                "ratio": curves[0][i].get("ratio"),
                "removed": [c[i].get("point") for c in curves] if key == "branches" else None,
            } for i in range(n)]
        # parity of growkit's channel pruning with Torch-Pruning used directly
        if "growkit_l1" in pr and "tp_direct_l1" in pr:
            diffs = [abs(a["test_acc"] - b["test_acc"]) for r in runs
                     for a, b in zip(r["pruning"]["growkit_l1"], r["pruning"]["tp_direct_l1"])]
            same_params = all(a["params"] == b["params"] for r in runs
                              for a, b in zip(r["pruning"]["growkit_l1"], r["pruning"]["tp_direct_l1"]))
            pr["parity"] = {"max_abs_test_acc_diff": max(diffs) if diffs else None, "same_params": same_params,
                            "growkit_wall_s": statistics.mean(r["pruning"]["growkit_l1"][-1]["wall_s"] for r in runs),
                            "direct_wall_s": statistics.mean(r["pruning"]["tp_direct_l1"][-1]["wall_s"] for r in runs)}
        s["pruning"] = pr
    return s


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _cell_vs_macro(runs: list[dict[str, Any]]) -> list[str]:
    """Paired per seed: each cell-mode row minus its method's macro row (same base, data, budget)."""
    rows = [m for m in runs[0]["methods"] if " [tie=" in m and all(m in r["methods"] for r in runs)]
    if not rows:
        return []
    L = ["Cell mode minus macro mode, paired per seed (test accuracy points; wins / draws / losses over seeds; "
         "tied edits: edits with a tie in the selected model, mean; grown: seeds whose selected model is grown):", "",
         "| method | cell - macro | per seed | W / D / L | added params cell / macro | tied edits | grown cell / macro |",
         "|---|---|---|---|---|---|---|"]
    for m in rows:
        macro = m.split(" [tie=")[0]
        if not all(macro in r["methods"] for r in runs):
            continue
        d = [100 * (r["methods"][m]["test_acc"] - r["methods"][macro]["test_acc"]) for r in runs]
        mean, std = _mean_std(d)
        w, t = sum(x > 0 for x in d), sum(x == 0 for x in d)
        grown = [sum(r["methods"][k]["edits"] > 0 for r in runs) for k in (m, macro)]
        L.append(f"| {m} | {mean:+.2f} ± {std:.2f} | {', '.join(f'{x:+.2f}' for x in d)} | {w} / {t} / {len(d) - w - t} | "
                 f"{statistics.mean(r['methods'][m]['added_params'] for r in runs):,.0f} / "
                 f"{statistics.mean(r['methods'][macro]['added_params'] for r in runs):,.0f} | "
                 f"{statistics.mean(r['methods'][m].get('tied_edits', 0) for r in runs):.1f} | "
                 f"{grown[0]} / {grown[1]} of {len(runs)} |")
    return L + [""]


def markdown(result: dict[str, Any]) -> str:
    a = result["settings"]
    L = [
        "# Growth methods on equal terms, and pruning",
        "",
        f"{result['date']}, torch {result['versions']['torch']}, timm {result['versions']['timm']}, CPU, "
        f"{a['threads']} thread(s); total wall time {result['total_wall_s'] / 60:.1f} min; growkit at commit "
        f"{result['growkit']['commit'][:10]}{' + local changes' if result['growkit']['dirty'] else ''}"
        f"{'; QUICK smoke settings, not a result' if a['quick'] else ''}.",
        "",
        f"Base per seed: timm `{gvf.FAMILY}` (pretrained=False, stem_width={gvf.STEM_WIDTH}), trained "
        f"{a['base_epochs']} epochs (SGD, lr {a['base_lr']}, cosine, batch {a['batch_size']}). Every method starts from "
        f"that same base with the same data order and gets the same extra training: {a['rounds']} round(s) x "
        f"({a['search_epochs']} search + {a['finetune_epochs']} fine-tune epochs); the search budget is counted in "
        f"training batches (column 'search batches'). lr {a['lr']}, new_lr_mult {a['new_lr_mult']}, budget params "
        f"x{a['budget']}, ops {a['ops'] or 'default'}, max_inputs {a['max_inputs']}, max_ops {a['max_ops']}; method "
        f"options {a['method_options'] or 'defaults'}. Selection on validation; TEST accuracy reported, mean ± std "
        f"(median) over seeds {a['seeds']}."
        + (f" Blocks per stage {tuple(a['layers'])}." if a.get("layers") else "")
        + (f" Tie modes {', '.join(a['ties'])}: rows 'method [tie=stage]' are cell mode (one pattern per cell type, "
           "each copy with its own weights; the budget counts every copy), plain rows macro mode."
           if a.get("ties", ["none"]) != ["none"] else ""),
        "",
    ]
    for name, d in result["datasets"].items():
        s, runs = d["summary"], d["runs"]
        b = s["base"]
        L += [f"## {name} (train/val/test {'/'.join(map(str, runs[0]['sizes']))}, base channels "
              f"{tuple(runs[0]['base']['channels'])}, base train acc {_pct(b['train_acc_mean'])} %)", ""]
        L += ["| method | test acc % | median | per seed | - random (points) | added params | added MFLOPs | "
              "search s | total s | search batches | atoms |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
        L.append(f"| base (no extra training) | {_pct(b['test_acc_mean'])} ± {_pct(b['test_acc_std'])} | "
                 f"{_pct(b['test_acc_median'])} | {', '.join(_pct(x) for x in b['per_seed'])} | - | "
                 f"{b['params_mean']:,.0f} (total) | {b['flops_mean'] / 1e6:.3f} (total) | - | - | - | - |")
        for m, x in s["methods"].items():
            mr = x["minus_random"]
            mr_s = "-" if mr is None else ", ".join(f"{100 * v:+.2f}" for v in mr)
            L.append(f"| {m} | {_pct(x['test_acc_mean'])} ± {_pct(x['test_acc_std'])} | {_pct(x['test_acc_median'])} | "
                     f"{', '.join(_pct(v) for v in x['per_seed'])} | {mr_s} | {x['added_params_mean']:,.0f} "
                     f"(+{100 * x['added_params_mean'] / b['params_mean']:.0f} %) | {x['added_flops_mean'] / 1e6:.3f} | "
                     f"{x['search_s_mean']:.1f} | {x['wall_s_mean']:.1f} | {x['search_steps_mean']:.0f} | "
                     f"{x['atoms_mean']:.1f} |")
        L.append("")
        L += _cell_vs_macro(runs)
        pr = s.get("pruning")
        if pr:
            L += [f"### {name}: channel pruning, accuracy vs params (same base, same run; "
                  f"{a['prune_finetune_epochs']} fine-tune epoch(s) at lr {a['prune_lr']} after each step)", ""]
            head = "| step | ratio |" + "".join(f" {label}: params | test acc % |" for k, label in PRUNERS if k in pr)
            L += [head, "|---|---|" + "---|---|" * sum(k in pr for k, _ in PRUNERS)]
            L.append("| 0 | 0 |" + "".join(f" {b['params_mean']:,.0f} | {_pct(b['test_acc_mean'])} |"
                                             for k, _ in PRUNERS if k in pr))
            n = max(len(pr[k]) for k, _ in PRUNERS if k in pr)
            for i in range(n):
                ratio = next((pr[k][i]["ratio"] for k, _ in PRUNERS if k in pr and i < len(pr[k])), None)
                row = f"| {i + 1} | {ratio:.2f} |" if ratio is not None else f"| {i + 1} | - |"
                for k, _ in PRUNERS:
                    if k not in pr:
                        continue
                    c = pr[k][i] if i < len(pr[k]) else None
                    row += (f" {c['params_mean']:,.0f} | {_pct(c['test_acc_mean'])} ± {_pct(c['test_acc_std'])} |"
                            if c else " - | - |")
                L.append(row)
            if "parity" in pr:
                p = pr["parity"]
                L += ["", f"growkit.prune vs Torch-Pruning used directly (L1): same params at every step: "
                      f"{'yes' if p['same_params'] else 'NO'}; largest test accuracy difference "
                      f"{100 * (p['max_abs_test_acc_diff'] or 0):.2f} points; wall time {p['growkit_wall_s']:.1f} s "
                      f"(growkit, incl. validation after each step) vs {p['direct_wall_s']:.1f} s (direct)."]
            if "branches" in pr:
                st = [r["pruning"]["branches_start"] for r in runs if "branches_start" in r["pruning"]]
                L += ["", f"### {name}: backward elimination of the branches of the most accurate Petridish-grown "
                      "model (validation)", "",
                      "| step | params | test acc % | removed (per seed) |", "|---|---|---|---|"]
                if st:
                    L.append(f"| 0 (grown) | {statistics.mean(x['params'] for x in st):,.0f} | "
                             f"{_pct(statistics.mean(x['test_acc'] for x in st))} | - |")
                for c in pr["branches"]:
                    L.append(f"| {c['step']} | {c['params_mean']:,.0f} | {_pct(c['test_acc_mean'])} ± "
                             f"{_pct(c['test_acc_std'])} | {', '.join(map(str, c['removed'] or []))} |")
            L.append("")
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="digits,kmnist")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--method-options", default="", help='JSON: {"pnas": {"k": 4}, ...} (default: each method\'s defaults)')
    p.add_argument("--base-epochs", type=int, default=30)
    p.add_argument("--base-lr", type=float, default=0.05)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--search-epochs", type=int, default=3)
    p.add_argument("--finetune-epochs", type=int, default=7)
    p.add_argument("--lr", type=float, default=0.1, help="grow lr for every method (grow_vs_finetune's tuned KMNIST value)")
    p.add_argument("--new-lr-mult", type=float, default=2.0)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--budget", type=float, default=1.5)
    p.add_argument("--ops", default="paper", help="comma-separated op names, 'paper', 'wide', or 'default'")
    p.add_argument("--max-inputs", type=int, default=2)
    p.add_argument("--max-ops", type=int, default=3)
    p.add_argument("--ties", default="none", help="comma-separated tie modes per method: none (macro), stage, all")
    p.add_argument("--layers", default=None, metavar="B1,B2,B3,B4",
                   help="blocks per stage of the base (default: the family's own; cell mode needs repeated blocks)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--no-prune", dest="prune", action="store_false", help="skip the pruning curves")
    p.add_argument("--prune-steps", type=int, default=5)
    p.add_argument("--prune-ratio", type=float, default=0.5, help="channel pruning ratio at the last step")
    p.add_argument("--prune-finetune-epochs", type=int, default=1)
    p.add_argument("--prune-lr", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    p.add_argument("--out", default=None, help="output prefix (default benchmarks/results/methods)")
    p.add_argument("--reuse", default=None, metavar="JSON",
                   help="an earlier result of these settings: its rows are kept (only missing method rows run)")
    p.add_argument("--render", default=None, metavar="JSON", help="only rewrite JSON's markdown next to it, then exit")
    args = p.parse_args(argv)
    if args.render:
        Path(args.render).with_suffix(".md").write_text(markdown(json.loads(Path(args.render).read_text())))
        return 0
    args.ops = ops_from_text(args.ops)
    argv_s = " ".join(sys.argv if argv is None else argv)
    if args.quick:
        args.base_epochs, args.rounds, args.search_epochs, args.finetune_epochs = 15, 1, 2, 2
        args.prune_steps = 2
        if "--seeds" not in argv_s:
            args.seeds = "0"
        if "--datasets" not in argv_s:
            args.datasets = "digits"
    args.methods = [m for m in args.methods.split(",") if m]
    args.ties = [t for t in args.ties.split(",") if t]
    if not args.ties or any(t not in TIES for t in args.ties):
        p.error(f"--ties wants modes from {TIES}, got {args.ties}")
    args.layers = tuple(int(b) for b in args.layers.split(",")) if args.layers else None
    unknown = [m for m in args.methods if m not in method_names()]
    if unknown:
        p.error(f"unknown methods {unknown}; available: {method_names()}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("growkit").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [n for n in args.datasets.split(",") if n]
    out_prefix = Path(args.out) if args.out else RESULTS / "methods"
    out_prefix.parent.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "methods",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
                     "torch_pruning": _tp_version()},
        "settings": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}, "seeds": seeds,
                     "family": gvf.FAMILY, "stem_width": gvf.STEM_WIDTH,
                     "channels": {n: list(gvf.DATASETS[n]["channels"]) for n in names}},
        "growkit": gvf.growkit_info(),
        "datasets": {},
    }

    def write() -> None:
        result["total_wall_s"] = time.perf_counter() - t0
        Path(f"{out_prefix}.json").write_text(json.dumps(gvf._clean(result), indent=1))
        Path(f"{out_prefix}.md").write_text(markdown(result))

    prior: dict[tuple[str, int], dict[str, Any]] = {}
    if args.reuse:
        old = json.loads(Path(args.reuse).read_text())
        keys = ("base_epochs", "base_lr", "rounds", "search_epochs", "finetune_epochs", "lr", "new_lr_mult",
                "weight_decay", "budget", "ops", "max_inputs", "max_ops", "batch_size", "layers", "method_options", "quick")
        mine = gvf._clean(result["settings"])
        bad = [k for k in keys if old["settings"].get(k) != mine.get(k)]
        if bad:
            p.error(f"--reuse {args.reuse}: settings differ ({', '.join(bad)})")
        prior = {(n, r["seed"]): r for n, d in old["datasets"].items() for r in d["runs"]}
    for name in names:
        d: dict[str, Any] = {"runs": []}
        result["datasets"][name] = d
        for seed in seeds:
            d["runs"].append(run_seed(name, seed, args, prior.get((name, seed))))
            d["summary"] = summarize(d["runs"])
            write()
        logger.info("%s done at %.0f s", name, time.perf_counter() - t0)
    write()
    print(markdown(result))
    return 0


def _tp_version() -> str | None:
    try:
        import torch_pruning as tp

        return getattr(tp, "__version__", None)
    except ImportError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
