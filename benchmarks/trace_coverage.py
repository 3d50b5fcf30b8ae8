#!/usr/bin/env python
"""How much of timm does ``growkit.trace`` cover?

For every timm model family (``timm.list_modules()``) one representative is picked: the smallest
model of the family (parameter count measured on the ``meta`` device, so nothing is allocated)
with at most ``--max-params`` million parameters. Each representative is then created for real
(``pretrained=False``, CPU, float32) and run through:

* ``growkit.trace(model, x)`` with ``x`` a batch-1 random input of the model's
  ``pretrained_cfg["input_size"]``. growkit traces with torch.fx and checks that the traced module
  reproduces the eager output exactly; the result's growth points, skipped blocks and point
  layouts (nchw / nhwc / tokens) are recorded, or the error class and message when it fails:

  ``ok``            traced, exact
  ``trace_error``   ``growkit.TraceError`` (fx cannot trace it, or the trace is not exact)
  ``input_error``   ``growkit.InputError`` (the model rejects the example input)
  ``create_error``  ``timm.create_model`` failed
  ``other_error``   any other exception, or the worker process died
  ``timeout``       the model took longer than ``--timeout`` seconds

* a reference: timm's own fx setup (``torch.fx.Tracer`` with timm's notrace modules as leaves and
  its notrace functions autowrapped, model in eval mode) and ``torch.equal`` against eager.
  ``timm_fx`` is ``ok`` / ``fail`` (``n/a`` when the model could not be created or run eagerly).
  A model that is ``ok`` here but not with growkit points at a growkit bug.

Each model runs in its own subprocess (timeout guard, no memory growth across models). The family
-> representative selection is cached in ``<out>/trace_coverage_models.json`` (rebuild it with
``--refresh``). Results go to ``<out>/trace_coverage.json`` and ``<out>/trace_coverage.md``.

Usage::

    python benchmarks/trace_coverage.py                       # all families
    python benchmarks/trace_coverage.py --families resnet,vit --timeout 60
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

logger = logging.getLogger("trace_coverage")

MODELS_CACHE = "trace_coverage_models.json"
REASON_CHARS = 300
FULL_ERROR_CHARS = 4000
STATUSES = ("ok", "trace_error", "input_error", "create_error", "other_error", "timeout")


def _short(text: str, n: int = REASON_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _exc_text(exc: BaseException) -> str:
    """The exception message; prefixed by its class unless it is a growkit error."""
    msg = str(exc)
    if type(exc).__module__.startswith("growkit"):
        return msg
    return f"{type(exc).__name__}: {msg}"


# ----------------------------------------------------------------------------------------------
# model selection (meta device, cached)


def count_params_meta(name: str) -> int:
    """Parameter count of timm model ``name`` built on the meta device (nothing allocated)."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    return int(sum(p.numel() for p in model.parameters()))


def count_family(family: str) -> dict[str, Any]:
    """``{"params": {model: n}, "errors": {model: reason}}`` for every model of ``family``."""
    import timm

    params: dict[str, int] = {}
    errors: dict[str, str] = {}
    for name in timm.list_models(module=family):
        try:
            params[name] = count_params_meta(name)
        except Exception as exc:  # noqa: BLE001 - any failure is recorded, not fatal
            errors[name] = _short(_exc_text(exc))
            logger.debug("meta creation of %s failed: %s", name, errors[name])
    return {"params": params, "errors": errors}


def load_counts(path: Path, families: list[str], refresh: bool) -> dict[str, dict[str, Any]]:
    """Per-family parameter counts, from the cache where possible; the cache is updated."""
    import timm
    import torch
    from tqdm import tqdm

    cache: dict[str, Any] = {}
    if path.exists() and not refresh:
        try:
            cache = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            logger.warning("ignoring unreadable cache %s: %s", path, exc)
        if cache.get("timm_version") != timm.__version__ or cache.get("torch_version") != torch.__version__:
            logger.info("cache %s was built with other versions; rebuilding", path)
            cache = {}
    counts: dict[str, dict[str, Any]] = dict(cache.get("families", {}))
    todo = [f for f in families if f not in counts]
    if todo:
        logger.info("counting parameters on the meta device for %d families", len(todo))
        for family in tqdm(todo, desc="meta param counts", unit="family", file=sys.stderr):
            counts[family] = count_family(family)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "timm_version": timm.__version__,
            "torch_version": torch.__version__,
            "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "families": dict(sorted(counts.items())),
        }
        path.write_text(json.dumps(payload, indent=1) + "\n")
        logger.info("wrote %s", path)
    return {f: counts[f] for f in families}


