"""Parallel growth: several children per round, the Ray executor, worker failures, resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import growkit
from growkit.errors import InputError

TESTS = str(Path(__file__).resolve().parent)
KW = dict(rounds=2, children=2, seed=0, progress=False, budget=growkit.Budget(params=2.0))


def _same_gallery(a: growkit.GrowResult, b: growkit.GrowResult) -> None:
    """Equal in structure (ids, parents, rounds, plans, costs) and in every weight and metric."""
    assert len(a.gallery) == len(b.gallery)
    for x, y in zip(a.gallery, b.gallery):
        assert (x.id, x.parent, x.round, x.kind, x.plan, x.cost.params, x.cost.flops) == \
            (y.id, y.parent, y.round, y.kind, y.plan, y.cost.params, y.cost.flops)
        assert x.val_error == y.val_error and x.val_loss == y.val_loss
        assert x.state.keys() == y.state.keys() and all(torch.equal(x.state[k], y.state[k]) for k in x.state)
    assert [e.id for e in a.gallery.hull()] == [e.id for e in b.gallery.hull()]


class KillWorkerOnce:
    """Cross entropy that SIGKILLs the Ray worker process running it, the first time only.

    Never kills the test process itself; the marker file makes the kill happen once overall.
    """

    def __init__(self, marker: str, driver_pid: int) -> None:
        self.marker, self.driver_pid = marker, driver_pid

    def __call__(self, out, y):
        if os.getpid() != self.driver_pid and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.nn.functional.cross_entropy(out, y)


class KillWorkerAlways(KillWorkerOnce):
    """SIGKILLs every Ray worker that runs it."""

    def __call__(self, out, y):
        if os.getpid() != self.driver_pid:
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.nn.functional.cross_entropy(out, y)


class Interrupt(Exception):
    pass


class StopAfter:
    """Cross entropy that raises :class:`Interrupt` at its ``n``-th call (a crash mid-round)."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def __call__(self, out, y):
        self.calls += 1
        if self.calls == self.n:
            raise Interrupt
        return torch.nn.functional.cross_entropy(out, y)


@pytest.fixture(scope="module")
def local_result(trained, digits):
    train_l, val_l = digits
    return growkit.grow(trained, train_l, val_l, **KW)


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    # Workers import the test models (conftest) and this module's loss functions by reference.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}})
    yield ray
    ray.shutdown()


def test_local_children_schedule(local_result, trained):
    res = local_result
    assert [e.round for e in res.gallery] == [0, 1, 1, 2, 2]
    assert [h["child"] for h in res.history[:-1]] == [0, 1, 0, 1]
    # Both children of round 1 grow from the base: it is the only entry when the round is drawn.
    assert [e.parent for e in res.gallery][1:3] == [0, 0]
    for e in res.gallery:
        if e.kind == "grown":
            m = growkit.apply_plan(trained, e.plan)
            assert growkit.core.cost.count_params(m) == e.cost.params
    assert res.history[-1]["executor"] == "local"


@pytest.mark.slow  # Ray start-up: see README (slow tests)
def test_ray_executor_gallery_equals_local(ray_local, local_result, trained, digits):
    train_l, val_l = digits
    res = growkit.grow(trained, train_l, val_l, executor="ray", executor_options={"num_workers": 2}, **KW)
    _same_gallery(res, local_result)
    tail = res.history[-1]
    assert tail["executor"] == "ray" and tail["jobs"] == 8 and tail["retries"] == 0 and tail["dropped"] == 0
    x = torch.randn(4, 1, 16, 16)
    res.model.eval()
    local_result.model.eval()
    with torch.no_grad():
        assert torch.equal(res.model(x), local_result.model(x))


@pytest.mark.slow  # Ray start-up: see README (slow tests)
def test_ray_killed_worker_is_retried_and_loses_nothing(ray_local, local_result, trained, digits, tmp_path):
    train_l, val_l = digits
    marker = tmp_path / "killed"
    res = growkit.grow(trained, train_l, val_l, executor="ray",
                       executor_options={"num_workers": 2, "max_retries": 1},
                       loss_fn=KillWorkerOnce(str(marker), os.getpid()), checkpoint_dir=tmp_path / "run", **KW)
    assert marker.exists()  # a worker really was killed
    tail = res.history[-1]
    assert tail["retries"] == 1 and tail["dropped"] == 0 and tail["workers_started"] == 3
    # The retried job starts from its seed again: the very same gallery as without the failure.
    _same_gallery(res, local_result)
    saved = json.loads((tmp_path / "run" / "gallery.json").read_text())
    assert len(saved["gallery"]["entries"]) == len(res.gallery)


@pytest.mark.slow  # Ray start-up: see README (slow tests)
def test_ray_child_dropped_after_retries_keeps_gallery(ray_local, trained, digits, tmp_path):
    train_l, val_l = digits
    res = growkit.grow(trained, train_l, val_l, executor="ray", rounds=1, children=2, seed=0, progress=False,
                       executor_options={"num_workers": 2, "max_retries": 0},
                       loss_fn=KillWorkerAlways(str(tmp_path / "m"), os.getpid()), checkpoint_dir=tmp_path / "run")
    assert [e.kind for e in res.gallery] == ["base"]
    notes = [h["note"] for h in res.history[:-1]]
    assert len(notes) == 2 and all(n.startswith("dropped: its worker died in the weak job (1 attempt)") for n in notes)
    assert res.history[-1]["dropped"] == 2
    saved = json.loads((tmp_path / "run" / "gallery.json").read_text())
    assert [d["kind"] for d in saved["gallery"]["entries"]] == ["base"]


