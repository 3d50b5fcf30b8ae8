"""Integrations against the real libraries: Lightning's GrowCallback and Avalanche's GrowPlugin."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import growkit
from growkit.data import digits_dataset
from growkit.core.plan import BRANCHES

from .conftest import TinyResNet

WIDTHS = (4, 8, 16)


@pytest.fixture(scope="module")
def digits():
    x, y = digits_dataset(16).tensors
    return x, y


@pytest.fixture(scope="module")
def probe(digits):
    return digits[0][-64:]


def outputs(model, x):
    """Eval-mode outputs without leaving the model in eval mode (training goes on afterwards)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(x)
    finally:
        model.train(was)


def param_ids(opt):
    return [id(p) for g in opt.param_groups for p in g["params"]]


def branch_params(grower, names):
    named = dict(grower.model.module.named_parameters())
    return [named[n] for n in names if n.startswith(BRANCHES)]


def assert_replays(base, grower, x):
    grown = grower.grown_model()
    replay = growkit.apply_plan(base, grower.plan)
    replay.load_state_dict(grown.state_dict())
    assert torch.equal(outputs(replay, x), outputs(grown, x))


# ====================================================================== Lightning
@pytest.fixture(scope="module")
def pl():
    return pytest.importorskip("lightning.pytorch", reason="Lightning is not installed: pip install -e '.[dev]'")


def lit_module(pl, net, val_script=None):
    class LitNet(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = net

        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.model(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_acc", (self.model(x).argmax(1) == y).float().mean())

        def on_validation_epoch_end(self):
            if val_script is not None:  # a scripted metric: plateau behaviour that does not depend on luck
                self.log("val_score", val_script[min(self.current_epoch, len(val_script) - 1)])

        def configure_optimizers(self):
            # self.parameters() includes the candidates: the callback must take them out again.
            opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
            return [opt], [torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.9 ** epoch)]

    return LitNet()


def trainer(pl, epochs, callbacks, **kw):
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **kw)


