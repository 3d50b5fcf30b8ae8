"""Growth at scale: ``grow()``'s defaults against fine-tuning and controls at equal wall-clock.

Full-width timm models (``pretrained=False``, default widths) on KMNIST / MNIST at 32 px from
../shared/data, plus a warm-start setting (a base trained on MNIST, moved to KMNIST with a new
head). Per setting and seed, one base is trained (``base_epochs``, SGD, cosine); every arm then
starts from that same base with the same data order (a loader seeded by the seed) and gets the
same measured wall-clock as ``grow`` took:

  grow           growkit.grow(base, ...) with its defaults (plus ``--grow-kwargs``);
  finetune       growkit's own same-time baseline (growkit.growth.baseline.finetune_for);
  random_edges   growkit.grow(selection="random"): the same weak learning, edges drawn at random;
  random_points  as many grown points and edges per point as grow's largest child, at random points
                 with random edges, no weak learning, then fine-tuned (new-parameter rule) for the
                 rest of grow's wall-clock;
  wider          grow's largest child's architecture (the base's if nothing grew) re-initialised
                 and trained from scratch for the base's training time plus grow's wall-clock;
  widen, deepen, mixed
                 growkit.grow(method="widen" | "deepen" | ["petridish", "widen", "deepen"]) with the
                 same settings; each is paired with its own same-time fine-tuning control
                 (``finetune@widen`` ...), because its wall-clock is its own, not grow's.

TEST accuracy (a held-out split never used for any choice) is reported; validation accuracy is
what grow's gallery selects on. The protocol of the reported run is written in
benchmarks/grow_at_scale_protocol.md before it runs.

    python benchmarks/grow_at_scale.py --quick                      # smoke run, ~1 min
    python benchmarks/grow_at_scale.py --seeds 0,1,2,3,4            # the reported run (or as two processes
    python benchmarks/grow_at_scale.py --merge A.json B.json        #  over disjoint --settings, merged)
    python benchmarks/grow_at_scale.py --settings kmnist/mobilenetv3_small_050 --seeds 100 \\
        --grow-kwargs '{"ops": "paper", "max_inputs": 2}' --out benchmarks/results/grow_at_scale_pilot_paper

Writes benchmarks/results/grow_at_scale.{json,md} and grow_at_scale_<setting>.png (or --out PREFIX).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn
from torch.utils.data import DataLoader

import growkit
from growkit import data as D
from growkit.core.cost import count_flops, count_params
from growkit.growth.baseline import finetune_for, train_for
from growkit.newparams import growth_optimizer
from growkit.runsetup import set_up_run
from growkit.train import evaluate, train_steps

logger = logging.getLogger("grow_at_scale")
RESULTS = Path(__file__).resolve().parent / "results"
ARMS = ("grow", "finetune", "random_edges", "random_points", "wider")
# growth methods other than Petridish; each gets a fine-tuning control at its own wall-clock
RESIZE_ARMS: dict[str, Any] = {"widen": "widen", "deepen": "deepen", "mixed": ["petridish", "widen", "deepen"]}
ALL_ARMS = ARMS + tuple(RESIZE_ARMS)


def shown_arms(arms: tuple[str, ...]) -> tuple[str, ...]:
    """The arms in the order of the tables, each resize arm followed by its fine-tuning control."""
    return tuple(x for a in arms for x in ((a, f"finetune@{a}") if a in RESIZE_ARMS else (a,)))


def pairs(arms: tuple[str, ...]) -> list[tuple[str, str]]:
    """(arm, control) pairs whose per-seed differences are reported."""
    out = [("grow", b) for b in ("finetune", "random_points", "random_edges", "wider", "base")
           if "grow" in arms and (b in arms or b == "base")]
    for a in arms:
        if a in RESIZE_ARMS:
            out += [(a, f"finetune@{a}"), (a, "base")] + ([("grow", a)] if "grow" in arms else [])
    return out


@dataclass(frozen=True)
class Setting:
    data: str                 # "kmnist" | "mnist": the set the arms train and are tested on
    model: str                # timm model name, default width
    base_epochs: int          # epochs the base is trained for
    pre: str | None = None    # warm start: the base is trained on this set, then gets a new head
    base_lr: float = 0.05
    sizes: tuple[int, int, int] = (2500, 1000, 5000)  # train / val / test images


SETTINGS: dict[str, Setting] = {
    "kmnist/mobilenetv3_small_050": Setting("kmnist", "mobilenetv3_small_050", 10),
    "kmnist/resnet10t": Setting("kmnist", "resnet10t", 8),
    "mnist/mobilevit_xxs": Setting("mnist", "mobilevit_xxs", 8),
    "mnist->kmnist/mobilenetv3_small_050": Setting("kmnist", "mobilenetv3_small_050", 10, pre="mnist"),
}

BATCH = 64


def dataset(name: str):
    return D.kmnist_dataset(size=32) if name == "kmnist" else D.mnist_dataset(size=32)


def splits(name: str, sizes: tuple[int, int, int]) -> list[Any]:
    # One fixed split per data set (seed 0): seeds vary the base, its init and the data order.
    return D.split(dataset(name), sizes, seed=0)


def loader(part: Any, seed: int | None) -> DataLoader:
    g = None if seed is None else torch.Generator().manual_seed(seed)
    return DataLoader(part, batch_size=BATCH, shuffle=seed is not None, generator=g)


def sgd(model: nn.Module, lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)


def train_epochs(model: nn.Module, train: Any, seed: int, epochs: int, lr: float) -> None:
    opt = sgd(model, lr)
    ld = loader(train, seed)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * len(ld))
    train_steps(model, ld, opt, epochs=epochs, scheduler=sched)


def accuracy(model: nn.Module, part: Any) -> float:
    return float(evaluate(model, loader(part, None))["accuracy"])


def describe(model: nn.Module, example: torch.Tensor, parts: dict[str, Any], wall: float, **extra: Any) -> dict[str, Any]:
    model.eval()
    return {"test_acc": accuracy(model, parts["test"]), "val_acc": accuracy(model, parts["val"]),
            "train_acc": accuracy(model, parts["train"]), "params": count_params(model),
            "flops": count_flops(model, (example,)), "wall_s": wall, **extra}


def make_base(s: Setting, seed: int, parts: dict[str, Any], cache: Path | None = None) -> tuple[nn.Module, float]:
    torch.manual_seed(seed)
    model = timm.create_model(s.model, pretrained=False, num_classes=10, in_chans=1)
    key = f"{s.pre}-{s.data}-{s.model}-{s.base_epochs}-{s.base_lr}-{'x'.join(map(str, s.sizes))}-{seed}"
    if cache is not None and (cache / f"{key}.safetensors").is_file():  # pilots: reuse a base already trained
        from safetensors.torch import load_file

        if s.pre is not None:
            model.reset_classifier(10)
        model.load_state_dict(load_file(cache / f"{key}.safetensors"))
        torch.manual_seed(seed + 1)  # the state a fresh base training would have left is not replayed
        return model.eval(), float(json.loads((cache / f"{key}.json").read_text())["seconds"])
    t = time.perf_counter()
    if s.pre is not None:
        pre_train = splits(s.pre, s.sizes)[0]
        train_epochs(model, pre_train, seed, s.base_epochs, s.base_lr)
        model.reset_classifier(10)  # the new task's head, untrained
    else:
        train_epochs(model, parts["train"], seed, s.base_epochs, s.base_lr)
    seconds = time.perf_counter() - t
    if cache is not None:
        from safetensors.torch import save_file

        cache.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, cache / f"{key}.safetensors")
        (cache / f"{key}.json").write_text(json.dumps({"seconds": seconds}))
    return model.eval(), seconds


def largest_plan(res: growkit.GrowResult) -> growkit.GrowthPlan | None:
    """The plan of the grown child with the most branches in grow's gallery (what random_points
    and wider match), ``None`` when nothing grew."""
    grown = [e for e in res.gallery if e.kind == "grown" and len(e.plan.edits) > 0]
    if not grown:
        return None
    return max(grown, key=lambda e: (len(e.plan.edits), -e.val_error)).plan


def random_points_arm(base: nn.Module, plan: growkit.GrowthPlan | None, parts: dict[str, Any], seed: int, seconds: float,
                      cfg: growkit.GrowConfig, example: torch.Tensor) -> dict[str, Any]:
    t = time.perf_counter()
    model, pts = copy.deepcopy(base), []
    if plan is not None:
        edits = plan.edits
        per_point = max(1, round(sum(len(e.edges) for e in edits) / len(edits)))
        rng = random.Random(seed)
        names = [p.name for p in growkit.trace(base, example).points if p.inputs]
        pts = rng.sample(names, min(len(edits), len(names)))
        cm = growkit.inject(base, example, points=pts, ops=cfg.ops, max_inputs=cfg.max_inputs)
        model = growkit.finalize(cm, max_ops=per_point, selection="random",
                                 generator=torch.Generator().manual_seed(seed))
    new = [p for m in model.modules() if isinstance(m, growkit.GrownBranch) for p in m.parameters()]
    setup = set_up_run(model, loader(parts["train"], seed), loader(parts["val"], None), example_input=example)
    opt, _ = growth_optimizer(model, new, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                              rule=cfg.new_param_rule() if new else None, steps_per_epoch=len(setup.loader))
    model.train()
    train_for(model, setup, opt, seconds - (time.perf_counter() - t), desc="random points")
    return describe(model, example, parts, time.perf_counter() - t, grown_points=len(pts))


def wider_arm(base: nn.Module, plan: growkit.GrowthPlan | None, s: Setting, parts: dict[str, Any], seed: int,
              seconds: float, example: torch.Tensor) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = copy.deepcopy(base) if plan is None else growkit.apply_plan(base, plan, example)
    for m in model.modules():
        if m is not model and hasattr(m, "reset_parameters"):
            m.reset_parameters()  # grown gates stay at 0 and train from there
    t = time.perf_counter()
    setup = set_up_run(model, loader(parts["train"], seed), loader(parts["val"], None), example_input=example)
    model.train()
    try:
        train_for(model, setup, sgd(model, s.base_lr), seconds, desc="wider from scratch")
    except growkit.NonFiniteLoss as exc:
        # the from-scratch recipe diverged on the grown architecture: an outcome of this arm, kept
        # (its weights are non-finite, so it scores as a constant prediction)
        logger.warning("seed %d wider: %s", seed, exc)
        return describe(model, example, parts, time.perf_counter() - t, diverged=True)
    return describe(model, example, parts, time.perf_counter() - t, diverged=False)


def run_seed(name: str, s: Setting, seed: int, grow_kwargs: dict[str, Any], arms: tuple[str, ...],
             cache: Path | None = None) -> dict[str, Any]:
    train, val, test = splits(s.data, s.sizes)
    parts = {"train": train, "val": val, "test": test}
    example = train[0][0].unsqueeze(0)
    base, base_s = make_base(s, seed, parts, cache)
    out: dict[str, Any] = {"seed": seed, "base": describe(base, example, parts, base_s)}
    logger.info("%s seed %d base: %s", name, seed, out["base"])

    cfg = growkit.GrowConfig(**{k: v for k, v in grow_kwargs.items() if k in set(growkit.GrowConfig.field_names())})

    def finetune_arm(seconds: float) -> dict[str, Any]:
        setup = set_up_run(base, loader(train, seed), loader(val, None), example_input=example)
        ft = finetune_for(base, setup, cfg, seconds)
        return describe(ft.model, example, parts, ft.seconds, steps=ft.steps)

    for a in (a for a in arms if a in RESIZE_ARMS):
        t = time.perf_counter()
        r = growkit.grow(base, loader(train, seed), loader(val, None), seed=seed,
                         **{**grow_kwargs, "method": RESIZE_ARMS[a]})
        out[a] = describe(r.model, example, parts, time.perf_counter() - t, returned_base=not r.plan.grown)
        out[f"finetune@{a}"] = finetune_arm(out[a]["wall_s"])
    if not set(arms) & set(ARMS):
        out["loadavg_1min_at_end"] = os.getloadavg()[0]
        return out
    t = time.perf_counter()
    res = growkit.grow(base, loader(train, seed), loader(val, None), seed=seed, **grow_kwargs)
    wall = time.perf_counter() - t
    plan = largest_plan(res)
    out["grow"] = describe(res.model, example, parts, wall, returned_base=not res.plan.edits,
                           grown_points=0 if plan is None else len(plan.edits))
    logger.info("%s seed %d grow: %s", name, seed, out["grow"])
    if "finetune" in arms:
        out["finetune"] = finetune_arm(wall)
    if "random_edges" in arms:
        t = time.perf_counter()
        r = growkit.grow(base, loader(train, seed), loader(val, None), seed=seed, **{**grow_kwargs, "selection": "random"})
        out["random_edges"] = describe(r.model, example, parts, time.perf_counter() - t)
    if "random_points" in arms:
        out["random_points"] = random_points_arm(base, plan, parts, seed, wall, cfg, example)
    if "wider" in arms:
        out["wider"] = wider_arm(base, plan, s, parts, seed, base_s + wall, example)
    out["loadavg_1min_at_end"] = os.getloadavg()[0]  # other work on the machine while the arms ran
    for a in shown_arms(arms):
        if a in out:
            logger.info("%s seed %d %s: test %.4f params %d wall %.1f", name, seed, a, out[a]["test_acc"],
                        out[a]["params"], out[a]["wall_s"])
    return out


def t_test_p(diffs: list[float]) -> float | None:
    if len(diffs) < 2 or statistics.stdev(diffs) == 0:
        return None
    from scipy.stats import ttest_1samp  # scipy comes with scikit-learn

    return float(ttest_1samp(diffs, 0.0).pvalue)


def summarize(runs: list[dict[str, Any]], arms: tuple[str, ...]) -> dict[str, Any]:
    s: dict[str, Any] = {}
    for a in ("base",) + shown_arms(arms):
        xs = [r[a]["test_acc"] for r in runs if a in r]
        if not xs:
            continue
        s[a] = {"test_acc": statistics.mean(xs), "test_acc_std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
                "per_seed": xs, "train_acc": statistics.mean(r[a]["train_acc"] for r in runs),
                "params": statistics.mean(r[a]["params"] for r in runs),
                "flops": statistics.mean(r[a]["flops"] for r in runs),
                "wall_s": statistics.mean(r[a]["wall_s"] for r in runs)}
    for a, b in pairs(arms):
        if a in s and b in s:
            d = [r[a]["test_acc"] - r[b]["test_acc"] for r in runs]
            s[f"{a}-{b}"] = {"per_seed": d, "mean": statistics.mean(d),
                             "std": statistics.stdev(d) if len(d) > 1 else 0.0, "p": t_test_p(d),
                             "wins": sum(x > 0 for x in d)}
    s["returned_base"] = {a: sum(bool(r[a].get("returned_base")) for r in runs)
                          for a in ("grow",) + tuple(RESIZE_ARMS) if a in s}
    s["loadavg"] = statistics.mean(r.get("loadavg_1min_at_end", float("nan")) for r in runs)
    return s


def _pct(m: float, sd: float) -> str:
    return f"{100 * m:.2f} ± {100 * sd:.2f}"


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [f"# Growth at scale: grow() defaults vs fine-tuning at equal wall-clock ({meta['threads']} thread(s), "
             f"{meta['device']}, torch {meta['torch']}, {meta['date']})", "",
             f"grow() settings: `{json.dumps(meta['grow_kwargs'])}` over the defaults. Seeds: {meta['seeds']}. "
             "TEST accuracy, mean ± sd over seeds; paired differences are per seed (first arm − second), p from a "
             "two-sided one-sample t-test. See benchmarks/grow_at_scale_protocol.md.", ""]
    for name, block in result["settings"].items():
        s = block["summary"]
        lines += [f"## {name}", "", "| arm | test acc % | train acc % | params | MFLOPs | wall s |", "|---|---|---|---|---|---|"]
        for a in ("base",) + shown_arms(tuple(result["meta"]["arms"])):
            if a in s:
                r = s[a]
                lines.append(f"| {a} | {_pct(r['test_acc'], r['test_acc_std'])} | {100 * r['train_acc']:.2f} | "
                             f"{r['params']:,.0f} | {r['flops'] / 1e6:.1f} | {r['wall_s']:.1f} |")
        lines += ["", "| paired difference | mean ± sd (points) | first arm wins | p |", "|---|---|---|---|"]
        for a, b in pairs(tuple(result["meta"]["arms"])):
            d = s.get(f"{a}-{b}")
            if d:
                p = "-" if d["p"] is None else ("< 0.001" if d["p"] < 0.001 else f"{d['p']:.3f}")
                lines.append(f"| {a} − {b} | {100 * d['mean']:+.2f} ± {100 * d['std']:.2f} | "
                             f"{d['wins']}/{len(d['per_seed'])} | {p} |")
        div = sum(bool(r.get("wider", {}).get("diverged")) for r in block["runs"])
        lines += ["", f"Seeds: {[r['seed'] for r in block['runs']]}."
                      + (f" The wider arm's from-scratch training diverged (NaN) in {div} seed(s); it scores as "
                         "a constant prediction there." if div else "")]
        returned = ", ".join(f"{a} {n} of {len(block['runs'])}" for a, n in s["returned_base"].items())
        lines += ["", f"Returned the base (nothing grown beat it on validation): {returned} seeds. "
                      "Base train accuracy per seed: "
                      f"{', '.join(format(100 * r['base']['train_acc'], '.1f') for r in block['runs'])} %. "
                      f"1-minute load average at the end of a seed: {s['loadavg']:.2f} (2 cores).", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], prefix: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for name, block in result["settings"].items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, a in enumerate(shown_arms(tuple(result["meta"]["arms"]))):
            pts = [(r[a]["wall_s"], 100 * r[a]["test_acc"]) for r in block["runs"] if a in r]
            if a == "wider":
                pts = [(w - r["base"]["wall_s"], acc) for (w, acc), r in zip(pts, block["runs"])]
            base_acc = [100 * r["base"]["test_acc"] for r in block["runs"]]
            for (w, acc), b0 in zip(pts, base_acc):
                if a != "wider":
                    ax.plot([0, w], [b0, acc], color=f"C{i}", alpha=0.25, lw=1)
            ax.scatter([w for w, _ in pts], [acc for _, acc in pts], color=f"C{i}", label=a, s=18)
        ax.scatter([0] * len(block["runs"]), [100 * r["base"]["test_acc"] for r in block["runs"]], color="k",
                   marker="x", label="base")
        ax.set_xlabel("wall-clock after the base (s; wider: beyond the base's training time)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(name)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = prefix.parent / f"{prefix.name}_{name.replace('/', '_').replace('->', '_to_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path))
    return files


def merge(paths: list[Path], out: Path) -> int:
    """One result from the JSON of runs over disjoint settings with the same meta (seeds, arms, kwargs)."""
    parts = [json.loads(p.read_text()) for p in paths]
    keys = ("arms", "grow_kwargs", "threads", "batch", "quick")
    if any({k: r["meta"][k] for k in keys} != {k: parts[0]["meta"][k] for k in keys} for r in parts):
        raise SystemExit("--merge: the runs differ in arms, grow settings, threads or batch")
    result = {"meta": {**parts[0]["meta"], "processes": len(parts), "dates": [r["meta"]["date"] for r in parts]},
              "settings": {}}
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in parts:
        for name, block in r["settings"].items():
            runs.setdefault(name, []).extend(block["runs"])
            result["settings"].setdefault(name, {"setting": block["setting"]})
    for name, rs in runs.items():
        seeds = [r["seed"] for r in rs]
        if len(set(seeds)) != len(seeds):
            raise SystemExit(f"--merge: {name} has seed(s) twice")
        rs.sort(key=lambda r: r["seed"])
        result["settings"][name].update(runs=rs, summary=summarize(rs, tuple(parts[0]["meta"]["arms"])))
    result["meta"]["seeds"] = sorted({r["seed"] for rs in runs.values() for r in rs})
    out.parent.mkdir(parents=True, exist_ok=True)
    result["meta"]["plots"] = plot(result, out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--arms", default=",".join(ARMS), help=f"any of {','.join(ALL_ARMS)}")
    p.add_argument("--grow-kwargs", default="{}", help="JSON: grow() arguments over its defaults")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny sizes and 1 base epoch: a smoke run")
    p.add_argument("--out", default=str(RESULTS / "grow_at_scale"))
    p.add_argument("--merge", nargs="+", type=Path, default=None,
                   help="JSON results of runs of disjoint settings (e.g. run as two processes): write one result")
    p.add_argument("--base-cache", type=Path, default=None,
                   help="directory to keep trained bases in and reuse them from (pilots; not for the reported run)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.merge:
        return merge(args.merge, Path(args.out))
    torch.set_num_threads(args.threads)
    grow_kwargs = json.loads(args.grow_kwargs)
    arms = tuple(a for a in args.arms.split(",") if a)
    if set(arms) - set(ALL_ARMS):
        raise SystemExit(f"--arms: unknown {sorted(set(arms) - set(ALL_ARMS))}; choose from {','.join(ALL_ARMS)}")
    seeds = [int(x) for x in args.seeds.split(",")]
    settings = {n: SETTINGS[n] for n in args.settings.split(",")}
    if args.quick:
        settings = {n: Setting(**{**asdict(s), "base_epochs": 1, "sizes": (256, 128, 128)}) for n, s in settings.items()}
        grow_kwargs.setdefault("rounds", 1)
    result: dict[str, Any] = {
        "meta": {"threads": torch.get_num_threads(), "device": "cpu", "torch": torch.__version__,
                 "timm": timm.__version__, "machine": platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
                 "seeds": seeds, "arms": list(arms), "grow_kwargs": grow_kwargs, "batch": BATCH, "quick": args.quick, "base_cache": args.base_cache is not None},
        "settings": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name, s in settings.items():
        runs = []
        for seed in seeds:
            runs.append(run_seed(name, s, seed, grow_kwargs, arms, args.base_cache))
            result["settings"][name] = {"setting": asdict(s), "runs": runs, "summary": summarize(runs, arms)}
            out.with_suffix(".json").write_text(json.dumps(result, indent=1))  # partial results survive a stop
    out.with_suffix(".md").write_text(markdown(result))
    result["meta"]["plots"] = plot(result, out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
