"""The HMST MoE LM (shapes, causality, losses, bf16, training, KV cache, early exit, counts) and episodic memory."""

import dataclasses
import json

import pytest
import torch

from models.common.errors import ModelError
from models.common.moe import MoELayer
from models.common.sampling import SamplingConfig, generate
from models.common.ssm import SSMConfig, SSMEncoder
from models.hmst.episodic import EpisodicMemory, encode_spans
from models.hmst.model import HMSTConfig, HMSTLM
from models.registry import build_model, count_params, list_models, param_counts

V = 97


def micro(**overrides) -> HMSTLM:
    torch.manual_seed(0)
    return build_model("hmst-micro", vocab_size=V, **overrides)


def test_presets_are_registered_and_documented():
    for name in ("hmst-micro", "hmst-tiny", "hmst-source-tiny", "hmst-small", "hmst-base", "hmst-large"):
        assert name in list_models()
    source = dataclasses.fields(HMSTConfig)
    assert {"n_experts", "top_k", "capacity_factor", "exit_layer"} <= {f.name for f in source}


def test_forward_shapes_loss_and_stats():
    model = micro()
    ids_BT = torch.randint(0, V, (2, 12))
    out = model(ids_BT, ids_BT)
    assert out.logits is None  # training with targets: the fused head never builds the logits
    with torch.no_grad():
        assert model(ids_BT, ids_BT).logits.shape == (2, 12, V)
    assert out.loss.ndim == 0 and out.aux_loss.ndim == 0
    assert out.lm_loss.item() == pytest.approx((out.loss - out.aux_loss).item())
    for key in ("moe/balance_loss", "moe/router_entropy", "moe/dropped_frac", "hmst/exit_loss"):
        assert key in out.stats
    assert model(ids_BT).loss is None


def test_aux_loss_is_averaged_over_layers():
    model = micro(exit_loss_weight=0.0, z_loss_weight=0.0, balance_loss_weight=1.0)
    out = model(torch.randint(0, V, (2, 16)), torch.randint(0, V, (2, 16)))
    # each layer adds balance/n_layers; stats hold the per-layer average, so the two must agree
    assert out.aux_loss.item() == pytest.approx(float(out.stats["moe/balance_loss"]), rel=1e-5)


def test_causality_future_tokens_do_not_change_past_logits():
    model = micro().eval()
    ids_BT = torch.randint(0, V, (1, 20))
    changed = ids_BT.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % V
    torch.testing.assert_close(model(ids_BT).logits[:, :12], model(changed).logits[:, :12])


def test_kv_cache_decode_equals_full_forward():
    model = micro().eval()
    ids_BT = torch.randint(0, V, (2, 14))
    full_BTV = model(ids_BT).logits
    cache = model.new_state(2, 14)
    parts = [model.step(ids_BT[:, :5], cache)] + [model.step(ids_BT[:, t:t + 1], cache) for t in range(5, 14)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full_BTV, atol=1e-5, rtol=1e-5)


def test_early_exit_skips_later_blocks_and_generates():
    model = micro().eval()
    ids_BT = torch.randint(0, V, (1, 8))
    calls = []
    hooks = [b.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, b in enumerate(model.blocks)]
    exit_logits = model(ids_BT, exit_early=True).logits
    assert calls == [0] and exit_logits.shape == (1, 8, V)
    for h in hooks:
        h.remove()
    # the exit path with its own cache matches its own full forward
    exit_lm = model.early_exit()
    cache = exit_lm.new_state(1, 8)
    steps = torch.cat([exit_lm.step(ids_BT[:, :4], cache), exit_lm.step(ids_BT[:, 4:], cache)], dim=1)
    torch.testing.assert_close(steps, exit_logits, atol=1e-5, rtol=1e-5)
    new = generate(exit_lm, ids_BT, SamplingConfig(max_new_tokens=4, temperature=0))
    assert new.shape == (1, 4)
    with pytest.raises(ModelError, match="exit_layer=0"):
        micro(exit_layer=0)(ids_BT, exit_early=True)


