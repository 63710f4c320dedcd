"""Haystacks of distractor text and fitting a prompt to a requested length in tokens.

The built-in filler is generated from a seed (sentences about weather, rivers and machines built from small
word lists that share no word with the tasks' names, places or objects); a user-given text file is split
into sentences and cycled.  :func:`fit_length` finds the most haystack units that keep a prompt within a
token budget, from below (the prompt is re-tokenised exactly, a few times).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from pathlib import Path

_ADJ = "quiet old bright heavy slow distant pale warm narrow ancient silver gentle broad hollow".split()
_NOUN = (
    "river cloud machine harbour lantern forest engine meadow bridge valley tower orchard compass "
    "village mill storm canal".split()
)
_VERB = "drifts rests turns hums glows waits sways fades rises settles shifts echoes".split()
_ADV = "slowly softly quietly again tonight forever steadily always briefly onward".split()
_TAIL = (
    "under a grey sky",
    "while the wind changes",
    "as the season turns",
    "beyond the hills",
    "through the long afternoon",
    "near the old road",
    "in the morning light",
)


def generated_sentences(seed: int) -> Callable[[int], list[str]]:
    """``take(n)``: the first ``n`` sentences of the seeded built-in filler (stable prefixes)."""
    rng = random.Random(f"haystack-{seed}")
    cache: list[str] = []

    def take(n: int) -> list[str]:
        while len(cache) < n:
            s = f"The {rng.choice(_ADJ)} {rng.choice(_NOUN)} {rng.choice(_VERB)} {rng.choice(_ADV)}"
            if rng.random() < 0.5:
                s += " " + rng.choice(_TAIL)
            cache.append(s + ".")
        return cache[:n]

    return take


def file_sentences(path: str | Path, seed: int) -> Callable[[int], list[str]]:
    """``take(n)``: sentences of a text file from a seeded starting point, cycled when the file is short."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s.strip()]
    if not sents:
        raise ValueError(f"{path}: no text to build a haystack from")
    start = random.Random(f"haystack-{seed}").randrange(len(sents))

    def take(n: int) -> list[str]:
        return [sents[(start + i) % len(sents)] for i in range(n)]

    return take


def make_haystack(source: str | Path | None, seed: int) -> Callable[[int], list[str]]:
    """The built-in filler (``source`` None or ``"generated"``) or the sentences of a text file."""
    if source is None or str(source) == "generated":
        return generated_sentences(seed)
    return file_sentences(source, seed)


def insert_at_depths(sentences: list[str], needles: list[str], depths: list[float]) -> list[str]:
    """Insert ``needles`` (in order) between the sentences at relative ``depths`` in [0, 1] (sorted)."""
    out = list(sentences)
    slots = sorted((min(len(sentences), int(round(d * len(sentences)))), i) for i, d in enumerate(depths))
    for offset, (slot, i) in enumerate(slots):
        out.insert(slot + offset, needles[i])
    return out


def fit_length(
    render: Callable[[int], str],
    count: Callable[[str], int],
    target: int,
    unit_tokens: float,
    tol: float = 0.005,
) -> tuple[str, int]:
    """``render(k)`` with the largest ``k`` whose token count is at most ``target`` (RULER's rule: the prompt
    is fitted from below, never over), stopping early once within ``tol`` of ``target``.

    ``unit_tokens``: a first guess of the tokens one unit adds.  Returns (text, token count).
    """
    text0 = render(0)
    base = count(text0)
    if base > target:
        raise ValueError(f"the task's fixed text alone has {base} tokens, more than the {target} allowed")
    lo, best = 0, (text0, base)  # the largest k known to fit, and its (text, count)
    hi: int | None = None  # the smallest k known not to fit
    k = max(1, int((target - base) / unit_tokens))
    for _ in range(64):
        if hi is not None:
            k = min(k, hi - 1)
        k = max(k, lo + 1)
        if hi is not None and k >= hi:
            break
        text = render(k)
        n = count(text)
        if n <= target:
            lo, best = k, (text, n)
            if target - n <= tol * target:
                break
        else:
            hi = k
        per_unit = (n - base) / k
        k += int(round((target - n) / max(per_unit, 1e-6)))
    return best
