"""Records far longer than the pack length: decided from the text's length before tokenising, never wrongly.

The bound (tokenizer.py): a byte-level BPE token stands for at most ``max_token_bytes`` bytes, so a text has at
least ``ceil(bytes / max_token_bytes)`` tokens.  These tests check that it is a true lower bound (so no record
that fits is ever rejected) and that ``--overlong truncate`` on a huge record keeps exactly what truncating the
fully tokenised record keeps.
"""

from __future__ import annotations

import dataclasses
import os
import random
import unicodedata

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from megatron_focusft.data import ChatEncoder, DataError, load_tokenizer
from megatron_focusft.data.tokenizer import ChatTokenizer, utf8_length

QWEN2_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "qwen2-tokenizer")
QWEN2_DIR = os.environ.get("QWEN2_TOKENIZER_DIR", os.path.abspath(QWEN2_DIR))
if not os.path.isdir(QWEN2_DIR):
    QWEN2_DIR = "/work/shared/qwen2-tokenizer"
TEMPLATE = os.path.join(os.path.dirname(__file__), "data", "qwen25_chat_template.jinja")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(QWEN2_DIR, added_tokens="qwen2.5")


def unbounded(tok: ChatTokenizer) -> ChatTokenizer:
    """The same tokenizer without a length bound: the encoder then tokenises every record whole (the
    reference behaviour)."""
    ref = dataclasses.replace(tok)
    ref.__dict__["max_token_bytes"] = None
    return ref


def texts():
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 12))) for _ in range(300)]
    decomposed = unicodedata.normalize("NFD", "ΐΰǕṏẫệ각힣Åé") * 50  # NFC composes these: fewer bytes
    out = {
        "spaces": " " * 10_000,  # Qwen2's longest tokens are runs of spaces (128 bytes)
        "mixed whitespace": (" " * 300 + "\t" * 70 + "\n" * 40) * 20,
        "rules": ("=" * 500 + "\n" + "-" * 300 + "\n") * 10,
        "words": " ".join(rng.choice(words) for _ in range(3000)),
        "cjk and emoji": "长上下文微调 🤖🧪 データ 토큰 " * 400,
        "decomposed (not NFC)": decomposed,
        "NFC": unicodedata.normalize("NFC", decomposed),
        "special tokens": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n" * 200,
        "code": "def f(x):\n    return [i ** 2 for i in range(x)]  # squares\n" * 200,
        "one character": "x",
    }
    out["everything"] = "".join(out.values())
    return out


