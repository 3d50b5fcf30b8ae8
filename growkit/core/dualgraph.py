"""A GraphModule with one graph for training and one for evaluation.

torch.fx freezes Python branches at trace time, so a ``forward`` that branches on
``self.training`` (``F.dropout(x, training=self.training)``, ``if self.training: ...``) traces to
different graphs in the two modes. Like torchvision's ``feature_extraction.DualGraphModule``,
:class:`DualGraphModule` keeps both and switches with ``.train()`` / ``.eval()``. growkit's graph
surgery edits every graph of :func:`graphs_of` the same way, under the same node names.
"""
from __future__ import annotations

import copy
from itertools import chain
from typing import Any

import torch.fx
from torch import nn
from torch.fx.graph_module import _copy_attr

__all__ = ["DualGraphModule", "graphs_of", "same_graph", "align_names", "all_nodes"]


class _Body(nn.Module):
    """A module whose ``__dict__`` is given: the source of attributes when copying."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__()
        self.__dict__ = body


class DualGraphModule(torch.fx.GraphModule):
    """GraphModule that runs ``train_graph`` in train mode and ``eval_graph`` in eval mode."""

    def __init__(
        self, root: nn.Module, train_graph: torch.fx.Graph, eval_graph: torch.fx.Graph, class_name: str = "GraphModule"
    ) -> None:
        super().__init__(root, train_graph, class_name)
        # Submodules and attributes only the eval graph uses (the train graph's are copied above).
        for node in eval_graph.nodes:
            if node.op in ("get_attr", "call_module") and not _has_attr(self, node.target):
                _copy_attr(root, self, node.target)
        self.train_graph = train_graph
        self.eval_graph = eval_graph
        self.training = True

    def train(self, mode: bool = True) -> "DualGraphModule":
        target = self.train_graph if mode else self.eval_graph
        if self.graph is not target:
            self.graph = target  # the setter recompiles forward from this graph
        return super().train(mode)

    def __deepcopy__(self, memo: dict[int, Any]) -> "DualGraphModule":
        body = copy.deepcopy(self.__dict__, memo)
        res = DualGraphModule(_Body(body), body["train_graph"], body["eval_graph"], type(self).__name__)
        res.meta = copy.deepcopy(getattr(self, "meta", {}), memo)
        res.train(self.training)
        return res


def _has_attr(mod: nn.Module, target: str) -> bool:
    for part in target.split("."):
        if not hasattr(mod, part):
            return False
        mod = getattr(mod, part)
    return True


def graphs_of(gm: torch.fx.GraphModule) -> list[torch.fx.Graph]:
    """Every graph of ``gm``: train then eval for a :class:`DualGraphModule`, else its one graph."""
    if isinstance(gm, DualGraphModule):
        return [gm.train_graph, gm.eval_graph]
    return [gm.graph]


def _node_key(n: torch.fx.Node) -> str:
    target = n.target if isinstance(n.target, str) else getattr(n.target, "__qualname__", repr(n.target))
    return f"{n.name}|{n.op}|{target}|{n.args!r}|{sorted(n.kwargs.items())!r}"


def same_graph(a: torch.fx.Graph, b: torch.fx.Graph) -> bool:
    """True when two graphs have the same nodes (names, ops, targets, arguments) in the same order."""
    ka = [_node_key(n) for n in a.nodes]
    kb = [_node_key(n) for n in b.nodes]
    return ka == kb


def _target(n: torch.fx.Node) -> str:
    if isinstance(n.target, str):
        return n.target
    return f"{getattr(n.target, '__module__', '')}.{getattr(n.target, '__qualname__', repr(n.target))}"


def align_names(train: torch.fx.Graph, eval_: torch.fx.Graph) -> tuple[torch.fx.Graph, set[str]]:
    """A copy of ``train`` whose nodes carry the names of the corresponding ``eval_`` nodes, and
    the set of those names.

    Nodes correspond when op, target and constant arguments are equal and their input nodes
    correspond (matched in graph order), or when they are the same submodule call (its k-th call
    in both graphs), even where a train-only branch changed its input. A branch taken only in
    training shifts fx's automatic names (``add_1`` in one graph is ``add`` in the other); after
    alignment a growth point's name means the same place in both graphs. Nodes only the train
    graph has get names that the eval graph does not use.
    """
    intern: dict[str, int] = {}
    ids: dict[torch.fx.Node, int] = {}

    def sig(n: torch.fx.Node) -> str:
        args = torch.fx.node.map_arg((n.args, n.kwargs), lambda a: f"%{ids[a]}")
        return f"{n.op}|{_target(n)}|{args!r}"

    by_sig: dict[str, list[torch.fx.Node]] = {}
    calls: dict[str, list[torch.fx.Node]] = {}
    for n in eval_.nodes:
        s = sig(n)
        ids[n] = intern.setdefault(s, len(intern))
        by_sig.setdefault(s, []).append(n)
        if n.op == "call_module":
            calls.setdefault(str(n.target), []).append(n)
    eval_names = {n.name for n in eval_.nodes}
    final: dict[torch.fx.Node, str] = {}
    used: set[str] = set()
    shared: set[str] = set()
    taken: set[torch.fx.Node] = set()
    for n in train.nodes:
        s = sig(n)
        match = next((m for m in by_sig.get(s, []) if m not in taken), None)
        if match is None and n.op == "call_module":
            # The same module call, on an input a train-only branch changed: the same place in
            # the network (a growth point there means the same thing in both modes).
            match = next((m for m in calls.get(str(n.target), []) if m not in taken), None)
        ids[n] = ids[match] if match is not None else intern.setdefault(s, len(intern))
        if match is not None and n.op != "output":
            taken.add(match)
            final[n] = match.name
            shared.add(final[n])
        else:
            name, k = n.name if n.op == "output" else f"train_{n.name}", 0
            while (name in eval_names and n.op != "output") or name in used:
                k += 1
                name = f"train_{n.name}_{k}"
            final[n] = name
        used.add(final[n])
    out = torch.fx.Graph(tracer_cls=train._tracer_cls, tracer_extras=train._tracer_extras)
    out.set_codegen(copy.deepcopy(train._codegen))
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for n in train.nodes:
        args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), lambda a: env[a])
        new = out.create_node(n.op, n.target, args, kwargs, name=final[n], type_expr=n.type)
        if new.name != final[n]:
            raise RuntimeError(f"fx renamed {final[n]!r} to {new.name!r}")
        new.meta = copy.copy(n.meta)
        env[n] = new
    return out, shared


def all_nodes(gm: torch.fx.GraphModule) -> chain:
    """Nodes of every graph of ``gm``."""
    return chain.from_iterable(g.nodes for g in graphs_of(gm))
