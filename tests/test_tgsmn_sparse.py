"""The TG-SMN hierarchical sparse-expert LM: routing, dispatch, balance loss, knobs, training, precision, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.common.errors import ModelError
from models.common.sampling import SamplingConfig, generate
from models.io import load_model, save_model
from models.registry import build_model, model_config
from models.tgsmn.sparse import HierarchicalSparseExperts, RoutingKnobs, SparseLM

V = 97


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from a second thread, and on a shared 2-core host OpenMP barriers make them slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**overrides) -> SparseLM:
    """A small sparse LM: 2 layers, 4 groups x 4 experts of rank 8."""
    torch.manual_seed(0)
    kw = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=2, max_seq_len=64,
              n_experts=16, group_size=4, expert_rank=8, max_k=2)
    return build_model("tgsmn-sparse-tiny", **{**kw, **overrides})


def batch(B=2, T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def naive_experts(layer: HierarchicalSparseExperts, x_ND, expert_ids_NK, gate_NK):
    """The original TG-SMN code's per-token computation: gather each token's expert weights, then einsum."""
    W1_NKDR, W2_NKRD = layer.W1_EDR[expert_ids_NK], layer.W2_ERD[expert_ids_NK]
    h_NKR = layer.act(torch.einsum("nd,nkdr->nkr", x_ND, W1_NKDR))
    return (torch.einsum("nkr,nkrd->nkd", h_NKR, W2_NKRD) * gate_NK[..., None]).sum(1)


def test_shapes_stats_and_loss_includes_balance():
    model = tiny()
    x, y = batch()
    with torch.no_grad():
        out = model(x, y)  # no_grad: the unfused head, which returns the logits
    assert out.logits.shape == (2, 12, V)
    assert set(out.stats) == {"tgsmn/router_entropy", "tgsmn/group_entropy", "tgsmn/experts_used_frac",
                              "tgsmn/dropped_frac"}
    assert 0 < float(out.stats["tgsmn/router_entropy"]) <= math.log(4) + 1e-5
    assert 0 < float(out.stats["tgsmn/group_entropy"]) <= math.log(4) + 1e-5
    assert 0 < float(out.stats["tgsmn/experts_used_frac"]) <= 1
    assert float(out.stats["tgsmn/dropped_frac"]) == 0.0
    # each layer's balance term is >= 2 * weight (group + expert terms, 1.0 each at best) and enters the loss
    assert out.aux_loss is not None and out.aux_loss.item() >= 2 * 2 * model.cfg.balance_weight * 0.99
    ce = F.cross_entropy(out.logits.flatten(0, 1), y.flatten())
    torch.testing.assert_close(out.loss, ce + out.aux_loss)
    torch.testing.assert_close(out.lm_loss, ce)


def test_balance_weight_scales_aux_loss():
    x, y = batch()
    aux_1 = tiny(balance_weight=0.01)(x, y).aux_loss
    aux_2 = tiny(balance_weight=0.02)(x, y).aux_loss
    torch.testing.assert_close(aux_2, 2 * aux_1)
    assert tiny(balance_weight=0.0)(x, y).aux_loss.item() == 0.0


@pytest.mark.parametrize("capacity", [dict(), dict(capacity_factor=0.25, min_capacity=1)],
                         ids=["no-drops", "with-drops"])
def test_causal(capacity):
    model = tiny(**capacity).eval()
    x, _ = batch(B=3, T=16)
    logits = model(x).logits
    x2 = x.clone()
    x2[:, 9:] = (x2[:, 9:] + 1) % V  # change the future
    logits2 = model(x2).logits
    torch.testing.assert_close(logits[:, :9], logits2[:, :9])
    assert not torch.allclose(logits[:, 9:], logits2[:, 9:])


def test_dispatch_matches_naive_per_token_outputs_and_grads():
    layer = tiny().blocks[0].ffn
    torch.manual_seed(3)
    x_ND = torch.randn(40, 32, requires_grad=True)
    expert_ids_NK, gate_NK, _, _ = layer.route(x_ND)
    gate_NK = gate_NK.detach().requires_grad_()
    y_fast, dropped = layer.experts(x_ND, expert_ids_NK, gate_NK)
    dy = torch.randn_like(y_fast)
    grads_fast = torch.autograd.grad(y_fast, (x_ND, layer.W1_EDR, layer.W2_ERD, gate_NK), dy)
    y_ref = naive_experts(layer, x_ND, expert_ids_NK, gate_NK)
    grads_ref = torch.autograd.grad(y_ref, (x_ND, layer.W1_EDR, layer.W2_ERD, gate_NK), dy)
    assert float(dropped) == 0.0
    torch.testing.assert_close(y_fast, y_ref)
    for g_fast, g_ref in zip(grads_fast, grads_ref):
        torch.testing.assert_close(g_fast, g_ref)


def test_whole_layer_matches_naive_per_token_routing_and_experts():
    layer = tiny().blocks[0].ffn
    layer.knobs.temperature = 0.7
    torch.manual_seed(5)
    x_ND = torch.randn(40, 32, requires_grad=True)
    params = (x_ND, layer.group_router.weight, layer.router_GDM, layer.W1_EDR, layer.W2_ERD)

    expert_ids_NK, gate_NK, _, _ = layer.route(x_ND)
    y_fast, _ = layer.experts(x_ND, expert_ids_NK, gate_NK)

    # the naive reference: per-token group router weights gathered, no sorting, no grid
    group_p_N, group_ids_N = F.softmax(layer.group_router(x_ND), dim=-1).max(dim=-1)
    logits_NM = torch.einsum("nd,ndm->nm", x_ND, layer.router_GDM[group_ids_N])
    top_NK, top_m_NK = logits_NM.topk(2, dim=-1)
    gate_ref_NK = F.softmax(top_NK / 0.7, dim=-1) * (group_p_N / group_p_N.detach())[:, None]
    ids_ref_NK = group_ids_N[:, None] * 4 + top_m_NK
    y_ref = naive_experts(layer, x_ND, ids_ref_NK, gate_ref_NK)

    assert torch.equal(expert_ids_NK, ids_ref_NK)
    torch.testing.assert_close(y_fast, y_ref)
    dy = torch.randn_like(y_fast)
    for g_fast, g_ref in zip(torch.autograd.grad(y_fast, params, dy), torch.autograd.grad(y_ref, params, dy)):
        torch.testing.assert_close(g_fast, g_ref)


def test_capacity_drops_the_latest_slots_of_overloaded_experts():
    layer = tiny(capacity_factor=0.5, min_capacity=1).blocks[0].ffn
    torch.manual_seed(4)
    x_ND = torch.randn(24, 32)
    expert_ids_NK = torch.randint(0, 4, (24, 2))  # 48 slots onto 4 experts: capacity ceil(0.5 * 48 / 16) = 2
    expert_ids_NK[:, 1] += 4  # distinct experts per token, as top-k gives
    gate_NK = torch.rand(24, 2)
    y_fast, dropped = layer.experts(x_ND, expert_ids_NK, gate_NK)
    # reference: each expert keeps its first 2 slots in (token, k) order
    kept_NK = torch.zeros(24, 2, dtype=torch.bool)
    seen: dict[int, int] = {}
    for n in range(24):
        for j in range(2):
            e = int(expert_ids_NK[n, j])
            kept_NK[n, j] = seen.get(e, 0) < 2
            seen[e] = seen.get(e, 0) + 1
    torch.testing.assert_close(y_fast, naive_experts(layer, x_ND, expert_ids_NK, gate_NK * kept_NK))
    assert float(dropped) == pytest.approx(1 - kept_NK.float().mean().item())


@pytest.mark.parametrize("balance_weight", [0.0, 0.01])
def test_group_router_is_trained(balance_weight):
    model = tiny(balance_weight=balance_weight)
    x, y = batch()
    model(x, y).loss.backward()
    for block in model.blocks:
        grad = block.ffn.group_router.weight.grad
        assert grad is not None and grad.abs().sum() > 0


def test_group_gate_is_one_in_the_forward_pass():
    layer = tiny().blocks[0].ffn
    _, gate_NK, _, _ = layer.route(torch.randn(30, 32))
    torch.testing.assert_close(gate_NK.sum(-1), torch.ones(30))


def test_set_routing_changes_k_noise_and_temperature():
    model = tiny()
    layer = model.blocks[0].ffn
    x_ND = torch.randn(50, 32)
    assert model.routing == RoutingKnobs(k=2, noise=0.0, temperature=1.0)
    model.set_routing(1, 0.0, 1.0)
    ids_NK, gate_NK, _, _ = layer.route(x_ND)
    assert ids_NK.shape == (50, 1) and torch.all(gate_NK == 1)

    model.set_routing(2, 0.0, 0.2)
    _, sharp_NK, _, _ = layer.route(x_ND)
    model.set_routing(2, 0.0, 5.0)
    _, flat_NK, _, _ = layer.route(x_ND)
    assert (sharp_NK.max(-1).values > flat_NK.max(-1).values).all()

    model.set_routing(2, 5.0, 1.0)
    x, _ = batch()
    model.train()
    assert not torch.equal(model(x).logits, model(x).logits)  # noise draws differ
    model.eval()
    torch.testing.assert_close(model(x).logits, model(x).logits, rtol=0, atol=0)  # no noise in eval
    model.set_routing(2, 0.0, 1.0)
    torch.testing.assert_close(model(x).logits, model(x).logits, rtol=0, atol=0)


def test_flops_count_active_params_and_follow_k():
    model = tiny()
    dense = build_model("tgsmn-dense-tiny", vocab_size=V, d_model=32, n_layers=2, n_heads=2, d_ff=128)
    per_layer = 32 * (4 + 4) + 2 * 2 * 32 * 8
    assert model.active_ffn_params() == 2 * per_layer
    flops_k2 = model.flops_per_token(16)
    model.set_routing(1, 0.0, 1.0)
    assert model.flops_per_token(16) < flops_k2 < dense.flops_per_token(16)


def test_training_steps_lower_the_loss():
    model = tiny()
    model.set_routing(2, 0.3, 1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = batch(B=4, T=16)
    losses = []
    for _ in range(30):
        out = model(x, y)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(out.lm_loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_bf16_autocast_forward_backward():
    model = tiny()
    x, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, y)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_generation_with_kv_cache_matches_full_forward():
    model = tiny().eval()
    prompt = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    new = generate(model, prompt, SamplingConfig(max_new_tokens=6, temperature=0))
    full = torch.cat([prompt, new], dim=1)
    greedy = model(full).logits[:, prompt.size(1) - 1:-1].argmax(-1)
    assert torch.equal(greedy, new)


def test_save_load_roundtrip(tmp_path):
    model = tiny().eval()
    save_model(model, "tgsmn-sparse-tiny", tmp_path)
    loaded = load_model(tmp_path)
    x, _ = batch()
    torch.testing.assert_close(loaded(x).logits, model(x).logits)


def test_presets():
    small = model_config("tgsmn-sparse-small", vocab_size=8176)
    assert (small.d_model, small.n_layers, small.n_heads, small.n_experts, small.expert_rank,
            small.group_size, small.max_k) == (192, 4, 4, 256, 16, 32, 2)
    model = build_model("tgsmn-sparse-tiny", vocab_size=V)
    assert isinstance(model.blocks[0].ffn, HierarchicalSparseExperts)


@pytest.mark.parametrize("overrides, message", [
    (dict(n_experts=30, group_size=4), "divisible by group_size"),
    (dict(max_k=5, group_size=4), "exceeds group_size"),
    (dict(expert_rank=0), "expert_rank must be positive"),
    (dict(router_noise=-0.1), "noise must be >= 0"),
    (dict(router_temperature=0.0), "temperature must be > 0"),
    (dict(balance_weight=-1.0), "balance_weight"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(n_expert=8), "unknown config field"),
])
def test_bad_config_is_refused(overrides, message):
    with pytest.raises(ModelError, match=message):
        tiny(**overrides)


@pytest.mark.parametrize("knobs, message", [
    ((3, 0.0, 1.0), r"k must be in \[1, max_k=2\]"),
    ((0, 0.0, 1.0), "k must be in"),
    ((1, -1.0, 1.0), "noise must be >= 0"),
    ((1, 0.0, 0.0), "temperature must be > 0"),
])
def test_bad_routing_is_refused(knobs, message):
    model = tiny()
    with pytest.raises(ModelError, match=message):
        model.set_routing(*knobs)
    assert model.routing == RoutingKnobs(2, 0.0, 1.0)