def select_models(counts: dict[str, dict[str, Any]], max_params: float) -> list[dict[str, Any]]:
    """One row per family: the smallest model with at most ``max_params`` million parameters."""
    rows = []
    limit = max_params * 1e6
    for family, c in sorted(counts.items()):
        params: dict[str, int] = c["params"]
        fits = sorted((n, name) for name, n in params.items() if n <= limit)
        meta_errors = c.get("errors", {})
        if fits:
            n, name = fits[0]
            rows.append({"family": family, "model": name, "meta_params_m": round(n / 1e6, 3),
                         "meta_errors": len(meta_errors)})
        else:
            if params:
                why = f"no model <= {max_params:g}M (smallest {min(params.values()) / 1e6:.1f}M)"
            elif meta_errors:
                why = f"no model could be created on meta ({len(meta_errors)} tried): " + next(
                    iter(meta_errors.values()))
            else:
                why = "family lists no models"
            rows.append({"family": family, "model": None, "meta_params_m": None,
                         "meta_errors": len(meta_errors), "reason": _short(why)})
    return rows


# ----------------------------------------------------------------------------------------------
# per-model worker (runs in a subprocess)


def _outputs_equal(a: Any, b: Any) -> bool:
    import torch
    from torch.utils._pytree import tree_flatten

    fa, sa = tree_flatten(a)
    fb, sb = tree_flatten(b)
    if sa != sb or len(fa) != len(fb):
        return False
    for x, y in zip(fa, fb):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x, y):
                return False
        elif isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor) or x != y:
            return False
    return True


def timm_fx_reference(model: Any, x: Any, source: str = "timm") -> tuple[str, str]:
    """Trace ``model`` (eval mode) the way timm's fx helpers do (plain ``torch.fx`` for other
    sources); ``("ok"|"fail", reason)``."""
    import torch
    import torch.fx
    from timm.layers._fx import get_notrace_functions, get_notrace_modules

    x = x if isinstance(x, tuple) else (x,)
    leaves = tuple(m for m in get_notrace_modules() if isinstance(m, type)) if source == "timm" else ()

    class TimmTracer(torch.fx.Tracer):
        def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
            if isinstance(m, leaves):
                return True
            return super().is_leaf_module(m, module_qualified_name)

    model.eval()
    try:
        tracer = TimmTracer(autowrap_functions=tuple(get_notrace_functions()) if source == "timm" else ())
        graph = tracer.trace(model)
        gm = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
        gm.eval()
        with torch.no_grad():
            eager = model(*x)
            traced = gm(*x)
    except Exception as exc:  # noqa: BLE001
        return "fail", _short(_exc_text(exc))
    if not _outputs_equal(traced, eager):
        return "fail", "traced output differs from eager (torch.equal)"
    return "ok", ""