def loaders(digits, n=320):
    x, y = digits
    train = DataLoader(TensorDataset(x[:n], y[:n]), batch_size=32, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    val = DataLoader(TensorDataset(x[n:n + 128], y[n:n + 128]), batch_size=128)
    return train, val


def make_recording_callback(probe_x, **kw):
    from growkit.adapters.lightning import GrowCallback

    class Recording(GrowCallback):
        """Records the model output right before and right after each growth, and the optimizer then."""

        def __init__(self):
            super().__init__(**kw)
            self.records = []

        def on_train_epoch_end(self, trainer, pl_module):
            n = len(self.grower.events)
            before = outputs(self.grower.model, probe_x)
            super().on_train_epoch_end(trainer, pl_module)
            for ev in self.grower.events[n:]:
                opt = trainer.optimizers[0]
                new = branch_params(self.grower, ev.new_params)
                self.records.append({
                    "ev": ev, "epoch": trainer.current_epoch, "before": before,
                    "after": outputs(self.grower.model, probe_x), "opt_ids": param_ids(opt),
                    "cand_ids": {id(p) for p in self.grower.candidate_parameters()},
                    "new": [(p, p.detach().clone()) for p in new], "groups": len(opt.param_groups),
                    "lambdas": len(trainer.lr_scheduler_configs[0].scheduler.lr_lambdas),
                })

    return Recording()


def test_lightning_callback_grows_exactly_and_hands_over_the_optimizer(pl, digits, probe):
    torch.manual_seed(0)
    net = TinyResNet(widths=WIDTHS)
    base = copy.deepcopy(net)
    cb = make_recording_callback(probe, attr="model", trigger="epoch", warmup_steps=2, min_steps=5, seed=0)
    module = lit_module(pl, net)
    train, val = loaders(digits)
    trainer(pl, 3, [cb]).fit(module, train, val)

    assert module.model is cb.grower.model
    evs = cb.grower.events
    assert [r["epoch"] for r in cb.records] == [0, 1]  # every epoch but the last
    assert [e.trigger for e in evs] == ["epoch", "epoch"]
    grown = [r for r in cb.records if r["ev"].chosen]
    assert grown and cb.grower.plan.edits, [e.note for e in evs]
    for r in grown:
        assert r["ev"].exact and torch.equal(r["before"], r["after"])  # growth keeps the function
        ids = r["opt_ids"]
        assert r["new"] and all(ids.count(id(p)) == 1 for p, _ in r["new"])
        assert not r["cand_ids"] & set(ids)
        assert r["lambdas"] == r["groups"]  # the LR scheduler follows the new group
    opt = module.trainer.optimizers[0]
    assert len(opt.param_groups) == 1 + len(grown)
    assert opt.param_groups[1]["lr"] == pytest.approx(2.0 * opt.param_groups[0]["lr"])
    assert set(param_ids(opt)) == {id(p) for p in cb.grower.parameters()}
    # training went on: the first growth's branches were trained in the following epochs
    assert any(not torch.equal(p.detach(), at_growth) for p, at_growth in grown[0]["new"])
    assert module.trainer.callback_metrics["grow/params"].item() == cb.grower.cost.params
    assert_replays(base, cb.grower, probe)


def test_lightning_callback_plateau_trigger(pl, digits):
    torch.manual_seed(0)
    from growkit.adapters.lightning import GrowCallback

    cb = GrowCallback("model", trigger="plateau", monitor="val_score", mode="max", plateau_patience=1,
                      warmup_steps=1, min_steps=2, seed=0)
    module = lit_module(pl, TinyResNet(widths=WIDTHS), val_script=[0.5, 0.6, 0.6, 0.6])
    train, val = loaders(digits, n=96)
    trainer(pl, 4, [cb], num_sanity_val_steps=0).fit(module, train, val)
    # epoch 0 and 1 improve, epoch 2 does not (patience 1) -> growth; epoch 3 is the last one
    assert [e.trigger for e in cb.grower.events] == ["plateau"]
    assert cb.grower.events[0].step == 3 * len(train)

    with pytest.raises(growkit.InputError, match="score_threshold"):
        GrowCallback(trigger="score")
    missing = GrowCallback("model", trigger="plateau", monitor="nope", warmup_steps=1, min_steps=2)
    with pytest.raises(growkit.InputError, match="nope"):
        trainer(pl, 1, [missing]).fit(lit_module(pl, TinyResNet(widths=WIDTHS)), train, val)


def test_lightning_checkpoint_resume_restores_the_grown_model(pl, digits, probe, tmp_path):
    from growkit.adapters.lightning import GrowCallback

    opts = dict(attr="model", trigger="epoch", warmup_steps=2, min_steps=5, seed=0)
    torch.manual_seed(0)
    cb = GrowCallback(**opts)
    module = lit_module(pl, TinyResNet(widths=WIDTHS))
    train, val = loaders(digits)
    t1 = trainer(pl, 2, [cb])
    t1.fit(module, train, val)
    assert cb.grower.plan.edits
    path = tmp_path / "grown.ckpt"
    t1.save_checkpoint(path)
    opt1 = t1.optimizers[0]
    names = {id(p): n for n, p in module.named_parameters()}
    momentum = {names[id(p)]: s["momentum_buffer"].clone() for p, s in opt1.state.items()}
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    saved_groups = [[names[id(p)] for p in g["params"]] for g in opt1.param_groups]
    warmup = cb.grower.new_group_state(opt1)
    assert warmup and all(w["step"] > 0 for w in warmup)

    class Check(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            opt = trainer.optimizers[0]
            named = {id(p): n for n, p in pl_module.named_parameters()}
            self.groups = [[named[id(p)] for p in g["params"]] for g in opt.param_groups]
            self.momentum = {named[id(p)]: s["momentum_buffer"].clone() for p, s in opt.state.items()}
            self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}
            self.lambdas = len(trainer.lr_scheduler_configs[0].scheduler.lr_lambdas)
            self.warmup = cb2.grower.new_group_state(opt)

    torch.manual_seed(1)  # a differently initialised fresh network: everything must come from the file
    cb2, check = GrowCallback(**opts), Check()
    module2 = lit_module(pl, TinyResNet(widths=WIDTHS))
    t2 = trainer(pl, 3, [cb2, check])
    t2.fit(module2, train, val, ckpt_path=path)
    assert cb2.grower.plan.to_dict() == cb.grower.plan.to_dict()
    assert [e.to_dict() for e in cb2.grower.events] == [e.to_dict() for e in cb.grower.events]
    assert check.state.keys() == saved.keys() and all(torch.equal(check.state[k], v) for k, v in saved.items())
    assert check.groups == saved_groups and check.lambdas == len(saved_groups)
    assert check.warmup == warmup  # the new parameters' warm-up continues; it does not restart from 0
    assert check.momentum.keys() == momentum.keys()
    assert all(torch.equal(check.momentum[k], v) for k, v in momentum.items())
    assert t2.global_step == t1.global_step + len(train)  # one more epoch was trained
    assert not {id(p) for p in cb2.grower.candidate_parameters()} & set(param_ids(t2.optimizers[0]))

    # a grown checkpoint without the callback's state cannot be resumed into a fresh model: say so
    weights = tmp_path / "weights-only.ckpt"
    t1.save_checkpoint(weights, weights_only=True)
    with pytest.raises(growkit.PlanError, match="no GrowCallback state"):
        trainer(pl, 3, [GrowCallback(**opts)]).fit(lit_module(pl, TinyResNet(widths=WIDTHS)), train, val,
                                                  ckpt_path=weights)


# ====================================================================== Avalanche
@pytest.fixture(scope="module")
def av():
    return pytest.importorskip("avalanche", reason="Avalanche is not installed: pip install -e '.[dev]'")


def make_recording_plugin(probe_x, **kw):
    from growkit.adapters.avalanche import GrowPlugin

    class Recording(GrowPlugin):
        """Records the output right before and right after each boundary growth."""

        def __init__(self):
            super().__init__(**kw)
            self.records = []

        def grow(self, strategy):
            before = outputs(self.grower.model, probe_x)
            ev = super().grow(strategy)
            self.records.append({"ev": ev, "before": before, "after": outputs(self.grower.model, probe_x),
                                 "new": [(p, p.detach().clone()) for p in branch_params(self.grower, ev.new_params)]})
            return ev

    return Recording()


def digits_split3(x: torch.Tensor, y: torch.Tensor):
    """Avalanche class-incremental benchmark over digits: 450 train / 300 test samples, classes 4 + 3 + 3."""
    from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark

    return class_incremental_benchmark({"train": TensorDataset(x[:450], y[:450]),
                                        "test": TensorDataset(x[450:750], y[450:750])},
                                       class_order=list(range(10)), num_classes_per_exp=[4, 3, 3])


def first_iteration_recorder(record):
    """An Avalanche plugin keeping ``record(strategy)`` from the first iteration of each experience
    (after the strategy built its optimizer), in ``.seen``."""
    from avalanche.core import SupervisedPlugin

    class Recorder(SupervisedPlugin):
        def __init__(self):
            super().__init__()
            self.seen = []

        def after_training_iteration(self, strategy, **kwargs):
            if strategy.clock.train_exp_iterations == 0:
                self.seen.append(record(strategy))

    return Recorder()


def test_avalanche_plugin_grows_at_boundaries_and_trains_grown_params(av, digits, probe):
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    x, y = digits
    bench = digits_split3(x, y)
    torch.manual_seed(0)
    net = TinyResNet(widths=WIDTHS)
    base = copy.deepcopy(net)
    grow = make_recording_plugin(probe, warmup_steps=2, min_steps=5, seed=0)

    def look(strategy):  # the optimizer (after make_optimizer), candidates, model and grown parameters
        g = grow.grower
        grown = [p for r in grow.records for p, _ in r["new"]]
        return (param_ids(strategy.optimizer), {id(p) for p in g.candidate_parameters()},
                [id(p) for p in g.parameters()], [id(p) for p in grown])

    probe_plugin = first_iteration_recorder(look)
    # two param groups (no weight decay on BN/bias): Avalanche's own make_optimizer could not place
    # the candidates of a grown model in such an optimizer
    decay = [p for p in net.parameters() if p.dim() > 1]
    rest = [p for p in net.parameters() if p.dim() <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 1e-4}, {"params": rest}], lr=0.05, momentum=0.9)
    strategy = Naive(model=net, optimizer=opt, criterion=torch.nn.CrossEntropyLoss(), train_mb_size=32,
                     train_epochs=2, eval_mb_size=128, device="cpu", plugins=[grow, probe_plugin],
                     evaluator=EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[]))
    for exp in bench.train_stream:
        strategy.train(exp, eval_streams=[])

    g = grow.grower
    assert strategy.model is g.model
    assert [e.experience for e in g.events] == [0, 1] and {e.trigger for e in g.events} == {"experience"}
    chosen = [r for r in grow.records if r["ev"].chosen]
    assert chosen and g.plan.edits, [e.note for e in g.events]
    for r in chosen:
        assert r["ev"].exact and torch.equal(r["before"], r["after"])
    assert len(probe_plugin.seen) == 3
    for k, (opt_ids, cand_ids, mine, grown_ids) in enumerate(probe_plugin.seen):
        assert not cand_ids & set(opt_ids), f"candidates in the optimizer during experience {k}"
        assert sorted(opt_ids) == sorted(mine)  # base and grown parameters, each exactly once
        assert set(grown_ids) <= set(opt_ids)
    assert len(strategy.optimizer.param_groups) == 2 + len(chosen)
    # the grown parameters were trained by the next experience
    assert any(not torch.equal(p.detach(), at_growth) for p, at_growth in chosen[0]["new"])
    res = strategy.eval(bench.test_stream)
    assert {f"Top1_Acc_Exp/eval_phase/test_stream/Exp00{k}" for k in range(3)} <= res.keys()
    # Avalanche evaluated the grown model (candidates and all): its accuracy is the model's own
    by_hand = (outputs(g.model, x[450:750]).argmax(1) == y[450:750]).float().mean().item()
    assert res["Top1_Acc_Stream/eval_phase/test_stream"] == pytest.approx(by_hand, abs=1e-6)
    assert strategy.evaluator.get_last_metrics()["Grow/params"] == g.cost.params
    assert "make_optimizer" not in strategy.__dict__  # the override lives only while training
    assert_replays(base, g, probe)


