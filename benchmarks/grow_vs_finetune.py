"""grow() vs fine-tuning with the same extra epochs, in the underfitting regime.

Per dataset and seed, one capacity-limited timm backbone (``resnet10t`` with narrow channels,
``pretrained=False``) is trained to a plateau (the *base*). From that same trained base:

  (a) ``growkit.grow`` with ``selection="alpha"`` (Petridish: top-|alpha| edges),
  (b) fine-tuning the original for the same E extra epochs with the same phase schedule
      (cosine restarted at the same points as grow's phases, new optimizer per phase, the best
      end-of-round checkpoint by validation accuracy, as grow's gallery does),
  (c) ``growkit.grow`` with ``selection="random"`` (the paper's ablation),
  (d) a wider model of the same family, params closest to (a)'s grown model, trained from
      scratch for base + E epochs (the ceiling),
  (e), (f), (g) ``growkit.grow`` with ``method="widen"``, ``"deepen"`` and the three mixed
      (petridish, widen, deepen: one drawn per round), with (a)'s budget, epochs and rates.

E = rounds * (search_epochs + finetune_epochs). Validation accuracy is used for every choice
(tuning, checkpoint selection); TEST accuracy is reported. With ``--tune`` the learning rate of
(b) and (lr, new_lr_mult) of (a) are chosen on validation accuracy of a separate tuning seed,
with the same number of configurations for each; (c) uses (a)'s choice.

    python benchmarks/grow_vs_finetune.py --quick --threads 1               # smoke run, ~15 s
    python benchmarks/grow_vs_finetune.py --tune --ops paper --threads 1    # the reported run (~60 min on CPU)
    python benchmarks/grow_vs_finetune.py --datasets kmnist --lr 0.1 --new-lr-mult 2 --ft-lr 0.3 \
        --variants grow,finetune,random --threads 1 --out benchmarks/results/grow_vs_finetune_kmnist_extgrid
    python benchmarks/grow_vs_finetune.py --datasets kmnist --seeds 0,1,2,3,4 --lr 0.1 --new-lr-mult 2 \
        --ft-lr 0.3 --ops paper --variants grow,finetune,wider,widen,deepen,mixed --threads 1 \
        --out benchmarks/results/grow_vs_finetune_resize_kmnist      # width / depth growth (issue 21)

--threads 1 was used for the reported numbers: on this shared 2-core machine two intra-op threads
made steps up to ~80x slower whenever another process was busy (OpenMP spinning); with these
tiny models one thread is as fast as two on an idle machine.

Writes benchmarks/results/grow_vs_finetune.{json,md} (or --out PREFIX).
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import inspect
import json
import logging
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import growkit
from growkit import data as D
from growkit.core.cost import count_flops, count_params
from growkit.train import evaluate, train_steps
from growkit.core.ops import ops_from_text

logger = logging.getLogger("grow_vs_finetune")

RESULTS = Path(__file__).resolve().parent / "results"

# Per dataset: loader, split sizes, base channels. Widths were picked so the base underfits
# (train accuracy clearly below 100 % after base training); see the base rows of the report.
DATASETS: dict[str, dict[str, Any]] = {
    "kmnist": {"load": lambda: pad32(D.kmnist_dataset()), "sizes": (7000, 1000, 2000), "channels": (2, 4, 8, 16)},
    "mnist": {"load": lambda: pad32(D.mnist_dataset()), "sizes": (7000, 1000, 2000), "channels": (1, 2, 4, 8)},
    "digits": {"load": lambda: D.digits_dataset(size=16), "sizes": (1200, 300, 297), "channels": (1, 2, 4, 8)},
}
FAMILY = "resnet10t"
STEM_WIDTH = 4
MULTS = (1, 2, 4, 8)

# Tuning grids (same number of configurations for grow and for fine-tuning).
# The same learning-rate grid for both; grow's new parameters train at 2x lr (an exploratory
# KMNIST grid found 10x diverging at lr 0.1 and 2x best; see grow_vs_finetune_kmnist_extgrid.md).
GROW_GRID = [{"lr": lr, "new_lr_mult": 2.0} for lr in (0.03, 0.1, 0.3)]
FT_GRID = [{"lr": lr} for lr in (0.03, 0.1, 0.3)]
TUNE_SEED = 1000


# ----------------------------------------------------------------------------------------- data
def pad32(ds: TensorDataset) -> TensorDataset:
    """28x28 -> 32x32, padded with the background value. With 28x28 the resnet's stride-2 stages
    give 7x7 -> 4x4, a non-integer factor, so growkit finds no eligible input for layer2; with
    32x32 every stage halves exactly (8, 4, 2, 1)."""
    x, y = ds.tensors
    return TensorDataset(F.pad(x, (2, 2, 2, 2), value=float(x.min())), y)


def make_data(name: str, seed: int, batch_size: int, quick: bool) -> dict[str, Any]:
    spec = DATASETS[name]
    ds = spec["load"]()
    sizes = spec["sizes"]
    if quick:
        sizes = tuple(max(64, s // 7) for s in sizes)
    tr, va, te = D.split(ds, sizes, seed=seed)
    _, val, tel = D.make_loaders([tr, va, te], batch_size=256, seed=seed)
    return {
        "train": tr,
        "val": val,
        "test": tel,
        "train_eval": DataLoader(tr, batch_size=256, shuffle=False),
        "batch_size": batch_size,
        "sizes": list(sizes),
        "example": tr[0][0].unsqueeze(0),
    }


def train_loader(data: dict[str, Any], seed: int) -> DataLoader:
    """A fresh shuffled loader: every variant of a seed sees the same batch order."""
    g = torch.Generator().manual_seed(10_000 + seed)
    return DataLoader(data["train"], batch_size=data["batch_size"], shuffle=True, generator=g)


# ---------------------------------------------------------------------------------------- models
def base_channels(name: str, args: argparse.Namespace) -> tuple[int, ...]:
    """The dataset's base widths, or the ``--channels`` override."""
    return tuple(args.channels.get(name, DATASETS[name]["channels"]))


