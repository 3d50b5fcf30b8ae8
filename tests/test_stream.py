"""Lifelong streams: builders, Grower in a user loop, grow_stream, metrics, resume."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import growkit
from growkit.data import digits_dataset
from growkit.lifelong.metrics import AccuracyMatrix
from growkit.train import evaluate, train_steps

from .conftest import TinyResNet, run_eval


@pytest.fixture(scope="module")
def digits():
    return digits_dataset(16)


@pytest.fixture(scope="module")
def stream3(digits):
    return growkit.class_incremental(digits, 3, class_order=list(range(9)) + [9], batch_size=32, seed=0)


@pytest.fixture(scope="module")
def pretrained(stream3):
    torch.manual_seed(0)
    m = TinyResNet(widths=(4, 8, 16))
    train_steps(m, stream3[0].train, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), epochs=2)
    return m


def test_class_incremental_partitions_classes(digits):
    s = growkit.class_incremental(digits, 5, batch_size=64, seed=1)
    assert len(s) == 5 and sorted(c for e in s for c in e.classes) == list(range(10))
    for e in s:
        ys = torch.cat([y for _, y in e.train] + [y for _, y in e.test])
        assert set(ys.tolist()) <= set(e.classes)
    with pytest.raises(growkit.InputError, match="n_experiences"):
        growkit.class_incremental(digits, 11)
    with pytest.raises(growkit.InputError, match="permutation"):
        growkit.class_incremental(digits, 2, class_order=[0, 1])


def test_training_loaders_never_yield_a_one_sample_batch(digits):
    """A last training batch of one sample makes BatchNorm raise in train mode (it did in the stability grid)."""
    from growkit.data import make_loaders
    from torch.utils.data import Subset

    for bs in (8, 16, 32, 64):
        s = growkit.class_incremental(digits, 3, batch_size=bs, seed=9)
        sizes = [len(x) for e in s for x, _ in e.train]
        assert min(sizes) > 1
        # the first experience still sees every full batch
        assert sum(sizes[: len(s[0].train)]) >= len(s[0].train.dataset) - bs + 1
    part = Subset(digits, list(range(65)))  # 65 = 2 full batches of 32 + 1
    train, val = make_loaders([part, part], batch_size=32)
    assert [len(x) for x, _ in train] == [32, 32]
    assert sum(len(x) for x, _ in val) == 65  # evaluation keeps every sample
    small = Subset(digits, list(range(5)))  # fewer samples than a batch: keep them all
    assert [len(x) for x, _ in make_loaders([small], batch_size=32)[0]] == [5]


def test_domain_incremental_permutes_pixels(digits):
    s = growkit.domain_incremental(digits, 3, kind="permuted", batch_size=64, seed=0)
    assert [e.classes for e in s] == [list(range(10))] * 3
    ds1, ds2 = s[1].train.dataset, s[2].train.dataset
    for ds in (ds1, ds2):
        xt, yt = ds[0]
        xo, yo = ds.base[0]
        assert yt == yo and not torch.equal(xt, xo)
        assert torch.equal(xt.flatten().sort().values, xo.flatten().sort().values)  # same pixels, moved
    assert not torch.equal(ds1.fn(ds1.base[0][0]), ds2.fn(ds1.base[0][0]))  # a new permutation per experience
    # experiences draw disjoint samples
    idx = [set(e.train.dataset.indices if k == 0 else e.train.dataset.base.indices) for k, e in enumerate(s)]
    assert not (idx[0] & idx[1]) and not (idx[1] & idx[2])
    r = growkit.domain_incremental(digits, 2, kind="rotated", batch_size=8, seed=0)
    xr, _ = r[1].train.dataset[0]
    assert xr.shape == (1, 16, 16) and not torch.equal(xr, r[1].train.dataset.base[0][0])


def test_accuracy_matrix_metrics_by_hand():
    m = AccuracyMatrix(3, initial=[0.1, 0.05, 0.0])
    for row in ([0.9, 0.1, 0.2], [0.6, 0.8, 0.1], [0.5, 0.7, 0.9]):
        m.add_row(row)
    assert m.average_accuracy() == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    assert m.forgetting() == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)
    assert m.bwt() == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    assert m.fwt() == pytest.approx(((0.1 - 0.05) + (0.1 - 0.0)) / 2)
    assert AccuracyMatrix.from_dict(m.to_dict()).summary() == m.summary()


def _train(g, opt, loader):
    """A user's training loop around a Grower."""
    for x, y in loader:
        loss = F.cross_entropy(g.model(x), y) + g.extra_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        g.after_step()


