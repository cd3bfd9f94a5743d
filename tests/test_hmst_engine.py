"""Fact-recall task, HMST inference engine (gates, cost, sessions, fallback), consolidation, critic/encoder training."""

import random

import numpy as np
import pytest
import torch

from memory_service import LocalMemory, MemoryConfig
from models.common.errors import ModelError
from models.hmst.critic import Critic, CriticConfig, pack_segments
from models.hmst.engine import Decisions, EngineConfig, HMSTEngine, LexicalEmbedder, consolidate
from models.hmst.facts import ATTRIBUTES, FactConfig, FactWorld, exact_match, qa_line
from models.hmst.training import (CriticTrainConfig, MemoryTrainConfig, auroc, critic_scores, load_critic,
                                  load_ssm_encoder, save_component, train_critic, train_memory_encoder)
from models.registry import build_model
from orchestration.data.tokenizers import ByteTokenizer

WORLD = FactWorld(FactConfig(seed=0, n_entities=30))


class Latin1Bytes(ByteTokenizer):
    """ByteTokenizer that decodes every byte to a character of its own (no UTF-8 replacement characters), so two
    answers of an untrained model compare equal only when their tokens do."""

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("latin-1")


def make_engine(sharpen: float = 1.0, **config) -> HMSTEngine:
    """An engine on an untrained hmst-micro. ``sharpen`` scales the LM's weight matrices: at init the model only
    echoes the prompt's last token (every answer is "::::::"), scaled up its greedy continuation depends on the
    prompt, so a test can tell the prompt the engine decoded from."""
    torch.manual_seed(0)
    critic = Critic(CriticConfig(vocab_size=256, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=256))
    model = build_model("hmst-micro", vocab_size=256)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.mul_(sharpen)
    return HMSTEngine(model, Latin1Bytes(), semantic_memory=LocalMemory(MemoryConfig(dim=128, fsync=False)),
                      critic=critic, config=EngineConfig(**config))


@torch.no_grad()
def greedy_answer(engine: HMSTEngine, prompt: str, early_exit: bool = False) -> str:
    """The answer decoded independently of the engine: the whole sequence re-run through the model (no cache) for
    every token, argmax, until a newline or max_new_tokens."""
    ids, new = engine.tokenizer.encode(prompt), []
    for _ in range(engine.config.max_new_tokens):
        logits_V = engine.model(torch.tensor([ids + new]), exit_early=early_exit).logits[0, -1]
        new.append(int(logits_V.argmax()))
        if "\n" in engine.tokenizer.decode(new):
            break
    return engine.tokenizer.decode(new).split("\n", 1)[0].strip()


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
    engine = make_engine(sharpen=4.0)
    facts = WORLD.by_placement("semantic")
    assert engine.fill_semantic([f.statement() for f in facts]) == len(facts)
    hits, changed = 0, 0
    for i, fact in enumerate(facts):
        result = engine.session().ask(fact.question(), Decisions(semantic=True))
        hits += result.retrieved == [fact.statement()]
        assert "\n" not in result.response and "question:" not in result.response  # the prompt is not echoed
        if i < 6:  # the answer is the model's continuation of the prompt with the retrieved fact in it
            assert result.response == greedy_answer(engine, qa_line(fact.question(), context=result.retrieved))
            off = engine.session().ask(fact.question(), Decisions())
            assert off.retrieved == [] and off.response == greedy_answer(engine, qa_line(fact.question()))
            assert off.prompt_tokens == len(qa_line(fact.question()).encode()) < result.prompt_tokens
            changed += off.response != result.response
    assert hits / len(facts) >= 0.9  # the lexical embedder finds the fact about the asked entity and attribute
    assert changed >= 3  # the retrieved text reached the model: it answers differently with it


def test_early_exit_decodes_with_the_exit_head_for_fewer_flops():
    engine = make_engine(sharpen=4.0, max_new_tokens=6)
    questions = ["what is the color of Bavik?", "what is the city of Tomar?", "what is the metal of Zorun?"]
    full = [engine.session().ask(q, Decisions()) for q in questions]
    early = [engine.session().ask(q, Decisions(early_exit=True)) for q in questions]
    # each answer is the greedy continuation of its own head: the exit head after block 1, or the full model
    assert [r.response for r in full] == [greedy_answer(engine, qa_line(q)) for q in questions]
    assert [r.response for r in early] == [greedy_answer(engine, qa_line(q), early_exit=True) for q in questions]
    assert [r.response for r in early] != [r.response for r in full]
    for e, f in zip(early, full):
        assert e.flops < 0.5 * f.flops  # hmst-micro exits after 1 of its 4 blocks


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
    assert retried.flops > plain.flops
    # the confidence is the critic's score of the retried answer read with the fact it was given
    tok = engine.tokenizer
    batch = pack_segments([(tok.encode("what is the color of Bavik?"), tok.encode(retried.response),
                            tok.encode("the color of Bavik is red."))], max_len=engine.critic.cfg.max_seq_len)
    with torch.no_grad():
        assert retried.confidence == pytest.approx(float(engine.critic(*batch).correctness()[0]), abs=1e-6)
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
    from models.hmst.meta_controller import GATES, MetaController, MetaControllerConfig

    torch.manual_seed(0)
    engine = make_engine(sharpen=4.0)
    controller = MetaController(MetaControllerConfig(query_dim=128, n_experts=4, hidden=32)).eval()
    # a controller whose heads ignore their input: early exit and semantic retrieval on, the rest off, expert 2
    with torch.no_grad():
        for head in (controller.gate_head, controller.expert_head):
            head.weight.zero_()
        controller.gate_head.bias.copy_(torch.tensor([8.0 if g in ("early_exit", "semantic") else -8.0
                                                      for g in GATES]))
        controller.expert_head.bias.copy_(torch.tensor([0.0, 0.0, 8.0, 0.0, 0.0]))
    engine.meta_controller = controller
    engine.fill_semantic(["the color of Bavik is red."])
    question = "what is the color of Bavik?"
    obs = engine.session().observe(question)
    np.testing.assert_allclose(obs.query_D, engine.embedder.embed([question])[0])
    # state: context fraction, episodic fill (empty), semantic fill (1 of semantic_fill_scale), last confidence
    np.testing.assert_allclose(obs.state_F[1:], [len(qa_line(question).encode()) / engine.model.cfg.max_seq_len,
                                                 0.0, 1 / 1000, 0.5], rtol=1e-6)
    result = engine.answer(question)
    assert result.decisions == Decisions(early_exit=True, semantic=True, expert=2)
    # the same answer as those decisions given explicitly, plus the cost of the controller's observation
    explicit = engine.session().ask(question, Decisions(early_exit=True, semantic=True, expert=2))
    assert result.retrieved == explicit.retrieved == ["the color of Bavik is red."]
    assert result.response == explicit.response and result.flops == pytest.approx(explicit.flops + obs.flops)


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