def grow_stages(model: Any, x: tuple[Any, ...], res: dict[str, Any], dump: Any, exporter: str = "auto") -> None:
    """inject -> exact? -> randomised alphas -> finalize -> exact? -> eta = 0.1 -> ONNX + onnxruntime.

    ``x``: the model's positional inputs (a tuple).

    ``res["grow"]`` ends as ``ok`` or ``<stage>_error`` / ``<stage>_inexact`` with a reason.
    """
    import torch

    import growkit

    stage = "inject"
    res["grow"] = "timeout"
    dump()
    try:
        model.eval()
        with torch.no_grad():
            eager = model(*x)
        t0 = time.perf_counter()
        cm = growkit.inject(model, x)
        res["candidates"] = len(cm.candidates)
        cm.eval()
        with torch.no_grad():
            res["inject_exact"] = _outputs_equal(cm(*x), eager)
        if not res["inject_exact"]:
            res["grow"], res["grow_reason"] = "inject_inexact", "output with candidates differs (torch.equal)"
            return
        stage = "finalize"
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for c in cm.candidates.values():
                c.alpha.copy_(torch.randn(c.alpha.shape, generator=gen))
        grown = growkit.finalize(cm)
        grown.eval()
        with torch.no_grad():
            res["finalize_exact"] = _outputs_equal(grown(*x), eager)
        if not res["finalize_exact"]:
            res["grow"], res["grow_reason"] = "finalize_inexact", "grown output at eta=0 differs (torch.equal)"
            return
        res["grown_branches"] = len(growkit.plan_of(grown).edits)
        res["grow_s"] = round(time.perf_counter() - t0, 3)
        # The candidate model holds a full copy of the weights: free it before the exporter makes
        # its own copies (the 645M-parameter regnet_y_128gf was OOM-killed during export with it).
        del cm
        gc.collect()
        with torch.no_grad():
            for b in grown.growkit_branches.values():
                b.eta.fill_(0.1)
            res["eta_changes_output"] = not _outputs_equal(grown(*x), eager)
        dump()
        stage = "export"
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="gk_onnx_") as tmp:
            rep = growkit.export_onnx(grown, Path(tmp) / "m.onnx", x, check=False, exporter=exporter)
        res.update(exporter=rep.exporter, onnx_max_abs=rep.max_abs_diff, onnx_max_rel=rep.max_rel_diff,
                   onnx_parity=rep.passed, export_s=round(time.perf_counter() - t0, 2))
        if rep.fallback_reason:
            res["dynamo_reason"] = _short(rep.fallback_reason)
        res["grow"] = "ok" if rep.passed else "parity_fail"
        if not rep.passed:
            res["grow_reason"] = f"onnxruntime differs: max abs {rep.max_abs_diff:.3g}, rel {rep.max_rel_diff:.3g}"
    except Exception as exc:  # noqa: BLE001
        res["grow"] = f"{stage}_error"
        res["grow_reason"] = _short(_exc_text(exc))
        res["grow_error_full"] = _exc_text(exc)[:FULL_ERROR_CHARS]
    if res["grow"] in ("export_error", "parity_fail"):
        # Attribute the failure: does the torch exporter handle the original (ungrown) model?
        dump()
        try:
            with tempfile.TemporaryDirectory(prefix="gk_onnx_") as tmp:
                rep = growkit.export_onnx(model.eval(), Path(tmp) / "orig.onnx", x, check=False, exporter=exporter)
            res["orig_export"] = "ok" if rep.passed else "parity_fail"
        except Exception as exc:  # noqa: BLE001
            res["orig_export"] = "error"
            res["orig_export_reason"] = _short(_exc_text(exc))


TV_SIZES = (32, 64, 96, 128, 160, 224, 299)


def torchvision_model(name: str) -> tuple[Any, tuple[Any, ...], str]:
    """torchvision classifier ``name`` (``weights=None``) and the smallest input it accepts.

    ViTs are built with ``image_size`` = two patches (their position embedding fixes the size);
    the others are probed at :data:`TV_SIZES` (eval mode) and the first size that runs is used.
    """
    import torch
    import torchvision

    kwargs: dict[str, Any] = {"weights": None}
    sizes: tuple[int, ...] = TV_SIZES
    if name.startswith("vit_"):
        patch = int(name.rsplit("_", 1)[1])
        kwargs["image_size"] = sizes_one = 2 * patch
        sizes = (sizes_one,)
    model = torchvision.models.get_model(name, **kwargs)
    model.eval()
    why = ""
    for s in sizes:
        x = torch.randn(1, 3, s, s)
        try:
            with torch.no_grad():
                model(x)
        except Exception as exc:  # noqa: BLE001 - too small for this architecture: try the next size
            why = _short(_exc_text(exc), 200)
            continue
        note = f"image_size={s} (position embedding for 2x2 patches)" if "image_size" in kwargs else f"{s}px probed"
        return model, (x,), note
    raise ValueError(f"no input size in {sizes} runs: {why}")


def torchvision_params(name: str) -> float:
    """Parameter count torchvision records for ``name``'s weights (no download); inf if none."""
    from torchvision.models import get_model_weights

    try:
        return float(max(w.meta.get("num_params", 0) for w in get_model_weights(name)))
    except (ValueError, KeyError):
        return float("inf")