def test_grower_in_a_user_loop_is_exact_and_keeps_optimizer_state(stream3, pretrained):
    g = growkit.Grower(pretrained, torch.zeros(1, 1, 16, 16), warmup_steps=2, min_steps=5, seed=0)
    opt = torch.optim.SGD(g.parameters(), lr=0.05, momentum=0.9)
    g.attach(opt)
    base_ids = [id(p) for p in g.parameters()]
    _train(g, opt, stream3[1].train)
    momentum = {id(p): opt.state[p]["momentum_buffer"].clone() for p in g.parameters()}
    x, y = next(iter(stream3[1].test))
    opt.zero_grad()
    g.model.train()
    F.cross_entropy(g.model(x), y).backward()
    grads_before = {id(p): p.grad.clone() for p in g.parameters()}
    opt.zero_grad()
    before = run_eval(g.model, x)
    ev = g.end_experience(1)
    assert ev.chosen, ev.note
    assert ev.exact and ev.params_after > ev.params_before
    assert torch.equal(run_eval(g.model, x), before)  # growth preserves the function
    g.model.train()
    F.cross_entropy(g.model(x), y).backward()
    for p in g.parameters():
        if id(p) in grads_before:  # base gradients unchanged in train mode (eta = 0)
            assert torch.equal(p.grad, grads_before[id(p)])
    # base parameters are the same objects, their optimizer state is kept; new ones are added
    assert all(i in {id(p) for p in g.parameters()} for i in base_ids)
    assert all(torch.equal(opt.state[p]["momentum_buffer"], momentum[id(p)]) for p in g.parameters() if id(p) in momentum)
    # the new group's rate ramps from 0 (the new-parameter rule sets it before every step)
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 0.0
    assert {id(p) for g_ in opt.param_groups for p in g_["params"]} == {id(p) for p in g.parameters()}
    # the plan replays onto the original model
    grown = g.grown_model()
    replay = growkit.apply_plan(pretrained, g.plan)
    replay.load_state_dict(grown.state_dict())
    assert torch.equal(run_eval(replay, x), run_eval(grown, x))


@pytest.mark.slow  # four seeded Grower runs (9 s); the budget rule stays in the default run (test_petridish, test_grow)
def test_grower_random_selection_stays_within_budget(stream3, pretrained):
    # The Grower costed one random draw of edges and grew another (fixed with grow()'s).
    base = sum(p.numel() for p in pretrained.parameters())
    ops = ("identity", "sep_conv_3x3", "sep_conv_5x5", "max_pool_3x3")
    for seed in range(4):
        g = growkit.Grower(pretrained, torch.zeros(1, 1, 16, 16), budget=growkit.Budget(params=1.15), ops=ops,
                           selection="random", warmup_steps=0, min_steps=5, seed=seed)
        opt = torch.optim.SGD(g.parameters(), lr=0.05, momentum=0.9)
        g.attach(opt)
        _train(g, opt, stream3[1].train)
        ev = g.end_experience(1)
        assert ev.chosen, ev.note
        assert ev.exact and base < ev.params_after <= 1.15 * base, (seed, ev.params_after, base)
        assert ev.params_after == sum(p.numel() for p in g.grown_model().parameters())