def _parse_channels(items: list[str]) -> dict[str, tuple[int, ...]]:
    out = {}
    for item in items:
        name, _, widths = item.partition("=")
        if name not in DATASETS or not widths:
            raise SystemExit(f"--channels wants NAME=W1,W2,W3,W4 with NAME in {', '.join(DATASETS)}, got {item!r}")
        out[name] = tuple(int(w) for w in widths.split(","))
    return out


def make_model(channels: tuple[int, ...], layers: tuple[int, ...] | None = None) -> nn.Module:
    """The base family at ``channels`` (and ``layers`` blocks per stage; ``None``: the family's own)."""
    extra = {} if layers is None else {"layers": tuple(layers)}
    return timm.create_model(FAMILY, pretrained=False, num_classes=10, in_chans=1,
                             channels=tuple(channels), stem_width=STEM_WIDTH, **extra)


def wider_channels(base: tuple[int, ...], target_params: int, example: torch.Tensor) -> tuple[tuple[int, ...], int]:
    """The same family with wider channels whose parameter count is closest to ``target_params``."""
    base_params = count_params(make_model(base))
    best: tuple[float, tuple[int, ...], int] | None = None
    seen = set()
    w = float(base[0])
    while True:
        w += 0.125
        ch = tuple(max(b, int(w * m + 0.5)) for b, m in zip(base, MULTS))
        if ch in seen or ch == tuple(base):
            continue
        seen.add(ch)
        p = count_params(make_model(ch))
        if p <= base_params:
            continue
        d = abs(p - target_params)
        if best is None or d < best[0]:
            best = (d, ch, p)
        if p > 2 * max(target_params, base_params):
            break
    assert best is not None
    return best[1], best[2]


def cosine(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The same schedule as growkit.grow's ``cosine_schedule`` (growkit/jobs.py) (per step, restarted each phase)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))


def sgd(params, lr: float, args: argparse.Namespace) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=args.weight_decay)


def train_from_scratch(model: nn.Module, data: dict[str, Any], seed: int, epochs: int, lr: float,
                       args: argparse.Namespace) -> nn.Module:
    loader = train_loader(data, seed)
    opt = sgd(model.parameters(), lr, args)
    train_steps(model, loader, opt, epochs=epochs, scheduler=cosine(opt, epochs * len(loader)))
    return model