def held_out_answers(tokenizer) -> tuple[list, np.ndarray]:
    """Every value of its attribute as the answer to each held-out (semantic-placement) question, with the fact:
    1 correct answer and 11 corrupted ones per question."""
    examples, labels = [], []
    for fact in WORLD.by_placement("semantic"):
        for value in ATTRIBUTES[fact.attribute]:
            examples.append((tokenizer.encode(fact.question()), tokenizer.encode(" " + value),
                             tokenizer.encode(fact.statement())))
            labels.append(value == fact.value)
    return examples, np.array(labels)


def test_critic_learns_to_spot_corrupted_answers_saves_and_loads(tmp_path):
    # a tiny critic on single-fact contexts (no distractors) gets well above chance in 150 steps (a few seconds);
    # the full-size run with distractors is the slow test below
    small = CriticConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=128, dropout=0.0)
    cfg = CriticTrainConfig(steps=150, batch_size=32, eval_examples=200, max_distractors=0, critic=small)
    critic, result = train_critic(WORLD, ByteTokenizer(), 256, cfg, log=None)
    assert result["auroc"] > 0.7 and result["auroc"] > result["auroc_before"] + 0.1
    save_component(critic, "critic", tmp_path, {"result": result})
    loaded = load_critic(tmp_path)
    # scored afresh, the loaded critic ranks the correct answers to the held-out questions above the corrupted ones
    examples, labels = held_out_answers(ByteTokenizer())
    assert auroc(critic_scores(loaded, examples, max_len=128), labels) > 0.7
    ids = torch.randint(0, 256, (2, 12))
    args = (ids, torch.zeros_like(ids), torch.ones_like(ids, dtype=torch.bool))
    torch.testing.assert_close(loaded(*args).correct_logit_B, critic(*args).correct_logit_B)
    with pytest.raises(ModelError, match="no critic"):
        load_critic(tmp_path / "nowhere")


@pytest.mark.slow
def test_critic_detects_corrupted_answers_on_held_out_entities():
    from orchestration.data.tokenizers import train_bpe

    # a BPE trained on the fact corpus, as a pretrained run's tokenizer is (bytes split the values and names into
    # 128-token windows that cut contexts off: AUROC about 0.72)
    world = FactWorld(FactConfig(seed=0))
    tok = train_bpe(world.corpus_documents([]), 1024)
    _, result = train_critic(world, tok, tok.vocab_size, CriticTrainConfig(), log=None)
    assert result["auroc"] > 0.85 and result["auroc_before"] < 0.65


def test_memory_encoder_contrastive_training_learns(tmp_path):
    torch.manual_seed(0)
    from orchestration.data.sources import builtin_documents

    tok = ByteTokenizer()
    docs = [d for d in builtin_documents() if len(d) > 400]
    random.Random(0).shuffle(docs)
    embed = torch.nn.Embedding(256, 32)
    cfg = MemoryTrainConfig(steps=150, batch_size=32, span_tokens=32, lr=3e-3, eval_pairs=64, temperature=0.1,
                            ssm=dict_to_ssm(d_model=32))
    encoder, result = train_memory_encoder(embed, tok.encode_batch(docs[:200]), tok.encode_batch(docs[200:260]), cfg,
                                           log=None)
    # below chance (log of the 32 in-batch candidates): spans of one document are told apart from the others
    assert result["final_loss"] < 0.95 * np.log(32)
    save_component(encoder, "ssm_encoder", tmp_path)
    loaded = load_ssm_encoder(tmp_path)
    spans_BTD = embed(torch.tensor([ids[:48] for ids in tok.encode_batch(docs[260:264])]))
    with torch.no_grad():  # the loaded encoder is the trained one: the same summaries
        torch.testing.assert_close(loaded.summarize(spans_BTD), encoder.summarize(spans_BTD))


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
