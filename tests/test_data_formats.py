"""Record formats users bring (OpenAI, LLaMA-Factory's ShareGPT, ms-swift's agent form, Alpaca), each written in
its tool's documented form: tokens and loss mask equal Hugging Face's ``apply_chat_template`` (Qwen2.5's template)
of the record converted to OpenAI messages by hand; every input kind gives the same documents; detection."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from megatron_focusft.data import ChatEncoder, DataError, FieldNames, detect_format, load_tokenizer
from megatron_focusft.data.reading import iter_file_records, parse_record

DATA = os.path.join(os.path.dirname(__file__), "data")
QWEN2_DIR = os.environ.get("QWEN2_TOKENIZER_DIR", "/work/shared/qwen2-tokenizer")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not os.path.isdir(QWEN2_DIR):
    QWEN2_DIR = os.path.join(os.path.dirname(ROOT), "shared", "qwen2-tokenizer")

WEATHER = {  # a bare function schema, as LLaMA-Factory's tools column holds them
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TOOLS = [{"type": "function", "function": WEATHER}]  # the OpenAI form


def call(city: str) -> dict:
    return {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}


# Each format: records in the tool's documented form, and the same conversations as OpenAI messages by hand.
RECORDS = {
    "openai": [
        {
            "system": "You are a weather bot.",
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "18°C, sunny"},
                {"role": "assistant", "content": "18°C and sunny."},
            ],
            "tools": TOOLS,
        },
        {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello!"}]},
    ],
    "sharegpt": [  # LLaMA-Factory's dataset format (data/README.md, "ShareGPT format")
        {
            "conversations": [
                {"from": "human", "value": "Weather in Paris and Oslo?"},
                {
                    "from": "function_call",
                    "value": json.dumps([{"name": "get_weather", "arguments": {"city": c}} for c in ("Paris", "Oslo")]),
                },
                {"from": "observation", "value": "Paris 18°C; Oslo 9°C"},
                {"from": "gpt", "value": "Paris is warmer."},
                {"from": "human", "value": "And Rome?"},
                {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Rome"}})},
                {"from": "observation", "value": "24°C"},
                {"from": "gpt", "value": "Rome: 24°C."},
            ],
            "system": "You are a weather bot.",
            "tools": json.dumps([WEATHER]),
        },
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "2+2?"},
                {"from": "gpt", "value": "4"},
            ],
            "system": "",
            "tools": "",
        },
    ],
    "swift": [  # ms-swift's agent format (docs: Instruction/Agent-support.md)
        {
            "tools": json.dumps(TOOLS),
            "messages": [
                {"role": "system", "content": "You are a weather bot."},
                {"role": "user", "content": "Weather in Paris and Oslo?"},
                {"role": "tool_call", "content": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
                {"role": "tool_call", "content": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})},
                {"role": "tool_response", "content": "18°C"},
                {"role": "tool_response", "content": "9°C"},
                {"role": "assistant", "content": "Paris 18°C, Oslo 9°C."},
            ],
        },
        {
            "tools": json.dumps([WEATHER]),
            "messages": [
                {"role": "user", "content": "Rome?"},
                {"role": "assistant", "content": "<think>\nI should look it up.\n</think>\n"},
                {"role": "tool_call", "content": json.dumps({"name": "get_weather", "arguments": {"city": "Rome"}})},
                {"role": "tool_response", "content": "24°C"},
                {"role": "assistant", "content": "24°C."},
            ],
        },
    ],
    "alpaca": [  # LLaMA-Factory's Alpaca format
        {
            "instruction": "Translate to French.",
            "input": "Good morning",
            "output": "Bonjour",
            "system": "You translate.",
            "history": [["Hi", "Hello! What shall I translate?"]],
        },
        {"instruction": "Name a prime.", "input": "", "output": "7", "system": "", "history": []},
    ],
}
BY_HAND = {
    "openai": [
        (
            [
                {"role": "system", "content": "You are a weather bot."},
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", **call("Paris")}]},
                {"role": "tool", "tool_call_id": "c1", "content": "18°C, sunny"},
                {"role": "assistant", "content": "18°C and sunny."},
            ],
            TOOLS,
        ),
        ([{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello!"}], None),
    ],
    "sharegpt": [
        (
            [
                {"role": "system", "content": "You are a weather bot."},
                {"role": "user", "content": "Weather in Paris and Oslo?"},
                {"role": "assistant", "content": "", "tool_calls": [call("Paris"), call("Oslo")]},
                {"role": "tool", "content": "Paris 18°C; Oslo 9°C"},
                {"role": "assistant", "content": "Paris is warmer."},
                {"role": "user", "content": "And Rome?"},
                {"role": "assistant", "content": "", "tool_calls": [call("Rome")]},
                {"role": "tool", "content": "24°C"},
                {"role": "assistant", "content": "Rome: 24°C."},
            ],
            TOOLS,
        ),
        (
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"},
            ],
            None,
        ),
    ],
    "swift": [
        (
            [
                {"role": "system", "content": "You are a weather bot."},
                {"role": "user", "content": "Weather in Paris and Oslo?"},
                {"role": "assistant", "content": "", "tool_calls": [call("Paris"), call("Oslo")]},
                {"role": "tool", "content": "18°C"},
                {"role": "tool", "content": "9°C"},
                {"role": "assistant", "content": "Paris 18°C, Oslo 9°C."},
            ],
            TOOLS,
        ),
        (
            [
                {"role": "user", "content": "Rome?"},
                {
                    "role": "assistant",
                    "content": "<think>\nI should look it up.\n</think>\n",
                    "tool_calls": [call("Rome")],
                },
                {"role": "tool", "content": "24°C"},
                {"role": "assistant", "content": "24°C."},
            ],
            TOOLS,
        ),
    ],
    "alpaca": [
        (
            [
                {"role": "system", "content": "You translate."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello! What shall I translate?"},
                {"role": "user", "content": "Translate to French.\nGood morning"},
                {"role": "assistant", "content": "Bonjour"},
            ],
            None,
        ),
        ([{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"}], None),
    ],
}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(QWEN2_DIR, added_tokens="qwen2.5")


@pytest.fixture(scope="module")
def encoder(tok):
    return ChatEncoder(tok, renderer="qwen2.5")


@pytest.fixture(scope="module")
def apply_chat_template(tok):
    """(ids, assistant mask) from transformers: ids with Qwen2.5's template, the mask with the same text written
    TRL-style (``{% generation %}`` around each assistant output), checked to render the very same ids."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok.tokenizer)
    with open(os.path.join(DATA, "qwen25_chat_template.jinja"), encoding="utf-8") as f:
        plain = f.read()
    with open(os.path.join(DATA, "qwen25_generation_chat_template.jinja"), encoding="utf-8") as f:
        tagged = f.read()

    def apply(messages, tools):
        ids = hf.apply_chat_template(messages, tools=tools, chat_template=plain, tokenize=True, return_dict=True)
        out = hf.apply_chat_template(
            messages, tools=tools, chat_template=tagged, return_dict=True, return_assistant_tokens_mask=True
        )
        assert out["input_ids"] == ids["input_ids"]
        return out["input_ids"], out["assistant_masks"]

    return apply