def make_model(source: str, name: str) -> tuple[Any, tuple[Any, ...], str]:
    """(model, positional inputs, how the input was chosen) for a timm / torchvision / zoo name."""
    import torch

    if source == "torchvision":
        return torchvision_model(name)
    if source == "zoo":
        root = str(Path(__file__).resolve().parents[1])
        if root not in sys.path:
            sys.path.insert(0, root)
        from tests.zoo import build

        model, args = build(name, in_chans=3, size=32)
        return model, args, "3x32x32 (zoo)"
    import timm

    model = timm.create_model(name, pretrained=False)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    input_size = tuple(int(s) for s in cfg.get("input_size", (3, 224, 224)))
    torch.manual_seed(0)
    return model, (torch.randn(1, *input_size, dtype=torch.float32),), "pretrained_cfg input_size"


def run_worker(name: str, out_path: Path, threads: int, stages: str = "trace", source: str = "timm",
               exporter: str = "auto") -> None:
    """Create ``name``, run growkit.trace and the fx reference; write JSON to ``out_path``.

    The JSON is rewritten after each phase, so a timeout in a later phase keeps earlier results.
    """
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(threads)
    import growkit
    from growkit.core.dualgraph import DualGraphModule

    res: dict[str, Any] = {"model": name, "status": "other_error", "timm_fx": "n/a"}

    def dump() -> None:
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(res))
        os.replace(tmp, out_path)

    res["status"] = "timeout"  # what the parent reports if creation never returns
    res["phase"] = "model creation"
    dump()
    try:
        torch.manual_seed(0)
        model, x, input_note = make_model(source, name)
    except Exception as exc:  # noqa: BLE001
        res.update(status="create_error", reason=_short(_exc_text(exc)),
                   error_full=_exc_text(exc)[:FULL_ERROR_CHARS])
        res.pop("phase", None)
        dump()
        return
    res["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 3)
    res["input_size"] = list(x[0].shape[1:])
    if len(x) > 1:
        res["inputs"] = len(x)
    res["input_note"] = input_note
    res["phase"] = "growkit.trace"
    dump()

    t0 = time.perf_counter()
    try:
        lg = growkit.trace(model, x)
        res.pop("phase", None)
    except growkit.TraceError as exc:
        res["status"] = "trace_error"
        err: BaseException | None = exc
    except growkit.InputError as exc:
        res["status"] = "input_error"
        err = exc
    except Exception as exc:  # noqa: BLE001
        res["status"] = "other_error"
        err = exc
    else:
        err = None
        res.update(
            status="ok",
            points=len(lg.points),
            skipped=len(lg.skipped),
            layouts=sorted({p.layout for p in lg.points}),
            granularity=lg.granularity,
            dual_graph=isinstance(lg.graph_module, DualGraphModule),
            skipped_reasons=dict(Counter(lg.skipped.values()).most_common(5)),
        )
    res["trace_s"] = round(time.perf_counter() - t0, 3)
    res.pop("phase", None)
    if err is not None:
        res["reason"] = _short(_exc_text(err))
        res["error_full"] = _exc_text(err)[:FULL_ERROR_CHARS]
    if stages == "grow":
        res["grow"] = "not run"
        if res["status"] == "ok":
            grow_stages(model, x, res, dump, exporter)
        dump()

    res["timm_fx"] = "timeout"
    dump()

    if res["status"] == "input_error":
        res["timm_fx"] = "n/a"
    else:
        res["timm_fx"], fx_reason = timm_fx_reference(model, x, source)
        if fx_reason:
            res["timm_fx_reason"] = fx_reason
    dump()


# ----------------------------------------------------------------------------------------------
# driver


def run_one(name: str, timeout: float, threads: int, stages: str = "trace", source: str = "timm",
            exporter: str = "auto") -> dict[str, Any]:
    """Run :func:`run_worker` for ``name`` in a fresh interpreter; never raises."""
    with tempfile.TemporaryDirectory(prefix="trace_cov_") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--worker-out", str(out),
               "--threads", str(threads), "--stages", stages, "--source", source, "--exporter", exporter]
        t0 = time.perf_counter()
        timed_out = False
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            rc, stderr = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as exc:
            timed_out, rc = True, None
            stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        wall = round(time.perf_counter() - t0, 2)
        res: dict[str, Any] = {"model": name, "timm_fx": "n/a"}
        if out.exists():
            try:
                res = json.loads(out.read_text())
            except json.JSONDecodeError:
                pass
    res["wall_s"] = wall
    if timed_out:
        if res.get("status") in (None, "timeout"):
            phase = res.pop("phase", None) or ("growkit.trace" if res.get("status") else "model creation")
            res["status"] = "timeout"
            res["reason"] = f"no result within {timeout:g} s ({phase} phase)"
        if res.get("timm_fx") == "timeout":
            res["timm_fx_reason"] = f"no result within {timeout:g} s"
        if res.get("grow") == "timeout":
            res["grow_reason"] = f"no result within {timeout:g} s"
    elif rc != 0 or res.get("status") == "timeout":
        tail = (stderr or "").strip().splitlines()[-3:]
        res["status"] = "other_error" if res.get("status") in (None, "timeout") else res["status"]
        if res.get("timm_fx") == "timeout":
            res["timm_fx"], res["timm_fx_reason"] = "fail", f"worker exited with code {rc}"
        res.setdefault("reason", _short(f"worker exited with code {rc}: " + " | ".join(tail)))
    return res