def test_grow_stream_grows_at_boundaries_and_fills_the_matrix(stream3, pretrained, tmp_path):
    before = copy.deepcopy(pretrained.state_dict())
    res = growkit.grow_stream(pretrained, stream3, epochs=2, lr=0.05, replay=64, seed=0, progress=False,
                              grower_options={"warmup_steps": 3, "min_steps": 6})
    assert all(torch.equal(v, pretrained.state_dict()[k]) for k, v in before.items())
    assert [e.experience for e in res.events] == [0, 1]  # growth only at the two inner boundaries
    assert any(e.chosen for e in res.events) and all(e.exact for e in res.events if e.chosen)
    params = [c["params"] for c in res.matrix.costs]
    assert params[-1] > params[0] or params[1] > params[0]
    # the last row is the final model's accuracy on each experience's test set
    last = [evaluate(res.model, e.test)["accuracy"] for e in stream3]
    assert res.matrix.rows[-1] == pytest.approx(last, abs=0)
    assert len(res.matrix.rows) == 3 and res.matrix.initial is not None
    # the plan replays
    m = growkit.apply_plan(pretrained, res.plan)
    m.load_state_dict(res.model.state_dict())
    x = next(iter(stream3[2].test))[0]
    assert torch.equal(run_eval(m, x), run_eval(res.model, x))
    out = res.save(tmp_path / "run")
    assert (out / "metrics.json").is_file() and (out / "accuracy.png").stat().st_size > 0


class _Boom(Exception):
    pass


class _FailingLoader:
    def __init__(self, loader, fail_at):
        self.loader, self.fail_at, self.generator = loader, fail_at, loader.generator

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for i, b in enumerate(self.loader):
            if i == self.fail_at:
                raise _Boom()
            yield b


@pytest.mark.slow  # three stream runs (12 s); resume stays in the default run through grow (test_parallel mid_child) and the Grower (test_adapters Lightning resume)
def test_grow_stream_resumes_to_the_uninterrupted_result(digits, pretrained, tmp_path):
    def stream():
        return growkit.class_incremental(digits, 3, class_order=list(range(10)), batch_size=32, seed=0)

    kw = dict(epochs=1, lr=0.05, replay=32, seed=0, progress=False, grower_options={"warmup_steps": 2, "min_steps": 4})
    ref = growkit.grow_stream(pretrained, stream(), **kw)
    s = stream()
    s.experiences[2].train = _FailingLoader(s[2].train, 3)  # dies inside the last experience
    with pytest.raises(_Boom):
        growkit.grow_stream(pretrained, s, checkpoint_dir=tmp_path / "c", **kw)
    res = growkit.grow_stream(pretrained, stream(), checkpoint_dir=tmp_path / "c", resume=True, **kw)
    assert res.matrix.rows == ref.matrix.rows
    assert res.plan.to_dict() == ref.plan.to_dict()
    sa, sb = res.model.state_dict(), ref.model.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def run_frozen(pretrained, stream, **kw):
    """grow_stream on a copy that cannot change (lr 0, BatchNorm statistics fixed, no growth)."""
    pretrained = copy.deepcopy(pretrained)
    for m in pretrained.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.0
    return pretrained, growkit.grow_stream(pretrained, stream, grow=False, lr=0.0, momentum=0.0, weight_decay=0.0,
                                           progress=False, seed=0, **kw)


