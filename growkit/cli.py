"""The ``growkit`` command line."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

import torch

from .errors import GrowkitError, InputError
from .core.ops import ops_from_text
from .core.tie import TIES

__all__ = ["main"]


def _cmd_trace(args: argparse.Namespace) -> int:
    from .core.graph import trace
    from .modelspec import create_model, default_input_size

    kwargs = {"num_classes": args.num_classes} if args.num_classes else {}
    model = create_model(args.model, **kwargs)
    size = tuple(args.input_size) if args.input_size else default_input_size(model) or (3, 224, 224)
    lg = trace(model, torch.randn(1, *size), granularity=args.granularity, points=args.points or None)
    if args.json:
        import json

        print(json.dumps(lg.to_dict(), indent=2))
    else:
        print(lg)
    return 0


def _load_data(spec: str, size: int | None):
    from . import data as gdata

    kind, _, path = spec.partition(":")
    if kind == "digits":
        return gdata.digits_dataset(size or 16), None
    if kind in ("mnist", "kmnist"):
        fn = gdata.mnist_dataset if kind == "mnist" else gdata.kmnist_dataset
        return fn(path or None, size), None
    if kind == "imagefolder":
        root = Path(path)
        if (root / "train").is_dir():
            val = root / "val" if (root / "val").is_dir() else None
            return gdata.image_folder(root / "train", size or 224), (
                gdata.image_folder(val, size or 224, train=False) if val else None
            )
        return gdata.image_folder(root, size or 224), None
    raise InputError(f"--data {spec!r}: use digits, mnist[:ROOT], kmnist[:ROOT] or imagefolder:PATH")


def _load_checkpoint(model, path: str) -> None:
    if not Path(path).is_file():
        raise InputError(f"--checkpoint {path}: no such file; pass the trained weights (.safetensors, or a "
                         "torch state dict saved with torch.save)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    try:
        model.load_state_dict(sd)
    except RuntimeError as exc:
        raise InputError(f"checkpoint {path} does not fit the model: {exc}") from exc


def _method_options(text: str | None) -> dict:
    import json

    if not text:
        return {}
    try:
        opts = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"--method-options must be a JSON object, e.g. '{{\"samples\": 8}}': {exc}") from exc
    if not isinstance(opts, dict):
        raise InputError("--method-options must be a JSON object, e.g. '{\"samples\": 8}'")
    return opts


def _cmd_grow(args: argparse.Namespace) -> int:
    from . import data as gdata

    from .core.cost import Budget
    from .growth.grow import grow
    from .io import save
    from .modelspec import create_model
    from .growth.methods import get_method
    from .train import train_steps

    options = _method_options(args.method_options)
    get_method(args.method, **options)  # an unknown pass or option fails now, not after base training
    if not args.checkpoint and args.base_epochs is None:
        # Growing an untrained network and reporting chance -> trained as a gain says nothing.
        raise InputError("growkit grow needs a trained base model: pass --checkpoint FILE (its trained weights) or "
                         "--base-epochs N to train it on --data first (--base-epochs 0 grows it untrained, as it is)")
    if args.base_epochs is not None and args.base_epochs < 0:
        raise InputError(f"--base-epochs must be >= 0, got {args.base_epochs}")
    out = Path(args.out)
    if not args.resume and out.exists() and (not out.is_dir() or any(out.iterdir())):
        # The run writes checkpoints, the model and reports there: never over someone's files.
        from .checkpoint import LATEST

        if (out / LATEST).is_file():
            raise InputError(f"--out {out} holds the checkpoints of an earlier run: add --resume to continue it, "
                             "or choose a new directory")
        raise InputError(f"--out {out} exists and is not an empty directory; choose a new directory")
    ds, val_ds = _load_data(args.data, args.image_size)
    x0 = ds[0][0]
    model = create_model(args.model, num_classes=args.num_classes, in_chans=int(x0.shape[0]))
    if val_ds is None:
        n = len(ds)
        n_val = max(1, int(0.15 * n))
        train_ds, val_ds = gdata.split(ds, [n - n_val, n_val], seed=args.seed)
    else:
        train_ds = ds
    train_l, val_l = gdata.make_loaders([train_ds, val_ds], args.batch_size, seed=args.seed)
    torch.manual_seed(args.seed)
    if args.checkpoint:
        _load_checkpoint(model, args.checkpoint)
    elif args.base_epochs:
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
        steps = args.base_epochs * len(train_l)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        train_steps(model, train_l, opt, epochs=args.base_epochs, scheduler=sched, progress=True, desc="base")
    res = grow(
        model, train_l, val_l, budget=Budget.parse(args.budget) if args.budget else None, rounds=args.rounds,
        search_epochs=args.search_epochs, finetune_epochs=args.finetune_epochs, lr=args.lr, seed=args.seed,
        checkpoint_dir=args.out, resume=args.resume, method=args.method, method_options=options, children=args.children,
        ops=ops_from_text(args.ops), tie=args.tie, compare_finetune=args.compare_finetune,
        executor="ray" if args.ray_workers else "local",
        executor_options={"num_workers": args.ray_workers, "address": args.ray_address} if args.ray_workers else None,
    )
    save(res, out, overwrite=True)  # the directory was empty: only this run's files are there
    res.plot(out / "gallery.png")
    (out / "report.md").write_text(res.report() + "\n")
    print(res.report())
    print(f"\nwrote {out}/plan.json, weights.safetensors, gallery.json, gallery.png, report.md")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    import json

    from .growth.gallery import Gallery

    path = Path(args.dir) / "gallery.json"
    if not path.is_file():
        raise InputError(f"{path} not found: point growkit report at a directory written by growkit grow / save")
    try:
        gal = Gallery.from_dict(json.loads(path.read_text())["gallery"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path} is not a gallery written by growkit grow / save ({exc})") from exc
    print(repr(gal) + "\n")
    print(gal.report())
    png = gal.plot(Path(args.dir) / "gallery.png")
    print(f"\nplot: {png}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_onnx
    from .io import load

    model = load(args.dir)
    plan = __import__("growkit").plan_of(model)
    example = plan.example_input()
    example = tuple(torch.randn(a.shape, dtype=a.dtype) for a in example)
    report = export_onnx(model, args.out, example if len(example) > 1 else example[0], opset=args.opset,
                         dynamic_batch=not args.static_batch)
    print(report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="growkit",
        description="Grow trained PyTorch models (Petridish) instead of retraining them.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    t = sub.add_parser("trace", help="trace a model and print its layer graph (growth points, inputs)")
    t.add_argument("model", help="timm:NAME (e.g. timm:resnet18) or package.module:factory")
    t.add_argument("--input-size", type=int, nargs="+", metavar="N", help="input size without batch, e.g. 3 224 224")
    t.add_argument("--num-classes", type=int, default=None)
    t.add_argument("--json", action="store_true", help="print the graph as JSON")
    t.add_argument("--granularity", choices=("block", "layer"), default="block",
                   help="growth points at block outputs (falls back to layers when none fit) or every conv/linear unit")
    t.add_argument("--points", nargs="+", metavar="NAME", help="extra growth points: module paths or fx node names")
    t.set_defaults(func=_cmd_trace)

    g = sub.add_parser("grow", help="grow a trained model on local data and write the result")
    g.add_argument("--model", required=True, help="timm:NAME or package.module:factory")
    g.add_argument("--checkpoint", help="trained weights (.safetensors, or a torch state dict loaded weights-only)")
    g.add_argument("--data", required=True, help="digits | mnist[:ROOT] | kmnist[:ROOT] | imagefolder:PATH")
    g.add_argument("--budget", default="params=1.5", help="e.g. params=1.2,flops=1.5 (ratios) or abs:params=2e6")
    g.add_argument("--out", required=True, help="output directory")
    g.add_argument("--num-classes", type=int, default=10)
    g.add_argument("--image-size", type=int, default=None)
    g.add_argument("--base-epochs", type=int, default=None,
                   help="train the base first; required when no --checkpoint is given (0: grow it untrained)")
    g.add_argument("--resume", action="store_true",
                   help="continue the interrupted run whose checkpoints are in --out (same options)")
    g.add_argument("--rounds", type=int, default=2)
    g.add_argument("--search-epochs", type=int, default=1)
    g.add_argument("--finetune-epochs", type=int, default=1)
    g.add_argument("--lr", type=float, default=0.01)
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--children", type=int, default=1, help="children grown per round (parents from the eps-hull)")
    g.add_argument("--ray-workers", type=int, default=0, help="run the children's jobs on this many Ray workers")
    g.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: a local one)")
    g.add_argument("--ops", default="default",
                   help="candidate ops: default (cheap: grow()'s default), paper (the paper's full set), wide "
                        "(paper + inverted bottlenecks), or comma-separated op names")
    g.add_argument("--method", default="petridish",
                   help="growth pass: petridish (default), darts, enas, pnas, random, evolution, or a registered one")
    g.add_argument("--compare-finetune", action="store_true",
                   help="also fine-tune the base for the time growing took and report both (costs that time again)")
    g.add_argument("--method-options", default=None, help='JSON options of the pass, e.g. \'{"samples": 8}\'')
    g.add_argument("--tie", choices=TIES, default="none",
                   help="none: grow each point on its own (macro search); stage / all: one pattern per cell type")
    g.set_defaults(func=_cmd_grow)

    r = sub.add_parser("report", help="print the gallery table of a grow output directory and plot it")
    r.add_argument("dir")
    r.set_defaults(func=_cmd_report)
    e = sub.add_parser("export", help="export a saved growkit model to ONNX, checked against onnxruntime")
    e.add_argument("dir", help="directory written by growkit grow / growkit.save")
    e.add_argument("--out", required=True, help="path of the .onnx file")
    e.add_argument("--opset", type=int, default=None)
    e.add_argument("--static-batch", action="store_true", help="export with a fixed batch size")
    e.set_defaults(func=_cmd_export)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except GrowkitError as exc:
        print(f"growkit: error: {exc.cli_message()}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path the user typed: say which, without a traceback
        print(f"growkit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
