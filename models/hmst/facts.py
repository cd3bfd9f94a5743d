"""The fact-recall task: deterministic synthetic facts, where they are placed, questions, and exact match.

A ``FactWorld`` is a seeded set of facts (entity, attribute, value), e.g. "the color of Bavik is amber.". Every
entity has one placement for all its facts:

- ``semantic``: the facts exist only in the semantic memory (FAISS) that the engine can retrieve from;
- ``context``: the facts are told to the session earlier (recent context / episodic memory);
- ``pretraining``: the facts exist only in the pretraining corpus, so the LM can only answer from its weights.

Questions ask for the value ("what is the color of Bavik?"); the metric is exact match of the answer's first
word. ``corpus_documents`` writes the pretraining corpus: natural text mixed with the pretraining-placement facts
and with "context: ... question: ... answer: ..." examples about *other*, freshly drawn entities with random
values, so the LM learns to copy a value from its context rather than memorise the held-out facts (the semantic
and context facts never appear in the corpus).

Example::

    >>> world = FactWorld(FactConfig(seed=0, n_entities=12))
    >>> fact = world.by_placement("semantic")[0]
    >>> fact.question().startswith("what is the") and fact.statement().endswith(f" is {fact.value}.")
    True
    >>> exact_match(f" {fact.value}.\\nquestion: ...", fact.value), exact_match("nothing", fact.value)
    (True, False)
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from models.common.errors import ModelError

# Values are ordinary words, so a byte-level BPE trained on the corpus keeps most of them whole.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": ("red", "blue", "green", "amber", "violet", "black", "white", "orange", "silver", "brown", "pink", "gray"),
    "city": ("paris", "lima", "oslo", "cairo", "tokyo", "quito", "dublin", "madrid", "nairobi", "denver", "riga",
             "perth"),
    "animal": ("otter", "falcon", "tiger", "beaver", "salmon", "raven", "badger", "camel", "lizard", "panda", "moose",
               "heron"),
    "metal": ("iron", "copper", "zinc", "gold", "tin", "nickel", "cobalt", "lead", "bronze", "steel", "chrome",
              "brass"),
    "fruit": ("apple", "mango", "lemon", "cherry", "plum", "peach", "melon", "grape", "banana", "kiwi", "lime",
              "pear"),
}
PLACEMENTS = ("semantic", "context", "pretraining")
_ONSETS = "b c d f g h k l m n p r s t v z br dr gr kr tr st".split()
_VOWELS = "a e i o u ai".split()
_CODAS = ["", "", "n", "r", "l", "s", "k", "m"]


@dataclass(frozen=True)
class Fact:
    """One (entity, attribute, value) triple and where it lives."""

    entity: str
    """A made-up proper name, e.g. "Bavik"."""
    attribute: str
    """A key of ``ATTRIBUTES``."""
    value: str
    """One of ``ATTRIBUTES[attribute]``."""
    placement: str
    """semantic, context or pretraining (see the module docstring)."""

    def statement(self) -> str:
        return statement(self.entity, self.attribute, self.value)

    def question(self) -> str:
        return f"what is the {self.attribute} of {self.entity}?"


def statement(entity: str, attribute: str, value: str) -> str:
    return f"the {attribute} of {entity} is {value}."


@dataclass
class FactConfig:
    """A fact world and the corpus written for it."""

    seed: int = 0
    """Seed of names, values and placements (the same seed always gives the same world)."""
    n_entities: int = 120
    """Entities in the world; each gets ``attributes_per_entity`` facts."""
    attributes_per_entity: int = 2
    """Facts per entity (distinct attributes), at most the number of attributes."""
    placement_fractions: tuple[float, float, float] = (0.4, 0.2, 0.4)
    """Share of entities placed in (semantic, context, pretraining)."""
    copy_examples: int = 12000
    """Context-copy documents in the corpus (about fresh entities with random values)."""
    natural_fraction: float = 0.2
    """Share of the given natural-text documents kept in the corpus (a seeded sample). Copying from context is
    learnt in a sudden phase change whose step grows with the natural share: with 20% of the builtin corpus,
    hmst-micro and hmst-tiny reach it after about 1,100-1,400 steps of 16 x 128 tokens."""
    pretraining_repeats: int = 8
    """How often each pretraining-placement fact is stated (and asked) in the corpus."""
    distractors: int = 2
    """Most statements (about other attributes) next to the relevant one in a copy example's context."""

    def __post_init__(self):
        if self.n_entities < 3:
            raise ModelError(f"FactConfig.n_entities must be >= 3 (one per placement), got {self.n_entities}")
        if not 1 <= self.attributes_per_entity <= len(ATTRIBUTES):
            raise ModelError(f"FactConfig.attributes_per_entity must be in [1, {len(ATTRIBUTES)}], got "
                             f"{self.attributes_per_entity}")
        fractions = tuple(float(f) for f in self.placement_fractions)
        if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
            raise ModelError(f"FactConfig.placement_fractions must be 3 non-negative shares of (semantic, context, "
                             f"pretraining) summing to 1, got {self.placement_fractions}")
        self.placement_fractions = fractions
        if not 0 <= self.natural_fraction <= 1:
            raise ModelError(f"FactConfig.natural_fraction must be in [0, 1], got {self.natural_fraction}")
        for name in ("copy_examples", "pretraining_repeats", "distractors"):
            if getattr(self, name) < 0:
                raise ModelError(f"FactConfig.{name} must be >= 0, got {getattr(self, name)}")