def test_bf16_autocast_forward_backward():
    model = micro(capacity_factor=1.25)
    ids_BT = torch.randint(0, V, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids_BT, ids_BT)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_a_few_training_steps_lower_the_loss():
    model = micro(bias_balance_rate=1e-3)
    g = torch.Generator().manual_seed(0)
    ids_BT = torch.randint(0, V, (4, 33), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        out = model(ids_BT[:, :-1], ids_BT[:, 1:])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.lm_loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_expert_bias_hook_reaches_every_layer():
    model = micro().eval()
    ids_BT = torch.randint(0, V, (2, 10))
    model.set_expert_bias(torch.tensor([100.0, 0.0, 0.0, 0.0]))
    stats = model(ids_BT).stats
    # top-2 of 4 with expert 0 forced: every token uses expert 0, so its load share is 1/2 -> max/mean = 2
    assert float(stats["moe/max_load_over_mean"]) == pytest.approx(2.0)
    model.set_expert_bias(None)
    assert all(m.expert_bias is None for m in model.moe_layers())


def test_param_counts_match_the_analytic_formula():
    model = micro()
    cfg = model.cfg
    counts = count_params(model)
    expert = 2 * cfg.d_model * cfg.d_ff
    per_layer = 4 * cfg.d_model**2 + 2 * cfg.d_model + cfg.d_model * cfg.n_experts + cfg.n_experts * expert
    total = V * cfg.d_model + cfg.n_layers * per_layer + cfg.d_model * 2  # tied head, final + exit norms
    assert counts["total"] == total == model.num_params()
    assert counts["active"] == total - cfg.n_layers * (cfg.n_experts - cfg.top_k) * expert
    assert model.active_params() == counts["active"]
    assert param_counts("hmst-micro", vocab_size=V) == counts  # what `memtrain models` prints
    big = param_counts("hmst-large")  # on the meta device: nothing is allocated
    assert big["total"] > 5e10 and big["active"] < big["total"] / 5
    # a dense model uses all of its parameters, biases included
    dense = param_counts("tgsmn-dense-tiny", vocab_size=V, bias=True)
    assert dense["active"] == dense["total"]


def test_flops_count_active_experts_only():
    model = micro(exit_layer=0)
    dense_like = micro(exit_layer=0, n_experts=2, top_k=2)  # same active experts, fewer total
    assert model.flops_per_token(64) == pytest.approx(dense_like.flops_per_token(64) + 6 * 4 * 128 * 2, rel=1e-9)
    assert isinstance(model.blocks[0].ffn, MoELayer)


@pytest.mark.parametrize("overrides, match", [
    (dict(top_k=5), "top_k"),
    (dict(exit_layer=4), "exit_layer"),
    (dict(capacity_factor=-0.5), "capacity_factor"),
    (dict(exit_loss_every=0), "exit_loss_every"),
    (dict(d_model=130), "divisible"),
])
def test_bad_config_is_refused(overrides, match):
    with pytest.raises(ModelError, match=match):
        build_model("hmst-micro", **overrides)


def test_unknown_field_lists_valid_ones():
    with pytest.raises(ModelError, match="n_experts"):
        build_model("hmst-micro", experts=8)


def test_too_long_sequence_is_refused():
    model = micro(max_seq_len=16)
    with pytest.raises(ModelError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


# --- episodic memory ---

def make_memory(capacity=3, eviction="fifo"):
    torch.manual_seed(0)
    encoder = SSMEncoder(SSMConfig(d_model=32, d_state=8, head_dim=16, n_layers=1, chunk_size=4)).eval()
    embed = torch.nn.Embedding(50, 32)
    return EpisodicMemory(capacity, 32, eviction), encoder, embed


def test_episodic_retrieval_returns_the_real_span():
    memory, encoder, embed = make_memory(capacity=8)
    spans = [torch.randint(0, 50, (n,)) for n in (5, 9, 3, 12)]
    memory.add(encode_spans(encoder, embed, spans), spans, texts=[f"span {i}" for i in range(4)],
               importance=[0.1, 0.2, 0.3, 0.4])
    hits = memory.retrieve(encode_spans(encoder, embed, spans), k=2)
    for i, row in enumerate(hits):
        assert row[0].text == f"span {i}" and torch.equal(row[0].tokens, spans[i])
        assert row[0].score == pytest.approx(1.0, abs=1e-5) and row[0].score >= row[1].score
    # padding a span in a batch does not change its summary (the encoder is causal, pooling is masked)
    alone = encode_spans(encoder, embed, [spans[2]])
    torch.testing.assert_close(alone[0], encode_spans(encoder, embed, spans)[2], atol=1e-5, rtol=1e-5)


def test_episodic_eviction_keeps_capacity_and_unique_ids():
    memory, encoder, embed = make_memory(capacity=3)
    spans = [torch.tensor([i, i + 1]) for i in range(5)]
    ids = memory.add(encode_spans(encoder, embed, spans), spans)
    assert ids == [0, 1, 2, 3, 4] and len(memory) == 3
    assert sorted(memory.ids_C.tolist()) == [2, 3, 4]  # FIFO evicted 0 and 1
    assert memory.remove([3, 99]) == 1 and len(memory) == 2
    more = memory.add(encode_spans(encoder, embed, spans[:2]), spans[:2])
    assert more == [5, 6] and len(memory) == 3  # capacity still enforced after a removal
    assert memory.stats()["episodic/fill"] == 1.0


def test_episodic_importance_eviction_drops_least_important():
    memory, encoder, embed = make_memory(capacity=2, eviction="importance")
    spans = [torch.tensor([1, 2]), torch.tensor([3, 4]), torch.tensor([5, 6])]
    memory.add(encode_spans(encoder, embed, spans), spans, importance=[0.9, 0.1, 0.5])
    assert sorted(memory.ids_C.tolist()) == [0, 2]


def test_episodic_bad_input():
    memory, encoder, embed = make_memory()
    with pytest.raises(ModelError, match=r"\(N, 32\)"):
        memory.add(torch.zeros(2, 31), [torch.tensor([1])] * 2)
    with pytest.raises(ModelError, match="one span"):
        memory.add(torch.zeros(2, 32), [torch.tensor([1])])
    with pytest.raises(ModelError, match="queries"):
        memory.retrieve(torch.zeros(5))
    assert memory.retrieve(torch.zeros(32)) == [[]]


# --- critic ---

from models.hmst.critic import FACTS, QUERY, RESPONSE, Critic, CriticConfig, pack_segments  # noqa: E402
from models.hmst.meta_controller import (GATES, MetaController, MetaControllerConfig,  # noqa: E402
                                         state_features)


def small_critic() -> Critic:
    torch.manual_seed(0)
    return Critic(CriticConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=24,
                               dropout=0.0)).eval()


def test_critic_packing_segments_and_truncation():
    ids, segments, mask = pack_segments([([1, 2, 3], [4, 5], [6, 7, 8, 9]), ([1], [2], [])], max_len=8)
    assert ids.shape == (2, 8)
    assert segments[0].tolist() == [QUERY] * 3 + [RESPONSE] * 2 + [FACTS] * 3  # facts cut first
    assert mask[1].tolist() == [True, True] + [False] * 6
    with pytest.raises(ModelError, match="max_len"):
        pack_segments([([1], list(range(9)), [])], max_len=8)


def test_critic_padding_does_not_change_the_prediction():
    critic = small_critic()
    alone = critic(*pack_segments([([1, 2], [3, 4], [5])], max_len=24))
    padded = critic(*pack_segments([([1, 2], [3, 4], [5]), ([1] * 10, [2] * 5, [3] * 5)], max_len=24))
    torch.testing.assert_close(alone.correct_logit_B[0], padded.correct_logit_B[0], atol=1e-5, rtol=1e-5)
    # segment ids matter: the same tokens labelled as facts instead of response give another score
    ids, segments, mask = pack_segments([([1, 2], [3, 4], [5])], max_len=24)
    other = critic(ids, torch.full_like(segments, FACTS), mask)
    assert not torch.allclose(other.correct_logit_B, alone.correct_logit_B)


def test_a_critic_is_saved_as_its_flat_config_fields_and_loads_back(tmp_path):
    from models.hmst.training import load_critic, save_component

    critic = small_critic()
    save_component(critic, "critic", tmp_path)
    # the stack's seven fields, flat: the format every saved critic.json has
    assert json.loads((tmp_path / "critic.json").read_text())["config"] == dict(
        vocab_size=40, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=24, dropout=0.0)
    batch = pack_segments([([1, 2], [3, 4], [5])], max_len=24)
    torch.testing.assert_close(load_critic(tmp_path)(*batch).correct_logit_B, critic(*batch).correct_logit_B)
    with pytest.raises(ModelError, match="CriticConfig.d_model=30 must be divisible by n_heads=4"):
        CriticConfig(d_model=30, n_heads=4)


def test_critic_learns_to_flag_swapped_facts():
    # toy task: the response is correct iff it repeats the fact value token
    critic = small_critic().train()
    g = torch.Generator().manual_seed(0)
    values = torch.randint(10, 40, (32,), generator=g).tolist()
    wrong = [(v + 7 - 10) % 30 + 10 for v in values]
    examples = [([1, 2], [v if i % 2 == 0 else w], [3, v]) for i, (v, w) in enumerate(zip(values, wrong))]
    labels = torch.tensor([1.0 if i % 2 == 0 else 0.0 for i in range(32)])
    batch = pack_segments(examples, max_len=24)
    opt = torch.optim.AdamW(critic.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = Critic.loss(critic(*batch), labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.7


# --- meta-controller ---

def test_meta_controller_policy_and_deterministic_mode():
    torch.manual_seed(0)
    ctrl = MetaController(MetaControllerConfig(query_dim=16, n_experts=4, hidden=32))
    query_BD = torch.randn(6, 16)
    state_BF = state_features(uncertainty=torch.rand(6), context_fraction=torch.rand(6),
                              episodic_fill=torch.rand(6), semantic_fill=torch.rand(6), last_confidence=torch.rand(6))
    gates, expert = ctrl.distributions(query_BD, state_BF)
    sampled = ctrl.act(query_BD, state_BF)
    assert set(sampled.actions) == set(GATES) | {"expert"}
    assert all(((a == 0) | (a == 1)).all() for name, a in sampled.actions.items() if name != "expert")
    assert ((sampled.actions["expert"] >= 0) & (sampled.actions["expert"] <= 4)).all()
    # evaluate() gives the same log-prob as act() did for the same actions, and it has a gradient for PPO
    again = ctrl.evaluate(query_BD, state_BF, sampled.actions)
    torch.testing.assert_close(again.log_prob_B, sampled.log_prob_B)
    again.log_prob_B.sum().backward()
    assert ctrl.gate_head.weight.grad.abs().sum() > 0
    det = ctrl.act(query_BD, state_BF, deterministic=True)
    assert torch.equal(det.actions["expert"], expert.probs.argmax(-1))
    assert torch.equal(det.actions["verify"], (gates.probs[:, 3] > 0.5).long())
    assert torch.equal(ctrl.act(query_BD, state_BF, deterministic=True).actions["semantic"], det.actions["semantic"])


def test_meta_controller_expert_bias_drives_the_lm():
    ctrl = MetaController(MetaControllerConfig(query_dim=16, n_experts=4, bias_strength=100.0))
    bias_BE = ctrl.expert_bias(torch.tensor([0, 3]))
    assert bias_BE.tolist() == [[0.0] * 4, [0.0, 0.0, 100.0, 0.0]]
    model = micro().eval()
    model.set_expert_bias(bias_BE)
    assert model(torch.randint(0, V, (2, 6))).logits.shape == (2, 6, V)


def test_meta_controller_bad_input():
    ctrl = MetaController(MetaControllerConfig(query_dim=16, n_experts=4))
    with pytest.raises(ModelError, match="in \\[0, 1\\]"):
        state_features([2.0], [0.1], [0.0], [0.0], [0.5])
    with pytest.raises(ModelError, match="one value per query"):
        state_features([0.5, 0.5], [0.1], [0.0], [0.0], [0.5])
    with pytest.raises(ModelError, match=r"\(B, 16\)"):
        ctrl.act(torch.randn(2, 8), torch.zeros(2, 5))
