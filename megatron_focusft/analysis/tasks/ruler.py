"""RULER-style synthetic tasks: NIAH multi-value, common-word extraction (CWE), variable tracking (VT).

Templates follow RULER's (Hsieh et al., 2024); the words, keys and values are generated from the seed.
Every task has an :func:`oracle` that answers from the prompt text alone.

Each task also has RULER's *answer prefix* (``answer_prefix`` in RULER's ``constants.py``), which RULER
appends after the chat template's assistant header, so that the model's turn starts with it; it is part
of the prompt, not of the scored prediction.  VT uses RULER's default ``vt`` task: one chain of 4 hops.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable

TASKS = ("niah_mv", "cwe", "vt")

NIAH_TEMPLATE = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards.\n{context}\n"
    "What are all the special magic numbers for {query} mentioned in the provided text?"
)
NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\n"
    "Question: What are the {n} most common words in the above list?"
)
NIAH_ANSWER_PREFIX = " Answer: The special magic numbers for {query} mentioned in the provided text are"
CWE_ANSWER_PREFIX = " Answer: The top {n} words that appear most often in the list are:"
# "assgined" is RULER's spelling; kept so that prompts match RULER's.
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
    "assgined the value {query}, they are: "
)
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {value} in the text above."
)

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_ADJ = "fancy silent brave crooked gleaming hungry lucky rapid tidy wicked".split()
_THING = "lamp violin ladder pebble whistle saddle kettle mirror candle basket".split()


def pseudo_words(rng: random.Random, n: int, exclude: set[str] = frozenset()) -> list[str]:
    """``n`` distinct pronounceable three-syllable words (e.g. ``bodaki``)."""
    out: list[str] = []
    seen = set(exclude)
    while len(out) < n:
        w = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(3))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def niah_mv(rng: random.Random, take: Callable[[int], list[str]], length: int, num_values: int = 4):
    key = f"{rng.choice(_ADJ)}-{rng.choice(_THING)}"
    values = [str(v) for v in rng.sample(range(1_000_000, 10_000_000), num_values)]
    needles = [NIAH_NEEDLE.format(key=key, value=v) for v in values]
    depths = sorted(rng.random() for _ in values)

    def render(k: int) -> str:
        from megatron_focusft.analysis.tasks.haystack import insert_at_depths

        context = " ".join(insert_at_depths(take(k), needles, depths))
        return NIAH_TEMPLATE.format(context=context, query=key)

    return render, values, 25.0, NIAH_ANSWER_PREFIX.format(query=key)


def cwe(rng: random.Random, take, length: int, num_common: int = 10, freq_common: int = 30, freq_rare: int = 3):
    # RULER keeps 30 repetitions of each common word at long lengths; short prompts get fewer (the common
    # words take at most ~40% of the prompt, ~7 tokens an entry), never as few as the rare words' count.
    freq_common = max(freq_rare + 2, min(freq_common, int(0.4 * length / (7 * num_common))))
    common = pseudo_words(rng, num_common)
    rare_pool_rng = random.Random(rng.random())
    rare_cache: list[str] = []
    order_seed = rng.random()

    def render(k: int) -> str:
        if len(rare_cache) < k:
            rare_cache.extend(pseudo_words(rare_pool_rng, k - len(rare_cache), set(common) | set(rare_cache)))
        words = common * freq_common + rare_cache[:k] * freq_rare
        random.Random(f"{order_seed}-{k}").shuffle(words)
        context = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(words))
        return CWE_TEMPLATE.format(context=context, n=num_common)

    return render, common, 5.0 * freq_rare, CWE_ANSWER_PREFIX.format(n=num_common)


def vt(rng: random.Random, take, length: int, num_hops: int = 4, num_chains: int = 1):
    names: list[str] = []
    while len(names) < (num_hops + 1) * num_chains:
        n = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if n not in names:
            names.append(n)
    values = [str(v) for v in rng.sample(range(10_000, 100_000), num_chains)]
    statements, depths = [], []
    for c in range(num_chains):
        chain = names[c * (num_hops + 1) : (c + 1) * (num_hops + 1)]
        statements.append(f"VAR {chain[0]} = {values[c]}.")
        statements += [f"VAR {b} = VAR {a}." for a, b in zip(chain[:-1], chain[1:])]
        depths += sorted(rng.random() for _ in chain)
    order = sorted(range(len(statements)), key=lambda i: depths[i])  # a chain's steps stay in order
    statements = [statements[i] for i in order]
    depths = sorted(depths)

    def render(k: int) -> str:
        from megatron_focusft.analysis.tasks.haystack import insert_at_depths

        context = " ".join(insert_at_depths(take(k), statements, depths))
        return VT_TEMPLATE.format(context=context, value=values[0])

    prefix = VT_ANSWER_PREFIX.format(num_v=num_hops + 1, query=values[0])
    return render, names[: num_hops + 1], 25.0, prefix


GENERATORS = {"niah_mv": niah_mv, "cwe": cwe, "vt": vt}


def oracle(sample: dict) -> list[str]:
    """The answer values, found in the prompt text alone."""
    text, task = sample["input"], sample["task"].removeprefix("ruler_")
    if task == "niah_mv":
        key = re.search(r"magic numbers for (\S+) mentioned in the provided text\?$", text).group(1)
        return re.findall(r"special magic numbers for " + re.escape(key) + r" is: (\d+)\.", text)
    if task == "cwe":
        n = int(re.search(r"What are the (\d+) most common words", text).group(1))
        words = re.findall(r"^\d+\. (\w+)$", text, flags=re.M)
        return [w for w, _ in Counter(words).most_common(n)]
    if task == "vt":
        value = re.search(r"assigned the value (\d+) in the text above\.$", text).group(1)
        found: set[str] = set()
        for a, b in re.findall(r"VAR (\w+) = (VAR \w+|\d+)\.", text):
            if b == value or (b.startswith("VAR ") and b[4:] in found):
                found.add(a)
        return sorted(found)
    raise ValueError(f"unknown RULER task {task!r}")