def summarise(rows: list[dict[str, Any]], n_families: int) -> dict[str, Any]:
    """Summary counts over the per-model rows."""
    reps = [r for r in rows if r.get("model")]
    ok = [r for r in reps if r.get("status") == "ok"]
    status = Counter(r.get("status") for r in reps)
    out = {
        "families": n_families,
        "families_without_model": sum(1 for r in rows if not r.get("model")),
        "representatives": len(reps),
        "growkit_ok": len(ok),
        "growkit_with_points": sum(1 for r in ok if r.get("points", 0) > 0),
        "timm_fx_ok": sum(1 for r in reps if r.get("timm_fx") == "ok"),
        "timm_fx_ok_growkit_fails": sorted(
            r["model"] for r in reps if r.get("timm_fx") == "ok" and r.get("status") != "ok"),
        "status_counts": {s: status[s] for s in STATUSES if status[s]},
        "layouts": dict(Counter(lay for r in ok for lay in r.get("layouts", []))),
    }
    if any("grow" in r for r in reps):
        grow = Counter(r.get("grow") for r in reps if r.get("status") == "ok")
        out.update(
            grow_counts=dict(grow),
            inject_exact=sum(1 for r in reps if r.get("inject_exact")),
            finalize_exact=sum(1 for r in reps if r.get("finalize_exact")),
            exported=sum(1 for r in reps if r.get("exporter")),
            exported_dynamo=sum(1 for r in reps if r.get("exporter") == "dynamo"),
            onnx_parity=sum(1 for r in reps if r.get("onnx_parity")),
            grown_ok=grow.get("ok", 0),
            export_fail_original_also=sorted(r["model"] for r in reps if r.get("orig_export") in ("error", "parity_fail")),
            export_fail_original_ok=sorted(r["model"] for r in reps if r.get("orig_export") == "ok"),
        )
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, list):
        return ",".join(map(str, v))
    return str(v).replace("|", "\\|")


