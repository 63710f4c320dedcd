"""Offline long-context tasks, generated deterministically from a seed at any length (4K..128K tokens).

Task names: ``babilong_qa1`` .. ``babilong_qa5``, ``ruler_niah_mv``, ``ruler_cwe``, ``ruler_vt``.  A sample::

    {"task", "index", "seed", "length" (requested tokens), "num_tokens" (measured), "input" (the prompt),
     "outputs" (reference answers), "metric" ("babilong" | "ruler"), "labels"/"question" (BABILong),
     "answer_prefix" (RULER's start of the assistant turn; "" for BABILong)}

Lengths follow RULER: the whole model input (``input`` in the chat template, plus the answer prefix) plus the
generation budget (:data:`MAX_NEW_TOKENS`) is at most the requested length, measured with the tokenizer of
the model under test; the haystack is fitted from below.  ``num_tokens`` counts ``input`` alone.  The
haystack is the built-in generated filler or the sentences of a user-given text file.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from megatron_focusft.analysis.prompts import prompt_ids
from megatron_focusft.analysis.tasks import babilong, ruler
from megatron_focusft.analysis.tasks.haystack import fit_length, insert_at_depths, make_haystack
from megatron_focusft.analysis.tasks.scoring import babilong_match, score_sample, string_match_all

TASKS: tuple[str, ...] = tuple(f"babilong_{t}" for t in babilong.TASKS) + tuple(f"ruler_{t}" for t in ruler.TASKS)

# RULER's / BABILong's generation budgets.
MAX_NEW_TOKENS = {"babilong": 16, "ruler_niah_mv": 128, "ruler_cwe": 120, "ruler_vt": 30}


def max_new_tokens_for(task: str) -> int:
    return MAX_NEW_TOKENS.get(task, MAX_NEW_TOKENS["babilong"] if task.startswith("babilong") else 64)


def parse_length(text: str) -> int:
    """``4k`` -> 4096, ``128K`` -> 131072, ``5000`` -> 5000."""
    m = re.fullmatch(r"\s*(\d+)\s*([kK]?)\s*", text)
    if not m:
        raise ValueError(f"bad length {text!r} (e.g. 4k, 16k, 5000)")
    return int(m.group(1)) * (1024 if m.group(2) else 1)


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")


def generate_sample(
    task: str,
    length: int,
    index: int,
    tokenizer,
    seed: int = 0,
    haystack: str | Path | None = None,
    max_new_tokens: int | None = None,
) -> dict:
    """Sample ``index`` of ``task`` at ``length`` tokens (the same for the same arguments, always): the chat
    prompt plus ``max_new_tokens`` (default: the task's budget) fill at most ``length`` positions."""
    check_task(task)
    rng = random.Random(f"{seed}|{task}|{length}|{index}")
    take = make_haystack(haystack, rng.randrange(1 << 30))
    budget = max_new_tokens or max_new_tokens_for(task)
    prefix = ""

    def count(text: str) -> int:  # positions used: the prompt as decoded, plus the generation
        return len(prompt_ids(tokenizer, text, prefix)) + budget

    sample = {"task": task, "index": index, "seed": seed, "length": length}
    if task.startswith("babilong_"):
        facts, question, answer, labels = babilong.facts_and_question(task.removeprefix("babilong_"), rng)
        depths = sorted(rng.random() for _ in facts)

        def render(k: int) -> str:
            return babilong.prompt_parts(" ".join(insert_at_depths(take(k), facts, depths)), question)

        text, n = fit_length(render, count, length, unit_tokens=12.0)
        sample.update(
            input=text,
            outputs=[answer],
            metric="babilong",
            labels=list(labels),
            question=question,
            facts=facts,
            answer_prefix="",
        )
    else:
        render, outputs, unit, prefix = ruler.GENERATORS[task.removeprefix("ruler_")](rng, take, length)
        text, n = fit_length(render, count, length, unit_tokens=unit)
        sample.update(input=text, outputs=list(outputs), metric="ruler", answer_prefix=prefix)
    sample["num_tokens"] = len(tokenizer.encode(sample["input"]))
    sample["total_tokens"] = n  # prompt (chat template, answer prefix) + max_new_tokens <= length
    return sample


def generate(
    tasks: list[str],
    lengths: list[int],
    samples: int,
    tokenizer,
    seed: int = 0,
    haystack=None,
    max_new_tokens: int | None = None,
) -> list[dict]:
    return [
        generate_sample(t, n, i, tokenizer, seed, haystack, max_new_tokens)
        for t in tasks
        for n in lengths
        for i in range(samples)
    ]


def oracle_answer(sample: dict) -> str:
    """A perfect reader's answer, derived from the prompt text (for testing the generators and scorers)."""
    if sample["metric"] == "babilong":
        return babilong.oracle(sample)
    return ", ".join(ruler.oracle(sample))


__all__ = [
    "TASKS",
    "babilong_match",
    "check_task",
    "fit_length",
    "generate",
    "generate_sample",
    "max_new_tokens_for",
    "oracle_answer",
    "parse_length",
    "score_sample",
    "string_match_all",
]