def test_avalanche_plugin_freeze_options_isolate_experiences(av, digits, probe):
    from avalanche.training import Naive

    x, y = digits
    bench = digits_split3(x, y)
    torch.manual_seed(0)
    net = TinyResNet(widths=WIDTHS)
    grow = make_recording_plugin(probe, warmup_steps=2, min_steps=5, seed=0, freeze_grown=True, freeze_base=True,
                                 keep_trainable=["head"])

    def look(strategy):  # the frozen parameters and the optimizer's parameters
        g = grow.grower
        frozen = {n: p.detach().clone() for n, p in g.model.module.named_parameters() if g.is_frozen(n)}
        return frozen, param_ids(strategy.optimizer)

    snap = first_iteration_recorder(look)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    strategy = Naive(model=net, optimizer=opt, criterion=torch.nn.CrossEntropyLoss(), train_mb_size=32,
                     train_epochs=2, eval_mb_size=128, device="cpu", plugins=[grow, snap])
    for exp in bench.train_stream:
        strategy.train(exp, eval_streams=[])
    g = grow.grower
    chosen = [r for r in grow.records if r["ev"].chosen]
    assert chosen and g.base_frozen, [e.note for e in g.events]
    assert all(r["ev"].exact and torch.equal(r["before"], r["after"]) for r in chosen)
    frozen, opt_ids = snap.seen[-1]
    assert frozen  # the base (but the head) froze at the first growth
    named = dict(g.model.module.named_parameters())
    # the frozen parameters are out of the optimizer Avalanche rebuilt, and the last experience left them as they were
    assert not {id(named[n]) for n in frozen} & set(opt_ids)
    assert all(torch.equal(named[n], v) for n, v in frozen.items())
    assert sorted(opt_ids) == sorted(id(p) for p in g.parameters())
    # what the last experience trained did change
    assert any(not torch.equal(p.detach(), at) for p, at in chosen[-1]["new"])
