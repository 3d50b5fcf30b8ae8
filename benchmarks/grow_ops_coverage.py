#!/usr/bin/env python
"""Width and depth growth over every timm family representative and the torchvision zoo.

For each model of ``benchmarks/results/coverage.json`` (the 88 timm family representatives, up to
60M parameters) or ``coverage_torchvision.json`` (``--source torchvision``; ``--max-params``
keeps the smaller ones), in its own subprocess (timeout guard):

* ``widen``: ``growkit.widen(model, x, ratio=1.25, init="split")`` over every group that widens
  exactly (the others are skipped with a reason), then the output compared with the original's
  (eval mode, max |diff| <= 1e-5 x max |y|), then ONNX export + onnxruntime parity
  (``growkit.export_onnx``, TorchScript exporter, batch sizes 1 and 3).
* ``deepen``: ``growkit.deepen(model, x, block="copy")`` at every point where a copy fits (else
  ``block="identity"`` everywhere); output compared with ``torch.equal``; then the new blocks are
  switched on (gates eta = 0.1, zero projections randomised) so the export carries them, and ONNX
  parity as above.

A model counts as exact for an op when the op grew something, the output matched, and ONNX parity
held. Writes ``benchmarks/results/grow_ops_coverage[_torchvision].{json,md}``.

    python benchmarks/grow_ops_coverage.py [--source timm|torchvision] [--models a,b] [--timeout 900]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
RTOL = 1e-5
OPS = ("widen", "deepen")


def _short(text: Any, n: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _rel(a: Any, b: Any) -> float:
    import torch
    from torch.utils._pytree import tree_flatten

    fa, fb = tree_flatten(a)[0], tree_flatten(b)[0]
    worst = 0.0
    for x, y in zip(fa, fb):
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape:
                return float("inf")
            scale = float(y.abs().max()) if y.numel() else 0.0
            worst = max(worst, float((x - y).abs().max()) / max(scale, 1e-12) if x.numel() else 0.0)
    return worst


def _export(model: Any, x: tuple[Any, ...], res: dict[str, Any], op: str) -> None:
    import growkit

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gk_ops_") as tmp:
        # TorchScript first (much faster on CPU); torch's dynamo exporter where it fails (ViTs).
        try:
            rep = growkit.export_onnx(model, Path(tmp) / "m.onnx", x, check=False, exporter="torchscript")
        except growkit.ExportError as exc:
            res[f"{op}_torchscript_reason"] = _short(exc, 200)
            rep = growkit.export_onnx(model, Path(tmp) / "m.onnx", x, check=False, exporter="dynamo")
    res[f"{op}_exporter"] = rep.exporter
    res[f"{op}_onnx_rel"] = rep.max_rel_diff
    res[f"{op}_onnx"] = bool(rep.passed)
    res[f"{op}_export_s"] = round(time.perf_counter() - t0, 2)


def widen_stage(model: Any, x: tuple[Any, ...], eager: Any, res: dict[str, Any], dump: Any) -> None:
    import growkit
    from growkit.core.widen import REPORT_KEY

    import torch

    stage = "widen"
    try:
        t0 = time.perf_counter()
        w = growkit.widen(model, x, ratio=1.25, init="split", seed=0)
        res["widen_s"] = round(time.perf_counter() - t0, 2)
        rep = w.meta[REPORT_KEY]
        res["widen_groups"] = len(rep["widened"])
        res["widen_layer_norm_groups"] = len(rep.get("layer_norm", []))
        res["widen_skipped"] = len(rep["skipped"])
        res["widen_skip_reasons"] = dict(Counter(_short(re.sub(r"^[\w.]+: ", "", v), 120)
                                                 for v in rep["skipped"].values()).most_common(4))
        n0, n1 = (sum(p.numel() for p in m.parameters()) for m in (model, w))
        res["widen_param_ratio"] = round(n1 / n0, 3)
        w.eval()
        with torch.no_grad():
            res["widen_rel"] = _rel(w(*x), eager)
        res["widen_exact"] = res["widen_rel"] <= RTOL
        if not res["widen_exact"]:
            res["widen"] = "inexact"
            return
        dump()
        stage = "widen export"
        _export(w, x, res, "widen")
        res["widen"] = "ok" if res["widen_onnx"] else "parity_fail"
    except Exception as exc:  # noqa: BLE001 - every failure is a row of the table
        res["widen"] = "error" if stage == "widen" else "export_error"
        res["widen_reason"] = _short(f"{type(exc).__name__}: {exc}")


def deepen_stage(model: Any, x: tuple[Any, ...], eager: Any, res: dict[str, Any], dump: Any) -> None:
    import growkit
    from growkit.core.deepen import DEPTH, GatedBlock, IdentityBlock

    import torch

    stage = "deepen"
    try:
        t0 = time.perf_counter()
        try:
            d = growkit.deepen(model, x, block="copy")
            res["deepen_block"] = "copy"
        except growkit.InputError as exc:
            res["deepen_copy_reason"] = _short(exc, 200)
            d = growkit.deepen(model, x, block="identity")
            res["deepen_block"] = "identity"
        res["deepen_s"] = round(time.perf_counter() - t0, 2)
        rep = d.meta["growkit_deepen_report"]
        res["deepen_blocks"] = len(rep["deepened"])
        res["deepen_skipped"] = len(rep["skipped"])
        d.eval()
        with torch.no_grad():
            res["deepen_exact"] = bool(growkit.core.graph.outputs_equal(d(*x), eager))
        if not res["deepen_exact"]:
            res["deepen"] = "inexact"
            return
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for b in getattr(d, DEPTH).values():
                if isinstance(b, GatedBlock):
                    b.eta.fill_(0.1)
                elif isinstance(b, IdentityBlock):
                    b.proj.weight.copy_(0.01 * torch.randn(b.proj.weight.shape, generator=g))
            res["deepen_changes_output"] = not growkit.core.graph.outputs_equal(d(*x), eager)
        dump()
        stage = "deepen export"
        _export(d, x, res, "deepen")
        res["deepen"] = "ok" if res["deepen_onnx"] else "parity_fail"
    except Exception as exc:  # noqa: BLE001
        res["deepen"] = "error" if stage == "deepen" else "export_error"
        res["deepen_reason"] = _short(f"{type(exc).__name__}: {exc}")


def worker(name: str, source: str, out: Path, threads: int, ops: tuple[str, ...] = OPS) -> None:
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(HERE))
    from trace_coverage import make_model

    res: dict[str, Any] = {"model": name, "ops": list(ops), **{op: "timeout" for op in ops}}

    def dump() -> None:
        out.write_text(json.dumps(res))

    dump()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model, x, _note = make_model(source, name)
    model.eval()
    res["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 3)
    res["input_size"] = list(x[0].shape[1:])
    with torch.no_grad():
        eager = model(*x)
    if "widen" in ops:
        widen_stage(model, x, eager, res, dump)
        dump()
    if "deepen" in ops:
        deepen_stage(model, x, eager, res, dump)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    dump()


def run_one(name: str, source: str, timeout: float, threads: int, ops: tuple[str, ...] = OPS) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gk_opscov_") as tmp:
        out = Path(tmp) / "r.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(HERE.parent)}
        cmd = [sys.executable, __file__, "--worker", name, "--source", source, "--out", str(out),
               "--threads", str(threads), "--ops", ",".join(ops)]
        try:
            p = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
            err = p.stderr[-1500:] if p.returncode else ""
        except subprocess.TimeoutExpired:
            err = f"timeout after {timeout:.0f} s"
        res = json.loads(out.read_text()) if out.exists() else {"model": name, "ops": list(ops),
                                                                **{op: "timeout" for op in ops}}
        if err:
            res["worker_error"] = _short(err, 600)
            for op in ops:
                if res.get(op) == "timeout":
                    res[op] = "timeout" if err.startswith("timeout") else "crash"
        return res


def selection(source: str, max_params: float) -> list[dict[str, Any]]:
    src = RESULTS / ("coverage.json" if source == "timm" else "coverage_torchvision.json")
    rows = json.loads(src.read_text())["models"]
    out = []
    for r in rows:
        if not r.get("model"):
            continue
        if source == "torchvision" and (r.get("params_m") or 0) > max_params:
            continue
        out.append({"family": r.get("family", r["model"]), "model": r["model"]})
    return out


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any], summary: dict[str, Any]) -> str:
    lines = [f"# Width / depth growth coverage ({meta['source']})", "",
             f"{meta['date']}, torch {meta['torch']}, timm {meta['timm']}, {meta['threads']} thread(s), "
             f"timeout {meta['timeout_s']:.0f} s per model, {meta['wall_s']:.0f} s in all"
             + (f" ({meta['note']})" if meta.get("note") else "") + ".", "",
             "`widen`: `growkit.widen(model, x, ratio=1.25, init='split')` over every group that widens exactly; "
             f"output within {RTOL:g} relative (eval); ONNX (TorchScript exporter, dynamo where it fails) parity with onnxruntime. "
             "`deepen`: `growkit.deepen(model, x, block='copy')` (identity blocks where no copy fits), "
             "`torch.equal`; then the new blocks switched on and ONNX parity.", "",
             f"**widen exact + ONNX parity: {summary['widen_ok']} / {summary['models']}; "
             f"deepen exact + ONNX parity: {summary['deepen_ok']} / {summary['models']}.**", "",
             f"widen statuses: {summary['widen_counts']}; deepen statuses: {summary['deepen_counts']}", "",
             (f"Not run (out of time): {len(summary['not_run'])} of {summary['selection']}: "
              f"{', '.join(summary['not_run'])}." if summary.get("not_run") else
              f"All {summary['selection']} models of the selection run."), "",
             "`LN groups`: widened groups normalised by LayerNorm, which take LEMON's average expansion (exact by "
             "construction; the same output check applies). Rows marked * had their widen columns re-run "
             "(`rerun` in the JSON) after that expansion landed; their deepen columns are from the earlier run.", "",
             "| family | model | params M | widen | groups widened / skipped | LN groups | params x | widen rel diff | "
             "widen ONNX rel | deepen | block | blocks | deepen ONNX rel | why not / skipped because |",
             "|---|---|---:|---|---|---:|---:|---:|---:|---|---|---:|---:|---|"]

    def f(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.2g}"
        return "" if v is None else str(v)

    for r in rows:
        why = []
        for op in ("widen", "deepen"):
            if r.get(f"{op}_reason"):
                why.append(f"{op}: {r[f'{op}_reason']}")
        if r.get("worker_error") and (r.get("widen") in ("crash", "timeout") or r.get("deepen") in ("crash", "timeout")):
            why.append(_short(r["worker_error"], 200))
        if r.get("widen_skip_reasons"):
            why.append("skipped: " + "; ".join(f"{k} (x{v})" for k, v in r["widen_skip_reasons"].items()))
        why_s = " / ".join(why).replace("|", "\\|")
        lines.append(
            f"| {r.get('family', '')} | {r['model']}{'*' if r.get('rerun') else ''} | {f(r.get('params_m'))} | "
            f"{r.get('widen')} | {f(r.get('widen_groups'))} / {f(r.get('widen_skipped'))} | "
            f"{f(r.get('widen_layer_norm_groups'))} | {f(r.get('widen_param_ratio'))} | "
            f"{f(r.get('widen_rel'))} | {f(r.get('widen_onnx_rel'))} | {r.get('deepen')} | {f(r.get('deepen_block'))} | "
            f"{f(r.get('deepen_blocks'))} | {f(r.get('deepen_onnx_rel'))} | {why_s} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default="timm", choices=("timm", "torchvision"))
    ap.add_argument("--models", default=None, help="comma-separated model names (default: the whole selection)")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-params", type=float, default=60.0, help="torchvision: largest model in M params")
    ap.add_argument("--out", default=None)
    ap.add_argument("--merge", default=None, help="comma-separated partial / result JSON files of runs over parts of "
                    "the selection (run in parallel with --models): write the combined results")
    ap.add_argument("--ops", default="widen,deepen", help="which of widen,deepen to run; with --merge, a file "
                    "whose rows ran fewer ops updates only those ops' columns of the rows before it")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    ops = tuple(o for o in args.ops.split(",") if o)
    if not ops or set(ops) - set(OPS):
        ap.error(f"--ops: a subset of {','.join(OPS)}")
    if args.worker:
        worker(args.worker, args.source, Path(args.out), args.threads, ops)
        return 0
    import timm
    import torch

    sel = selection(args.source, args.max_params)
    if args.models:
        wanted = set(args.models.split(","))
        sel = [s for s in sel if s["model"] in wanted]
    stem = "grow_ops_coverage" + ("" if args.source == "timm" else f"_{args.source}")
    out = Path(args.out) if args.out else RESULTS / stem
    done: dict[str, dict[str, Any]] = {}
    part = out.with_suffix(".partial.json")
    if part.exists():
        done = {r["model"]: r for r in json.loads(part.read_text())}
    t0 = time.perf_counter()
    merged_wall = 0.0
    for f in (args.merge.split(",") if args.merge else []):
        d = json.loads(Path(f).read_text())
        rows_f = d["models"] if isinstance(d, dict) else d
        merged_wall += float(d["meta"]["wall_s"]) if isinstance(d, dict) else 0.0
        for r in rows_f:
            ran = tuple(r.get("ops") or OPS)
            if r["model"] in done and ran != OPS:  # a re-run of some ops: replace only their columns
                old = {k: v for k, v in done[r["model"]].items() if not any(k.startswith(op) for op in ran)}
                new = {k: v for k, v in r.items() if any(k.startswith(op) for op in ran) or k == "worker_error"}
                done[r["model"]] = {**old, **new, "rerun": {op: Path(f).name for op in ran}}
            else:
                done[r["model"]] = r
    for i, s in enumerate(sel):
        if s["model"] in done or args.merge:
            continue
        r = run_one(s["model"], args.source, args.timeout, args.threads, ops)
        r["family"] = s["family"]
        done[s["model"]] = r
        part.write_text(json.dumps(list(done.values())))
        print(f"[{i + 1}/{len(sel)}] {s['model']}: widen {r.get('widen')} ({r.get('widen_groups')} groups), "
              f"deepen {r.get('deepen')} ({r.get('deepen_blocks')} blocks) {r.get('wall_s')} s", flush=True)
    rows = [done[s["model"]] for s in sel if s["model"] in done]
    missing = [s["model"] for s in sel if s["model"] not in done]
    summary = {"selection": len(sel), "not_run": missing, "models": len(rows),
               "widen_ok": sum(r.get("widen") == "ok" for r in rows),
               "deepen_ok": sum(r.get("deepen") == "ok" for r in rows),
               "widen_counts": dict(Counter(r.get("widen") for r in rows)),
               "deepen_counts": dict(Counter(r.get("deepen") for r in rows))}
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "source": args.source,
            "torch": torch.__version__, "timm": timm.__version__, "threads": args.threads,
            "timeout_s": args.timeout, "wall_s": time.perf_counter() - t0 + merged_wall, "rtol": RTOL,
            "max_params_m": args.max_params if args.source == "torchvision" else 60.0,
            "partial": args.models is not None, "merged_from": args.merge}
    if args.merge:
        meta["wall_s"] = sum(float(r.get("wall_s") or 0.0) for r in rows)
        meta["note"] = ("merged from runs over parts of the selection in parallel processes (1 thread each); wall_s is "
                        "the sum of the models' own times")
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary, "models": rows}, indent=1))
    out.with_suffix(".md").write_text(markdown(rows, meta, summary))
    if not args.models:
        part.unlink(missing_ok=True)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