def metrics(model: nn.Module, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "train_acc": evaluate(model, data["train_eval"])["accuracy"],
        "val_acc": evaluate(model, data["val"])["accuracy"],
        "test_acc": evaluate(model, data["test"])["accuracy"],
        "params": count_params(model),
        "flops": count_flops(model, data["example"]),
    }


# -------------------------------------------------------------------------------------- variants
def finetune(base: nn.Module, data: dict[str, Any], seed: int, lr: float, args: argparse.Namespace) -> dict[str, Any]:
    """(b): the original model, the same phases as grow (search phase, fine-tune phase per round,
    cosine restarted and a new optimizer each phase); best end-of-round checkpoint by validation
    accuracy, the base included (as grow's gallery)."""
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    loader = train_loader(data, seed)
    best_val = evaluate(model, data["val"])["accuracy"]
    best_state, best_round = copy.deepcopy(model.state_dict()), 0
    rounds = []
    for rnd in range(1, args.rounds + 1):
        for epochs in (args.search_epochs, args.finetune_epochs):
            if epochs <= 0:
                continue
            opt = sgd(model.parameters(), lr, args)
            train_steps(model, loader, opt, epochs=epochs, scheduler=cosine(opt, epochs * len(loader)))
        v = evaluate(model, data["val"])["accuracy"]
        rounds.append({"round": rnd, "val_acc": v})
        if v > best_val:
            best_val, best_state, best_round = v, copy.deepcopy(model.state_dict()), rnd
    model.load_state_dict(best_state)
    return {"model": model, "selected_round": best_round, "rounds": rounds}


MIXED = ("petridish", "widen", "deepen")
"""What the ``mixed`` variant mixes: one of these methods drawn per round (issue 21)."""


def grow(base: nn.Module, data: dict[str, Any], seed: int, selection: str, hp: dict[str, Any],
         args: argparse.Namespace, method: str = "petridish") -> dict[str, Any]:
    loader = train_loader(data, seed)
    extra = {}
    if args.candidate_lr is not None and "candidate_lr" in inspect.signature(growkit.grow).parameters:
        extra["candidate_lr"] = args.candidate_lr
    res = growkit.grow(
        copy.deepcopy(base), loader, data["val"],
        method=list(MIXED) if method == "mixed" else method,
        rounds=args.rounds, search_epochs=args.search_epochs, finetune_epochs=args.finetune_epochs,
        lr=hp["lr"], new_lr_mult=hp["new_lr_mult"], weight_decay=args.weight_decay,
        budget=growkit.Budget(params=args.budget), selection=selection, seed=seed, progress=False,
        max_ops=args.max_ops, ops=args.ops, max_inputs=args.max_inputs or None, l1=args.l1, **extra,
    )
    best = res.best
    hist = []
    for h in res.history:
        if "round" not in h:
            continue
        hist.append({k: v for k, v in h.items() if k in (
            "round", "parent", "chosen", "scores", "etas", "val_accuracy", "params", "flops",
            "search_train_acc", "finetune_train_acc", "search_s", "finetune_s", "note", "entry", "method")})
    return {
        "model": res.model,
        "selected_entry": best.id,
        "selected_kind": best.kind,
        "selected_edits": [{"point": e["point"], "edges": e["edges"]} for e in best.plan.to_dict()["edits"]],
        "history": hist,
    }


