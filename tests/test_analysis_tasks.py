"""Offline long-context task generators: deterministic, on length, solved by an oracle, not by a constant."""

from __future__ import annotations

import functools
import os
import re

import pytest

from megatron_focusft.analysis import tasks as T
from megatron_focusft.analysis.tasks.scoring import babilong_match, string_match_all
from megatron_focusft.data import load_tokenizer

QWEN2_DIR = os.environ.get("QWEN2_TOKENIZER_DIR", "/work/shared/qwen2-tokenizer")


@functools.lru_cache(maxsize=1)
def tok():
    return load_tokenizer(QWEN2_DIR, added_tokens="qwen2.5")


@pytest.mark.parametrize("length", [4096, 16384])
@pytest.mark.parametrize("task", T.TASKS)
def test_prompt_plus_generation_fits_the_length_and_oracle_scores_100(task, length):
    """RULER's rule: chat prompt (template + answer prefix) + generation budget <= length, fitted from below."""
    from megatron_focusft.analysis.prompts import prompt_ids

    for index in range(2):
        s = T.generate_sample(task, length, index, tok())
        n = len(tok().encode(s["input"]))
        assert n == s["num_tokens"]
        total = len(prompt_ids(tok(), s["input"], s["answer_prefix"])) + T.max_new_tokens_for(task)
        assert total == s["total_tokens"]
        assert length - 0.02 * length <= total <= length, (task, length, total)
        assert T.score_sample(s, T.oracle_answer(s)) == 1.0, (task, s["outputs"], T.oracle_answer(s))
    s = T.generate_sample(task, length, 0, tok(), max_new_tokens=500)
    total = len(prompt_ids(tok(), s["input"], s["answer_prefix"])) + 500
    assert length - 0.02 * length <= total <= length


@pytest.mark.parametrize("task", T.TASKS)
def test_deterministic_by_seed(task):
    a = T.generate_sample(task, 2048, 3, tok(), seed=7)
    assert a == T.generate_sample(task, 2048, 3, tok(), seed=7)
    assert a["input"] != T.generate_sample(task, 2048, 3, tok(), seed=8)["input"]
    assert a["input"] != T.generate_sample(task, 2048, 4, tok(), seed=7)["input"]


def test_user_haystack_file(tmp_path):
    text = tmp_path / "book.txt"
    text.write_text("It was a dark and stormy night. The rain fell in torrents! Was it over? " * 20)
    s = T.generate_sample("babilong_qa1", 4096, 0, tok(), haystack=text)
    assert "stormy night" in s["input"] and "quiet river" not in s["input"]
    assert 0.95 * 4096 <= s["num_tokens"] < s["total_tokens"] <= 4096
    assert T.score_sample(s, T.oracle_answer(s)) == 1.0


def test_constant_answer_scores_near_chance():
    n = 40
    for task, constant, chance in [
        ("babilong_qa1", "kitchen", 1 / 6),
        ("babilong_qa2", "garden", 1 / 6),
        ("babilong_qa4", "office", 1 / 6),
        ("babilong_qa5", "Mary", 1 / 11),
    ]:
        samples = [T.generate_sample(task, 1024, i, tok()) for i in range(n)]
        acc = sum(T.score_sample(s, constant) for s in samples) / n
        assert acc <= chance + 0.2, (task, acc)
        # and the oracle still gets every one
        assert all(T.score_sample(s, T.oracle_answer(s)) == 1.0 for s in samples)
    for task in ("ruler_niah_mv", "ruler_cwe", "ruler_vt"):
        samples = [T.generate_sample(task, 1024, i, tok()) for i in range(5)]
        assert sum(T.score_sample(s, "The answer is 1234567 the list") for s in samples) == 0.0


def test_scoring_rules():
    labels = ["kitchen", "garden", "office"]
    assert babilong_match("The kitchen.", "kitchen", labels, "Where is Mary?") == 1.0
    assert babilong_match("kitchen or garden", "kitchen", labels, "Where is Mary?") == 0.0  # listing all
    # a label named in the question does not count against the answer
    assert babilong_match("It was in the garden, before the kitchen", "garden", labels, "before the kitchen?") == 1.0
    assert string_match_all("values: 12, 34", ["12", "34", "56", "78"]) == 0.5
    assert string_match_all("ABC abd", ["abc", "ABD"]) == 1.0