def make_names(rng: random.Random, n: int, taken: set[str] | None = None) -> list[str]:
    """``n`` distinct made-up names (not in ``taken``), e.g. "Bavik", "Trolemo"."""
    taken = set() if taken is None else set(taken)
    names: list[str] = []
    while len(names) < n:
        syllables = rng.randint(2, 3)
        name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
        name = name.capitalize()
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


class FactWorld:
    """The facts of one seed, grouped by placement; also draws wrong values for corrupted answers."""

    def __init__(self, cfg: FactConfig | None = None):
        self.cfg = cfg = cfg or FactConfig()
        rng = random.Random(f"facts-{cfg.seed}")
        self.entities = make_names(rng, cfg.n_entities)
        n_sem = round(cfg.placement_fractions[0] * cfg.n_entities)
        n_ctx = round(cfg.placement_fractions[1] * cfg.n_entities)
        placement_of = (["semantic"] * n_sem + ["context"] * n_ctx
                        + ["pretraining"] * (cfg.n_entities - n_sem - n_ctx))
        rng.shuffle(placement_of)
        self.facts: list[Fact] = []
        for entity, placement in zip(self.entities, placement_of):
            for attribute in rng.sample(sorted(ATTRIBUTES), cfg.attributes_per_entity):
                self.facts.append(Fact(entity, attribute, rng.choice(ATTRIBUTES[attribute]), placement))

    def by_placement(self, placement: str) -> list[Fact]:
        if placement not in PLACEMENTS:
            raise ModelError(f"unknown placement {placement!r}; choose one of {', '.join(PLACEMENTS)}")
        return [f for f in self.facts if f.placement == placement]

    def split(self, facts: list[Fact], part: str, heldout_fraction: float) -> list[Fact]:
        """The facts of ``part`` ("train", "heldout" or "all") of a seeded entity split: ``heldout_fraction`` of
        the world's entities (drawn from the seed alone, so every process agrees) are held out. A controller trained
        on sessions about the train entities is evaluated on questions about entities it never saw.

        Example::

            >>> world = FactWorld(FactConfig(seed=0, n_entities=20))
            >>> facts = world.by_placement("semantic")
            >>> train, held = world.split(facts, "train", 0.25), world.split(facts, "heldout", 0.25)
            >>> len(train) + len(held) == len(facts) and not {f.entity for f in train} & {f.entity for f in held}
            True
        """
        if part not in ("train", "heldout", "all"):
            raise ModelError(f"unknown entity split {part!r}; choose train, heldout or all")
        if not 0 <= heldout_fraction < 1:
            raise ModelError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
        if part == "all":
            return list(facts)
        rng = random.Random(f"split-{self.cfg.seed}")
        heldout = set(rng.sample(self.entities, round(heldout_fraction * len(self.entities))))
        return [f for f in facts if (f.entity in heldout) == (part == "heldout")]

    def semantic_key(self, embedder_signature: str) -> str:
        """The idempotency key of filling a memory with this world's semantic facts under one embedder: every
        process that fills one (the pipeline, each env runner) uses it, so the facts go in once."""
        return f"facts-{self.cfg.seed}-{self.cfg.n_entities}-{embedder_signature}"

    @staticmethod
    def wrong_value(fact: Fact, rng: random.Random) -> str:
        """A value of the same attribute that is not the fact's (a corrupted answer)."""
        return rng.choice([v for v in ATTRIBUTES[fact.attribute] if v != fact.value])

    def corpus_documents(self, natural: list[str], seed: int = 0) -> list[str]:
        """Pretraining documents: a ``natural_fraction`` sample of ``natural`` + pretraining facts + context-copy
        examples, shuffled.

        The semantic- and context-placement facts never appear; copy examples use freshly drawn entities (disjoint
        from the world's) with uniformly random values, so the only way to answer them is to copy from context.
        """
        cfg = self.cfg
        rng = random.Random(f"corpus-{cfg.seed}-{seed}")
        docs = rng.sample(list(natural), round(cfg.natural_fraction * len(natural)))
        known = self.by_placement("pretraining")
        for _ in range(cfg.pretraining_repeats):
            chunk = rng.sample(known, len(known))
            for i in range(0, len(chunk), 4):  # a few facts and questions per document
                part = chunk[i:i + 4]
                lines = [f.statement() for f in part] + [qa_line(f.question(), f.value) for f in rng.sample(part, len(part))]
                docs.append("\n".join(lines) + "\n")
        fresh = make_names(rng, max(200, cfg.copy_examples // 20), taken=set(self.entities))
        for _ in range(cfg.copy_examples):
            docs.append(_copy_document(rng, fresh, cfg.distractors))
        rng.shuffle(docs)
        return docs


def qa_line(question: str, answer: str | None = None, context: list[str] | None = None) -> str:
    """The prompt layout the engine uses and the corpus teaches: [context: ...\\n]question: ... answer:[ value].

    Example::

        >>> qa_line("what is the color of Bavik?", context=["the color of Bavik is red."])
        'context: the color of Bavik is red.\\nquestion: what is the color of Bavik? answer:'
    """
    prefix = f"context: {' '.join(context)}\n" if context else ""
    return f"{prefix}question: {question} answer:" + (f" {answer}" if answer is not None else "")


def _copy_document(rng: random.Random, names: list[str], distractors: int) -> str:
    """2-4 facts about fresh entities, told in a leading line or in a "context:" line, then questions about them."""
    facts = []
    for entity in rng.sample(names, rng.randint(2, 4)):
        attribute = rng.choice(sorted(ATTRIBUTES))
        facts.append((entity, attribute, rng.choice(ATTRIBUTES[attribute])))
    lines = []
    told = [f for f in facts if rng.random() < 0.3]  # stated earlier in the document: "recent context"
    lines += [statement(*f) for f in told]
    for fact in rng.sample(facts, len(facts)):
        question = f"what is the {fact[1]} of {fact[0]}?"
        if fact in told and rng.random() < 0.5:  # answer from the earlier line alone
            lines.append(qa_line(question, fact[2]))
            continue
        # distractors about other attributes: the LM first learns the simpler "copy the asked attribute's
        # value from the context" (a few hundred steps at hmst-micro size do not teach entity binding)
        noise = [statement(*d) for d in facts if d[1] != fact[1]][:rng.randint(0, distractors)]
        context = noise + [statement(*fact)]
        rng.shuffle(context)
        lines.append(qa_line(question, fact[2], context))
    return "\n".join(lines) + "\n"


def normalize_answer(text: str) -> str:
    """The first word of the first line, lower-cased, without surrounding punctuation."""
    first_line = text.strip().split("\n", 1)[0]
    words = first_line.split()
    return words[0].strip(".,;:!?\"'").lower() if words else ""


def exact_match(response: str, value: str) -> bool:
    return normalize_answer(response) == value.lower()


def write_corpus(world: FactWorld, natural: list[str], path: str | os.PathLike, seed: int = 0) -> Path:
    """Write ``world.corpus_documents(natural)`` as JSON lines ``{"text": doc}`` (what ``--data <path>`` reads).

    The file is written to a temporary name and renamed into place.
    """
    path = Path(path)
    if path.suffix != ".jsonl":
        raise ModelError(f"the fact corpus is written as JSON lines; give a path ending in .jsonl, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for doc in world.corpus_documents(natural, seed):
            f.write(json.dumps({"text": doc}) + "\n")
    os.replace(tmp, path)
    return path
