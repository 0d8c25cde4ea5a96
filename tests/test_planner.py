"""The planner: dense fallback equals the model, plans are recorded per layer, mode auto follows them."""

from __future__ import annotations

import torch

from ann_mlp.approx_mlp import ApproxMLP, augmented_keys
from ann_mlp.approx_model import ApproxModel
from ann_mlp.capture import forward, make_batch
from ann_mlp.checkpoint import load_checkpoint
from ann_mlp.index import build_index
from ann_mlp.patch import patched
from ann_mlp.planner import (
    PLAN_BATCH_SIZES,
    PLAN_MARGIN,
    approx_up_to,
    decode_timings,
    machine,
    plan_layer,
    planning_prompts,
    replan_if_moved,
)


def test_dense_path_reproduces_the_model(tiny_checkpoint):
    checkpoint = load_checkpoint(str(tiny_checkpoint))
    adapter = checkpoint.adapter
    mlps = {}
    for layer in range(checkpoint.num_layers):
        weights = adapter.mlp_weights(layer)
        mlp = ApproxMLP(weights, build_index("exact", augmented_keys(weights)), k=4)
        mlp.approx_up_to = 0  # every call runs dense
        mlps[layer] = mlp
    batch = make_batch(checkpoint, ["The planner's dense path is the exact MLP.", "Short one."], 32)
    exact = forward(checkpoint, batch)
    with patched(adapter, mlps):
        dense = forward(checkpoint, batch)
    key = "last_hidden_state" if checkpoint.kind == "encoder" else "logits"
    torch.testing.assert_close(dense[key], exact[key], atol=1e-5, rtol=1e-5)
    assert all(m.stats.queries == 0 and m.stats.dense_tokens > 0 for m in mlps.values())


def test_plan_is_a_prefix_of_the_measured_clear_wins(tiny_checkpoints):
    weights = load_checkpoint(str(tiny_checkpoints["opt"])).adapter.mlp_weights(0)
    mlp = ApproxMLP(weights, build_index("ivf", augmented_keys(weights)), k=8)
    plan = plan_layer(mlp, torch.randn(50, weights.d_model), repeats=3)
    assert plan["batch_sizes"] == list(PLAN_BATCH_SIZES)
    assert len(plan["dense_us"]) == len(plan["approx_us"]) == len(PLAN_BATCH_SIZES)
    assert all(t > 0 for t in plan["dense_us"] + plan["approx_us"])
    wins = [a <= PLAN_MARGIN * d for d, a in zip(plan["dense_us"], plan["approx_us"])]  # clear wins only
    expected = 0
    for size, win in zip(PLAN_BATCH_SIZES, wins):
        if not win:
            break
        expected = size
    assert plan["approx_up_to"] == expected
    assert mlp.stats.queries == 0  # planning leaves no counts behind


def test_only_clear_wins_approximate():
    """A measured gain under 10 % is within the planner's noise: dense there, and at every larger size."""
    sizes = (1, 4, 16, 64)
    assert approx_up_to(sizes, [100, 400, 800, 2000], [50, 200, 750, 1000]) == 4  # 6 % at 16 ends it
    assert approx_up_to(sizes, [100, 400, 800, 2000], [95, 200, 400, 1000]) == 0  # 5 % at batch 1 is not a win
    assert approx_up_to(sizes, [100, 400, 800, 2000], [90, 360, 720, 1800]) == 64  # exactly the margin is


def test_store_records_plans_and_auto_follows_them(tiny_stores):
    model = ApproxModel.open(tiny_stores["tiny-bert"])
    assert all(entry.plan is not None and "approx_up_to" in entry.plan for entry in model.manifest.layers)
    assert model.plans == {entry.layer: entry.plan for entry in model.manifest.layers}
    for layer, plan in model.plans.items():
        model.plans[layer] = {**plan, "approx_up_to": 4}
    checkpoint = model.checkpoint
    small, large = (make_batch(checkpoint, [text], 64) for text in ("a b", "a longer input of many tokens here"))
    assert small.num_tokens <= 4 < large.num_tokens
    for batch, dense_expected in ((small, False), (large, True)):
        model.reset_stats()
        with model.approximate(planned=True):
            forward(checkpoint, batch)
        for mlp in model.mlps.values():
            assert (mlp.stats.dense_tokens > 0) == dense_expected
            assert (mlp.stats.queries > 0) == (not dense_expected)
    model.reset_stats()
    with model.approximate():  # unplanned: always approximate, whatever the plan says
        forward(checkpoint, large)
    assert all(m.stats.dense_tokens == 0 and m.stats.queries > 0 for m in model.mlps.values())
    assert all(m.approx_up_to is None for m in model.mlps.values())  # the plan does not outlive the block


def test_layers_whose_plan_never_pays_keep_the_models_own_mlp(tiny_stores):
    model = ApproxModel.open(tiny_stores["tiny-llama"])
    for layer, plan in model.plans.items():
        model.plans[layer] = {**(plan or {}), "approx_up_to": 0}
    checkpoint = model.checkpoint
    batch = make_batch(checkpoint, ["every layer stays dense here"], 64)
    exact = forward(checkpoint, batch).logits
    model.reset_stats()
    with model.approximate(planned=True):
        assert not any(isinstance(m, ApproxMLP) for m in checkpoint.model.modules())
        planned = forward(checkpoint, batch).logits
    torch.testing.assert_close(planned, exact)
    assert all(m.stats.dense_tokens == batch.num_tokens and m.stats.queries == 0 for m in model.mlps.values())


def test_causal_lm_plans_decide_batch_one_inside_decoding(tiny_stores):
    """A causal LM's plan times one-token calls while the model decodes, and batch 1 follows them."""
    model = ApproxModel.open(tiny_stores["tiny-llama"])
    assert model.manifest.extra["plan_machine"] == machine()
    for plan in model.plans.values():
        assert plan["decode_dense_us"] > 0 and plan["decode_approx_us"] > 0
        expected = approx_up_to(
            PLAN_BATCH_SIZES,
            [plan["decode_dense_us"], *plan["dense_us"][1:]],
            [plan["decode_approx_us"], *plan["approx_us"][1:]],
        )
        assert plan["approx_up_to"] == expected


def test_decode_timings_cover_every_layer_and_leave_no_state(tiny_stores):
    model = ApproxModel.open(tiny_stores["tiny-llama"])
    timings = decode_timings(model, planning_prompts(model))
    assert set(timings) == set(model.mlps)
    assert all(dense > 0 and approx > 0 for dense, approx in timings.values())
    assert all(
        m.approx_up_to is None and m.stats.queries == 0 and m.stats.dense_tokens == 0 for m in model.mlps.values()
    )
    assert not any(isinstance(m, ApproxMLP) for m in model.checkpoint.model.modules())  # unpatched


def test_a_store_planned_elsewhere_is_planned_again_in_memory(tiny_stores):
    model = ApproxModel.open(tiny_stores["tiny-llama"])
    assert not replan_if_moved(model)  # planned on this machine: kept as recorded
    model.manifest.extra["plan_machine"] = {**machine(), "cpu": "another processor"}
    recorded = {layer: dict(plan) for layer, plan in model.plans.items()}
    model.plans = {layer: None for layer in model.plans} | {0: {"approx_up_to": 64}}
    assert replan_if_moved(model)
    assert set(model.plans) == set(recorded)
    assert all(
        "decode_dense_us" in plan and plan["batch_sizes"] == list(PLAN_BATCH_SIZES) for plan in model.plans.values()
    )
