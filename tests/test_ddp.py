"""DistributedDataParallel: candidate and grown models train like one process on the global batch.

Two CPU processes (gloo) each take half of every global batch of 8; the same steps run in this
process on the whole batch. float64 makes float rounding negligible, so parameters, buffers (BN
running statistics, candidate score buffers) and scores must agree to 1e-9. Plain DDP (per-rank
BatchNorm statistics, per-rank gradient RMS and scores) must not agree, so the comparison can fail.
"""
from __future__ import annotations

import copy
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import growkit
from growkit.core.candidates import CandidateModel
from growkit.distributed import (
    _Converted,
    convert_batchnorm,
    desync,
    new_stats_group,
    prepare_ddp,
    unused_parameters,
    unwrap,
)
from growkit.train import train_steps

from .conftest import TinyResNet

WORLD = 2
LOCAL = 4  # per-rank batch; the global batch is WORLD * LOCAL
STEPS = 3
OPS = ("sep_conv_3x3", "dil_conv_3x3", "avg_pool_3x3", "identity")  # BatchNorms in the ops and the feature norms
RTOL, ATOL = 1e-9, 1e-12


# ----------------------------------------------------------------------------------------------
# the same construction in this process and in the workers


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(STEPS, WORLD * LOCAL, 1, 8, 8, generator=g, dtype=torch.float64)
    ys = torch.randint(0, 10, (STEPS, WORLD * LOCAL), generator=g)
    return list(zip(xs, ys))


def _shard(batches, rank: int):
    return [(x[rank * LOCAL:(rank + 1) * LOCAL], y[rank * LOCAL:(rank + 1) * LOCAL]) for x, y in batches]


def _candidate_model() -> CandidateModel:
    torch.manual_seed(0)
    base = TinyResNet(widths=(4, 8)).double()
    cm = growkit.inject(base, torch.zeros(1, 1, 8, 8, dtype=torch.float64), ops=OPS, l1=1e-3, normalize_grad=True)
    return cm.double()


def _weak_learn(model: nn.Module, batches) -> None:
    """SGD on the base, Adam on the candidates (as grow() does), through growkit.train.train_steps."""
    cm = unwrap(model)
    ids = {id(p) for p in cm.candidate_parameters()}
    opts = [
        torch.optim.SGD([p for p in cm.parameters() if id(p) not in ids], lr=0.1, momentum=0.9),
        torch.optim.Adam(cm.candidate_parameters(), lr=1e-3),
    ]
    train_steps(model, batches, opts, extra_loss=cm.extra_loss)


def _finetune(model: nn.Module, batches) -> None:
    train_steps(model, batches, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))


def _grow(cm: CandidateModel) -> nn.Module:
    return growkit.finalize(cm, max_ops=2).double()