def test_grow_stream_matrix_matches_hand_computed(stream3, pretrained):
    # With lr = 0, frozen BatchNorm statistics and no growth the model never changes, so every row
    # of R is the model's accuracy on each experience's test split, computed here by hand.
    pretrained, res = run_frozen(pretrained, stream3)
    pretrained.eval()
    by_hand = []
    for e in stream3:
        correct = total = 0
        with torch.no_grad():
            for x, y in e.test:
                correct += int((pretrained(x).argmax(1) == y).sum())
                total += int(y.numel())
        by_hand.append(correct / total)
    assert res.matrix.initial == pytest.approx(by_hand, abs=0)
    assert res.matrix.rows == [pytest.approx(by_hand, abs=0)] * 3
    assert res.matrix.forgetting() == 0.0 and res.matrix.bwt() == 0.0
    assert res.matrix.average_accuracy() == pytest.approx(sum(by_hand) / 3)
    assert res.matrix.fwt() == pytest.approx(0.0)


def test_grow_stream_refuses_a_checkpoint_dir_held_by_another_run(stream3, pretrained, tmp_path):
    import os

    from growkit.checkpoint import CheckpointDir

    ckpt = tmp_path / "c"
    before = copy.deepcopy(pretrained.state_dict())
    with CheckpointDir(ckpt).lock():
        with pytest.raises(growkit.LockError, match=f"in use by another run.*{os.getpid()}"):
            growkit.grow_stream(pretrained, stream3, epochs=1, checkpoint_dir=ckpt, progress=False)
    assert not (ckpt / "LATEST").exists()  # nothing was written beside the holder's checkpoints
    assert all(torch.equal(v, pretrained.state_dict()[k]) for k, v in before.items())


# ---------------------------------------------------------------- DER-like isolation (freeze_grown / freeze_base)
def _bn_buffers(module, prefix):
    return {n: b.clone() for n, b in module.named_buffers() if n.startswith(prefix)}


def test_freeze_grown_freezes_earlier_branches_and_trains_the_new_ones(stream3, pretrained):
    from growkit.core.plan import BRANCHES

    g = growkit.Grower(pretrained, torch.zeros(1, 1, 16, 16), warmup_steps=2, min_steps=5, seed=0, freeze_grown=True)
    opt = torch.optim.SGD(g.parameters(), lr=0.05, momentum=0.9)
    g.attach(opt)
    x = next(iter(stream3[1].test))[0]
    _train(g, opt, stream3[1].train)
    ev1 = g.end_experience(1)
    assert ev1.chosen and ev1.exact, ev1.note
    first = set(getattr(g.model.module, BRANCHES).keys())
    _train(g, opt, stream3[2].train)
    before = run_eval(g.model, x)
    ev2 = g.end_experience(2)
    assert ev2.chosen, ev2.note
    assert ev2.exact and torch.equal(run_eval(g.model, x), before)  # freezing leaves the function exact
    assert g.frozen_branches == first
    named = dict(g.model.module.named_parameters())
    frozen = {n: p.detach().clone() for n, p in named.items() if n.split(".")[1:2] and n.startswith(BRANCHES)
              and n.split(".")[1] in first}
    fresh = {n: named[n].detach().clone() for n in ev2.new_params if n.startswith(BRANCHES)}
    base = {n: p.detach().clone() for n, p in named.items() if not n.startswith((BRANCHES, "growkit_candidates"))}
    assert frozen and fresh and base
    stats = _bn_buffers(g.model.module, f"{BRANCHES}.{sorted(first)[0]}.")
    in_opt = {id(p) for grp in opt.param_groups for p in grp["params"]}
    assert all(not named[n].requires_grad and id(named[n]) not in in_opt for n in frozen)
    _train(g, opt, stream3[0].train)
    named = dict(g.model.module.named_parameters())
    assert all(torch.equal(named[n], v) for n, v in frozen.items())  # earlier branches: not a bit changed
    assert all(torch.equal(b, _bn_buffers(g.model.module, "")[n]) for n, b in stats.items() if "running" in n)
    assert any(not torch.equal(named[n], v) for n, v in fresh.items())  # the new branches learn
    assert any(not torch.equal(named[n], v) for n, v in base.items())  # freeze_base=False: the base learns


