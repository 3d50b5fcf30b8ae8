"""The ``growkit`` command line."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

import torch

from .errors import GrowkitError

__all__ = ["main"]


def _cmd_trace(args: argparse.Namespace) -> int:
    from .graph import trace
    from .modelspec import create_model, default_input_size

    kwargs = {"num_classes": args.num_classes} if args.num_classes else {}
    model = create_model(args.model, **kwargs)
    size = tuple(args.input_size) if args.input_size else default_input_size(model) or (3, 224, 224)
    lg = trace(model, torch.randn(1, *size))
    if args.json:
        import json

        print(json.dumps(lg.to_dict(), indent=2))
    else:
        print(lg)
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
    t.set_defaults(func=_cmd_trace)
    for extra in _extra_commands:
        extra(sub)
    return p


_extra_commands: list = []


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
        print(f"growkit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