def test_max_token_bytes_of_qwen2_and_of_tokenizers_it_cannot_bound(tok):
    assert tok.max_token_bytes == 128  # the 128-space token; the added tokens are shorter
    word_level = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    assert ChatTokenizer(word_level, None, "x", "file").max_token_bytes is None  # one [UNK] = any word
    plain_bpe = Tokenizer(models.BPE())  # no byte-level pre-tokenizer: bytes are not all in the vocabulary
    assert ChatTokenizer(plain_bpe, None, "x", "file").max_token_bytes is None
    assert ChatTokenizer(plain_bpe, None, "x", "file").min_tokens_at("abc" * 1000, [3000]) == [0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from megatron_focusft.data.tiny_tokenizer import write_tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny")
    write_tiny_tokenizer(str(folder))
    return load_tokenizer(str(folder))


def test_tiny_tokenizer_bound(tiny):
    assert tiny.max_token_bytes is not None
    for name, text in texts().items():
        ends = [len(text) // 3, len(text)]
        for end, bound in zip(ends, tiny.min_tokens_at(text, ends)):
            assert bound <= len(tiny.encode_text(text[:end]).ids), name


@pytest.mark.parametrize("name", list(texts()))
def test_min_tokens_is_a_lower_bound_of_every_prefix(tok, name):
    text = texts()[name]
    ends = sorted({len(text), *range(1, len(text), max(1, len(text) // 37))})
    bounds = tok.min_tokens_at(text, ends)
    for end, bound in zip(ends, bounds):
        n = len(tok.encode_text(text[:end]).ids)
        assert bound <= n, (name, end, bound, n)
    assert bounds == sorted(bounds) and bounds[-1] > 0
    if name == "spaces":  # the bound is tight where the tokens are the longest ones
        assert bounds[-1] == len(tok.encode_text(text).ids) == 79


def test_utf8_length():
    for s in ["", "abc", "é", "长上下文", "🤖", "a\ud800b", "x" * 3_000_000 + "é"]:
        assert utf8_length(s) == len(s.encode("utf-8", "surrogatepass"))
    assert utf8_length("aé长🤖", 1, 3) == 5


def test_splits_before_only_where_the_tokenizer_cuts_anyway(tok):
    text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n"
    cut = text.index("<|im_start|>assistant")
    assert tok.splits_before(text, cut) and tok.splits_before(text, len(text))
    assert not tok.splits_before(text, cut - 1)  # inside ordinary text
    assert not tok.splits_before(text, text.index("<|im_end|>") + 3)  # inside an added token
    for pos in range(1, len(text)):  # where it says yes, the prefix's tokens are the whole text's first tokens
        if tok.splits_before(text, pos):
            head = tok.encode_text(text[:pos]).ids
            assert tok.encode_text(text).ids[: len(head)] == head


def conversation(turns):
    """``turns``: (user text, assistant text) pairs."""
    messages = []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages}


def huge_cases():
    rng = random.Random(1)
    words = ["alpha", "beta", "gamma", "delta", "épsilon", "ζήτα", "长", "🤖", "x" * 40, " " * 30]
    big = " ".join(rng.choice(words) for _ in range(12_000))  # ~70 KB: over 256 x 128 bytes
    nfd = unicodedata.normalize("NFD", "ΐΰǕṏẫệ각 ") * 4000
    many = [(f"question {i}: " + "blah " * rng.randint(1, 30), f"answer {i}") for i in range(600)]
    return {
        "first turn fits, then a huge one": conversation([("hi", "hello"), (big, "ok"), ("q", "a")]),
        "two turns fit": conversation([("hi", "hello"), ("more?", "yes, more"), (big, "ok")]),
        "huge first turn": conversation([(big, "ok"), ("q", "a")]),
        "huge answer": conversation([("hi", "hello"), ("write", big)]),
        "many small turns": conversation(many),
        "not NFC": conversation([("hi", "hello"), (nfd, "ok"), ("q", "a")]),
        "tools and system": {
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            "messages": [
                {"role": "system", "content": "sys"},
                {"role": "user", "content": "call it"},
                {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": {"a": 1}}]},
                {"role": "tool", "content": big},
                {"role": "tool", "content": "second result"},
                {"role": "assistant", "content": "done"},
            ],
        },
    }


@pytest.mark.parametrize("renderer", ["qwen2.5", "template"])
@pytest.mark.parametrize("loss_on", ["all", "last"])
def test_truncate_keeps_what_truncating_the_whole_record_keeps(tok, tmp_path, renderer, loss_on):
    if renderer == "template":
        os.symlink(os.path.join(QWEN2_DIR, "tokenizer.json"), tmp_path / "tokenizer.json")
        os.symlink(TEMPLATE, tmp_path / "chat_template.jinja")
        tok = load_tokenizer(str(tmp_path), added_tokens="qwen2.5")
    for overlong in ("truncate", "drop"):
        fast = ChatEncoder(tok, renderer=renderer, loss_on=loss_on, max_length=256, overlong=overlong)
        ref = ChatEncoder(unbounded(tok), renderer=renderer, loss_on=loss_on, max_length=256, overlong=overlong)
        for name, conv in huge_cases().items():
            if renderer == "template" and name == "many small turns":
                continue  # (the template renderer renders every prefix of a conversation: slow for 1200 turns)
            lower = tok.min_tokens_at("".join(s.text for s in fast.render(conv)), [10**9])[0]
            assert lower > 256, name  # every case takes the early path
            try:
                want = ref.encode(conv, name)
            except DataError as e:
                assert e.reason == "too_long", (name, e)
                with pytest.raises(DataError) as got:
                    fast.encode(conv, name)
                assert got.value.reason == "too_long" and got.value.location == name
                continue
            got = fast.encode(conv, name)
            assert got.input_ids.tolist() == want.input_ids.tolist(), name
            assert got.loss_mask.tolist() == want.loss_mask.tolist(), name
            assert got.truncated and want.truncated and len(got) <= 256, name


def test_records_that_fit_are_unchanged(tok):
    """Records within the pack length never take the early path (and encode exactly as before)."""
    fast = ChatEncoder(tok, renderer="qwen2.5", max_length=4096)
    ref = ChatEncoder(unbounded(tok), renderer="qwen2.5", max_length=4096)
    for name, conv in huge_cases().items():
        try:
            want = ref.encode(conv, name)
        except DataError as e:
            with pytest.raises(DataError) as got:
                fast.encode(conv, name)
            assert str(got.value) == str(e)
            continue
        got = fast.encode(conv, name)
        assert got.input_ids.tolist() == want.input_ids.tolist()
        assert got.loss_mask.tolist() == want.loss_mask.tolist()


def test_drop_names_the_length_and_the_location(tok):
    enc = ChatEncoder(tok, renderer="qwen2.5", max_length=256)
    with pytest.raises(DataError) as e:
        enc.encode(conversation([("word " * 20_000, "ok")]), "in.jsonl:7")
    assert e.value.reason == "too_long"
    assert str(e.value).startswith("in.jsonl:7: 100")
    assert "at least 7" in str(e.value) and "longer than the pack length 256 (not tokenised)" in str(e.value)