def markdown(rows: list[dict[str, Any]], summary: dict[str, Any], meta: dict[str, Any]) -> str:
    """Markdown report: header, summary, one table row per family."""
    s = summary
    source = meta.get("source", "timm")
    if source == "torchvision":
        what = (f"torchvision {meta.get('torchvision_version', '?')}: every classification model of "
                "`torchvision.models.list_models(module=torchvision.models)`, `weights=None`, batch-1 float32 "
                "input of the smallest size that runs (probed from 32 px up; ViTs built with `image_size` = 2 "
                "patches; the size used is in the input column)")
    elif source == "zoo":
        what = "the user-style modules of tests/zoo.py, batch-1 float32 3x32x32 inputs"
    else:
        what = (f"smallest model per family with <= {meta['max_params_m']:g}M params, "
                "batch-1 float32 input of `pretrained_cfg['input_size']`")
    lines = [
        f"# growkit coverage over {source}" + (" (trace, grow, ONNX)" if "grow_counts" in s else " (trace)"),
        "",
        f"torch {meta['torch_version']}, timm {meta['timm_version']}, growkit {meta['growkit_version']}, "
        f"{meta['date']}; {what}; CPU, {meta['threads']} torch thread(s) per model process, "
        f"timeout {meta['timeout_s']:g} s per model.",
        "",
        (f"**Summary:** {s['families']} families, {s['representatives']} representatives "
         f"({s['families_without_model']} families without a model <= {meta['max_params_m']:g}M); "
         if source == "timm" else f"**Summary:** {s['representatives']} models; ")
        +
        f"growkit traced ok: {s['growkit_ok']}; with >= 1 growth point: {s['growkit_with_points']}; "
        f"{'timm-fx' if source == 'timm' else 'plain-fx'} reference ok: {s['timm_fx_ok']}; "
        "failures by reason: "
        + (", ".join(f"{k} {v}" for k, v in s["status_counts"].items() if k != "ok") or "none")
        + ".",
        "",
    ]
    if meta.get("resumed_from"):
        lines += [
            f"Resumed run: rows not re-run here are from the run of {meta['resumed_from']}"
            + (f"; re-run with this code: {', '.join(meta['rerun'])}" if meta.get("rerun") else "") + ".",
            "",
        ]
    if "grow_counts" in s:
        lines += [
            f"**Growth stages** (trace -> inject -> finalize with randomised alphas -> eta = 0.1 -> "
            f"ONNX -> onnxruntime at batch 1 and 3, tolerance 1e-4 + 1e-3 max|y|): of {s['growkit_ok']} "
            f"traced, inject exact {s['inject_exact']}, finalize exact {s['finalize_exact']}, exported "
            f"{s['exported']} ({s['exported_dynamo']} by the dynamo exporter), onnxruntime parity "
            f"{s['onnx_parity']}; all stages ok: {s['grown_ok']}. Outcomes: "
            + ", ".join(f"{k} {v}" for k, v in sorted(s["grow_counts"].items(), key=lambda kv: str(kv[0])))
            + ".",
            "",
            "Export failures where the torch exporter also fails on the original (ungrown) model: "
            + (", ".join(s["export_fail_original_also"]) or "none")
            + "; where the original exports but the grown model does not (a growkit problem): "
            + (", ".join(s["export_fail_original_ok"]) or "none") + ".",
            "",
        ]
    if s["timm_fx_ok_growkit_fails"]:
        lines += [f"**timm-fx ok but growkit fails:** {', '.join(s['timm_fx_ok_growkit_fails'])}", ""]
    grow_cols = "grow_counts" in s
    head = ["family", "model", "params (M)", "status", "points", "skipped", "layouts", "trace s",
            "timm_fx" if source == "timm" else "plain fx"]
    if source != "timm":
        head[5:5] = ["input", "granularity", "train/eval graphs"]
    if grow_cols:
        head += ["candidates", "inject exact", "finalize exact", "exporter", "onnx max rel", "grow"]
    head += ["reason"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" for _ in head) + "|")
    for r in sorted(rows, key=lambda r: (r["family"], r.get("model") or "")):
        if not r.get("model"):
            cells = [r["family"], "-", "", "-", "", "", "", "", ""] + [""] * (6 if grow_cols else 0) + [r.get("reason", "")]
            if source != "timm":
                cells[5:5] = ["", "", ""]
        else:
            reason = r.get("reason", "")
            if r.get("grow_reason"):
                reason = (reason + " " if reason else "") + f"[grow: {_short(r['grow_reason'], 200)}]"
            if r.get("orig_export"):
                reason += f" [original model export: {r['orig_export']} {_short(r.get('orig_export_reason', ''), 150)}]"
            if r.get("timm_fx_reason") and r.get("timm_fx") != "ok":
                reason = (reason + " " if reason else "") + f"[timm_fx: {_short(r['timm_fx_reason'], 150)}]"
            cells = [r["family"], f"`{r['model']}`", r.get("params_m", r.get("meta_params_m")),
                     r.get("status"), r.get("points"), r.get("skipped"), r.get("layouts"),
                     r.get("trace_s"), r.get("timm_fx")]
            if source != "timm":
                size = r.get("input_size")
                cells[5:5] = ["x".join(map(str, size)) if size else "", r.get("granularity"),
                              "dual" if r.get("dual_graph") else ("one" if r.get("status") == "ok" else "")]
            if grow_cols:
                rel = r.get("onnx_max_rel")
                cells += [r.get("candidates"), r.get("inject_exact"), r.get("finalize_exact"), r.get("exporter"),
                          f"{rel:.2g}" if isinstance(rel, float) else rel, r.get("grow")]
            cells += [reason]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _finished(path: Path, stages: str, retry_failed: bool = False) -> dict[str, dict[str, Any]]:
    """Per-model results of an earlier run that completed every requested stage (and passed them,
    with ``retry_failed``)."""
    if not path.is_file():
        return {}
    rows = json.loads(path.read_text()).get("models", [])
    keys = ("family", "model", "meta_params_m", "meta_errors")
    done = {}
    for r in rows:
        if not r.get("model") or r.get("status") in (None, "pending", "timeout"):
            continue
        if stages == "grow" and r.get("status") == "ok" and r.get("grow") in (None, "timeout"):
            continue
        if retry_failed and (r.get("status") != "ok" or (stages == "grow" and r.get("grow") != "ok")):
            continue
        done[r["model"]] = {k: v for k, v in r.items() if k not in keys}
    return done


def results_stem(args: argparse.Namespace) -> str:
    """``coverage`` / ``trace_coverage``, suffixed ``_torchvision`` / ``_zoo`` for those sources."""
    stem = "coverage" if args.stages == "grow" else "trace_coverage"
    return stem if args.source == "timm" else f"{stem}_{args.source}"


def write_results(results: dict[str, dict[str, Any]], selection: list[dict[str, Any]],
                  args: argparse.Namespace, out_dir: Path, t_start: float, final: bool) -> str:
    """Write the JSON and markdown reports; called after every model so a stopped run keeps its rows."""
    import timm
    import torch

    import growkit

    rows = []
    for sel in selection:
        row = dict(sel)
        if sel["model"]:
            row.update(results.get(sel["model"], {"status": "pending", "reason": "not run yet"}))
        if row.get("model") and row.get("status") == "pending":
            continue
        rows.append(row)
    summary = summarise(rows, len(selection))
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "growkit_version": getattr(growkit, "__version__", "?"),
        "python": sys.version.split()[0],
        "max_params_m": args.max_params,
        "timeout_s": args.timeout,
        "threads": args.threads,
        "families_arg": args.families or None,
        "limit": args.limit or None,
        "source": args.source,
        "exporter": args.exporter,
        "resumed_from": getattr(args, "resumed_from", None),
        "rerun": [m.strip() for m in args.rerun.split(",") if m.strip()] or None,
        "complete": final,
        "models_done": len(results),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    stem = results_stem(args)
    if args.source == "torchvision":
        import torchvision

        meta["torchvision_version"] = torchvision.__version__
    results_json, results_md = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    results_json.write_text(json.dumps({"meta": meta, "summary": summary, "models": rows}, indent=1) + "\n")
    md = markdown(rows, summary, meta)
    if not final:
        pending = [r["model"] for r in selection if r["model"] and r["model"] not in results]
        md = (f"**Partial run: {len(results)} of {sum(1 for r in selection if r['model'])} models done.** "
              f"Not run yet: {', '.join(pending) or 'none'}.\n\n" + md)
    results_md.write_text(md)
    return md


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-params", type=float, default=60.0, help="max parameters, millions (60)")
    p.add_argument("--families", default="", help="comma-separated timm modules to restrict to")
    p.add_argument("--limit", type=int, default=0, help="only the first N selected families (0: all)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per model (120)")
    p.add_argument("--out", default="benchmarks/results", help="output folder")
    p.add_argument("--refresh", action="store_true", help="rebuild the cached model selection")
    p.add_argument("--jobs", type=int, default=1, help="models run in parallel (1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per model process (1)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--stages", choices=("trace", "grow"), default="trace",
                   help="trace only, or also inject -> finalize -> ONNX export -> onnxruntime parity")
    p.add_argument("--resume", action="store_true",
                   help="keep the finished models of an earlier (stopped) run in --out and run only the rest")
    p.add_argument("--retry-failed", action="store_true", help="with --resume: also re-run models that failed")
    p.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default="auto",
                   help="ONNX exporter for the grow stages (auto: dynamo, TorchScript if it fails)")
    p.add_argument("--report-only", action="store_true",
                   help="with --resume: run nothing, rewrite the reports from the results file (e.g. after merging)")
    p.add_argument("--rerun", default="", help="with --resume: comma-separated models to run again even if done")
    p.add_argument("--source", choices=("timm", "torchvision", "zoo"), default="timm",
                   help="timm families (default), every torchvision classification model, or tests/zoo.py")
    p.add_argument("--smallest-first", action="store_true",
                   help="torchvision: run models in order of parameter count (most models per hour)")
    p.add_argument("--models", default="", help="torchvision / zoo: comma-separated model names to restrict to")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.worker:
        run_worker(args.worker, Path(args.worker_out), args.threads, args.stages, args.source, args.exporter)
        return 0

    warnings.filterwarnings("ignore")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.source != "timm":
        selection = other_selection(args.source, args.models)
        if selection is None:
            return 2
        todo = list(selection)
        if args.smallest_first and args.source == "torchvision":
            todo.sort(key=lambda r: torchvision_params(r["model"]))
        logger.info("%d %s models to run", len(todo), args.source)
    else:
        selection, todo = timm_selection(args, out_dir)
        if selection is None:
            return 2
    return run_all(args, out_dir, selection, todo)


