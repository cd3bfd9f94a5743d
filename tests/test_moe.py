"""The MoE layer: dispatch equals a per-token reference, capacity drops, balance/z losses, bias balancing."""

import math

import pytest
import torch
import torch.nn.functional as F

from models.common.errors import ModelError
from models.common.moe import MoELayer


def naive_moe(moe: MoELayer, x_ND: torch.Tensor, capacity: int | None = None) -> torch.Tensor:
    """Token by token, choice by choice; with a capacity, an expert serves first choices (in token order) first."""
    probs_NE = F.linear(x_ND, moe.router.weight).softmax(-1)
    gates_NK, experts_NK = probs_NE.topk(moe.top_k, dim=-1)
    if moe.top_k > 1:
        gates_NK = gates_NK / gates_NK.sum(-1, keepdim=True)
    load = [0] * moe.n_experts
    y_ND = torch.zeros_like(x_ND)
    for k in range(moe.top_k):
        for n in range(x_ND.size(0)):
            e = int(experts_NK[n, k])
            load[e] += 1
            if capacity is not None and load[e] > capacity:
                continue
            y_ND[n] += gates_NK[n, k] * (F.gelu(x_ND[n] @ moe.up_EDF[e]) @ moe.down_EFD[e])
    return y_ND


# EQUAL_BLOCKS_MAX_ROWS 0: every expert block as it is, one matmul per expert; 100: all blocks padded to the
# largest, one batched matmul over the experts
@pytest.mark.parametrize("equal_blocks_max_rows", [0.0, 100.0])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_dispatch_matches_per_token_reference_with_gradients(monkeypatch, top_k, equal_blocks_max_rows):
    import models.common.moe as moe_module

    monkeypatch.setattr(moe_module, "EQUAL_BLOCKS_MAX_ROWS", equal_blocks_max_rows)
    torch.manual_seed(0)
    moe = MoELayer(16, 24, n_experts=4, top_k=top_k)
    x_BTD = torch.randn(3, 5, 16, requires_grad=True)
    y_BTD, _, stats = moe(x_BTD)
    x_ref = x_BTD.detach().clone().requires_grad_(True)
    y_ref = naive_moe(moe, x_ref.view(-1, 16))
    torch.testing.assert_close(y_BTD.view(-1, 16), y_ref, atol=1e-6, rtol=1e-5)
    assert float(stats["moe/dropped_frac"]) == 0.0
    g = torch.randn_like(y_ref)
    (up_grad,) = torch.autograd.grad((y_BTD.view(-1, 16) * g).sum(), [moe.up_EDF], retain_graph=True)
    (up_ref,) = torch.autograd.grad((y_ref * g).sum(), [moe.up_EDF])
    torch.testing.assert_close(up_grad, up_ref, atol=1e-6, rtol=1e-5)
    x_grad = torch.autograd.grad((y_BTD.view(-1, 16) * g).sum(), x_BTD)[0]
    x_grad_ref = torch.autograd.grad((naive_moe(moe, x_ref.view(-1, 16)) * g).sum(), x_ref)[0]
    torch.testing.assert_close(x_grad, x_grad_ref, atol=1e-6, rtol=1e-5)


def test_capacity_drops_are_counted_and_match_reference():
    torch.manual_seed(1)
    moe = MoELayer(8, 16, n_experts=4, top_k=2, capacity_factor=0.5)
    with torch.no_grad():  # route almost everything to expert 0 so the capacity must bite
        moe.router.weight.zero_()
        moe.router.weight[0] = 1.0
    x_BTD = torch.rand(1, 12, 8) + 0.5
    y_BTD, _, stats = moe(x_BTD)
    capacity = math.ceil(0.5 * 12 * 2 / 4)  # 3 assignments per expert
    torch.testing.assert_close(y_BTD.view(-1, 8), naive_moe(moe, x_BTD.view(-1, 8), capacity), atol=1e-6, rtol=1e-5)
    # expert 0 gets 12 first choices and keeps 3; the second choices spread over the other 3 experts
    probs = F.linear(x_BTD.view(-1, 8), moe.router.weight).softmax(-1)
    counts = torch.bincount(probs.topk(2, -1).indices.flatten(), minlength=4)
    expected_dropped = int((counts - counts.clamp(max=capacity)).sum())
    assert expected_dropped > 0
    assert float(stats["moe/dropped_frac"]) == pytest.approx(expected_dropped / 24)
    y_BTD.sum().backward()  # the dropped path has a gradient too


