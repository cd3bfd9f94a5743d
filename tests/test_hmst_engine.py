"""Fact-recall task, HMST inference engine (gates, cost, sessions, fallback), consolidation, critic/encoder training."""

import random

import numpy as np
import pytest
import torch

from memory_service import LocalMemory, MemoryConfig
from models.common.errors import ModelError
from models.hmst.critic import Critic, CriticConfig
from models.hmst.engine import Decisions, EngineConfig, HMSTEngine, LexicalEmbedder, consolidate
from models.hmst.facts import FactConfig, FactWorld, exact_match, qa_line
from models.hmst.training import (CriticTrainConfig, MemoryTrainConfig, auroc, load_critic, load_ssm_encoder,
                                  save_component, train_critic, train_memory_encoder)
from models.registry import build_model
from orchestration.tokenizers import ByteTokenizer

WORLD = FactWorld(FactConfig(seed=0, n_entities=30))


def make_engine(**config) -> HMSTEngine:
    torch.manual_seed(0)
    critic = Critic(CriticConfig(vocab_size=256, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=256))
    return HMSTEngine(build_model("hmst-micro", vocab_size=256), ByteTokenizer(),
                      semantic_memory=LocalMemory(MemoryConfig(dim=128, fsync=False)), critic=critic,
                      config=EngineConfig(**config))


# --- the task ---

def test_fact_world_is_deterministic_and_the_corpus_holds_only_pretraining_facts():
    again = FactWorld(FactConfig(seed=0, n_entities=30))
    assert again.facts == WORLD.facts and FactWorld(FactConfig(seed=1, n_entities=30)).facts != WORLD.facts
    assert {f.placement for f in WORLD.facts} == {"semantic", "context", "pretraining"}
    natural = [f"natural text {i}\n" for i in range(10)]
    text = "\n".join(WORLD.corpus_documents(natural))
    assert sum(doc in text for doc in natural) == 2 and "context: " in text  # natural_fraction 0.2 of the docs
    assert all(f.statement() in text for f in WORLD.by_placement("pretraining"))
    hidden = WORLD.by_placement("semantic") + WORLD.by_placement("context")
    assert not any(f.entity in text for f in hidden)  # held-out entities never appear in pretraining data


def test_exact_match_reads_the_first_word_of_the_first_line():
    assert exact_match(" Blue.\nquestion: x", "blue") and not exact_match("light blue", "blue")
    assert not exact_match("", "blue")


# --- the engine ---

def test_semantic_retrieval_puts_the_real_fact_in_the_prompt():
    engine = make_engine()
    facts = WORLD.by_placement("semantic")
    assert engine.fill_semantic([f.statement() for f in facts]) == len(facts)
    hits = 0
    for fact in facts:
        result = engine.session().ask(fact.question(), Decisions(semantic=True))
        hits += result.retrieved == [fact.statement()]
        assert "\n" not in result.response and "question:" not in result.response  # the prompt is not echoed
    assert hits / len(facts) >= 0.9  # the lexical embedder finds the fact about the asked entity and attribute
    off = engine.session().ask(facts[0].question(), Decisions())
    assert off.retrieved == [] and off.prompt_tokens < result.prompt_tokens


def test_early_exit_costs_fewer_flops_and_less_time():
    engine = make_engine(max_new_tokens=6)
    full = [engine.session().ask("what is the color of Bavik?", Decisions()) for _ in range(3)]
    early = [engine.session().ask("what is the color of Bavik?", Decisions(early_exit=True)) for _ in range(3)]
    assert early[0].flops < 0.5 * full[0].flops  # hmst-micro exits after 1 of its 4 blocks
    assert min(r.wall_s for r in early) < min(r.wall_s for r in full)


