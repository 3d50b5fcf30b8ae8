"""PyTorch Lightning integration: :class:`GrowCallback` grows a submodule of a LightningModule.

    model = MyLightningModule()                      # holds the network as ``self.model``
    grow = GrowCallback("model", trigger="epoch", budget=growkit.Budget(params=1.3))
    trainer = lightning.pytorch.Trainer(max_epochs=10, callbacks=[grow])
    trainer.fit(model, train_loader, val_loader)
    grown = grow.grower.grown_model()                # candidate-free copy for saving / export

What happens, in Lightning's hook order (``Trainer._run`` in lightning/pytorch/trainer/trainer.py):

1. ``setup("fit")`` runs before ``configure_optimizers`` (that is called from ``strategy.setup``):
   the callback builds a :class:`growkit.Grower` on ``getattr(pl_module, attr)`` and puts
   ``grower.model`` in its place, so ``configure_optimizers`` already sees the growable model.
   Its candidate parameters may end up in those optimizers (``self.parameters()`` includes them).
2. ``on_fit_start`` runs after ``strategy.setup`` created the optimizers and LR schedulers: each
   optimizer is attached to the grower with its schedulers, which removes the candidate
   parameters (the grower trains them with its own Adam) and, at every growth, adds the grown
   branch parameters as a new param group and extends the schedulers.
3. ``on_train_batch_end`` (after the optimizer step of automatic optimization,
   ``_TrainingEpochLoop.advance``) calls ``grower.after_step()`` whenever ``global_step`` moved,
   i.e. once per optimizer step also under gradient accumulation.
4. ``on_train_epoch_end`` (after the epoch's validation run, ``_FitLoop.on_advance_end``) grows:
   every ``every_n_epochs`` epochs (``trigger="epoch"``) or when the validation metric
   ``monitor`` stopped improving for ``plateau_patience`` validation runs (``trigger="plateau"``).
   No growth after the final epoch (nothing would train the new branches). With a
   ``score_threshold`` in the grower options the grower also grows on its own from step 3.
   Growth is function-preserving; the model's parameter count and FLOPs are logged with
   ``pl_module.log`` as ``grow/params``, ``grow/flops`` and ``grow/growths`` every epoch.

Checkpoints: ``trainer.save_checkpoint`` stores the grower's progress (plan, events, candidate
optimizer, RNG, running scores) and each optimizer's param-group layout in the callback state;
the weights (base, grown and candidates) are in the LightningModule's ``state_dict`` as usual.
Resuming with ``trainer.fit(model, ..., ckpt_path=...)`` and a *new* GrowCallback built with the
same options on a fresh LightningModule restores the grown model, the grower and the optimizer
and scheduler states. Lightning (``Trainer._run``) restores the weights and then the callbacks
before ``strategy.setup`` calls ``configure_optimizers``, and the optimizer states after
``on_fit_start``: a load pre-hook on ``grower.model`` sets the grown weights aside (the fresh
model has no room for them yet), ``load_state_dict`` replays the plan and loads them, so
``configure_optimizers`` sees the grown model, and ``on_fit_start`` re-creates each optimizer's
checkpointed param groups by parameter name before Lightning loads their state. A checkpoint
written before this callback's ``on_train_epoch_end`` (e.g. by a ``ModelCheckpoint`` saving on
validation end) resumes at the next epoch, so the growth due at that epoch's end is skipped.
Not supported: strategies that restore checkpoints after setup (DeepSpeed, FSDP) and
multi-process training (DDP cannot follow a parameter set that changes during training).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from growkit.core.candidates import CandidateModel
from growkit.errors import InputError, PlanError
from growkit.lifelong.grower import Grower, GrowthEvent

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.trainer.states import TrainerFn
except ImportError as e:  # pragma: no cover - exercised only without the extra installed
    raise ImportError("growkit.adapters.lightning needs Lightning: pip install 'growkit[lightning]'") from e

__all__ = ["GrowCallback"]

logger = logging.getLogger(__name__)

_TRIGGERS = ("epoch", "plateau", "score")
_PREFIX = "grower.model."


class GrowCallback(Callback):
    """Petridish growth of ``getattr(pl_module, attr)`` while a Lightning Trainer fits it.

    Args:
        attr: attribute of the LightningModule holding the network to grow.
        trigger: ``"epoch"`` (grow every ``every_n_epochs`` epochs), ``"plateau"`` (grow when the
            validation metric ``monitor`` has not improved for ``plateau_patience`` validation
            runs; default patience 2) or ``"score"`` (only the grower's own ``score_threshold``
            trigger, which is then required).
        monitor, mode: the validation metric for ``"plateau"`` and whether higher (``"max"``) or
            lower (``"min"``) is better.
        every_n_epochs: growth period for ``"epoch"``.
        example_input: batch-1 input of the network for tracing. Default: the LightningModule's
            ``example_input_array``, else the first tensor of the first training batch.
        **grower_kwargs: options of :class:`growkit.Grower` (``budget``, ``warmup_steps``, ...).

    After (or during) fitting, ``callback.grower`` is the :class:`growkit.Grower`:
    ``grower.grown_model()`` is the grown network without candidates, ``grower.plan`` its plan
    and ``grower.events`` the growth history.
    """

    def __init__(
        self,
        attr: str = "model",
        trigger: str = "epoch",
        monitor: str = "val_acc",
        mode: str = "max",
        every_n_epochs: int = 1,
        example_input: Any = None,
        **grower_kwargs: Any,
    ) -> None:
        super().__init__()
        if trigger not in _TRIGGERS:
            raise InputError(f"trigger must be one of {_TRIGGERS}, got {trigger!r}")
        if mode not in ("min", "max"):
            raise InputError(f"mode must be 'min' or 'max', got {mode!r}")
        if every_n_epochs < 1:
            raise InputError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if trigger == "score" and grower_kwargs.get("score_threshold") is None:
            raise InputError("trigger='score' needs a score_threshold (a grower option)")
        if trigger == "plateau":
            grower_kwargs.setdefault("plateau_patience", 2)
        self.attr, self.trigger, self.monitor, self.mode = attr, trigger, monitor, mode
        self.every_n_epochs = every_n_epochs
        self.example_input = example_input
        self.grower_kwargs = grower_kwargs
        self.grower: Grower | None = None
        self._module: pl.LightningModule | None = None
        self._example: Any = None
        self._attached: list[torch.optim.Optimizer] = []
        self._hook: Any = None
        self._restoring = False
        self._stash: dict[str, torch.Tensor] | None = None
        self._layouts: list[list[list[str]] | None] | None = None
        self._new_groups: list[list[dict[str, Any]]] | None = None
        self._val_metrics: list[float] = []
        self._last_step = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(attr=self.attr)

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.world_size > 1:
            raise InputError("GrowCallback supports single-process training only: growth changes the parameter "
                             "set, which distributed data parallel wrappers cannot follow")
        if trainer.strategy.restore_checkpoint_after_setup:
            raise InputError(f"GrowCallback does not support {type(trainer.strategy).__name__}, which restores "
                             "checkpoints after setup")
        net = getattr(pl_module, self.attr, None)
        if not isinstance(net, nn.Module):
            raise InputError(f"the LightningModule has no submodule {self.attr!r} to grow")
        self._module = pl_module
        if self.grower is not None and net is self.grower.model:
            logger.info("GrowCallback: continuing with the grower of an earlier fit")
        elif isinstance(net, CandidateModel):
            raise InputError(f"pl_module.{self.attr} already carries growth candidates (another GrowCallback on "
                             "the same attribute?)")
        else:
            dev = next((p.device for p in net.parameters()), torch.device("cpu"))
            example = _to_device(self._example_input(trainer, pl_module), dev)
            self._example = _to_device(example, torch.device("cpu"))
            self._install(Grower(net, example, **self.grower_kwargs))
        # Lightning restores a checkpoint's weights next (before configure_optimizers); the
        # pre-hook catches a grown state_dict so that load_state_dict() can rebuild the structure.
        self._restoring = True

    def _install(self, grower: Grower) -> None:
        assert self._module is not None
        if self._hook is not None:
            self._hook.remove()
        self.grower = grower
        setattr(self._module, self.attr, grower.model)
        self._hook = grower.model.register_load_state_dict_pre_hook(self._pre_load)

    def _example_input(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        if self.example_input is not None:
            return self.example_input
        arr = getattr(pl_module, "example_input_array", None)
        if arr is not None:
            if isinstance(arr, dict):
                raise InputError("example_input_array is a dict of keyword inputs; pass example_input= to GrowCallback")
            return _first_sample(arr)
        # The loaders handed to fit() are reachable before the fit loop loads them only through the
        # fit loop's data source (datamodule, LightningModule hook or the loaders themselves).
        source = getattr(trainer.fit_loop, "_data_source", None)
        if source is None or not source.is_defined():
            raise InputError("GrowCallback needs an example input: pass example_input= or set the LightningModule's "
                             "example_input_array")
        batch = next(iter(source.dataloader()))
        x = _first_tensor(batch)
        if x is None:
            raise InputError("the first training batch holds no tensor; pass example_input= to GrowCallback")
        return x[:1]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restoring = False
        if self.grower is None:
            return
        if self._stash is not None:
            raise PlanError("the checkpoint holds a grown model but no GrowCallback state to rebuild it from; resume "
                            f"with the GrowCallback(attr={self.attr!r}) the checkpoint was saved with")
        self.grower.to(pl_module.device)
        steps = trainer.num_training_batches
        if isinstance(steps, int) and steps > 0:  # sets the new parameters' warm-up (a fraction of an epoch)
            self.grower.steps_per_epoch = max(1, steps // max(1, trainer.accumulate_grad_batches))
        self.grower.detach()
        self._attached = list(trainer.optimizers)
        for opt in self._attached:
            self.grower.attach(opt, _schedulers(trainer, opt))
        mine = {id(p) for p in self.grower.parameters()}
        if not any(id(p) in mine for opt in self._attached for g in opt.param_groups for p in g["params"]):
            logger.warning("GrowCallback: no optimizer trains pl_module.%s; build one in configure_optimizers from "
                           "self.parameters() or self.%s.parameters()", self.attr, self.attr)
        if self._layouts is not None:
            self._restore_layouts(trainer, pl_module)
            self._layouts = None
        if self._new_groups is not None:
            for opt, saved in zip(self._attached, self._new_groups):
                self.grower.load_new_group_state(opt, saved)
            self._new_groups = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step

    # ------------------------------------------------------------------ training
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.grower is None or trainer.global_step == self._last_step:
            return  # no optimizer step in this batch (gradient accumulation)
        self._last_step = trainer.global_step
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        # A non-finite loss right after a growth rolls the growth back (the grower's rule).
        ev = self.grower.after_step(loss if isinstance(loss, torch.Tensor) else None)
        if ev is not None:
            _log_event(ev, trainer.current_epoch)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.grower is None or self.trigger != "plateau" or trainer.sanity_checking:
            return
        if trainer.state.fn != TrainerFn.FITTING:
            return
        v = trainer.callback_metrics.get(self.monitor)
        if v is None:
            raise InputError(f"GrowCallback monitors {self.monitor!r}, which validation did not log; logged metrics: "
                             f"{sorted(trainer.callback_metrics)}")
        self._val_metrics.append(float(v))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.grower is None:
            return
        reports, self._val_metrics = self._val_metrics, []
        if not _is_last_epoch(trainer):
            if self.trigger == "plateau":
                for v in reports:
                    ev = self.grower.report_validation(v, higher_is_better=self.mode == "max")
                    if ev is not None:
                        _log_event(ev, trainer.current_epoch)
            elif self.trigger == "epoch" and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
                _log_event(self.grower.grow_now("epoch"), trainer.current_epoch)
        cost = self.grower.cost
        grown = sum(1 for e in self.grower.events if e.chosen)
        for key, value in (("grow/params", cost.params), ("grow/flops", cost.flops), ("grow/growths", grown)):
            pl_module.log(key, float(value), on_step=False, on_epoch=True, batch_size=1)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self.grower is None:
            return {}
        meta, tensors = self.grower.state_dict()
        # Persistent weights already sit in the LightningModule's state_dict; keep the rest
        # (candidate optimizer, running candidate scores).
        in_model = {_PREFIX + k for k in self.grower.model.state_dict()}
        extra = {k: v for k, v in tensors.items() if k not in in_model}
        return {"format": "growkit.lightning.GrowCallback", "grower": meta, "tensors": extra,
                "layouts": [self._layout(opt) for opt in self._attached],
                # warm-up progress of the new-parameter groups: a resume continues the ramp
                "new_groups": [self.grower.new_group_state(opt) for opt in self._attached]}

    def _layout(self, opt: torch.optim.Optimizer) -> list[list[str]] | None:
        assert self._module is not None
        names = {id(p): n for n, p in self._module.named_parameters()}
        if any(id(p) not in names for g in opt.param_groups for p in g["params"]):
            return None  # parameters outside the LightningModule: the layout cannot be named
        return [[names[id(p)] for p in g["params"]] for g in opt.param_groups]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.grower is None or self._module is None:
            raise PlanError("GrowCallback state can only be loaded during trainer.fit(..., ckpt_path=...)")
        if self.grower.plan.edits:
            raise PlanError("this GrowCallback has already grown its model; resume with a new GrowCallback and a fresh "
                            "LightningModule")
        model_state = self._stash if self._stash is not None else self.grower.model.state_dict()
        tensors = {_PREFIX + k: v for k, v in model_state.items()}
        tensors.update(state_dict["tensors"])
        # The fresh grower's candidate-free copy is the base graph the saved plan replays onto.
        base = self.grower.grown_model()
        dev = next(self.grower.model.parameters()).device
        grower = Grower.from_state(base, _to_device(self._example, dev), state_dict["grower"], tensors,
                                   **self.grower_kwargs)
        self._install(grower.to(dev))
        self._stash = None
        self._layouts = state_dict.get("layouts")
        self._new_groups = state_dict.get("new_groups")
        logger.info("GrowCallback: resumed a grower with %d growth events (%d params)", len(grower.events),
                    grower.cost.params)

    def _pre_load(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        if not self._restoring:
            return
        mine = [k for k in state_dict if k.startswith(prefix)]
        current = module.state_dict()
        if {k[len(prefix):] for k in mine} == set(current):
            return  # same structure: an ordinary load
        # A grown checkpoint: keep its tensors for load_state_dict() (called by Lightning right after
        # the weights) and let this load see the current weights, which it then loads unchanged.
        self._stash = {k[len(prefix):]: state_dict.pop(k) for k in mine}
        for k, v in current.items():
            state_dict[prefix + k] = v

    def _restore_layouts(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.grower is not None and self._layouts is not None
        if len(self._layouts) != len(self._attached):
            raise PlanError(f"the checkpoint has {len(self._layouts)} optimizers, configure_optimizers made "
                            f"{len(self._attached)}")
        named = dict(pl_module.named_parameters())
        for opt, layout in zip(self._attached, self._layouts):
            if layout is None:
                continue
            missing = [n for g in layout for n in g if n not in named]
            if missing:
                raise PlanError(f"checkpointed optimizer parameters missing from the resumed model: {missing[:5]}")
            have = {id(p) for g in opt.param_groups for p in g["params"]}
            want = {id(named[n]) for g in layout for n in g}
            if have - want or len(layout) < len(opt.param_groups):
                raise PlanError("configure_optimizers built an optimizer that does not match the checkpointed one")
            scheds = _schedulers(trainer, opt)
            n_own = len(opt.param_groups)
            for i, names in enumerate(layout):
                params = [named[n] for n in names]
                if i < n_own:
                    opt.param_groups[i]["params"] = params
                else:
                    # Groups that growth added; their hyper-parameters come from the checkpoint.
                    self.grower.add_param_group(opt, params, scheds)


def _schedulers(trainer: pl.Trainer, opt: torch.optim.Optimizer) -> list[Any]:
    return [c.scheduler for c in trainer.lr_scheduler_configs if getattr(c.scheduler, "optimizer", None) is opt]


def _is_last_epoch(trainer: pl.Trainer) -> bool:
    if trainer.should_stop:
        return True
    if trainer.max_epochs is not None and trainer.max_epochs >= 0 and trainer.current_epoch + 1 >= trainer.max_epochs:
        return True
    return trainer.max_steps is not None and trainer.max_steps >= 0 and trainer.global_step >= trainer.max_steps


def _log_event(ev: GrowthEvent, epoch: int) -> None:
    if ev.chosen:
        logger.info("GrowCallback: grew %s after epoch %d (%s): params %d -> %d", ev.chosen, epoch, ev.trigger,
                    ev.params_before, ev.params_after)
    else:
        logger.info("GrowCallback: no growth after epoch %d (%s): %s", epoch, ev.trigger, ev.note)


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        t = _first_tensor(item)
        if t is not None:
            return t
    return None


def _first_sample(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x[:1]
    if isinstance(x, (list, tuple)):
        return tuple(a[:1] if isinstance(a, torch.Tensor) else a for a in x)
    raise InputError(f"unsupported example input of type {type(x).__name__}; pass example_input= to GrowCallback")


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return tuple(_to_device(a, device) for a in x)
    return x
