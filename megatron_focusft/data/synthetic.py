"""A small synthetic long-context, multi-turn data set with a learnable retrieval task (for the quickstart).

Each conversation (OpenAI ``messages`` form, with a ``tools`` list, as :mod:`tools/preprocess_data.py` reads):

* ``system``: what the assistant does;
* ``user``: a long haystack of filler sentences that hides several facts "The secret code of <name> is
  <word>.", then a request to look one or two other names up in the directory;
* ``assistant``: calls the ``lookup`` tool (one call per name), ``tool``: "The secret code of <name> is
  <word>." for each; ``assistant``: repeats what the tool said;
* ``user``: "What is the secret code of <name>?" about one of the haystack's facts; ``assistant``: "<word>".

Names and code words come from small fixed lists (50 each), disjoint from the filler's words, so that a tiny
model can learn the answer format quickly and, with enough steps, the retrieval itself (copy the word that
follows "The secret code of <name> is" in the context).  Generation is deterministic: conversation ``i`` of
seed ``s`` depends on ``(s, i)`` only.  ``meta`` (ignored by the data pipeline) records the answer.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass

NAMES = (
    "Alice Bruno Carmen Dmitri Elena Farid Greta Hiro Ingrid Jamal Kira Luca Maya Nadia Oscar Priya Quinn "
    "Rosa Samir Tara Umar Vera Wanda Xavier Yara Zane Amara Boris Chloe Diego Esme Felix Gemma Hugo Isla "
    "Jonah Kofi Lena Milo Noor Otto Petra Rhea Silas Theo Uma Viktor Willa Yusuf Zora"
).split()
CODE_WORDS = (
    "amber anchor badger beacon cactus cobalt comet copper coral crimson dagger ember falcon fennel glacier "
    "granite harbor hazel indigo ivory jasper juniper kettle lantern lemon marble meadow nickel nutmeg onyx "
    "orchid pepper pebble quartz raven saffron silver sparrow tangerine thistle topaz tulip velvet violet "
    "walnut willow zephyr zinc cedar maple"
).split()
assert len(NAMES) == 50 and len(set(NAMES)) == 50
assert len(CODE_WORDS) == 50 and len(set(CODE_WORDS)) == 50

# Filler: "<subject> <verb> <object> <place>." from small lists that share no word with NAMES / CODE_WORDS.
_SUBJECTS = (
    "The old farmer",
    "A young teacher",
    "The quiet baker",
    "Our neighbour",
    "The tall sailor",
    "A tired student",
    "The village doctor",
    "My cousin",
    "The night guard",
    "A travelling musician",
    "The shop owner",
    "Her grandmother",
)
_VERBS = (
    "carried",
    "painted",
    "found",
    "repaired",
    "sold",
    "bought",
    "described",
    "lost",
    "cleaned",
    "moved",
)
_OBJECTS = (
    "a wooden chair",
    "the broken clock",
    "a basket of apples",
    "an old map",
    "the blue bicycle",
    "a bag of flour",
    "the garden gate",
    "a heavy book",
    "the small boat",
    "a pair of boots",
)
_PLACES = (
    "near the river",
    "at the market",
    "before sunrise",
    "after the storm",
    "in the town square",
    "behind the school",
    "during the festival",
    "on a cold morning",
    "by the old bridge",
    "at the train station",
)

SYSTEM_PROMPT = (
    "You are a careful assistant. The user's notes contain secret codes. Use the lookup tool for names "
    "the user asks you to look up, and answer questions about secret codes with the code word only."
)
LOOKUP_TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look up the secret code of a person in the directory.",
        "parameters": {
            "type": "object",
            "properties": {"name": {"type": "string", "description": "the person's name"}},
            "required": ["name"],
        },
    },
}

# Tokens (Qwen2-style BPE) of a conversation outside its haystack: system turn with the tools block, the
# lookup turns, the question and the answer (measured with the Qwen2 tokenizer: ~330).
OVERHEAD_TOKENS = 330


def fact(name: str, word: str) -> str:
    return f"The secret code of {name} is {word}."


def question(name: str) -> str:
    return f"What is the secret code of {name}?"


def _filler(rng: random.Random) -> str:
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_PLACES)}."


def _approx_tokens(sentence: str) -> int:
    """Qwen2-style tokens of a plain English sentence: about one a word, plus the full stop."""
    return len(sentence.split()) + 1


@dataclass(frozen=True)
class SyntheticSpec:
    """What each conversation looks like.

    ``context_tokens``: approximate length of a whole conversation in Qwen2-style tokens (the haystack fills
    what the fixed parts leave); ``num_facts``: facts hidden in the haystack; ``max_lookups``: tool calls in
    the lookup turn (1 .. max_lookups).
    """

    context_tokens: int = 2000
    num_facts: int = 6
    max_lookups: int = 2

    def __post_init__(self):
        if self.context_tokens < 1:
            raise ValueError(f"context_tokens must be positive, got {self.context_tokens}")
        if self.num_facts < 1 or self.max_lookups < 1:
            raise ValueError("num_facts and max_lookups must be at least 1")
        if self.num_facts + self.max_lookups > min(len(NAMES), len(CODE_WORDS)):
            raise ValueError(
                f"num_facts + max_lookups must be at most {min(len(NAMES), len(CODE_WORDS))} "
                f"(distinct names and code words in a conversation)"
            )


def haystack(rng: random.Random, facts: list[str], budget_tokens: int) -> str:
    """Filler sentences of about ``budget_tokens`` tokens with ``facts`` at random places, in paragraphs."""
    sentences: list[str] = []
    used = sum(_approx_tokens(f) for f in facts)
    while used < budget_tokens:
        s = _filler(rng)
        sentences.append(s)
        used += _approx_tokens(s)
    slots = sorted(rng.randint(0, len(sentences)) for _ in facts)
    for k, (slot, f) in enumerate(zip(slots, facts)):
        sentences.insert(slot + k, f)
    paragraphs = [" ".join(sentences[i : i + 8]) for i in range(0, len(sentences), 8)]
    return "\n\n".join(paragraphs)


def make_conversation(seed: int, index: int, spec: SyntheticSpec | None = None) -> dict:
    """Conversation ``index`` of ``seed``: a record with ``messages``, ``tools`` and ``meta``."""
    spec = spec or SyntheticSpec()
    rng = random.Random(f"focusft-synthetic:{seed}:{index}")
    n_lookups = rng.randint(1, spec.max_lookups)
    names = rng.sample(NAMES, spec.num_facts + n_lookups)
    words = rng.sample(CODE_WORDS, spec.num_facts + n_lookups)
    hidden = list(zip(names[: spec.num_facts], words[: spec.num_facts]))
    looked_up = list(zip(names[spec.num_facts :], words[spec.num_facts :]))
    asked_name, answer = rng.choice(hidden)

    hay = haystack(rng, [fact(n, w) for n, w in hidden], spec.context_tokens - OVERHEAD_TOKENS)
    who = " and ".join(n for n, _ in looked_up)
    calls = [
        {
            "id": f"call_{k}",
            "type": "function",
            "function": {"name": "lookup", "arguments": json.dumps({"name": n})},
        }
        for k, (n, _) in enumerate(looked_up)
    ]
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"Here are my notes.\n\n{hay}\n\nPlease look up {who} in the directory."},
        {"role": "assistant", "content": "", "tool_calls": calls},
        *({"role": "tool", "tool_call_id": f"call_{k}", "content": fact(n, w)} for k, (n, w) in enumerate(looked_up)),
        {"role": "assistant", "content": " ".join(fact(n, w) for n, w in looked_up)},
        {"role": "user", "content": question(asked_name)},
        {"role": "assistant", "content": answer},
    ]
    return {
        "messages": messages,
        "tools": [LOOKUP_TOOL],
        "meta": {"seed": seed, "index": index, "name": asked_name, "answer": answer},
    }


def generate(num_conversations: int, seed: int = 0, spec: SyntheticSpec | None = None) -> Iterator[dict]:
    """Conversations ``0 .. num_conversations - 1`` of ``seed``."""
    if num_conversations < 0:
        raise ValueError(f"num_conversations must be >= 0, got {num_conversations}")
    for i in range(num_conversations):
        yield make_conversation(seed, i, spec)


def write_jsonl(path: str, records) -> int:
    """Write records one JSON object a line; returns how many."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n