def test_balance_loss_value_on_known_routing():
    moe = MoELayer(4, 8, n_experts=4, top_k=1, balance_loss_weight=1.0, z_loss_weight=0.0)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(4) * 10.0)
    # two tokens go to expert 0 (prob ~1), one each to experts 1 and 2, none to expert 3
    x_BTD = torch.tensor([[[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]])
    _, aux, stats = moe(x_BTD)
    probs_NE = F.linear(x_BTD[0], moe.router.weight).softmax(-1)
    f_E = torch.tensor([0.5, 0.25, 0.25, 0.0])
    expected = 4 * (f_E * probs_NE.mean(0)).sum()
    assert aux.item() == pytest.approx(expected.item(), rel=1e-5)
    assert expected.item() == pytest.approx(4 * (0.5 * 0.5 + 0.25 * 0.25 + 0.25 * 0.25), rel=1e-3)
    assert float(stats["moe/experts_used_frac"]) == 0.75


def test_balanced_routing_gives_the_weight_and_loss_scale_averages_layers():
    moe = MoELayer(4, 8, n_experts=4, top_k=2, balance_loss_weight=0.01, z_loss_weight=0.0, loss_scale=0.25)
    with torch.no_grad():
        moe.router.weight.zero_()  # uniform probabilities; top-2 ties broken by index, still P_e = 1/E
    _, aux, stats = moe(torch.randn(2, 8, 4))
    # f = (.5, .5, 0, 0), P = 1/4 each -> E * sum f P = 1, times weight, times loss_scale
    assert float(stats["moe/balance_loss"]) == pytest.approx(1.0)
    assert aux.item() == pytest.approx(0.01 * 0.25)


def test_z_loss_is_mean_squared_logsumexp():
    torch.manual_seed(2)
    moe = MoELayer(6, 8, n_experts=3, top_k=1, balance_loss_weight=0.0, z_loss_weight=0.5)
    x_BTD = torch.randn(2, 4, 6)
    _, aux, _ = moe(x_BTD)
    logits = F.linear(x_BTD.view(-1, 6), moe.router.weight)
    assert aux.item() == pytest.approx(0.5 * torch.logsumexp(logits, -1).square().mean().item(), rel=1e-5)
    aux.backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_bias_balancing_moves_load_to_starved_experts():
    torch.manual_seed(3)
    moe = MoELayer(8, 8, n_experts=4, top_k=1, bias_balance_rate=0.01).train()
    with torch.no_grad():
        moe.router.weight[0] += 0.3  # expert 0 is favoured by every token of a positive input
    x_BTD = torch.rand(4, 16, 8)
    first = float(moe(x_BTD)[2]["moe/max_load_over_mean"])
    for _ in range(100):
        moe(x_BTD)
    last = float(moe(x_BTD)[2]["moe/max_load_over_mean"])
    assert first > 2.0 and last < first * 0.6
    assert moe.balance_bias_E[0] < 0 < moe.balance_bias_E[1:].max()
    assert "balance_bias_E" in moe.state_dict()


def test_expert_bias_hook_steers_routing():
    torch.manual_seed(4)
    moe = MoELayer(8, 8, n_experts=4, top_k=1)
    x_BTD = torch.randn(2, 10, 8)
    moe.set_expert_bias(torch.tensor([0.0, 0.0, 50.0, 0.0]))
    assert float(moe(x_BTD)[2]["moe/max_load_over_mean"]) == 4.0  # everything on expert 2
    moe.set_expert_bias(torch.tensor([[50.0, 0, 0, 0], [0, 0, 0, 50.0]]))  # per sequence
    assert float(moe(x_BTD)[2]["moe/experts_used_frac"]) == 0.5
    moe.set_expert_bias(None)
    with pytest.raises(ModelError, match="n_experts=4"):
        moe.set_expert_bias(torch.zeros(3))


@pytest.mark.parametrize("equal_blocks_max_rows", [0.0, 100.0])
@pytest.mark.parametrize("capacity_factor", [0.0, 0.5])
def test_blocks_padded_for_onednn_match_reference(monkeypatch, capacity_factor, equal_blocks_max_rows):
    # Under bf16 on CPU each expert block is padded with zero rows to a multiple of 32 (see _row_bucket); run
    # that path in fp32, where the per-token reference is exact, with and without dropped assignments, with
    # per-expert and batched expert matmuls.
    import models.common.moe as moe_module

    monkeypatch.setattr(moe_module, "_row_bucket", lambda x_ND: 32)
    monkeypatch.setattr(moe_module, "EQUAL_BLOCKS_MAX_ROWS", equal_blocks_max_rows)
    torch.manual_seed(1)
    moe = MoELayer(16, 24, n_experts=4, top_k=2, capacity_factor=capacity_factor)
    x_BTD = torch.randn(3, 7, 16, requires_grad=True)
    y_BTD, _, stats = moe(x_BTD)
    x_ref = x_BTD.detach().clone().requires_grad_(True)
    capacity = math.ceil(capacity_factor * 21 * 2 / 4) if capacity_factor else None
    y_ref = naive_moe(moe, x_ref.view(-1, 16), capacity)
    torch.testing.assert_close(y_BTD.view(-1, 16), y_ref, atol=1e-6, rtol=1e-5)
    assert (float(stats["moe/dropped_frac"]) > 0) == bool(capacity_factor)
    g = torch.randn_like(y_ref)
    grads = torch.autograd.grad((y_BTD.view(-1, 16) * g).sum(), [x_BTD, moe.up_EDF, moe.down_EFD])
    grads_ref = torch.autograd.grad((y_ref * g).sum(), [x_ref, moe.up_EDF, moe.down_EFD])
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad.view_as(grad_ref), grad_ref, atol=1e-6, rtol=1e-5)


def test_bf16_autocast_forward_backward():
    torch.manual_seed(5)
    moe = MoELayer(16, 32, n_experts=4, top_k=2, capacity_factor=1.0)
    x_BTD = torch.randn(2, 8, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_BTD, aux, _ = moe(x_BTD)
    assert y_BTD.dtype == torch.bfloat16 and aux.dtype == torch.float32
    (y_BTD.float().sum() + aux).backward()
    assert torch.isfinite(x_BTD.grad).all() and moe.up_EDF.grad is not None


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_experts=4, top_k=5), "top_k"),
    (dict(n_experts=0, top_k=1), "n_experts"),
    (dict(n_experts=4, top_k=2, capacity_factor=-1.0), "capacity_factor"),
    (dict(n_experts=4, top_k=2, activation="swish"), "activation"),
    (dict(n_experts=4, top_k=2, z_loss_weight=-1.0), "z_loss_weight"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ModelError, match=match):
        MoELayer(8, 8, **kwargs)
