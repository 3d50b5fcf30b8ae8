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

__all__ = ["DualGraphModule", "graphs_of", "same_graph", "shared_nodes", "all_nodes"]


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


def shared_nodes(a: torch.fx.Graph, b: torch.fx.Graph) -> set[str]:
    """Names of the nodes that compute the same value in both graphs: same name, op, target and
    arguments, and every input node shared too."""
    kb = {n.name: _node_key(n) for n in b.nodes}
    shared: set[str] = set()
    for n in a.nodes:
        if kb.get(n.name) == _node_key(n) and all(i.name in shared for i in n.all_input_nodes):
            shared.add(n.name)
    return shared


def all_nodes(gm: torch.fx.GraphModule) -> chain:
    """Nodes of every graph of ``gm``."""
    return chain.from_iterable(g.nodes for g in graphs_of(gm))