def test_freeze_base_leaves_only_new_branches_and_kept_modules_training(stream3, pretrained):
    g = growkit.Grower(pretrained, torch.zeros(1, 1, 16, 16), warmup_steps=2, min_steps=5, seed=0, freeze_grown=True,
                       freeze_base=True, keep_trainable=["head"])
    opt = torch.optim.SGD(g.parameters(), lr=0.05, momentum=0.9)
    g.attach(opt)
    _train(g, opt, stream3[1].train)
    x = next(iter(stream3[1].test))[0]
    before = run_eval(g.model, x)
    ev = g.end_experience(1)
    assert ev.chosen and ev.exact and torch.equal(run_eval(g.model, x), before)
    named = dict(g.model.module.named_parameters())
    base = {n: p.detach().clone() for n, p in named.items()
            if not n.startswith(("growkit_branches", "growkit_candidates", "head."))}
    head = {n: p.detach().clone() for n, p in named.items() if n.startswith("head.")}
    fresh = {n: named[n].detach().clone() for n in ev.new_params if n.startswith("growkit_branches")}
    stats = {n: b.clone() for n, b in g.model.module.named_buffers() if n.startswith("stem.") and "running" in n}
    assert g.trainable_count() == sum(v.numel() for v in head.values()) + sum(v.numel() for v in fresh.values())
    _train(g, opt, stream3[2].train)
    named = dict(g.model.module.named_parameters())
    assert all(torch.equal(named[n], v) for n, v in base.items())
    assert all(torch.equal(dict(g.model.module.named_buffers())[n], v) for n, v in stats.items())
    assert any(not torch.equal(named[n], v) for n, v in head.items())
    assert any(not torch.equal(named[n], v) for n, v in fresh.items())


def test_freeze_options_reject_bad_values(pretrained, stream3):
    ex = torch.zeros(1, 1, 16, 16)
    with pytest.raises(growkit.InputError, match="freeze_grown"):
        growkit.Grower(pretrained, ex, freeze_grown="yes")
    with pytest.raises(growkit.InputError, match="freeze_base"):
        growkit.Grower(pretrained, ex, freeze_base=1)
    with pytest.raises(growkit.InputError, match="keep_trainable"):
        growkit.Grower(pretrained, ex, keep_trainable="head")
    with pytest.raises(growkit.InputError, match="not modules"):
        growkit.Grower(pretrained, ex, freeze_base=True, keep_trainable=["classifier"])
    with pytest.raises(growkit.InputError, match="freeze_grown"):
        growkit.grow_stream(pretrained, stream3, progress=False, grower_options={"freeze_grown": "experience"})
    with pytest.raises(growkit.InputError, match="task_incremental"):
        growkit.grow_stream(pretrained, stream3, progress=False, task_incremental="yes")


def test_grow_stream_passes_freeze_options_and_reports_growth_per_experience(stream3, pretrained):
    res = growkit.grow_stream(pretrained, stream3, epochs=1, lr=0.05, seed=0, progress=False,
                              grower_options={"warmup_steps": 2, "min_steps": 5, "freeze_grown": True,
                                              "freeze_base": True, "keep_trainable": ["head"]})
    growth = res.growth()
    assert [r["experience"] for r in growth] == [0, 1, 2]
    total = sum(p.numel() for p in pretrained.parameters())
    head = sum(p.numel() for p in pretrained.head.parameters())
    ev0 = res.events[0]
    assert ev0.chosen and growth[0]["params_grown"] == ev0.params_after - ev0.params_before > 0
    # after the first growth only the head and the branch just grown train
    assert growth[0]["trainable_params"] == head + growth[0]["params_grown"] < total
    assert [r["params"] for r in growth] == [c["params"] for c in res.matrix.costs]