class _WithSpare(nn.Module):
    """A model with a parameter its forward never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.body = TinyResNet(widths=(4, 8))
        self.spare = nn.Linear(3, 3)

    def forward(self, x):
        return self.body(x)


def _norm_zoo() -> list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]]:
    """BatchNorm kinds growkit models contain: (name, module, global input, loss weights)."""
    from timm.layers.norm_act import BatchNormAct2d

    from growkit.core.ops import OpBatchNorm2d, feature_norm

    torch.manual_seed(2)
    g = torch.Generator().manual_seed(3)
    n = WORLD * LOCAL
    mods = [
        ("bn2d", nn.BatchNorm2d(3), (n, 3, 5, 5)),
        ("bn1d_momentum_none", nn.BatchNorm1d(3, momentum=None), (n, 3)),
        ("op_bn", OpBatchNorm2d(3), (n, 3, 4, 4)),
        ("feature_norm", feature_norm(3, "nchw"), (n, 3, 4, 4)),
        ("token_bn", feature_norm(3, "tokens"), (n, 6, 3)),
        ("timm_bn_act", BatchNormAct2d(3), (n, 3, 4, 4)),
        ("no_running_stats", nn.BatchNorm2d(3, track_running_stats=False), (n, 3, 4, 4)),
    ]
    out = []
    for name, m, shape in mods:
        m = m.double()
        if getattr(m, "weight", None) is not None:
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
        out.append((name, m, 3 + 2 * torch.randn(shape, generator=g, dtype=torch.float64),
                    torch.randn(shape, generator=g, dtype=torch.float64)))
    return out


def _norm_step(m: nn.Module, x: torch.Tensor, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Two training steps' outputs, input and parameter gradients, then the state."""
    res = {}
    for step in range(2):
        x_ = x.clone().requires_grad_(True)
        y = m.train()(x_)
        (y * w).sum().backward()
        res[f"y{step}"], res[f"dx{step}"] = y.detach(), x_.grad
    res.update({f"grad {n}": p.grad for n, p in m.named_parameters()})
    res.update({f"state {k}": v for k, v in m.state_dict().items()})
    return res


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, every buffer (persistent or not) and every candidate score."""
    m = unwrap(model)
    out = {f"param {n}": p.detach().clone() for n, p in m.named_parameters()}
    out.update({f"buffer {n}": b.detach().clone() for n, b in m.named_buffers()})
    if isinstance(m, CandidateModel):
        out.update({f"score {k}": torch.tensor(v, dtype=torch.float64) for k, v in m.scores().items()})
    return out


# ----------------------------------------------------------------------------------------------
# the workers


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    try:
        batches = _shard(_batches(), rank)
        x = batches[0][0]
        res: dict = {}

        # each BatchNorm kind on its own: outputs, input gradients, running statistics
        res["norms"] = {}
        for name, m, gx, gw in _norm_zoo():
            convert_batchnorm(m, new_stats_group())
            sl = slice(rank * LOCAL, (rank + 1) * LOCAL)
            res["norms"][name] = _norm_step(m, gx[sl], gw[sl])

        # growkit's DDP: synced BatchNorms, candidates on the stats group
        cm = _candidate_model()
        before = copy.deepcopy(cm)
        ddp = prepare_ddp(cm, probe_batch=x)
        res["find_unused"] = ddp.find_unused_parameters
        res["converted"] = sum(isinstance(m, _Converted) for m in cm.modules())
        res["bn_total"] = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in cm.modules())
        cm.eval(), before.eval()
        with torch.no_grad():
            res["eval_equal"] = torch.equal(cm(x), before(x))
        res["keys_equal"] = list(cm.state_dict()) == list(before.state_dict())
        copied = copy.deepcopy(cm)
        res["copy_plain"] = not any(isinstance(m, _Converted) for m in copied.modules()) and all(
            c.stats_group is None for c in copied.candidates.values())
        _weak_learn(ddp, batches)
        res["weak"] = _state(ddp)
        # the converted weights load into a non-distributed model
        plain = _candidate_model()
        plain.load_state_dict(cm.state_dict())
        res["loads_back"] = all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), cm.state_dict().values()))

        # a grown model (finalize copies, so it is single-process) trained under DDP again
        grown = _grow(ddp.module)
        res["grown_plain"] = not any(isinstance(m, _Converted) for m in grown.modules())
        gddp = prepare_ddp(grown, probe_batch=x)
        res["grown_find_unused"] = gddp.find_unused_parameters
        _finetune(gddp, batches)
        res["grown"] = _state(gddp)

        # an unused parameter: the probe turns find_unused_parameters on, and DDP trains
        torch.manual_seed(0)
        spare = prepare_ddp(_WithSpare().double(), probe_batch=x)
        res["spare_find_unused"] = spare.find_unused_parameters
        _finetune(spare, batches)

        # plain DDP: per-rank BatchNorm statistics and per-rank candidate statistics
        cm = _candidate_model()
        _weak_learn(DistributedDataParallel(cm), batches)
        res["plain_ddp"] = _state(cm)

        # BatchNorms synced, candidates left on their local batch
        cm = _candidate_model()
        ddp = prepare_ddp(cm, find_unused_parameters=False)
        for c in cm.candidates.values():
            c.stats_group = None
        _weak_learn(ddp, batches)
        res["local_candidates"] = _state(cm)
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    t = time.perf_counter()
    ctx = mp.start_processes(_worker, args=(str(d / "rendezvous"), str(d)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail("DDP workers did not finish within 300 s")
    runs = [torch.load(d / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    runs[0]["seconds"] = time.perf_counter() - t
    return runs


@pytest.fixture(scope="module")
def single():
    """The same steps in one process on the global batches."""
    batches = _batches()
    cm = _candidate_model()
    _weak_learn(cm, batches)
    out = {"weak": _state(cm)}
    grown = _grow(cm)
    _finetune(grown, batches)
    out["grown"] = _state(grown)
    return out


def _assert_same(got: dict, want: dict, keys=None) -> None:
    assert set(got) == set(want)
    for k in keys if keys is not None else want:
        torch.testing.assert_close(got[k], want[k], rtol=RTOL, atol=ATOL, equal_nan=True, msg=lambda m: f"{k}: {m}")


def _differs(got: dict, want: dict, keys) -> list[str]:
    return [k for k in keys if not torch.allclose(got[k], want[k], rtol=1e-6, atol=1e-9)]


# ----------------------------------------------------------------------------------------------


@pytest.mark.slow  # two spawned DDP processes (9 s); the input checks below stay in the default run
def test_weak_learning_under_ddp_equals_single_process(ddp_runs, single):
    r0, r1 = ddp_runs
    want = single["weak"]
    assert any(k.startswith("score ") for k in want) and all(v == v for k, v in want.items() if k.startswith("score "))
    assert any("running_var" in k for k in want) and any("score_sum" in k for k in want)
    _assert_same(r0["weak"], want)
    _assert_same(r1["weak"], want)
    for k in want:  # DDP keeps the replicas identical
        assert torch.equal(r0["weak"][k], r1["weak"][k]), k
    # every BatchNorm converted; eval function, state_dict keys and weights unchanged
    assert r0["converted"] == r0["bn_total"] > 10
    assert r0["eval_equal"] and r0["keys_equal"] and r0["loads_back"] and r0["copy_plain"]
    assert r0["find_unused"] is False  # the probe found a gradient for every parameter


@pytest.mark.slow  # two spawned DDP processes (9 s); the input checks below stay in the default run
def test_every_batchnorm_kind_normalises_over_the_global_batch(ddp_runs):
    """Outputs and input gradients per shard, summed parameter gradients, running statistics."""
    for name, m, x, w in _norm_zoo():
        want = _norm_step(m, x, w)
        got = [r["norms"][name] for r in ddp_runs]
        for k in want:
            if k.startswith(("y", "dx")):
                g = torch.cat([r[k] for r in got])
            elif k.startswith("grad "):
                g = sum(r[k] for r in got)  # DDP would average: these are sums of per-rank losses
            else:
                g = got[0][k]
                assert torch.equal(g, got[1][k]), (name, k)
            torch.testing.assert_close(g, want[k], rtol=RTOL, atol=ATOL, msg=lambda s: f"{name} {k}: {s}")


@pytest.mark.slow  # two spawned DDP processes (9 s); the input checks below stay in the default run
def test_grown_model_under_ddp_equals_single_process(ddp_runs, single):
    r0, r1 = ddp_runs
    assert r0["grown_plain"] and r0["grown_find_unused"] is False
    assert any("eta" in k for k in single["grown"])
    _assert_same(r0["grown"], single["grown"])
    _assert_same(r1["grown"], single["grown"])


@pytest.mark.slow  # two spawned DDP processes (9 s); the input checks below stay in the default run
def test_without_the_fixes_ddp_differs(ddp_runs, single):
    """The comparison can fail: per-rank statistics give other parameters, buffers and scores."""
    r0 = ddp_runs[0]
    want = single["weak"]
    plain = _differs(r0["plain_ddp"], want, want)
    assert any("running_mean" in k for k in plain) and any(k.startswith("param module.stem") for k in plain)
    assert any(k.startswith("score ") for k in plain)
    # BatchNorms synced but candidates on their local half: the base model matches, the
    # candidates (normalised gradient, scores) do not.
    cand = [k for k in want if "growkit_candidates" in k or k.startswith("score ")]
    base = [k for k in want if k not in cand]
    _assert_same(r0["local_candidates"], want, base)
    local = _differs(r0["local_candidates"], want, cand)
    assert any(k.endswith(".alpha") for k in local) and any(k.startswith("score ") for k in local)


def test_prepare_ddp_needs_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(growkit.InputError, match="init_process_group"):
        prepare_ddp(TinyResNet())


@pytest.mark.slow  # two spawned DDP processes (9 s); the input checks below stay in the default run
def test_unused_parameter_probe_leaves_model_and_rng_alone(ddp_runs):
    assert ddp_runs[0]["spare_find_unused"] is True and ddp_runs[1]["spare_find_unused"] is True
    torch.manual_seed(0)
    m = _WithSpare()
    x = torch.randn(4, 1, 8, 8)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    rng = torch.get_rng_state()
    assert unused_parameters(m, x) == ["spare.weight", "spare.bias"]
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in sd.items())
    assert all(p.grad is None for p in m.parameters())
    cm = growkit.inject(m.body, x[:1], ops=OPS, normalize_grad=True)
    assert unused_parameters(cm, x) == []
    assert desync(cm) is cm


class _ScaledBN(nn.BatchNorm2d):
    """A BatchNorm subclass with a forward of its own."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_conversion_keeps_eval_function_keys_and_copies_plain():
    """Bookkeeping without a process group: eval mode, state_dict keys, copies, desync, errors."""
    from growkit.distributed import convert_batchnorm, group_batch_norm, register_sync_forward

    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    for torch_sync in (False, True):  # True: nn.SyncBatchNorm, as on CUDA (its eval mode runs on CPU)
        m = TinyResNet(widths=(4, 8))
        m.train()(x)  # running statistics away from their init
        ref = copy.deepcopy(m).eval()
        bns = [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)]
        names = convert_batchnorm(m, None, torch_sync=torch_sync)
        assert len(names) == len(bns) > 0 and all(isinstance(b, _Converted) for b in bns)
        assert all(isinstance(b, nn.SyncBatchNorm) == torch_sync for b in bns)
        m.eval()
        with torch.no_grad():
            assert torch.equal(m(x), ref(x))
        assert list(m.state_dict()) == list(ref.state_dict())
        assert not any(isinstance(b, _Converted) for b in copy.deepcopy(m).modules())
        assert desync(m) is m and all(type(b) is nn.BatchNorm2d for b in bns)

    odd = nn.Sequential(nn.Conv2d(1, 2, 3), _ScaledBN(2))
    with pytest.raises(growkit.InputError, match="register_sync_forward"):
        convert_batchnorm(odd, None)
    assert type(odd[1]) is _ScaledBN  # nothing converted
    register_sync_forward(_ScaledBN, lambda bn, x, group: 2 * group_batch_norm(bn, x, group))
    convert_batchnorm(odd, None)
    assert isinstance(odd[1], _ScaledBN) and isinstance(odd[1], _Converted)
    with pytest.raises(growkit.InputError):
        register_sync_forward(nn.Linear, lambda bn, x, group: x)