def template_encoder(tok, name: str) -> ChatEncoder:
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        return ChatEncoder(dataclasses.replace(tok, chat_template=f.read()), renderer="template")


@pytest.mark.parametrize("renderer", ["qwen2.5", "qwen25_chat_template.jinja", "qwen25_generation_chat_template.jinja"])
@pytest.mark.parametrize("fmt", list(RECORDS))
def test_each_format_equals_apply_chat_template_of_its_openai_form(tok, encoder, apply_chat_template, fmt, renderer):
    """The built-in renderer, Qwen2.5's template (responses by prefix splitting) and the same template written
    TRL-style (responses from its generation tags) all give transformers' ids and assistant mask."""
    enc = encoder if renderer == "qwen2.5" else template_encoder(tok, renderer)
    for k, (record, (messages, tools)) in enumerate(zip(RECORDS[fmt], BY_HAND[fmt], strict=True)):
        doc = enc.encode(record, f"{fmt}:{k}", fmt)
        ids, mask = apply_chat_template(messages, tools)
        assert doc.input_ids.tolist() == ids, (fmt, k)
        assert doc.loss_mask.tolist() == mask, (fmt, k)
    if fmt != "openai":  # a top-level system prompt is honoured, never replaced by the default one
        text = enc.tokenizer.decode(enc.encode(RECORDS[fmt][0], "", fmt).input_ids)
        assert "You are Qwen" not in text and text.count("<|im_start|>system\n") == 1


