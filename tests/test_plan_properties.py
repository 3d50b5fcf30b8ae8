"""Property-based tests: random valid plans replay exactly, random invalid ones are rejected."""
from __future__ import annotations

import copy
import json

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import growkit
from growkit.core.ops import PAPER_OPS

from .conftest import TinyResNet, run_eval

torch.manual_seed(0)
BASE = TinyResNet(widths=(4, 8, 8))
X = torch.randn(2, 1, 12, 12)
GRAPH = growkit.trace(BASE, X[:1])
POINTS = {p.name: [z.name for z in p.inputs] for p in GRAPH.points if p.inputs}
BASE_OUT = run_eval(BASE, X)
FINGERPRINT = growkit.plan_of(growkit.apply_plan(BASE, growkit.GrowthPlan(input_shapes=[[1, 1, 12, 12]]))).fingerprint
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def valid_plans(draw) -> dict:
    points = draw(st.lists(st.sampled_from(sorted(POINTS)), min_size=1, max_size=3, unique=True))
    edits = []
    for i, p in enumerate(points):
        pairs = [(z, op) for z in POINTS[p] for op in PAPER_OPS]
        edges = draw(st.lists(st.sampled_from(pairs), min_size=1, max_size=3, unique=True))
        edits.append({"point": p, "key": f"g{i}", "edges": [{"input": z, "op": op} for z, op in edges]})
    return {"format": "growkit.plan", "version": 1, "base": {}, "input_shapes": [[1, 1, 12, 12]],
            "input_dtypes": ["float32"], "fingerprint": FINGERPRINT, "edits": edits}


@SETTINGS
@given(plan=valid_plans(), seed=st.integers(0, 2**16))
def test_valid_plans_replay_exactly(tmp_path_factory, plan, seed):
    before = copy.deepcopy(BASE.state_dict())
    p = growkit.GrowthPlan.from_json(json.dumps(plan))
    assert p.to_dict() == plan
    grown = growkit.apply_plan(BASE, p)
    assert torch.equal(run_eval(grown, X), BASE_OUT)  # eta = 0: the base function
    torch.manual_seed(seed)
    with torch.no_grad():  # live branches with random weights
        for b in grown.growkit_branches.values():
            b.eta.fill_(0.5)
            for w in b.parameters():
                w.add_(0.1 * torch.randn_like(w))
    out = tmp_path_factory.mktemp("plan")
    growkit.save(grown, out)
    loaded = growkit.load(out, base_model=BASE)
    assert torch.equal(run_eval(loaded, X), run_eval(grown, X))
    assert growkit.plan_of(loaded).to_dict() == growkit.plan_of(grown).to_dict()
    assert all(torch.equal(v, BASE.state_dict()[k]) for k, v in before.items())  # base untouched


BAD_IDENTIFIERS = ["__import__('os').system('true')", "a.b", "", "x y", "g0;rm", 3, None]


@st.composite
def invalid_plans(draw) -> tuple[dict, str]:
    plan = copy.deepcopy(draw(valid_plans()))
    edit = draw(st.sampled_from(plan["edits"]))
    edge = draw(st.sampled_from(edit["edges"]))
    kind = draw(st.sampled_from(["point", "input", "op", "identifier", "fingerprint", "shape", "format", "no_edges"]))
    if kind == "point":
        edit["point"] = draw(st.sampled_from(["no_such_node", "conv1", "output"]))
    elif kind == "input":
        others = [n.name for n in GRAPH.graph_module.graph.nodes if n.name not in POINTS[edit["point"]]]
        edge["input"] = draw(st.sampled_from(others)).replace(".", "_")
    elif kind == "op":
        edge["op"] = draw(st.sampled_from(["conv_9x9", "eval", "lambda_x"]))
    elif kind == "identifier":
        field = draw(st.sampled_from(["point", "key", "input", "op"]))
        bad = draw(st.sampled_from(BAD_IDENTIFIERS))
        (edge if field in ("input", "op") else edit)[field] = bad
    elif kind == "fingerprint":
        plan["fingerprint"] = "0" * 16
    elif kind == "shape":
        plan["input_shapes"] = [[1, -1, 12]]
    elif kind == "format":
        plan["format"] = "pickle"
    else:
        edit["edges"] = []
    return plan, kind


@SETTINGS
@given(case=invalid_plans())
def test_invalid_plans_are_rejected(case):
    plan, kind = case
    before = copy.deepcopy(BASE.state_dict())
    try:
        growkit.apply_plan(BASE, growkit.GrowthPlan.from_json(json.dumps(plan)))
    except growkit.PlanError:
        pass
    else:
        raise AssertionError(f"plan with a bad {kind} was accepted: {plan}")
    assert all(torch.equal(v, BASE.state_dict()[k]) for k, v in before.items())