def test_expert_bias_changes_routing_only_for_that_query():
    engine = make_engine()
    seen = []
    hook = engine.model.blocks[0].ffn.register_forward_hook(lambda m, i, o: seen.append(o[2]))
    engine.session().ask("what is the color of Bavik?", Decisions(expert=1))
    biased = seen[0]
    seen.clear()
    engine.session().ask("what is the color of Bavik?", Decisions())
    hook.remove()
    assert biased != seen[0]  # the router's statistics differ under the bias
    assert all(m.expert_bias is None for m in engine.model.moe_layers())  # cleared afterwards
    with pytest.raises(ModelError, match="expert choice"):
        engine.session().ask("x?", Decisions(expert=9))


def test_verification_falls_back_to_retrieval_or_abstains():
    engine = make_engine(verify_threshold=1.0)  # nothing passes: the fallback always runs
    engine.fill_semantic(["the color of Bavik is red."])
    plain = engine.session().ask("what is the color of Bavik?", Decisions())
    retried = engine.session().ask("what is the color of Bavik?", Decisions(verify=True))
    assert retried.verified and retried.fallback == "retrieve" and retried.retrieved == ["the color of Bavik is red."]
    assert retried.flops > plain.flops and 0.0 <= retried.confidence <= 1.0
    abstaining = make_engine(verify_threshold=1.0, fallback="abstain")
    result = abstaining.session().ask("what is the color of Bavik?", Decisions(verify=True))
    assert result.abstained and result.response == "" and result.fallback == "abstain"
    passing = make_engine(verify_threshold=0.0)
    assert passing.session().ask("what is x?", Decisions(verify=True)).fallback is None


def test_session_context_and_episodic_memory_carry_over():
    engine = make_engine(context_turns=1)
    session = engine.session()
    session.tell("the color of Bavik is red.")
    first = session.ask("what is the city of Tomar?", Decisions())
    assert first.prompt_tokens > len(qa_line("what is the city of Tomar?"))  # the told line is in the prompt
    # the told statement has scrolled out of the 1 recent line: only episodic retrieval brings it back
    later = session.ask("what is the color of Bavik?", Decisions(episodic=True))
    assert "the color of Bavik is red." in later.retrieved
    assert len(session.episodic) == 3 and session.queries == 2
    assert engine.session().queries == 0 and len(engine.session().episodic) == 0


def test_consolidation_moves_real_text_with_provenance_and_runs_on_schedule():
    engine = make_engine(consolidate_every=2, consolidate_threshold=0.9)
    session = engine.session()
    session.tell("the color of Bavik is red.")
    session.ask("what is the city of Tomar?", Decisions())
    assert engine.semantic_count() == 0
    session.ask("what is the metal of Tomar?", Decisions())  # 2nd query: the scheduled consolidation runs
    assert engine.semantic_count() == 1 and len(session.consolidated) == 1
    text, meta = engine.semantic_memory.get(session.consolidated)[0]
    assert text == "the color of Bavik is red."
    assert meta["source"] == "episodic" and meta["importance"] == 1.0 and meta["session_query"] == 2
    assert all(e.text != text for e in session.episodic.entries())
    # the consolidated fact is now reachable by semantic retrieval from a new session
    assert engine.session().ask("what is the color of Bavik?", Decisions(semantic=True)).retrieved == [text]
    assert consolidate(session.episodic, engine.semantic_memory, engine.embedder, threshold=2.0) == []


def test_meta_controller_decides_when_no_decisions_are_given():
    from models.hmst.meta_controller import MetaController, MetaControllerConfig

    torch.manual_seed(0)
    engine = make_engine()
    engine.meta_controller = MetaController(MetaControllerConfig(query_dim=128, n_experts=4, hidden=32)).eval()
    obs = engine.session().observe("what is the color of Bavik?")
    assert obs.query_D.shape == (128,) and obs.state_F.shape == (5,) and ((obs.state_F >= 0) & (obs.state_F <= 1)).all()
    result = engine.answer("what is the color of Bavik?")
    assert isinstance(result.decisions, Decisions) and result.flops > obs.flops