def other_selection(source: str, models: str) -> list[dict[str, Any]] | None:
    """One row per torchvision classification model / zoo entry (``family`` = the model name)."""
    if source == "torchvision":
        import torchvision

        names = torchvision.models.list_models(module=torchvision.models)
    else:
        root = str(Path(__file__).resolve().parents[1])
        if root not in sys.path:
            sys.path.insert(0, root)
        from tests.zoo import ZOO

        names = list(ZOO)
    if models:
        wanted = [m.strip() for m in models.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in names]
        if unknown:
            logger.error("unknown %s models %s; known: %s", source, unknown, ", ".join(names))
            return None
        names = wanted
    return [{"family": n, "model": n, "meta_params_m": None, "meta_errors": 0} for n in names]


def timm_selection(args: argparse.Namespace, out_dir: Path) -> tuple[list[dict[str, Any]] | None, list[dict[str, Any]]]:
    """The timm family representatives (selection rows, rows to run)."""
    import timm

    all_families = timm.list_modules()
    families = all_families
    if args.families:
        wanted = [f.strip() for f in args.families.split(",") if f.strip()]
        unknown = [f for f in wanted if f not in all_families]
        if unknown:
            logger.error("unknown timm families %s; known: %s", unknown, ", ".join(all_families))
            return None, []
        families = wanted
    if args.limit:
        families = families[: args.limit]

    counts = load_counts(out_dir / MODELS_CACHE, families, args.refresh)
    selection = select_models(counts, args.max_params)
    todo = [r for r in selection if r["model"]]
    logger.info("%d families, %d representatives to trace", len(selection), len(todo))
    return selection, todo


