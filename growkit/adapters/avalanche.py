"""Avalanche integration: :class:`GrowPlugin` grows the model of a strategy at experience boundaries.

    model = MyNet()
    strategy = avalanche.training.Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                                        plugins=[GrowPlugin(budget=growkit.Budget(params=1.3))], ...)
    for exp in benchmark.train_stream:
        strategy.train(exp)
    grown = strategy.plugins[0].grower.grown_model()

Avalanche's optimizer life cycle (avalanche/training/templates, version 0.6) and how the plugin fits
in: ``BaseSGDTemplate._before_training_exp`` runs the plugins' ``after_train_dataset_adaptation``,
then ``check_model_and_optimizer`` (``BatchObservation``: ``model_adaptation`` and
``make_optimizer``, which re-synchronises the optimizer with *all* of ``strategy.model``'s
parameters via ``update_optimizer``, resetting its state on the first experience), and only then
the plugins' ``before_training_exp``. Left alone, ``make_optimizer`` would put the candidate
parameters into the strategy's optimizer (stepping them twice: they are trained by the grower),
and once growth has added a param group it cannot even place them (its group inference finds no
unique group and raises). So:

* ``after_train_dataset_adaptation`` (first experience): builds the :class:`growkit.Grower` on
  ``strategy.model`` (example input: the first training sample), makes ``grower.model`` the
  strategy's model and maps the user's optimizer from the original model's parameters to the
  grower's (by name, keeping its param groups). On every experience it puts a ``make_optimizer`` on the strategy
  instance that does what Avalanche's does over the model's parameters *without* the candidates
  (strategies whose class overrides ``make_optimizer`` keep theirs; see the next point).
* ``before_training_exp`` (after ``make_optimizer``): attaches the optimizer (and any
  ``LRSchedulerPlugin`` scheduler) to the grower, which drops any candidate parameter from it,
  and adds base or grown parameters it lacks, so the grown parameters are trained.
* ``after_update`` (after each ``optimizer_step``): ``grower.after_step()``.
* ``after_training_exp``: grows (function-preserving), adding the new parameters to the
  optimizer as a param group, so the next experience trains them; not after the stream's last
  experience unless ``grow_after_last``. Growth is published to the strategy's evaluator as the
  metrics ``Grow/params``, ``Grow/flops`` and ``Grow/points``.
* ``after_training``: removes the ``make_optimizer`` override again.

Not covered: Avalanche's strategy checkpointing (``avalanche.training.checkpoint``), distributed
training, and plugins that rebuild ``strategy.model`` themselves.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from growkit.errors import InputError
from growkit.lifelong.grower import Grower, GrowthEvent

try:
    from avalanche.core import SupervisedPlugin
    from avalanche.evaluation.metric_results import MetricValue
    from avalanche.models.dynamic_optimizers import update_optimizer
    from avalanche.training.plugins import LRSchedulerPlugin
    from avalanche.training.templates.observation_type.batch_observation import BatchObservation
except ImportError as e:  # pragma: no cover - exercised only without the extra installed
    raise ImportError("growkit.adapters.avalanche needs Avalanche: pip install 'growkit[avalanche]'") from e

__all__ = ["GrowPlugin"]

logger = logging.getLogger(__name__)


class GrowPlugin(SupervisedPlugin):
    """Petridish growth of ``strategy.model`` at experience boundaries (see the module docstring).

    Args:
        example_input: batch-1 input of the model for tracing (default: the first training sample
            of the first experience, with a batch dimension added).
        grow_after_last: also grow after the last experience of a stream (nothing trains the new
            branches then unless more experiences follow in a later ``train`` call).
        **grower_kwargs: options of :class:`growkit.Grower` (``budget``, ``warmup_steps``,
            ``freeze_grown`` / ``freeze_base`` for DER-like isolation of experiences, ...).

    ``plugin.grower`` is the :class:`growkit.Grower` once training started:
    ``grower.grown_model()``, ``grower.plan`` and ``grower.events``.
    """

    def __init__(self, *, example_input: Any = None, grow_after_last: bool = False, **grower_kwargs: Any) -> None:
        super().__init__()
        self.example_input = example_input
        self.grow_after_last = grow_after_last
        self.grower_kwargs = grower_kwargs
        self.grower: Grower | None = None
        self._optimizer: torch.optim.Optimizer | None = None

    # ------------------------------------------------------------------ set-up
    def after_train_dataset_adaptation(self, strategy: Any, **kwargs: Any) -> None:
        if self.grower is None:
            self._start(strategy)
        elif strategy.model is not self.grower.model:
            raise InputError("strategy.model was replaced after GrowPlugin started growing it; keep "
                             "plugin.grower.model as the strategy's model")
        self.grower.to(strategy.device)  # type: ignore[union-attr]
        if type(strategy).make_optimizer is BatchObservation.make_optimizer:
            strategy.make_optimizer = lambda **kw: self._make_optimizer(strategy, **kw)
        else:
            logger.warning("GrowPlugin: %s overrides make_optimizer; candidate parameters it adds are removed in "
                           "before_training_exp", type(strategy).__name__)

    def _start(self, strategy: Any) -> None:
        original: nn.Module = strategy.model
        example = self.example_input
        if example is None:
            sample = strategy.adapted_dataset[0]
            example = (sample[0] if isinstance(sample, (tuple, list)) else sample).unsqueeze(0)
        dev = next((p.device for p in original.parameters()), torch.device("cpu"))
        example = tuple(a.to(dev) for a in example) if isinstance(example, tuple) else example.to(dev)
        self.grower = Grower(original, example, **self.grower_kwargs)
        strategy.model = self.grower.model
        _adopt_optimizer(strategy.optimizer, original, self.grower.model)
        # Avalanche maps its optimizer to the model's parameters by identity on the first
        # make_optimizer call; start that mapping afresh for the new model.
        strategy.optimized_param_id = None

    def _attach(self, strategy: Any) -> None:
        assert self.grower is not None
        if self._optimizer is not None:
            self.grower.detach(self._optimizer)
        self.grower.attach(strategy.optimizer, self._schedulers(strategy))
        self._optimizer = strategy.optimizer

    def _make_optimizer(self, strategy: Any, reset_optimizer_state: bool = False, remove_params: bool = False,
                        verbose_optimizer: bool = False, **kwargs: Any) -> None:
        """``BatchObservation.make_optimizer`` over the model's parameters without the candidates
        (and without what ``freeze_grown`` / ``freeze_base`` froze)."""
        assert self.grower is not None
        mine = {id(p) for p in self.grower.parameters()}
        named = {n: p for n, p in strategy.model.named_parameters() if id(p) in mine}
        strategy.optimized_param_id = update_optimizer(strategy.optimizer, named, strategy.optimized_param_id,
                                                       reset_state=reset_optimizer_state, remove_params=remove_params,
                                                       verbose=verbose_optimizer)

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        assert self.grower is not None
        opt = strategy.optimizer
        try:  # sets the new parameters' warm-up (a fraction of an epoch)
            self.grower.steps_per_epoch = max(1, len(strategy.dataloader))
        except (AttributeError, TypeError):
            pass
        # (Re-)attaching runs the grower's clean-up (candidates out) on what make_optimizer built.
        self._attach(strategy)
        have = {id(p) for g in opt.param_groups for p in g["params"]}
        missing = [p for p in self.grower.parameters() if id(p) not in have]
        if missing:
            logger.warning("GrowPlugin: the optimizer lacked %d model parameters; added them as a new group",
                           len(missing))
            self.grower.add_param_group(opt, missing, self._schedulers(strategy))

    def after_training(self, strategy: Any, **kwargs: Any) -> None:
        strategy.__dict__.pop("make_optimizer", None)

    # ------------------------------------------------------------------ training
    def after_update(self, strategy: Any, **kwargs: Any) -> None:
        if self.grower is None:
            return
        loss = getattr(strategy, "loss", None)
        # A non-finite loss right after a growth rolls the growth back (the grower's rule).
        ev = self.grower.after_step(loss if isinstance(loss, torch.Tensor) else None)
        if ev is not None:
            self._publish(strategy, ev)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if self.grower is None or not self._at_boundary(strategy.experience):
            return
        self.grow(strategy)

    def grow(self, strategy: Any) -> GrowthEvent:
        """Grow now, at the end of ``strategy.experience`` (what ``after_training_exp`` calls)."""
        assert self.grower is not None
        exp = getattr(strategy.experience, "origin_experience", strategy.experience)
        ev = self.grower.end_experience(getattr(exp, "current_experience", None))
        self._publish(strategy, ev)
        return ev

    def _at_boundary(self, exp: Any) -> bool:
        if getattr(exp, "is_last_subexp", True) is False:
            return False  # inside an online experience: its boundary comes with its last sub-experience
        if self.grow_after_last:
            return True
        origin = getattr(exp, "origin_experience", exp)
        try:
            return origin.current_experience < len(origin.origin_stream) - 1
        except (AttributeError, TypeError):
            return True  # a stream of unknown length: every boundary may have a successor

    def _schedulers(self, strategy: Any) -> list[Any]:
        return [p.scheduler for p in strategy.plugins if isinstance(p, LRSchedulerPlugin)]

    def _publish(self, strategy: Any, ev: GrowthEvent) -> None:
        if ev.chosen:
            logger.info("GrowPlugin: grew %s after experience %s (%s): params %d -> %d", ev.chosen, ev.experience,
                        ev.trigger, ev.params_before, ev.params_after)
        else:
            logger.info("GrowPlugin: no growth after experience %s (%s): %s", ev.experience, ev.trigger, ev.note)
        evaluator = getattr(strategy, "evaluator", None)
        if evaluator is None:
            return
        x = strategy.clock.train_iterations
        for name, value in (("Grow/params", ev.params_after), ("Grow/flops", ev.flops_after),
                            ("Grow/points", len(ev.chosen))):
            evaluator.publish_metric_value(MetricValue(self, name, value, x))


def _adopt_optimizer(opt: torch.optim.Optimizer, original: nn.Module, model: nn.Module) -> None:
    """Point ``opt``'s groups from ``original``'s parameters to ``model``'s (same names under ``.module``)."""
    theirs = {id(p): n for n, p in original.named_parameters()}
    mine = dict(model.named_parameters())
    dropped = 0
    for g in opt.param_groups:
        params = []
        for p in g["params"]:
            name = theirs.get(id(p))
            if name is None:
                params.append(p)  # not the model's (e.g. a learnable loss): keep it
                continue
            q = mine.get(f"module.{name}")
            if q is None or q.shape != p.shape:
                dropped += 1
                continue
            params.append(q)
        g["params"] = params
    opt.state.clear()
    if dropped:
        logger.warning("GrowPlugin: %d optimizer parameters have no counterpart in the traced model; Avalanche's "
                       "make_optimizer adds the model's remaining parameters", dropped)
