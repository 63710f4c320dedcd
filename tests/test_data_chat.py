"""Chat rendering, tokenisation and loss masks with the real Qwen2 vocabulary (expected ids written out)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from megatron_focusft.data import (
    ChatEncoder,
    DataError,
    FieldNames,
    load_tokenizer,
    normalize_conversation,
)
from megatron_focusft.data.chat import Qwen25Renderer, TemplateRenderer

QWEN2_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "qwen2-tokenizer")
QWEN2_DIR = os.environ.get("QWEN2_TOKENIZER_DIR", os.path.abspath(QWEN2_DIR))
if not os.path.isdir(QWEN2_DIR):
    QWEN2_DIR = "/work/shared/qwen2-tokenizer"
TEMPLATE = os.path.join(os.path.dirname(__file__), "data", "qwen25_chat_template.jinja")

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}

CONVERSATIONS = {
    "plain": {
        "messages": [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello! How can I help?"},
        ]
    },
    "multi": {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "6."},
        ]
    },
    "tools": {
        "tools": [WEATHER_TOOL],
        "messages": [
            {"role": "user", "content": "Weather in Paris and Oslo?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    },
                    {
                        "id": "c2",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Oslo"}},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "18°C, sunny"},
            {"role": "tool", "tool_call_id": "c2", "content": "9°C, rain"},
            {"role": "assistant", "content": "Paris: 18°C and sunny; Oslo: 9°C with rain."},
        ],
    },
    "nonascii": {
        "messages": [
            {"role": "user", "content": "你好，世界！Ça va? 😀"},
            {"role": "assistant", "content": "\nこんにちは — très bien 👍"},
        ]
    },
}

# fmt: off
EXPECTED_IDS = {
    "plain": [
        151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446, 525, 264, 10950,
        17847, 13, 151645, 198, 151644, 872, 198, 13048, 0, 151645, 198, 151644, 77091, 198, 9707, 0, 2585,
        646, 358, 1492, 30, 151645, 198,
    ],
    "multi": [
        151644, 8948, 198, 3430, 9814, 13, 151645, 198, 151644, 872, 198, 17, 10, 17, 30, 151645, 198,
        151644, 77091, 198, 19, 151645, 198, 151644, 872, 198, 3036, 220, 18, 10, 18, 30, 151645, 198,
        151644, 77091, 198, 21, 13, 151645, 198,
    ],
    "tools": [
        151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446, 525, 264, 10950,
        17847, 382, 2, 13852, 271, 2610, 1231, 1618, 825, 476, 803, 5746, 311, 7789, 448, 279, 1196, 3239,
        382, 2610, 525, 3897, 448, 729, 32628, 2878, 366, 15918, 1472, 15918, 29, 11874, 9492, 510, 27,
        15918, 397, 4913, 1313, 788, 330, 1688, 497, 330, 1688, 788, 5212, 606, 788, 330, 455, 69364, 497,
        330, 4684, 788, 330, 28981, 369, 264, 3283, 497, 330, 13786, 788, 5212, 1313, 788, 330, 1700, 497,
        330, 13193, 788, 5212, 8926, 788, 5212, 1313, 788, 330, 917, 9207, 2137, 330, 6279, 788, 4383, 8926,
        1341, 3417, 532, 522, 15918, 1339, 2461, 1817, 729, 1618, 11, 470, 264, 2951, 1633, 448, 729, 829,
        323, 5977, 2878, 220, 151657, 151658, 11874, 9492, 510, 151657, 198, 4913, 606, 788, 366, 1688,
        11494, 8066, 330, 16370, 788, 366, 2116, 56080, 40432, 31296, 151658, 151645, 198, 151644, 872, 198,
        28981, 304, 12095, 323, 57858, 30, 151645, 198, 151644, 77091, 198, 151657, 198, 4913, 606, 788,
        330, 455, 69364, 497, 330, 16370, 788, 5212, 8926, 788, 330, 59604, 95642, 151658, 198, 151657, 198,
        4913, 606, 788, 330, 455, 69364, 497, 330, 16370, 788, 5212, 8926, 788, 330, 28867, 385, 95642,
        151658, 151645, 198, 151644, 872, 198, 27, 14172, 9655, 397, 16, 23, 30937, 11, 39698, 198, 522,
        14172, 9655, 397, 27, 14172, 9655, 397, 24, 30937, 11, 11174, 198, 522, 14172, 9655, 29, 151645,
        198, 151644, 77091, 198, 59604, 25, 220, 16, 23, 30937, 323, 39698, 26, 57858, 25, 220, 24, 30937,
        448, 11174, 13, 151645, 198,
    ],
    "nonascii": [
        151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446, 525, 264, 10950,
        17847, 13, 151645, 198, 151644, 872, 198, 108386, 3837, 99489, 6313, 45913, 64, 11164, 30, 90316,
        151645, 198, 151644, 77091, 271, 89015, 1959, 24901, 14370, 61804, 235, 151645, 198,
    ],
}
# Loss mask as runs (value, length): system + user + assistant header are context;
# the assistant body + <|im_end|> + \n are response.
EXPECTED_RUNS = {
    "plain": [(0, 31), (1, 9)],
    "multi": [(0, 20), (1, 3), (0, 14), (1, 4)],
    "tools": [(0, 167), (1, 42), (0, 35), (1, 19)],
    "nonascii": [(0, 37), (1, 9)],
}
# fmt: on


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(QWEN2_DIR, added_tokens="qwen2.5")


@pytest.fixture(scope="module")
def encoder(tok):
    return ChatEncoder(tok, renderer="qwen2.5")


def runs(mask):
    out = []
    for v in np.asarray(mask).tolist():
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return [tuple(r) for r in out]


def full_text(conv):
    messages, tools = normalize_conversation(conv)
    return "".join(s.text for s in Qwen25Renderer().render(messages, tools))


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_tokenisation_matches_expected_qwen2_ids(encoder, tok, name):
    doc = encoder.encode(CONVERSATIONS[name], name)
    assert doc.input_ids.dtype == np.int32 and doc.loss_mask.dtype == np.uint8
    assert doc.input_ids.tolist() == EXPECTED_IDS[name]
    assert runs(doc.loss_mask) == EXPECTED_RUNS[name]
    assert tok.decode(doc.input_ids) == full_text(CONVERSATIONS[name])
    # Every assistant response ends with <|im_end|> "\n" inside the loss mask; its header is outside.
    ids, m = doc.input_ids, doc.loss_mask
    ends = np.flatnonzero(ids == 151645)
    for e in ends:
        assert m[e] == m[e + 1]
    heads = np.flatnonzero((ids[:-1] == 151644) & (ids[1:] == 77091))  # <|im_start|>assistant
    assert (m[heads] == 0).all() and (m[heads + 1] == 0).all()


def test_rendering_of_tools_and_tool_results():
    text = full_text(CONVERSATIONS["tools"])
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
    assert "\n<tools>\n" + json.dumps(WEATHER_TOOL) + "\n</tools>" in text
    assert (
        "<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n18°C, sunny\n</tool_response>\n"
        "<tool_response>\n9°C, rain\n</tool_response><|im_end|>\n"
    ) in text


def test_special_tokens_and_tool_markers(tok):
    assert tok.encode("<|im_start|>") == [151644]
    assert tok.encode("<|im_end|>") == [151645]
    assert tok.encode("\n") == [198]
    assert tok.encode("<tool_call>") == [151657] and tok.encode("</tool_call>") == [151658]
    # Not special in Qwen2.5: ordinary text.
    assert tok.encode("<tool_response>") == [27, 14172, 9655, 29]
    assert tok.encode("<think>") == [13708, 766, 29]
    assert tok.pad_id == 151643


def test_vocab_and_merges_tokenize_like_tokenizer_json(tmp_path, tok):
    for f in ("vocab.json", "merges.txt"):
        os.symlink(os.path.join(QWEN2_DIR, f), tmp_path / f)
    other = load_tokenizer(str(tmp_path))
    for conv in CONVERSATIONS.values():
        text = full_text(conv)
        assert other.encode(text) == tok.encode(text)


def test_chat_template_from_the_checkpoint_folder_matches_builtin(tmp_path, encoder):
    os.symlink(os.path.join(QWEN2_DIR, "tokenizer.json"), tmp_path / "tokenizer.json")
    with open(TEMPLATE, encoding="utf-8") as f:
        config = {"chat_template": f.read(), "bos_token": None, "eos_token": {"content": "<|im_end|>"}}
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok2 = load_tokenizer(str(tmp_path), added_tokens="qwen2.5")
    assert tok2.special_tokens == {"eos_token": "<|im_end|>"}  # what apply_chat_template gives the template
    enc2 = ChatEncoder(tok2)  # auto: the folder's template
    assert isinstance(enc2.renderer, TemplateRenderer)
    for name, conv in CONVERSATIONS.items():
        a, b = encoder.encode(conv, name), enc2.encode(conv, name)
        assert a.input_ids.tolist() == b.input_ids.tolist(), name
        assert a.loss_mask.tolist() == b.loss_mask.tolist(), name


def test_trl_generation_template_gives_the_builtin_ids_and_mask(tmp_path, encoder):
    """A template with {% generation %} (TRL style): its generation spans are the responses, no prefix rendering."""
    os.symlink(os.path.join(QWEN2_DIR, "tokenizer.json"), tmp_path / "tokenizer.json")
    os.symlink(
        os.path.join(os.path.dirname(TEMPLATE), "qwen25_generation_chat_template.jinja"),
        tmp_path / "chat_template.jinja",
    )
    enc = ChatEncoder(load_tokenizer(str(tmp_path), added_tokens="qwen2.5"))
    assert isinstance(enc.renderer, TemplateRenderer) and enc.renderer.generation
    for name, conv in CONVERSATIONS.items():
        doc = enc.encode(conv, name)
        assert doc.input_ids.tolist() == EXPECTED_IDS[name] and runs(doc.loss_mask) == EXPECTED_RUNS[name], name
    with pytest.raises(DataError, match="^x:1: conversation has no assistant turn to train on"):
        enc.encode({"messages": [{"role": "user", "content": "q"}]}, "x:1")


def test_template_that_rewrites_history_is_refused():
    # Renders assistant content only on the last turn: prefixes are not prefixes of the full rendering.
    tpl = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role != 'assistant' or loop.last %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    )
    messages, tools = normalize_conversation(CONVERSATIONS["multi"])
    with pytest.raises(DataError, match="prefix-stable") as e:
        TemplateRenderer(tpl).render(messages, tools)
    assert e.value.reason == "template"


def test_blocks_of_a_rendered_conversation(encoder):
    """The mask's block rule (masks.py owns it) on a real conversation's loss mask: 1-D, batched, one token."""
    import torch

    from megatron_focusft.masks import blocks_from_loss_mask

    doc = encoder.encode(CONVERSATIONS["multi"])
    expected = [0] * 20 + [1] * 3 + [2] * 14 + [3] * 4
    assert blocks_from_loss_mask(torch.from_numpy(doc.loss_mask)).tolist() == expected
    batched = blocks_from_loss_mask(torch.from_numpy(np.stack([doc.loss_mask, doc.loss_mask])))
    assert batched.tolist() == [expected, expected]
    assert blocks_from_loss_mask(torch.tensor([1], dtype=torch.uint8)).tolist() == [0]


def test_loss_on_last_turn_only(tok):
    doc = ChatEncoder(tok, renderer="qwen2.5", loss_on="last").encode(CONVERSATIONS["multi"])
    assert runs(doc.loss_mask) == [(0, 37), (1, 4)]
    assert doc.input_ids.tolist() == EXPECTED_IDS["multi"]


def test_overlong_drop_truncate_error(tok):
    conv = CONVERSATIONS["multi"]  # 41 tokens; the first assistant turn ends at token 23
    for policy in ("drop", "error"):
        with pytest.raises(DataError, match="longer than the pack length 30") as e:
            ChatEncoder(tok, renderer="qwen2.5", max_length=30, overlong=policy).encode(conv, "x.jsonl:3")
        assert e.value.reason == "too_long" and str(e.value).startswith("x.jsonl:3: ")
    doc = ChatEncoder(tok, renderer="qwen2.5", max_length=30, overlong="truncate").encode(conv)
    assert doc.truncated and doc.input_ids.tolist() == EXPECTED_IDS["multi"][:23]
    assert runs(doc.loss_mask) == [(0, 20), (1, 3)]
    # loss on the last turn of what is kept
    doc = ChatEncoder(tok, renderer="qwen2.5", max_length=30, overlong="truncate", loss_on="last").encode(conv)
    assert runs(doc.loss_mask) == [(0, 20), (1, 3)]
    with pytest.raises(DataError, match="no whole assistant turn fits in 22"):
        ChatEncoder(tok, renderer="qwen2.5", max_length=22, overlong="truncate").encode(conv)
    assert len(ChatEncoder(tok, renderer="qwen2.5", max_length=41).encode(conv)) == 41


@pytest.mark.parametrize(
    "messages, reason, message",
    [
        ([{"role": "bot", "content": "x"}], "unknown_role", "message 0: unknown role 'bot'"),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}],
            "empty_assistant",
            "message 1: assistant turn with empty content and no tool_calls",
        ),
        (
            [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}],
            "orphan_tool",
            "message 1: tool message with no preceding tool call",
        ),
        (
            [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "", "tool_calls": [{"id": "a", "function": {"name": "f"}}]},
                {"role": "tool", "tool_call_id": "b", "content": "r"},
            ],
            "orphan_tool",
            "unknown tool_call_id 'b'",
        ),
        (
            [
                {"role": "user", "content": "q"},
                {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]},
            ],
            "bad_record",
            "arguments are not valid JSON",
        ),
        ([{"role": "user", "content": "only a question"}], "no_response", "no assistant turn"),
        ([{"role": "user", "content": 3}], "bad_record", "content must be a string"),
        # field types: each names the message and the field, never a TypeError from deep inside
        ([{"role": ["user"], "content": "q"}], "bad_record", "message 0: field 'role' must be a string"),
        ([{"role": {"r": 1}, "content": "q"}], "bad_record", "message 0: field 'role' must be a string"),
        ([{"role": 7, "content": "q"}], "bad_record", "message 0: field 'role' must be a string"),
        ([{"content": "q"}], "unknown_role", "message 0: unknown role None"),
        ([{"role": "user", "content": {"text": "q"}}], "bad_record", "message 0: field 'content': content must be"),
        (
            [{"role": "user", "content": [{"type": "text", "text": ["q"]}]}],
            "bad_record",
            "message 0: field 'content' part 0: unsupported content part",
        ),
        (
            [{"role": "user", "content": ["a", {"type": "image_url", "image_url": "x"}]}],
            "bad_record",
            "message 0: field 'content' part 1: unsupported content part",
        ),
    ],
)
def test_bad_conversations_give_clear_errors(encoder, messages, reason, message):
    with pytest.raises(DataError) as e:
        encoder.encode({"messages": messages}, "data.jsonl:17")
    assert e.value.reason == reason
    assert str(e.value).startswith("data.jsonl:17: ") and message in str(e.value)


def test_renamed_fields_are_named_in_type_errors(tok):
    enc = ChatEncoder(tok, renderer="qwen2.5", fields=FieldNames(role="from", content="value"))
    with pytest.raises(DataError, match=r"^x:3: message 1: field 'from' must be a string"):
        enc.encode({"messages": [{"from": "user", "value": "q"}, {"from": ["gpt"], "value": "a"}]}, "x:3")
    with pytest.raises(DataError, match=r"^x:3: message 0: field 'value': content must be a string"):
        enc.encode({"messages": [{"from": "user", "value": 1.5}]}, "x:3")


def test_unexpected_exception_becomes_a_located_data_error(encoder):
    # a value JSON cannot write (as a Parquet row can hold): json.dumps raises TypeError inside the renderer
    rec = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": [b"\x00"]}
    with pytest.raises(DataError, match=r"^data.parquet:row 4: unexpected TypeError while encoding: .*bytes") as e:
        encoder.encode(rec, "data.parquet:row 4")
    assert e.value.reason == "unexpected" and isinstance(e.value.__cause__, TypeError)


def test_builtin_renderer_needs_chatml_special_tokens(tmp_path):
    # a tokenizer.json without its added tokens: <|im_start|> would be spelled in pieces
    with open(os.path.join(QWEN2_DIR, "tokenizer.json"), encoding="utf-8") as f:
        spec = json.load(f)
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in ("<|im_start|>", "<|im_end|>")]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    plain = load_tokenizer(str(tmp_path))
    assert len(plain.encode("<|im_start|>")) > 1
    with pytest.raises(DataError, match=r"'<\|im_start\|>' is not a single token") as e:
        ChatEncoder(plain, renderer="qwen2.5")
    assert str(tmp_path) in str(e.value)


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="neither tokenizer.json nor vocab.json"):
        load_tokenizer(str(tmp_path))


def test_configurable_field_names_and_roles(encoder, tok):
    fields = FieldNames(
        messages="conversations", role="from", content="value", role_map={"human": "user", "gpt": "assistant"}
    )
    rec = {
        "conversations": [
            {"from": "human", "value": "Hi!"},
            {"from": "gpt", "value": "Hello! How can I help?"},
        ]
    }
    doc = ChatEncoder(tok, renderer="qwen2.5", fields=fields).encode(rec)
    assert doc.input_ids.tolist() == EXPECTED_IDS["plain"]
    # JSON-string columns (as Parquet often stores them) and OpenAI content parts
    rec = {
        "messages": json.dumps(
            [
                {"role": "user", "content": [{"type": "text", "text": "Hi!"}]},
                {"role": "assistant", "content": "Hello! How can I help?"},
            ]
        )
    }
    assert encoder.encode(rec).input_ids.tolist() == EXPECTED_IDS["plain"]


def test_nfc_shortcut_gives_the_normalised_ids(tok):
    for text in ("Ça va? ﬁ 你好", "Ça va? e\u0301 ﬁ 你好"):  # NFC text, and text that NFC changes
        assert tok.encode_text(text).ids == tok.tokenizer.encode(text, add_special_tokens=False).ids
    assert tok.encode_text("e\u0301").ids == tok.encode("é")
    assert type(tok.tokenizer.normalizer).__name__ == "NFC"  # restored


def test_byte_token_ends_give_char_to_token(tok):
    """The fast path (ids without offsets, token ends from each id's bytes) finds for every character the token
    char_to_token finds, on text whose characters byte-level BPE splits across tokens (emoji, flags, CJK)."""
    import random

    from megatron_focusft.data.tokenizer import ByteTokens, OffsetTokens

    rng = random.Random(0)
    pieces = ["😀", "👍🏽", "🇫🇷", "こんにちは", "数据", "é", "ß", "—", "𝔘𝔫", "\n", "\n\n", " ", "  ", "\t", "abc"]
    pieces += [" word", "<|im_start|>", "<|im_end|>", "<tool_call>", "Ça", "1234"]
    for _ in range(200):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 25)))
        fast, slow = tok.tokenize(text), OffsetTokens(tok.encode_text(text))
        assert isinstance(fast, ByteTokens) and fast.ids.tolist() == slow.ids.tolist(), text
        chars = list(range(len(text) + 1))
        assert fast.first_tokens(chars).tolist() == slow.first_tokens(chars).tolist(), text