# ---------------------------------------------------------------- task-incremental evaluation
def test_task_incremental_matrix_matches_hand_computed(stream3, pretrained):
    # As test_grow_stream_matrix_matches_hand_computed, with the logits outside each experience's
    # classes masked: the model never changes, so every row is the masked accuracy by hand.
    pretrained, res = run_frozen(pretrained, stream3, task_incremental=True)
    pretrained.eval()
    masked, plain = [], []
    for e in stream3:
        c_m = c_p = total = 0
        with torch.no_grad():
            for x, y in e.test:
                logits = pretrained(x)
                sub = logits[:, e.classes]  # the task's columns only
                pred = torch.tensor(e.classes)[sub.argmax(1)]
                c_m += int((pred == y).sum())
                c_p += int((logits.argmax(1) == y).sum())
                total += int(y.numel())
        masked.append(c_m / total)
        plain.append(c_p / total)
    assert res.task_matrix is not None
    assert res.task_matrix.rows == [pytest.approx(masked, abs=0)] * 3
    assert res.matrix.rows == [pytest.approx(plain, abs=0)] * 3  # the class-incremental matrix is unchanged
    assert all(m >= p for m, p in zip(masked, plain)) and masked != plain
    assert growkit.grow_stream(pretrained, stream3, grow=False, lr=0.0, progress=False, seed=0).task_matrix is None


def test_evaluate_with_classes_masks_the_other_logits():
    from torch.utils.data import DataLoader, TensorDataset

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return x + self.w  # the inputs are the logits

    logits = torch.tensor([[5.0, 1.0, 2.0, 0.0], [0.0, 3.0, 1.0, 9.0], [1.0, 0.0, 4.0, 2.0]])
    y = torch.tensor([2, 1, 2])
    ld = DataLoader(TensorDataset(logits, y), batch_size=2)
    assert evaluate(Fixed(), ld)["accuracy"] == pytest.approx(1 / 3)  # argmax 0, 3, 2
    assert evaluate(Fixed(), ld, classes=[1, 2])["accuracy"] == pytest.approx(1.0)  # argmax 2, 1, 2
    assert evaluate(Fixed(), ld, classes=[0, 2])["accuracy"] == pytest.approx(1 / 3)  # argmax 0, 2, 2
    with pytest.raises(growkit.InputError, match="beyond"):
        evaluate(Fixed(), ld, classes=[4])


def test_rollback_of_a_freezing_growth_unfreezes_what_it_froze(stream3, pretrained):
    g = growkit.Grower(pretrained, torch.zeros(1, 1, 16, 16), warmup_steps=2, min_steps=5, seed=0, freeze_base=True,
                       keep_trainable=["head"])
    opt = torch.optim.SGD(g.parameters(), lr=0.05, momentum=0.9)
    g.attach(opt)
    _train(g, opt, stream3[1].train)
    base = [p for n, p in g.model.module.named_parameters() if n.startswith("stem.")]
    ev = g.end_experience(1)
    assert ev.chosen and g.base_frozen and not any(p.requires_grad for p in base)
    assert g.rollback("diverged (test)")  # restored, grown again at half rate: frozen again
    assert g.base_frozen and not any(p.requires_grad for p in base)
    assert g.rollback("diverged again (test)")  # restored, continues without the growth
    assert not g.base_frozen and all(p.requires_grad for p in base)
    in_opt = {id(p) for grp in opt.param_groups for p in grp["params"]}
    assert all(id(p) in in_opt for p in base)
    momenta = {m.momentum for n, m in g.model.module.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert 0.0 not in momenta


def test_evaluation_leaves_the_random_stream_of_training_alone(digits):
    """A DataLoader iterator draws its seed from torch's global generator; evaluating must not shift it,
    or a run's result depends on how often it is evaluated (seen in the streams-vs-Avalanche study)."""
    from torch.utils.data import DataLoader

    m = TinyResNet(widths=(4, 8, 16))
    loader = DataLoader(digits, batch_size=256)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    evaluate(m, loader)
    evaluate(m, loader, classes=[0, 1])
    assert torch.equal(torch.get_rng_state(), before)