# ------------------------------------------------------------------------------------------ run
def run_seed(name: str, seed: int, hp_grow: dict[str, Any], hp_ft: dict[str, Any], args: argparse.Namespace,
             variants: tuple[str, ...] = ("grow", "finetune", "random", "wider")) -> dict[str, Any]:
    data = make_data(name, seed, args.batch_size, args.quick)
    torch.manual_seed(seed)
    t = time.perf_counter()
    base = make_model(base_channels(name, args))
    train_from_scratch(base, data, seed, args.base_epochs, args.base_lr, args)
    out: dict[str, Any] = {"seed": seed, "sizes": data["sizes"]}
    out["base"] = {**metrics(base, data), "wall_s": time.perf_counter() - t, "channels": list(base_channels(name, args))}
    logger.info("%s seed %d base: train %.4f val %.4f test %.4f, %d params (%.0f s)", name, seed,
                out["base"]["train_acc"], out["base"]["val_acc"], out["base"]["test_acc"], out["base"]["params"],
                out["base"]["wall_s"])
    for v in variants:
        t = time.perf_counter()
        if v == "grow" or v == "random":
            r = grow(base, data, seed, "alpha" if v == "grow" else "random", hp_grow, args)
        elif v in ("widen", "deepen", "mixed"):
            r = grow(base, data, seed, "alpha", hp_grow, args, method=v)
        elif v == "finetune":
            r = finetune(base, data, seed, hp_ft["lr"], args)
        elif v == "wider":
            target = out.get("grow", {}).get("params") or int(args.budget * out["base"]["params"])
            if target <= out["base"]["params"]:
                target = int(args.budget * out["base"]["params"])
            ch, _ = wider_channels(base_channels(name, args), target, data["example"])
            torch.manual_seed(seed)
            m = make_model(ch)
            train_from_scratch(m, data, seed, args.base_epochs + extra_epochs(args), args.base_lr, args)
            r = {"model": m, "channels": list(ch), "target_params": target}
        else:
            raise ValueError(v)
        model = r.pop("model")
        out[v] = {**metrics(model, data), "wall_s": time.perf_counter() - t, **r}
        logger.info("%s seed %d %s: train %.4f val %.4f test %.4f, %d params (%.0f s)%s", name, seed, v,
                    out[v]["train_acc"], out[v]["val_acc"], out[v]["test_acc"], out[v]["params"], out[v]["wall_s"],
                    f" etas {[h.get('etas') for h in out[v]['history']]}" if "history" in out[v] else "")
    return out


def extra_epochs(args: argparse.Namespace) -> int:
    return args.rounds * (args.search_epochs + args.finetune_epochs)


