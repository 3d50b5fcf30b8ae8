#!/usr/bin/env python
"""Trace -> inject -> finalize -> ONNX export -> onnxruntime parity over every timm family.

The trace coverage benchmark with every growth stage switched on (``--stages grow``): for the
smallest model of each timm family up to 60M parameters, candidates are injected (exactness
checked with torch.equal), alphas randomised, finalized (exactness at eta = 0 checked), eta set to
0.1 so the branches are live, and the grown model exported to ONNX and compared with onnxruntime
at batch sizes 1 and 3. Writes ``benchmarks/results/coverage.{json,md}``.

    python benchmarks/coverage.py [--families resnet,vit] [--timeout 600]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trace_coverage import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--timeout" not in " ".join(argv):
        argv = ["--timeout", "600", *argv]
    sys.exit(main(["--stages", "grow", *argv]))