def run_all(args: argparse.Namespace, out_dir: Path, selection: list[dict[str, Any]], todo: list[dict[str, Any]]) -> int:
    """Run every row of ``todo`` in its own worker process; write the reports after each."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    results: dict[str, dict[str, Any]] = {}
    if args.resume:
        prev = out_dir / f"{results_stem(args)}.json"
        results = _finished(prev, args.stages, args.retry_failed)
        if prev.is_file():
            args.resumed_from = json.loads(prev.read_text()).get("meta", {}).get("resumed_from") or json.loads(
                prev.read_text()).get("meta", {}).get("date")
        for name in (m.strip() for m in args.rerun.split(",") if m.strip()):
            results.pop(name, None)
        logger.info("resuming: %d models already done", len(results))
        todo = [r for r in todo if r["model"] not in results]
    t_start = time.perf_counter()
    if args.report_only:
        md = write_results(results, selection, args, out_dir, t_start, final=not todo)
        print(md)
        return 0
    with logging_redirect_tqdm(), tqdm(total=len(todo), desc="trace", unit="model", file=sys.stderr) as bar:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = {r["model"]: pool.submit(run_one, r["model"], args.timeout, args.threads, args.stages, args.source,
                                               args.exporter)
                       for r in todo}
            # Rows are written in submission order; with --jobs > 1 later models may finish first.
            for r in todo:
                res = futures[r["model"]].result()
                results[r["model"]] = res
                write_results(results, selection, args, out_dir, t_start, final=False)
                bar.set_postfix_str(f"{r['model']}: {res.get('status')}")
                bar.update(1)
                if res.get("status") != "ok":
                    logger.info("%s (%s): %s - %s", r["model"], r["family"], res.get("status"),
                                _short(res.get("reason", ""), 160))

    md = write_results(results, selection, args, out_dir, t_start, final=True)
    logger.info("wrote results under %s", out_dir)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