def tune(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Pick grow's (lr, new_lr_mult) and fine-tuning's lr by validation accuracy on a tuning seed."""
    seed = TUNE_SEED
    data = make_data(name, seed, args.batch_size, args.quick)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    base = make_model(base_channels(name, args))
    train_from_scratch(base, data, seed, args.base_epochs, args.base_lr, args)
    base_val = evaluate(base, data["val"])["accuracy"]
    trials: dict[str, list[dict[str, Any]]] = {"grow": [], "finetune": []}
    for hp in GROW_GRID:
        r = grow(base, data, seed, "alpha", hp, args)
        trials["grow"].append({**hp, "val_acc": evaluate(r["model"], data["val"])["accuracy"],
                               "etas": [h.get("etas") for h in r["history"]]})
        logger.info("tune %s grow %s: val %.4f", name, hp, trials["grow"][-1]["val_acc"])
    for hp in FT_GRID:
        r = finetune(base, data, seed, hp["lr"], args)
        trials["finetune"].append({**hp, "val_acc": evaluate(r["model"], data["val"])["accuracy"]})
        logger.info("tune %s finetune %s: val %.4f", name, hp, trials["finetune"][-1]["val_acc"])
    pick = {k: max(v, key=lambda d: d["val_acc"]) for k, v in trials.items()}  # first max wins ties
    return {
        "seed": seed, "base_val_acc": base_val, "trials": trials, "wall_s": time.perf_counter() - t0,
        "grow": {"lr": pick["grow"]["lr"], "new_lr_mult": pick["grow"]["new_lr_mult"]},
        "finetune": {"lr": pick["finetune"]["lr"]},
    }


# -------------------------------------------------------------------------------------- report
VARIANTS = [("base", "base (trained to plateau)"), ("grow", "(a) grow, top-|alpha|"),
            ("finetune", "(b) fine-tune, same extra epochs"), ("random", "(c) grow, random edges"),
            ("wider", "(d) wider from scratch"), ("widen", "(e) grow, method=widen"),
            ("deepen", "(f) grow, method=deepen"), ("mixed", "(g) grow, petridish + widen + deepen mixed")]
PAIRS = [("grow", "finetune", "(a) - (b)"), ("grow", "random", "(a) - (c)"), ("grow", "base", "(a) - base"),
         ("wider", "finetune", "(d) - (b)")] + [
    (v, b, f"({t}) - ({bt})") for v, t in (("widen", "e"), ("deepen", "f"), ("mixed", "g"))
    for b, bt in (("grow", "a"), ("finetune", "b"), ("wider", "d"))]


def _ms(xs: list[float]) -> str:
    m = statistics.mean(xs)
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * m:.2f} ± {100 * s:.2f}"


def _paired_p(diffs: list[float]) -> str:
    """Two-sided one-sample t-test of the per-seed differences against 0."""
    if len(diffs) < 2 or statistics.stdev(diffs) == 0:
        return "-"
    from scipy.stats import ttest_1samp  # scipy comes with scikit-learn

    p = float(ttest_1samp(diffs, 0.0).pvalue)
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    present = [k for k, _ in VARIANTS if all(k in r for r in runs)]
    s: dict[str, Any] = {}
    for k in present:
        s[k] = {f: statistics.mean(r[k][f] for r in runs) for f in ("train_acc", "val_acc", "test_acc", "params", "flops", "wall_s")}
        s[k]["test_acc_std"] = statistics.stdev([r[k]["test_acc"] for r in runs]) if len(runs) > 1 else 0.0
    for a, b, _ in PAIRS:
        if a in present and b in present:
            d = [r[a]["test_acc"] - r[b]["test_acc"] for r in runs]
            s[f"{a}-{b}"] = {"per_seed": d, "mean": statistics.mean(d),
                             "std": statistics.stdev(d) if len(d) > 1 else 0.0,
                             "wins": sum(x > 0 for x in d), "ties": sum(x == 0 for x in d)}
    if all(k in present for k in ("grow", "finetune", "wider")):
        gap = s["wider"]["test_acc"] - s["finetune"]["test_acc"]
        s["recovered_fraction"] = (s["grow"]["test_acc"] - s["finetune"]["test_acc"]) / gap if gap > 0 else None
    return s


def markdown(result: dict[str, Any]) -> str:
    a = result["settings"]
    L = [
        "# grow() vs fine-tuning in the underfitting regime",
        "",
        f"{result['date']}, torch {result['versions']['torch']}, timm {result['versions']['timm']}, "
        f"CPU, {a['threads']} thread(s); total wall time {result['total_wall_s'] / 60:.1f} min.",
        "",
        f"Base: timm `{FAMILY}` (pretrained=False, stem_width={STEM_WIDTH}), channels per dataset below, "
        f"trained {a['base_epochs']} epochs (SGD momentum 0.9, wd {a['weight_decay']}, lr {a['base_lr']}, one cosine, "
        f"batch {a['batch_size']}). Extra epochs E = rounds x (search + fine-tune) = {a['rounds']} x "
        f"({a['search_epochs']} + {a['finetune_epochs']}) = {result['extra_epochs']}, cosine restarted every phase for "
        f"(a), (b), (c). grow: budget params x{a['budget']}, max_ops {a['max_ops']}, ops {a['ops'] or 'default'}, "
        f"max_inputs {a['max_inputs']}, l1 {a['l1']}, candidate_lr "
        f"{a['candidate_lr'] if a['candidate_lr'] is not None else result['growkit'].get('candidate_lr_default', '-')}. "
        f"growkit at commit {result['growkit']['commit'][:10]}{' + local changes' if result['growkit']['dirty'] else ''}. (d): channels widened so its params are closest to (a)'s "
        f"grown model, trained from scratch for {a['base_epochs']} + E epochs with the base recipe. "
        "Selection uses validation accuracy only; the numbers below are TEST accuracy (%), mean ± std over seeds "
        f"{a['seeds']}.",
        "",
    ]
    for note in result.get("notes", []):
        L += [f"**Note ({note['date']}):** {note['text']}", ""]
    for rr in result.get("reruns", []):
        L += [f"Re-run on {rr['date'][:10]} at growkit commit {rr['growkit']['commit'][:10]}"
              f"{' + local changes' if rr['growkit']['dirty'] else ''}: variant(s) {', '.join(rr['variants'])} "
              f"(same bases, bit for bit; {rr['wall_s'] / 60:.1f} min). {rr.get('note') or ''}".rstrip(), ""]
    for name, d in result["datasets"].items():
        s, runs = d["summary"], d["runs"]
        hp = d["hparams"]
        L += [f"## {name} (train/val/test {'/'.join(map(str, runs[0]['sizes']))}, base channels "
              f"{tuple(runs[0]['base']['channels'])})", ""]
        L.append(f"Hyper-parameters ({'tuned on validation, seed ' + str(TUNE_SEED) if d.get('tuning') else 'fixed'}): "
                 f"grow lr {hp['grow']['lr']}, new_lr_mult {hp['grow']['new_lr_mult']}; fine-tune lr {hp['finetune']['lr']}.")
        L.append("")
        L += ["| variant | test acc % | per seed | train acc % | val acc % | params | MFLOPs | wall s |",
              "|---|---|---|---|---|---|---|---|"]
        for k, label in VARIANTS:
            if k not in s:
                continue
            per = ", ".join(f"{100 * r[k]['test_acc']:.2f}" for r in runs)
            L.append(f"| {label} | {_ms([r[k]['test_acc'] for r in runs])} | {per} | {100 * s[k]['train_acc']:.2f} | "
                     f"{100 * s[k]['val_acc']:.2f} | {s[k]['params']:,.0f} | {s[k]['flops'] / 1e6:.3f} | {s[k]['wall_s']:.0f} |")
        L.append("")
        L += ["| paired difference (test points) | per seed | mean ± std | wins/ties of seeds | mean > std (goal) "
              "| paired t-test p |", "|---|---|---|---|---|---|"]
        for a_, b_, label in PAIRS:
            key = f"{a_}-{b_}"
            if key in s:
                x = s[key]
                L.append(f"| {label} | {', '.join(f'{100 * v:+.2f}' for v in x['per_seed'])} | "
                         f"{100 * x['mean']:+.2f} ± {100 * x['std']:.2f} | {x['wins']}/{x['ties']} of {len(runs)} | "
                         f"{'yes' if x['mean'] > x['std'] else 'no'} | {_paired_p(x['per_seed'])} |")
        if s.get("recovered_fraction") is not None:
            L.append("")
            L.append(f"(a) recovers {100 * s['recovered_fraction']:.0f} % of the (d) - (b) gain, at "
                     f"+{100 * (s['grow']['params'] / s['base']['params'] - 1):.0f} % params (d: "
                     f"+{100 * (s['wider']['params'] / s['base']['params'] - 1):.0f} %) and {s['grow']['wall_s']:.0f} s "
                     f"of extra training (d: {s['wider']['wall_s']:.0f} s from scratch).")
        L += ["", "Growth details per seed (selected entry; eta of each grown branch at the end of its round; "
              "cos-score of each point):", ""]
        L += ["| seed | variant | round | parent | chosen points | etas | scores | val acc % after round |",
              "|---|---|---|---|---|---|---|---|"]
        for r in runs:
            for k in ("grow", "random", "widen", "deepen", "mixed"):
                if k not in r:
                    continue
                for h in r[k]["history"]:
                    et = ", ".join(f"{p}: {v:+.3f}" for p, v in (h.get("etas") or {}).items()) or "-"
                    sc = ", ".join(f"{p}: {v:.3f}" for p, v in (h.get("scores") or {}).items() if v is not None)
                    va = f"{100 * h['val_accuracy']:.2f}" if "val_accuracy" in h else (h.get("note") or "-")
                    drawn = f", drew {h['method']}" if k == "mixed" and h.get("method") else ""
                    L.append(f"| {r['seed']} | {k} (sel. entry {r[k]['selected_entry']}, {r[k]['selected_kind']}{drawn}) | "
                             f"{h['round']} | {h['parent']} | {', '.join(h.get('chosen') or []) or '-'} | {et} | {sc} | {va} |")
        if d.get("tuning"):
            t = d["tuning"]
            L += ["", f"Tuning (seed {t['seed']}, validation accuracy %, base val {100 * t['base_val_acc']:.2f}): "
                  + "grow " + "; ".join(f"lr {x['lr']} mult {x['new_lr_mult']}: {100 * x['val_acc']:.2f}" for x in t["trials"]["grow"])
                  + " | fine-tune " + "; ".join(f"lr {x['lr']}: {100 * x['val_acc']:.2f}" for x in t["trials"]["finetune"]) + "."]
        L.append("")
    return "\n".join(L) + "\n"


def growkit_info() -> dict[str, Any]:
    """Commit of the growkit checkout (grow() is under active development) and grow()'s defaults."""
    import subprocess

    root = Path(growkit.__file__).resolve().parent.parent
    info: dict[str, Any] = {"commit": "unknown", "dirty": False}
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                        check=True).stdout.strip()
        info["dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "growkit"], cwd=root,
                                            capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    sig = inspect.signature(growkit.grow).parameters
    for k in ("candidate_lr", "new_lr_mult", "l1", "max_ops", "max_inputs"):
        if k in sig:
            info[f"{k}_default"] = sig[k].default
    return info


def merge(result: dict[str, Any], rerun: dict[str, Any], note: str | None = None) -> dict[str, Any]:
    """``result`` with the variants of ``rerun`` swapped in, seed by seed.

    Used to re-run one arm after a fix without re-running the others. The bases are retrained in
    the re-run; they must match the original bit for bit (metrics and parameter counts), else the
    arms would not share a starting point and the merge is refused.
    """
    out = copy.deepcopy(result)
    known = {k for k, _ in VARIANTS if k != "base"}
    variants = sorted({v for d in rerun["datasets"].values() for r in d["runs"] for v in r if v in known})
    for name, d in rerun["datasets"].items():
        if name not in out["datasets"]:
            raise ValueError(f"{name} is not in the result being merged into")
        old = {r["seed"]: r for r in out["datasets"][name]["runs"]}
        if sorted(old) != sorted(r["seed"] for r in d["runs"]):
            raise ValueError(f"{name}: seeds differ ({sorted(old)} vs {[r['seed'] for r in d['runs']]})")
        if d["hparams"] != out["datasets"][name]["hparams"]:
            raise ValueError(f"{name}: hyper-parameters differ ({d['hparams']} vs {out['datasets'][name]['hparams']})")
        for r in d["runs"]:
            a, b = old[r["seed"]]["base"], r["base"]
            keys = ("train_acc", "val_acc", "test_acc", "params", "flops")
            if any(a[k] != b[k] for k in keys):
                raise ValueError(f"{name} seed {r['seed']}: the re-run base differs "
                                 f"({ {k: a[k] for k in keys} } vs { {k: b[k] for k in keys} })")
            for v in variants:
                old[r["seed"]][v] = r[v]
        out["datasets"][name]["summary"] = summarize(out["datasets"][name]["runs"])
    out.setdefault("reruns", []).append({"variants": variants, "date": rerun["date"], "growkit": rerun["growkit"],
                                         "wall_s": rerun["total_wall_s"], "note": note})
    return out


def _clean(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="kmnist,mnist,digits")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--base-epochs", type=int, default=30)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--search-epochs", type=int, default=3)
    p.add_argument("--finetune-epochs", type=int, default=7)
    p.add_argument("--base-lr", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=0.01, help="grow lr (without --tune)")
    p.add_argument("--new-lr-mult", type=float, default=10.0, help="grow new_lr_mult (without --tune)")
    p.add_argument("--ft-lr", type=float, default=None, help="fine-tune lr (without --tune; default: --lr)")
    p.add_argument("--tune", action="store_true", help="tune lr / new_lr_mult (grow) and lr (fine-tune) on validation")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--budget", type=float, default=1.5)
    p.add_argument("--max-ops", type=int, default=3)
    p.add_argument("--ops", default=None, help="comma-separated op names, 'paper', 'wide', or default")
    p.add_argument("--channels", action="append", default=[], metavar="NAME=W1,W2,W3,W4",
                   help="override a dataset's base widths (repeatable)")
    p.add_argument("--max-inputs", type=int, default=2, help="nearest eligible inputs per point; 0: all")
    p.add_argument("--l1", type=float, default=1e-3)
    p.add_argument("--candidate-lr", type=float, default=None,
                   help="grow's candidate_lr (Adam lr of the weak learners), if this growkit has it; default: growkit's")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default="grow,finetune,random,wider",
                   help="subset of grow,finetune,random,wider,widen,deepen,mixed (wider needs grow first for its size "
                        "target)")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    p.add_argument("--out", default=None, help="output prefix (default benchmarks/results/grow_vs_finetune)")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="only rewrite the markdown report next to this result file, from its JSON")
    p.add_argument("--merge", nargs=2, default=None, metavar=("RESULT", "RERUN"),
                   help="replace the variants RERUN.json has in RESULT.json (same seeds; the bases must be "
                        "identical), recompute the summary, rewrite RESULT.{json,md}; --note says why")
    p.add_argument("--note", default=None, help="with --merge: a note kept in the result and shown in the report")
    args = p.parse_args(argv)
    if args.render:
        src = Path(args.render)
        src.with_suffix(".md").write_text(markdown(json.loads(src.read_text())))
        return 0
    if args.merge:
        dst = Path(args.merge[0])
        merged = merge(json.loads(dst.read_text()), json.loads(Path(args.merge[1]).read_text()), args.note)
        dst.write_text(json.dumps(_clean(merged), indent=1))
        dst.with_suffix(".md").write_text(markdown(merged))
        return 0
    args.channels = _parse_channels(args.channels)
    args.ops = ops_from_text(args.ops)
    if args.quick:
        args.base_epochs, args.rounds, args.search_epochs, args.finetune_epochs = 2, 1, 1, 1
        if "--seeds" not in " ".join(sys.argv):
            args.seeds = "0"
        if "--datasets" not in " ".join(sys.argv):
            args.datasets = "digits"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("growkit").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [n for n in args.datasets.split(",") if n]
    out_prefix = Path(args.out) if args.out else RESULTS / ("grow_vs_finetune_quick" if args.quick else "grow_vs_finetune")
    out_prefix.parent.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "grow_vs_finetune",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()},
        "settings": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}, "seeds": seeds,
                     "family": FAMILY, "stem_width": STEM_WIDTH,
                     "channels": {n: list(base_channels(n, args)) for n in names},
                     "grow_grid": GROW_GRID, "finetune_grid": FT_GRID, "tune_seed": TUNE_SEED},
        "extra_epochs": extra_epochs(args),
        "growkit": growkit_info(),
        "datasets": {},
    }

    def write() -> None:
        result["total_wall_s"] = time.perf_counter() - t0
        # str + suffix, not with_suffix: a prefix like "..._lr0.1" must keep its ".1"
        Path(f"{out_prefix}.json").write_text(json.dumps(_clean(result), indent=1))
        Path(f"{out_prefix}.md").write_text(markdown(result))

    for name in names:
        d: dict[str, Any] = {"runs": []}
        result["datasets"][name] = d
        if args.tune:
            d["tuning"] = tune(name, args)
            hp_grow, hp_ft = d["tuning"]["grow"], d["tuning"]["finetune"]
            logger.info("%s tuned: grow %s, finetune %s (%.0f s)", name, hp_grow, hp_ft, d["tuning"]["wall_s"])
        else:
            hp_grow = {"lr": args.lr, "new_lr_mult": args.new_lr_mult}
            hp_ft = {"lr": args.ft_lr if args.ft_lr is not None else args.lr}
        d["hparams"] = {"grow": hp_grow, "finetune": hp_ft}
        for seed in seeds:
            d["runs"].append(run_seed(name, seed, hp_grow, hp_ft, args, tuple(v for v in args.variants.split(",") if v)))
            d["summary"] = summarize(d["runs"])
            write()
        logger.info("%s done at %.0f s", name, time.perf_counter() - t0)
    write()
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