def test_babilong_scoring_follows_the_official_metrics():
    """Hand-written cases of booydar/babilong metrics.py (preprocess_output + compare_answers)."""
    rooms = ["bathroom", "bedroom", "garden", "hallway", "kitchen", "office"]
    q = "Where is the apple?"
    # the first sentence, not the first line, is the answer
    assert babilong_match("The apple is in the kitchen. Before that it was in the garden.", "kitchen", rooms, q) == 1
    assert babilong_match("Kitchen. Mary went to the garden earlier.", "kitchen", rooms, q) == 1
    assert babilong_match("garden\nkitchen", "kitchen", rooms, q) == 0  # one sentence naming two rooms
    assert babilong_match("kitchen\nThe end", "kitchen", rooms, q) == 1
    assert babilong_match("The garden. The kitchen.", "kitchen", rooms, q) == 0  # only the first sentence counts
    # labels are matched as substrings
    assert babilong_match("bedrooms", "bedroom", rooms, q) == 1
    assert babilong_match("In the KITCHEN", "kitchen", rooms, q) == 1
    # a model writing examples: cut at <context> / <example>
    assert babilong_match("kitchen <context> the garden", "kitchen", rooms, q) == 1
    assert babilong_match("kitchen <example> office", "kitchen", rooms, q) == 1
    # labels in the question never count, neither for nor against
    assert babilong_match("the kitchen", "kitchen", rooms, "Where was the apple before the kitchen?") == 0
    assert babilong_match("office, after the hallway", "office", rooms, "Where was he after the hallway?") == 1
    # several sub-targets (qa8): exactly those labels
    objs = ["apple", "football", "milk", "nothing"]
    assert babilong_match("milk and apple", "apple,milk", objs, "What is Mary carrying?") == 1
    assert babilong_match("milk", "apple,milk", objs, "What is Mary carrying?") == 0
    assert babilong_match("milk, apple, football", "apple,milk", objs, "What is Mary carrying?") == 0
    assert babilong_match("", "kitchen", rooms, q) == 0


def test_parse_length():
    assert [T.parse_length(x) for x in ("4k", "128K", "5000")] == [4096, 131072, 5000]
    with pytest.raises(ValueError):
        T.parse_length("4m")


def _record(seen, ids, n):
    seen.append((ids, n))
    return []


def test_ruler_prompts_end_with_rulers_answer_prefix():
    """RULER's answer prefixes (RULER constants.py) start the assistant turn; the budgets stay RULER's."""
    from megatron_focusft.analysis import evaluate as ev
    from megatron_focusft.analysis.prompts import prompt_ids

    want = {
        "ruler_niah_mv": (" Answer: The special magic numbers for {q} mentioned in the provided text are", 128),
        "ruler_cwe": (" Answer: The top 10 words that appear most often in the list are:", 120),
        "ruler_vt": (
            " Answer: According to the chain(s) of variable assignment in the text above, 5 variables are "
            "assgined the value {q}, they are: ",
            30,
        ),
    }
    for task, (prefix, budget) in want.items():
        s = T.generate_sample(task, 2048, 0, tok())
        if task == "ruler_niah_mv":
            prefix = prefix.format(q=re.search(r"numbers for (\S+) mentioned in the provided text\?$", s["input"])[1])
        elif task == "ruler_vt":
            prefix = prefix.format(q=re.search(r"the value (\d+) in the text above\.$", s["input"])[1])
            assert len(s["outputs"]) == 5 and s["input"].count("VAR ") == 5 + 4  # one chain of 4 hops
        assert s["answer_prefix"] == prefix
        ids = prompt_ids(tok(), s["input"], s["answer_prefix"])
        assert tok().decode(ids).endswith(s["input"] + "<|im_end|>\n<|im_start|>assistant\n" + prefix)
        assert ev.max_new_tokens_for(task) == budget
        seen: list = []
        results = ev.evaluate(functools.partial(_record, seen), [s], tok(), progress=False)
        assert seen == [(ids, budget)] and results[0]["prediction"] == ""
        assert T.score_sample(s, T.oracle_answer(s)) == 1.0 and T.score_sample(s, prefix) == 0.0
    b = T.generate_sample("babilong_qa1", 2048, 0, tok())
    assert b["answer_prefix"] == "" and ev.max_new_tokens_for("babilong_qa1") == 16
    assert tok().decode(prompt_ids(tok(), b["input"])).endswith("<|im_start|>assistant\n")


def _xs(base, k):
    return "x" * (base + 7 * k)


def test_fit_length_from_below():
    """Coarse units (7 tokens) and a target between two of them: the largest count <= target, never above."""
    for base, target in [(10, 100), (3, 1000), (50, 53), (10, 10)]:
        text, n = T.fit_length(functools.partial(_xs, base), len, target, unit_tokens=3.0)
        assert n == len(text) == base + 7 * ((target - base) // 7), (base, target, n)
    with pytest.raises(ValueError, match="fixed text alone"):
        T.fit_length(lambda k: "x" * (20 + k), len, 10, unit_tokens=1.0)