def test_bad_inputs_are_refused():
    with pytest.raises(ModelError, match="5 entries"):
        Decisions.from_array([1, 0])
    with pytest.raises(ModelError, match="dim=128"):
        HMSTEngine(build_model("hmst-micro", vocab_size=256), ByteTokenizer(),
                   semantic_memory=LocalMemory(MemoryConfig(dim=64)))
    with pytest.raises(ModelError, match="fallback"):
        EngineConfig(fallback="pray")
    with pytest.raises(ModelError, match="placement_fractions"):
        FactConfig(placement_fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ModelError, match="empty"):
        make_engine().answer("")
    with pytest.raises(ModelError, match="vocabulary"):
        LexicalEmbedder(ByteTokenizer(), vocab_size=50).embed(["zzz"])


# --- training the side networks ---

def test_auroc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    scores, labels = rng.random(200), rng.random(200) < 0.4
    pairs = (scores[labels][:, None] > scores[~labels][None, :]).mean()
    assert auroc(scores, labels) == pytest.approx(pairs)


def test_critic_training_runs_saves_and_loads(tmp_path):
    cfg = CriticTrainConfig(steps=20, batch_size=16, eval_examples=64)
    critic, result = train_critic(WORLD, ByteTokenizer(), 256, cfg, log=None)
    assert 0.0 <= result["auroc"] <= 1.0 and result["steps"] == 20
    save_component(critic, "critic", tmp_path, {"result": result})
    loaded = load_critic(tmp_path)
    ids = torch.randint(0, 256, (2, 12))
    args = (ids, torch.zeros_like(ids), torch.ones_like(ids, dtype=torch.bool))
    torch.testing.assert_close(loaded(*args).correct_logit_B, critic(*args).correct_logit_B)
    with pytest.raises(ModelError, match="no critic"):
        load_critic(tmp_path / "nowhere")


@pytest.mark.slow
def test_critic_detects_corrupted_answers_on_held_out_entities():
    _, result = train_critic(FactWorld(FactConfig(seed=0)), ByteTokenizer(), 256, CriticTrainConfig(), log=None)
    assert result["auroc"] > 0.8 and result["auroc_before"] < 0.65


def test_memory_encoder_contrastive_training_learns(tmp_path):
    torch.manual_seed(0)
    from orchestration.data import builtin_documents

    tok = ByteTokenizer()
    docs = [d for d in builtin_documents() if len(d) > 400]
    random.Random(0).shuffle(docs)
    embed = torch.nn.Embedding(256, 32)
    cfg = MemoryTrainConfig(steps=150, batch_size=32, span_tokens=32, lr=3e-3, eval_pairs=64, temperature=0.1,
                            ssm=dict_to_ssm(d_model=32))
    encoder, result = train_memory_encoder(embed, tok.encode_batch(docs[:200]), tok.encode_batch(docs[200:260]), cfg,
                                           log=None)
    # below chance (log of the 32 in-batch candidates): spans of one document are told apart from the others
    assert result["final_loss"] < 0.95 * np.log(32) and 0.0 <= result["top1_after"] <= 1.0
    save_component(encoder, "ssm_encoder", tmp_path)
    assert load_ssm_encoder(tmp_path).cfg.d_model == 32


def dict_to_ssm(**fields):
    from models.common.ssm import SSMConfig

    return SSMConfig(d_state=8, head_dim=16, n_layers=1, **fields)


def test_a_memory_filled_by_another_embedder_is_recognised():
    engine = make_engine()
    assert engine.foreign_semantic_memory() is None  # empty
    engine.fill_semantic(["the color of Bavik is red."], [{"source": "test"}])
    assert engine.foreign_semantic_memory() is None
    _, metadata = engine.semantic_memory.get([0])[0]
    assert metadata == {"source": "test", "embedder": engine.embedder.signature}
    other = HMSTEngine(engine.model, ByteTokenizer(), semantic_memory=engine.semantic_memory,
                       embedder=LexicalEmbedder(ByteTokenizer(), vocab_size=256, dim=128, seed=1))
    assert other.foreign_semantic_memory() == engine.embedder.signature