def write_inputs(folder, records) -> dict[str, str]:
    """The same records as every input kind: JSONL, gzip JSONL, JSON array, Parquet, Parquet folder, datasets."""
    import gzip

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {
        kind: str(folder / name)
        for kind, name in [
            ("jsonl", "in.jsonl"),
            ("gzip", "in.jsonl.gz"),
            ("json", "in.json"),
            ("parquet", "in.parquet"),
            ("parquet_dir", "shards"),
            ("datasets", "saved"),
        ]
    }
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    (folder / "in.jsonl").write_text(lines, encoding="utf-8")
    (folder / "in.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (folder / "in.json").write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    table = pa.Table.from_pylist(records)
    pq.write_table(table, paths["parquet"])
    (folder / "shards").mkdir()
    pq.write_table(table.slice(0, 1), folder / "shards" / "part-0.parquet")
    pq.write_table(table.slice(1), folder / "shards" / "part-1.parquet")
    datasets.Dataset.from_list(records).save_to_disk(paths["datasets"])
    return paths


@pytest.mark.parametrize("fmt", list(RECORDS))
def test_every_input_kind_gives_the_same_documents(encoder, tmp_path, fmt):
    records = RECORDS[fmt]
    expected = [encoder.encode(r, "", fmt) for r in records]
    for kind, path in write_inputs(tmp_path, records).items():
        assert detect_format(path) == fmt, kind
        docs = [encoder.encode(parse_record(rec), rec.location, fmt) for rec in iter_file_records(path)]
        assert len(docs) == len(expected), kind
        for a, b in zip(docs, expected):
            np.testing.assert_array_equal(a.input_ids, b.input_ids, err_msg=kind)
            np.testing.assert_array_equal(a.loss_mask, b.loss_mask, err_msg=kind)


@pytest.mark.parametrize(
    "fmt, record, message",
    [
        (
            "sharegpt",
            {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{x"}]},
            "message 1: field 'value' of a tool call is not valid JSON",
        ),
        (
            "sharegpt",
            {"conversations": [{"from": "human", "value": "q"}, {"from": "observation", "value": "r"}]},
            "message 1: tool message with no preceding tool call",
        ),
        (
            "sharegpt",
            {"conversations": [{"from": "bot", "value": "q"}]},
            "message 0: unknown role 'bot' (expected one of system, user, assistant, tool, human, gpt, function_call",
        ),
        (
            "sharegpt",
            {
                "conversations": [
                    {"from": "system", "value": "A"},
                    {"from": "human", "value": "q"},
                    {"from": "gpt", "value": "a"},
                ],
                "system": "B",
            },
            "field 'system' and the conversation's own system turn differ; keep one",
        ),
        (
            "swift",
            {"messages": [{"role": "user", "content": "q"}, {"role": "tool_call", "content": "[]"}]},
            'message 1: field \'content\' of a tool call must be a JSON object {"name", "arguments"} or a list of them',
        ),
        (
            "swift",
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": "{"},
            "field 'tools' is not valid JSON",
        ),
        ("alpaca", {"instruction": "q", "output": ""}, "field 'output': assistant turn with empty content"),
        (
            "alpaca",
            {"instruction": "q", "output": "a", "history": [["only one"]]},
            "field 'history' item 0: expected an [instruction, response] pair of strings",
        ),
        ("openai", {"messages": [{"role": "tool_call", "content": "{}"}]}, "message 0: unknown role 'tool_call'"),
    ],
)
def test_bad_records_name_the_message_and_field(encoder, fmt, record, message):
    with pytest.raises(DataError) as e:
        encoder.encode(record, "in.json:item 3", fmt)
    assert str(e.value).startswith("in.json:item 3: ") and message in str(e.value), str(e.value)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_detection_rules_and_one_line_errors(tmp_path):
    for fmt, records in RECORDS.items():
        assert detect_format(write_jsonl(tmp_path / f"{fmt}.jsonl", records)) == fmt
    # OpenAI records before ms-swift ones: swift reads both
    assert detect_format(write_jsonl(tmp_path / "mix.jsonl", RECORDS["openai"] + RECORDS["swift"])) == "swift"
    # the old ShareGPT flags still work, and now the format's own rules (system, function_call) apply
    renamed = [{"conv": [{"from": "user", "value": "q"}, {"from": "bot", "value": "a"}]}]
    fields = FieldNames(messages="conv", role_map={"bot": "assistant"})
    assert detect_format(write_jsonl(tmp_path / "renamed.jsonl", renamed), fields) == "sharegpt"
    assert detect_format(write_jsonl(tmp_path / "empty.jsonl", [])) == "openai"  # nothing to tell: no record

    bad = {
        "unknown": (
            [{"prompt": "q", "completion": "a"}],
            r"unknown.jsonl: cannot tell the record format \(fields "
            r"seen: prompt, completion; expected 'messages' of role/content",
        ),
        "two": (
            [{"messages": RECORDS["openai"][1]["messages"], "instruction": "q", "output": "a"}],
            r"two.jsonl: cannot tell the record format: two.jsonl:1 fits alpaca and openai \(fields: messages, "
            r"instruction, output\); pass --format",
        ),
        "turns": (
            [{"conversations": [{"role": "user", "content": "q"}]}, {"messages": [{"from": "human", "value": "q"}]}],
            r"turns.jsonl: cannot tell the record format \(fields seen: conversations, messages;",
        ),
        "mixed": (
            RECORDS["sharegpt"] + RECORDS["alpaca"],
            r"mixed.jsonl: records of more than one format: sharegpt "
            r"\(first at mixed.jsonl:1\), alpaca \(first at mixed.jsonl:3\); pass --format",
        ),
    }
    for name, (records, message) in bad.items():
        with pytest.raises(DataError, match=message) as e:
            detect_format(write_jsonl(tmp_path / f"{name}.jsonl", records))
        assert e.value.reason == "bad_file" and "\n" not in str(e.value)


def test_cli_detects_each_input_and_says_so(encoder, tmp_path, capsys):
    import importlib.util

    from megatron_focusft.data.dataset import PackedDataset

    spec = importlib.util.spec_from_file_location("preprocess_data", os.path.join(ROOT, "tools", "preprocess_data.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    inputs = []
    for fmt, records in RECORDS.items():
        path = tmp_path / f"{fmt}.json"
        path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
        inputs.append(str(path))
    common = ["--tokenizer", QWEN2_DIR, "--added-tokens", "qwen2.5", "--renderer", "qwen2.5", "--pack-length", "512"]
    common += ["--no-progress"]
    rc = tool.main(["--input", *inputs, "--out", str(tmp_path / "ds"), *common])
    out = capsys.readouterr().out
    assert rc == 0
    for fmt, path in zip(RECORDS, inputs):
        assert f"format                 {fmt} (detected)  {path}" in out
    ds = PackedDataset(str(tmp_path / "ds"))
    docs = [tuple(ids.tolist()) for i in range(len(ds)) for ids, _ in ds.documents(i)]
    want = [tuple(encoder.encode(r, "", fmt).input_ids.tolist()) for fmt, rs in RECORDS.items() for r in rs]
    assert sorted(docs) == sorted(want)
    # a layout that cannot be told: exit 2, one line naming the file and the fields seen
    (tmp_path / "odd.jsonl").write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    rc = tool.main(["--input", str(tmp_path / "odd.jsonl"), "--out", str(tmp_path / "ds2"), *common])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(tmp_path / "odd.jsonl") in err[0] and "prompt, completion" in err[0]