class FailInWorker(KillWorkerOnce):
    """Raises in Ray workers only (the driver evaluates the base with it first)."""

    def __call__(self, out, y):
        if os.getpid() != self.driver_pid:
            raise TypeError("loss got not a tensor")
        return torch.nn.functional.cross_entropy(out, y)


@pytest.mark.slow  # Ray start-up: see README (slow tests)
def test_ray_job_exception_is_raised(ray_local, trained, digits):
    train_l, val_l = digits
    with pytest.raises(TypeError, match="not a tensor"):
        growkit.grow(trained, train_l, val_l, executor="ray", rounds=1, children=1, progress=False,
                     loss_fn=FailInWorker("", os.getpid()), executor_options={"num_workers": 1})


@pytest.mark.slow  # Ray start-up: see README (slow tests)
def test_ray_workers_that_cannot_start_raise_resource_error(ray_local, trained, digits):
    train_l, val_l = digits
    with pytest.raises(growkit.ResourceError, match="did not start within 3 s"):
        growkit.grow(trained, train_l, val_l, executor="ray", rounds=1, progress=False,
                     executor_options={"num_workers": 1, "num_cpus": 3, "start_timeout_s": 3})


@pytest.mark.slow  # Ray start-up: see README (slow tests)
def test_ray_existing_cluster_address(trained, digits, tmp_path):
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    port = 26379 + os.getpid() % 1000
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
    ray_cli = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false"],
                   check=True, env=env, capture_output=True)
    try:
        train_l, val_l = digits
        res = growkit.grow(trained, train_l, val_l, executor="ray", rounds=1, children=2, seed=0, progress=False,
                           executor_options={"address": f"127.0.0.1:{port}", "num_workers": 2})
        ref = growkit.grow(trained, train_l, val_l, rounds=1, children=2, seed=0, progress=False)
        _same_gallery(res, ref)
        assert not ray.is_initialized()  # growkit joined the cluster and left it again
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True)


# mid_child (a crash inside a child's epoch) stays in the default run: it covers resume end to end.
@pytest.mark.parametrize("where", [pytest.param("between_children", marks=pytest.mark.slow), "mid_child"])
def test_local_children_resume_mid_round(trained, digits, tmp_path, where):
    train_l, val_l = digits
    # One round is enough: both crash points lie in round 1 (a second round only repeats the work).
    kw = dict(rounds=1, children=2, seed=0, progress=False, search_epochs=2, finetune_epochs=1)
    ref = growkit.grow(trained, train_l, val_l, **kw)
    evals, per_child = len(val_l), 2 * len(train_l) + len(train_l) + len(val_l)
    # Loss calls: base evaluation, child 0, then child 1's weak-learning batches. Crash in child 1's
    # first epoch (last checkpoint: child 0 done) or in its second (last: child 1's first epoch).
    at = evals + per_child + (3 if where == "between_children" else len(train_l) + 3)
    with pytest.raises(Interrupt):
        growkit.grow(trained, train_l, val_l, loss_fn=StopAfter(at), checkpoint_dir=tmp_path, **kw)
    got = growkit.checkpoint.CheckpointDir(tmp_path).read()
    assert got is not None
    prog = got[0]["progress"]
    assert (prog["round"], prog["done"]) == (1, [0])
    if where == "between_children":
        assert prog["phase"] == "jobs" and "job" not in prog
    else:
        assert (prog["job"], prog["phase"], prog["epoch"]) == (1, "search", 1)
    res = growkit.grow(trained, train_l, val_l, checkpoint_dir=tmp_path, resume=True, **kw)
    _same_gallery(res, ref)


class NoisyDigits(torch.utils.data.Dataset):
    """Digits with numpy-drawn noise: augmentation that uses the global numpy generator."""

    def __init__(self, base) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        import numpy as np

        x, y = self.base[i]
        return x + 0.1 * torch.from_numpy(np.random.randn(*x.shape).astype("float32")), y


def test_jobs_seed_numpy_and_python_generators(trained, digits):
    import numpy as np

    train_l, val_l = digits
    noisy = torch.utils.data.DataLoader(NoisyDigits(train_l.dataset), batch_size=32, shuffle=True,
                                        generator=torch.Generator().manual_seed(0))
    kw = dict(rounds=1, seed=0, progress=False)
    results = []
    for outside in (1, 2):  # the caller's global generators differ; the run must not
        np.random.seed(outside)
        results.append(growkit.grow(trained, noisy, val_l, **kw))
    _same_gallery(*results)


def test_executor_bad_input(trained, digits):
    train_l, val_l = digits
    with pytest.raises(InputError, match="children"):
        growkit.grow(trained, train_l, val_l, children=0, progress=False)
    with pytest.raises(InputError, match="unknown executor"):
        growkit.grow(trained, train_l, val_l, executor="dask", progress=False)
    with pytest.raises(InputError, match="method='petridish'"):
        growkit.grow(trained, train_l, val_l, method="random", children=2, progress=False)
    with pytest.raises(InputError, match="num_workers"):
        growkit.grow(trained, train_l, val_l, executor="ray", executor_options={"num_workers": 0}, progress=False)
