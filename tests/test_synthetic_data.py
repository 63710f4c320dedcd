"""Synthetic retrieval conversations (megatron_focusft/data/synthetic.py, tools/make_synthetic_data.py) and
the tiny tokenizer (megatron_focusft/data/tiny_tokenizer.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from megatron_focusft.data import (
    ChatEncoder,
    DataError,
    iter_records,
    load_tokenizer,
    normalize_conversation,
    parse_record,
    synthetic,
)
from megatron_focusft.data.dataset import PackedDataset
from megatron_focusft.data.tiny_tokenizer import (
    DEFAULT_VOCAB_SIZE,
    train_tiny_tokenizer,
    write_tiny_tokenizer,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN2_DIR = os.environ.get("QWEN2_TOKENIZER_DIR", os.path.join(os.path.dirname(ROOT), "shared", "qwen2-tokenizer"))
if not os.path.isdir(QWEN2_DIR):
    QWEN2_DIR = "/work/shared/qwen2-tokenizer"
needs_qwen2 = pytest.mark.skipif(not os.path.isdir(QWEN2_DIR), reason="Qwen2 tokenizer folder not available")


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def qwen2():
    return load_tokenizer(QWEN2_DIR, added_tokens="qwen2.5")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-tokenizer")
    write_tiny_tokenizer(str(d))
    return d


def decode_tokens(tok, ids) -> str:
    return tok.decode(np.asarray(ids).tolist())


def check_document(tok, rec, doc):
    """Loss tokens decode to the assistant turns; the asked fact sits in the (unmasked) context."""
    meta = rec["meta"]
    assert doc.num_loss_tokens > 0
    text = decode_tokens(tok, doc.input_ids)
    q = text.index(synthetic.question(meta["name"]))
    assert synthetic.fact(meta["name"], meta["answer"]) in text[:q]  # retrievable from the context
    assert text.endswith(f"<|im_start|>assistant\n{meta['answer']}<|im_end|>\n")
    # the last loss block is exactly the answer turn's body, <|im_end|> and newline
    mask = doc.loss_mask.astype(bool)
    start = len(mask) - int(np.argmin(mask[::-1])) if not mask.all() else 0
    assert decode_tokens(tok, doc.input_ids[start:]) == f"{meta['answer']}<|im_end|>\n"
    assert mask[start:].all()
    # the haystack is context: no loss on it
    hay_end = text.index("Please look up")
    n_ctx_chars = 0
    for k, t in enumerate(doc.input_ids):
        n_ctx_chars += len(decode_tokens(tok, [t]))
        if n_ctx_chars >= hay_end:
            assert not mask[: k + 1].any()
            break


# --------------------------------------------------------------------------------------------- generator
def test_deterministic_by_seed_and_index():
    spec = synthetic.SyntheticSpec(context_tokens=500)
    a = list(synthetic.generate(5, seed=3, spec=spec))
    assert a == list(synthetic.generate(5, seed=3, spec=spec))
    assert a[:3] == list(synthetic.generate(3, seed=3, spec=spec))  # conversation i depends on (seed, i)
    b = list(synthetic.generate(5, seed=4, spec=spec))
    assert all(x != y for x, y in zip(a, b))
    assert len({r["meta"]["answer"] for r in synthetic.generate(40, seed=0, spec=spec)}) > 10


def test_conversation_shape():
    rec = synthetic.make_conversation(0, 1, synthetic.SyntheticSpec(context_tokens=800, num_facts=5))
    messages, tools = normalize_conversation(rec)
    roles = [m["role"] for m in messages]
    assert roles[:3] == ["system", "user", "assistant"] and roles[-3:] == ["assistant", "user", "assistant"]
    assert "tool" in roles and tools[0]["function"]["name"] == "lookup"
    calls = messages[2]["tool_calls"]
    assert 1 <= len(calls) <= 2 and roles.count("tool") == len(calls)
    for call, result in zip(calls, messages[3 : 3 + len(calls)]):
        assert result["content"].startswith(f"The secret code of {call['arguments']['name']} is ")
    hay = messages[1]["content"]
    assert len(re.findall(r"The secret code of \w+ is \w+\.", hay)) == 5
    assert messages[-1]["content"] == rec["meta"]["answer"] in synthetic.CODE_WORDS
    assert messages[-2]["content"] == synthetic.question(rec["meta"]["name"])
    # names and code words never occur in the filler
    filler = " ".join(synthetic._SUBJECTS + synthetic._VERBS + synthetic._OBJECTS + synthetic._PLACES)
    assert not set(filler.lower().split()) & {w.lower() for w in synthetic.NAMES + synthetic.CODE_WORDS}


def test_bad_specs():
    with pytest.raises(ValueError):
        synthetic.SyntheticSpec(context_tokens=0)
    with pytest.raises(ValueError):
        synthetic.SyntheticSpec(num_facts=49, max_lookups=2)
    with pytest.raises(ValueError):
        list(synthetic.generate(-1))


# ------------------------------------------------------------------------------------------- Qwen2 vocabulary
@needs_qwen2
def test_records_encode_with_qwen2(tmp_path, qwen2):
    path = tmp_path / "syn.jsonl"
    assert (
        load_tool("make_synthetic_data").main(
            ["--out", str(path), "--num-conversations", "6", "--context-tokens", "700", "--seed", "5"]
        )
        == 0
    )
    enc = ChatEncoder(qwen2, renderer="qwen2.5")
    n = 0
    for raw in iter_records([str(path)]):
        rec = parse_record(raw)
        check_document(qwen2, rec, enc.encode(rec, raw.location))
        n += 1
    assert n == 6


@needs_qwen2
@pytest.mark.parametrize("target", [1000, 4000])
def test_context_tokens_is_about_right(qwen2, target):
    enc = ChatEncoder(qwen2, renderer="qwen2.5")
    spec = synthetic.SyntheticSpec(context_tokens=target)
    lengths = [len(enc.encode(r)) for r in synthetic.generate(4, seed=1, spec=spec)]
    assert all(0.85 * target <= n <= 1.15 * target for n in lengths), lengths


def test_cli_output_is_deterministic_and_bad_args_exit_2(tmp_path, capsys):
    tool = load_tool("make_synthetic_data")
    args = ["--num-conversations", "4", "--context-tokens", "400", "--seed", "9"]
    assert tool.main(["--out", str(tmp_path / "a.jsonl"), *args]) == 0
    assert tool.main(["--out", str(tmp_path / "b" / "b.jsonl"), *args]) == 0
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b" / "b.jsonl").read_bytes()
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == list(synthetic.generate(4, 9, synthetic.SyntheticSpec(context_tokens=400)))
    assert tool.main(["--out", str(tmp_path / "c.jsonl"), "--context-tokens", "0"]) == 2
    assert tool.main(["--out", str(tmp_path / "c.jsonl"), "--num-conversations", "0"]) == 2
    assert not (tmp_path / "c.jsonl").exists()
    assert "error:" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- tiny tokenizer
def test_tiny_tokenizer_loads_and_encodes(tiny_dir):
    from megatron_focusft.models.qwen2 import tiny_arch

    tok = load_tokenizer(str(tiny_dir))
    assert tok.vocab_size <= 1024 and tok.vocab_size <= tiny_arch().vocab_size
    assert tok.vocab_size == DEFAULT_VOCAB_SIZE
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"):
        assert tok.single_id(special) < tok.vocab_size
    assert tok.pad_id == tok.single_id("<|endoftext|>")
    assert tok.chat_template is None  # "auto" picks the built-in Qwen2.5 renderer
    cfg = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|im_end|>" and cfg["pad_token"] == "<|endoftext|>"
    assert cfg["added_tokens_decoder"][str(tok.single_id("<tool_call>"))]["special"] is False

    enc = ChatEncoder(tok, renderer="auto")
    for rec in synthetic.generate(3, seed=2, spec=synthetic.SyntheticSpec(context_tokens=600)):
        doc = enc.encode(rec)
        assert int(doc.input_ids.max()) < tok.vocab_size
        assert decode_tokens(tok, doc.input_ids) == "".join(s.text for s in enc.render(rec))
        check_document(tok, rec, doc)
    # byte-level: any text round-trips, even outside the training corpus
    text = "Zürich: 42 ünïcode ✓ <tool_response>\n"
    assert tok.decode(tok.encode(text)) == text


def test_tiny_tokenizer_refuses_qwen25_added_token_mode(tiny_dir):
    tok = load_tokenizer(str(tiny_dir), added_tokens="qwen2.5")  # keeps only ids 151643.. = none here
    with pytest.raises(DataError, match="not a single token"):
        ChatEncoder(tok, renderer="qwen2.5")


def test_tiny_tokenizer_is_deterministic(tmp_path, tiny_dir):
    assert train_tiny_tokenizer().to_str() == train_tiny_tokenizer().to_str()
    # another process (other hash seed), through the command line
    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONHASHSEED": "123"}
    cmd = [sys.executable, os.path.join(ROOT, "tools", "make_synthetic_data.py"), "--out"]
    cmd += [str(tmp_path / "x.jsonl"), "--num-conversations", "1", "--write-tokenizer", str(tmp_path / "tok")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "tok" / name).read_bytes() == (tiny_dir / name).read_bytes()
    with pytest.raises(ValueError):
        train_tiny_tokenizer(vocab_size=100)


def test_preprocess_with_tiny_tokenizer(tmp_path, tiny_dir):
    """The quickstart path: synthetic JSONL + tiny tokenizer -> packed data set with loss tokens."""
    path = tmp_path / "syn.jsonl"
    spec = synthetic.SyntheticSpec(context_tokens=300)
    synthetic.write_jsonl(str(path), synthetic.generate(8, seed=0, spec=spec))
    out = tmp_path / "packed" / "syn"
    argv = ["--input", str(path), "--tokenizer", str(tiny_dir), "--out", str(out), "--pack-length", "1024"]
    assert load_tool("preprocess_data").main([*argv, "--no-progress", "--on-error", "fail"]) == 0
    ds = PackedDataset(str(out))
    assert ds.meta["num_documents"] == 8
    tok = load_tokenizer(str(tiny_dir))
    assert ds.pad_id == tok.pad_id
    loss = 0
    for i in range(len(ds)):
        pack = ds.micro_batch([i])
        assert int(pack.tokens.max()) < tok.vocab_size
        loss += int(pack.loss_mask.sum())
    assert loss > 0
