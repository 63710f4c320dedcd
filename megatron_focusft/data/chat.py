"""One conversation -> one :class:`Document`: rendered turn by turn, tokenized once, loss mask per token.

Rendering
    * ``Qwen25Renderer``: the built-in Qwen2.5 ChatML renderer (default system prompt, tools block in the
      system turn, ``<tool_call>`` JSON inside the assistant turn, runs of tool results in one ``user`` turn).
    * ``TemplateRenderer``: the checkpoint's own Jinja ``chat_template``, rendered by transformers as
      ``apply_chat_template`` renders it; responses are its ``{% generation %}`` spans (TRL-style templates) or
      found by rendering growing prefixes of the conversation and checking that every prefix is a prefix of the
      full rendering.

Both return segments (context / assistant header / assistant response).  The whole text is tokenized once
(with character offsets), so the ids are exactly those of tokenizing the full rendering; a token is a
response token when any of its characters lies in a response segment.

Loss mask: 1 on the assistant body, its ``<|im_end|>`` and the newline after it; 0 on the
``<|im_start|>assistant\\n`` header and every other turn.  (The context/response blocks of the attention
mask are the maximal runs of equal loss-mask value: :mod:`megatron_focusft.masks` derives them.)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from .errors import DataError
from .formats import FieldNames, RecordFormat, normalize_conversation
from .tokenizer import ByteTokens, ChatTokenizer, OffsetTokens

QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

LossOn = Literal["all", "last"]
Overlong = Literal["drop", "truncate", "error"]
RendererName = Literal["auto", "template", "qwen2.5"]


def add_renderer_flag(p, help: str) -> None:
    """``--renderer``, shared by tools/preprocess_data.py and tools/evaluate.py (held-out data must be rendered
    as its training data was).  Defined here, not in :mod:`megatron_focusft.flags`, because preprocessing must
    start without importing torch or megatron-core."""
    p.add_argument("--renderer", choices=get_args(RendererName), default="auto", help=help)


# --------------------------------------------------------------------------------------------- documents
@dataclass
class Document:
    """One tokenized conversation: ``input_ids`` (int32) and ``loss_mask`` (uint8, 1 = response token)."""

    input_ids: np.ndarray
    loss_mask: np.ndarray
    source: str = ""
    truncated: bool = False

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())


# --------------------------------------------------------------------------------------------- renderers
@dataclass
class Segment:
    text: str
    kind: str  # "context" | "header" | "response"


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """Hugging Face's ``tojson`` filter (unlike Jinja's: no HTML escaping, keys kept in order)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class Qwen25Renderer:
    """The Qwen2.5 ChatML rendering, identical to Qwen2.5-Instruct's ``chat_template``."""

    name = "qwen2.5"

    def __init__(self, default_system: str = QWEN25_DEFAULT_SYSTEM):
        self.default_system = default_system

    def render(self, messages: list[dict], tools: list | None) -> list[Segment]:
        segs: list[Segment] = []
        start = 0
        system = self.default_system
        if messages and messages[0]["role"] == "system":
            system, start = messages[0]["content"], 1
        if tools:
            system += (
                "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
                + "".join("\n" + _tojson(t) for t in tools)
                + "\n</tools>\n\nFor each function call, return a json object with function name and "
                'arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, '
                '"arguments": <args-json-object>}\n</tool_call>'
            )
        segs.append(Segment(f"<|im_start|>system\n{system}<|im_end|>\n", "context"))
        n = len(messages)
        for i in range(start, n):
            m = messages[i]
            role = m["role"]
            if role == "assistant":
                calls = m.get("tool_calls")
                segs.append(Segment("<|im_start|>assistant\n", "header"))
                if not calls:
                    body = m["content"]
                else:
                    body = m["content"] + "\n" if m["content"] else ""
                    body += "\n".join(
                        '<tool_call>\n{"name": "'
                        + c["name"]
                        + '", "arguments": '
                        + _tojson(c["arguments"])
                        + "}\n</tool_call>"
                        for c in calls
                    )
                segs.append(Segment(body + "<|im_end|>\n", "response"))
            elif role == "tool":
                text = "" if i > 0 and messages[i - 1]["role"] == "tool" else "<|im_start|>user"
                text += "\n<tool_response>\n" + m["content"] + "\n</tool_response>"
                if i == n - 1 or messages[i + 1]["role"] != "tool":
                    text += "<|im_end|>\n"
                segs.append(Segment(text, "context"))
            else:  # user, or a later system turn
                segs.append(Segment(f"<|im_start|>{role}\n{m['content']}<|im_end|>\n", "context"))
        return segs


GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")  # how transformers tells a TRL-style template


def _render_jinja_template():
    """transformers' renderer of chat templates (what ``apply_chat_template`` calls), or a one-line error."""
    try:
        from transformers.utils.chat_template_utils import render_jinja_template
    except ImportError:
        raise DataError(
            "rendering a chat template needs transformers >= 4.52 (render_jinja_template); upgrade it, or pass "
            "--renderer qwen2.5",
            "tokenizer",
        ) from None
    return render_jinja_template


def _hf_messages(messages: list[dict]) -> list[dict]:
    """Canonical messages in the OpenAI form templates expect (tool calls under ``function``, with their ids,
    and a tool result's ``tool_call_id``: templates such as Mistral's render them)."""
    out = []
    for m in messages:
        hm = {"role": m["role"], "content": m["content"]}
        if m.get("tool_calls"):
            hm["tool_calls"] = [
                {
                    **({"id": c["id"]} if "id" in c else {}),
                    "type": "function",
                    "function": {"name": c["name"], "arguments": c["arguments"]},
                }
                for c in m["tool_calls"]
            ]
        if "tool_call_id" in m:
            hm["tool_call_id"] = m["tool_call_id"]
        out.append(hm)
    return out


class TemplateRenderer:
    """A checkpoint's Jinja chat template, rendered by transformers exactly as ``apply_chat_template`` renders it
    (its sandbox, filters and ``{% generation %}`` tag; the tokenizer's named special tokens as variables).

    Responses: a TRL-style template marks them itself with ``{% generation %}`` (the spans transformers'
    ``return_assistant_tokens_mask`` uses); any other (Qwen2.5's has no such tags) is split into turns by
    rendering growing prefixes of the conversation, each checked to be a prefix of the full rendering, the
    assistant header being what ``add_generation_prompt`` adds.
    """

    name = "template"

    def __init__(self, template: str, special_tokens: dict[str, str] | None = None):
        self.source = template
        self.extra = dict(special_tokens or {})
        self.generation = bool(GENERATION_TAG.search(template))
        self._render = _render_jinja_template()
        self._render(conversations=[], chat_template=template)  # compiles it: a syntax error surfaces here

    def _apply(self, messages: list[dict], tools: list | None, **kwargs) -> tuple[str, list[tuple[int, int]]]:
        """(rendering, generation spans) of one conversation; a failing template is a ``DataError``."""
        try:
            rendered, spans = self._render(
                conversations=[_hf_messages(messages)],
                tools=tools or None,
                chat_template=self.source,
                **kwargs,
                **self.extra,
            )
        except Exception as e:  # jinja errors, raise_exception() in the template, transformers' checks
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise DataError(f"chat template failed: {msg}", "template") from None
        return rendered[0], (spans[0] if spans else [])

    def full(self, messages: list[dict], tools: list | None, add_generation_prompt: bool = False) -> str:
        if not messages:
            return ""
        return self._apply(messages, tools, add_generation_prompt=add_generation_prompt)[0]

    def render(self, messages: list[dict], tools: list | None) -> list[Segment]:
        if self.generation:
            return self._render_tagged(messages, tools)
        full = self.full(messages, tools)
        segs: list[Segment] = []
        done = 0  # characters of `full` already assigned to segments (= rendering of the last stable prefix)
        prev_ok = True  # the rendering of messages[:i] is a prefix of the full rendering and ends at `done`
        n = len(messages)
        for i in range(n):
            prefix = full if i == n - 1 else self.full(messages[: i + 1], tools)
            ok = len(prefix) >= done and full.startswith(prefix)
            if messages[i]["role"] == "assistant":
                if not (ok and prev_ok):
                    raise DataError(
                        f"message {i}: chat template is not prefix-stable at this assistant turn "
                        "(turn-by-turn rendering differs from the full rendering); use the built-in renderer",
                        "template",
                    )
                gen = self.full(messages[:i], tools, add_generation_prompt=True) if i else ""
                header_end = len(gen) if len(gen) >= done and prefix.startswith(gen) else done
                if header_end > done:
                    segs.append(Segment(full[done:header_end], "header"))
                segs.append(Segment(full[header_end : len(prefix)], "response"))
            elif ok and len(prefix) > done:
                segs.append(Segment(full[done : len(prefix)], "context"))
            if ok:
                done = len(prefix)
            prev_ok = ok
        if done < len(full):
            segs.append(Segment(full[done:], "context"))
        if "".join(s.text for s in segs) != full:  # holds by construction; the promise stays checked
            raise DataError("turn-by-turn rendering differs from the full rendering", "template")
        return segs

    def _render_tagged(self, messages: list[dict], tools: list | None) -> list[Segment]:
        """Segments of a TRL-style template's rendering: its generation spans are the responses."""
        text, spans = self._apply(messages, tools, return_assistant_tokens_mask=True)
        segs: list[Segment] = []
        done = 0
        for a, b in spans:
            if not done <= a <= b <= len(text):
                raise DataError(f"chat template's generation spans overlap or run past the text ({a}, {b})", "template")
            if a > done:
                segs.append(Segment(text[done:a], "context"))
            if b > a:
                segs.append(Segment(text[a:b], "response"))
            done = b
        if done < len(text):
            segs.append(Segment(text[done:], "context"))
        return segs


# --------------------------------------------------------------------------------------------- encoder
def make_renderer(tokenizer: ChatTokenizer, renderer: RendererName = "auto"):
    """``auto``: the checkpoint's chat template when it has one, else the built-in Qwen2.5 renderer."""
    if renderer == "qwen2.5" or (renderer == "auto" and not tokenizer.chat_template):
        return Qwen25Renderer()
    if not tokenizer.chat_template:
        raise DataError(f"{tokenizer.folder}: no chat_template in this tokenizer folder", "tokenizer")
    try:
        return TemplateRenderer(tokenizer.chat_template, tokenizer.special_tokens)
    except DataError:
        raise
    except Exception as e:  # a jinja2 TemplateSyntaxError: a corrupt or unsupported template
        where = tokenizer.chat_template_file or tokenizer.folder
        line = f" line {e.lineno}" if isinstance(getattr(e, "lineno", None), int) else ""
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{where}: the chat template does not compile ({msg}{line})", "tokenizer") from None


def builtin_renderer_warning(tokenizer: ChatTokenizer) -> str:
    """What ``renderer="auto"`` falls back to without a chat template: said once, before any work, since it
    changes every record (a default system prompt appears in each conversation without one)."""
    return (
        f"{tokenizer.folder}: no chat template (no chat_template.jinja, no chat_template in tokenizer_config.json): "
        "rendering with the built-in Qwen2.5 ChatML renderer, which gives every conversation without a system "
        f"turn Qwen2.5's default system prompt ({QWEN25_DEFAULT_SYSTEM!r}); for another model give the folder its "
        "chat template; --renderer qwen2.5 chooses this renderer (and silences this warning)"
    )


def unexpected_error(e: BaseException, location: str | None = None) -> DataError:
    """An unexpected exception from one record, as a ``DataError(reason="unexpected")`` at ``location``."""
    return DataError(f"unexpected {type(e).__name__} while encoding: {str(e)[:200]}", "unexpected", location)


class ChatEncoder:
    """Record (dict) -> :class:`Document`, raising :class:`DataError` with the record's location.

    ``max_length``: conversations longer than this are dropped / truncated / errors (``overlong``); all three
    raise ``DataError(reason="too_long")`` when nothing can be kept, and the caller decides whether a
    ``drop`` is silent (counted) or an error.  ``loss_on="last"`` trains on the last assistant turn only.
    """

    def __init__(
        self,
        tokenizer: ChatTokenizer,
        renderer: RendererName = "auto",
        loss_on: LossOn = "all",
        max_length: int | None = None,
        overlong: Overlong = "drop",
        fields: FieldNames | None = None,
    ):
        if loss_on not in ("all", "last"):
            raise ValueError(f"loss_on must be 'all' or 'last', got {loss_on!r}")
        if overlong not in ("drop", "truncate", "error"):
            raise ValueError(f"overlong must be drop, truncate or error, got {overlong!r}")
        self.tokenizer = tokenizer
        self.renderer = make_renderer(tokenizer, renderer)
        self.loss_on = loss_on
        self.max_length = max_length
        self.overlong = overlong
        self.fields = fields or FieldNames()
        # The built-in renderer writes the ChatML markers, which must be special tokens: spelled out in
        # pieces they would train the model on text it never sees from a real Qwen2.5 tokenizer.  A
        # checkpoint's own template may use other markers; those it does use must still be single tokens.
        builtin = isinstance(self.renderer, Qwen25Renderer)
        for marker in ("<|im_start|>", "<|im_end|>"):
            if builtin or tokenizer.tokenizer.token_to_id(marker) is not None:
                tokenizer.single_id(marker)

    def render(self, record: dict, record_format: RecordFormat = "openai") -> list[Segment]:
        messages, tools = normalize_conversation(record, self.fields, record_format)
        return self.renderer.render(messages, tools)

    def encode(self, record: dict, location: str = "", record_format: RecordFormat = "openai") -> Document:
        """The :class:`Document` of a record of ``record_format``; every failure is a :class:`DataError` at
        ``location``: an unexpected exception while encoding this one record too (reason ``unexpected``), so
        that it can be skipped like any bad record and an error names where it happened."""
        try:
            return self._encode(record, location, record_format)
        except DataError as e:
            raise e.at(location) from None
        except MemoryError:
            raise
        except Exception as e:
            raise unexpected_error(e, location) from e

    def _encode(self, record: dict, location: str, record_format: RecordFormat) -> Document:
        segs = self.render(record, record_format)
        text = "".join(s.text for s in segs)
        enc, known_overlong = None, False
        if self.max_length is not None:
            (lower,) = self.tokenizer.min_tokens_at(text, [len(text)])
            if lower > self.max_length:  # certainly too long: decided before tokenising
                if self.overlong != "truncate":
                    raise DataError(
                        f"{len(text)} characters, so at least {lower} tokens, longer than the pack length "
                        f"{self.max_length} (not tokenised)",
                        "too_long",
                    )
                segs, text, enc = self._truncation_prefix(segs, text)
                known_overlong = True
        if enc is None:
            enc = self.tokenizer.tokenize(text)
        ids = enc.ids
        spans = []  # character spans of the response segments
        pos = 0
        for s in segs:
            if s.kind == "response":
                spans.append((pos, pos + len(s.text)))
            pos += len(s.text)
        if not spans:
            raise DataError("conversation has no assistant turn to train on", "no_response")
        first, end, aligned = _response_token_ranges(enc, spans, len(text))
        turn = np.full(len(ids), -1, dtype=np.int32)
        for k, (a, b) in enumerate(zip(first, end)):
            turn[a:b] = k

        n_tok = len(ids)
        truncated = False
        if self.max_length is not None and (n_tok > self.max_length or known_overlong):
            if self.overlong != "truncate":
                raise DataError(f"{n_tok} tokens, longer than the pack length {self.max_length}", "too_long")
            ok = np.flatnonzero(aligned & (end <= self.max_length))
            if ok.size == 0:
                length = "longer than the pack length" if known_overlong else f"{n_tok} tokens"
                raise DataError(f"{length} and no whole assistant turn fits in {self.max_length}", "too_long")
            n_tok = int(end[ok[-1]])
            ids, turn = ids[:n_tok], turn[:n_tok]
            truncated = True
        if self.loss_on == "last":
            last = int(turn.max())
            loss = (turn == last) & (last >= 0)
        else:
            loss = turn >= 0
        loss_mask = loss.astype(np.uint8)
        if not loss_mask.any():
            raise DataError("no response token left to train on", "no_response")
        return Document(np.ascontiguousarray(ids), loss_mask, location, truncated)

    def _truncation_prefix(self, segs: list[Segment], text: str):
        """``(segments, text, encoding)`` of a prefix of a conversation known to be longer than the pack length
        (``overlong="truncate"``), whose tokens are exactly the first tokens of the whole text and which holds
        every whole assistant turn that can fit: what truncating the whole text would keep, without tokenising
        all of it.

        A prefix ends at a segment end where the tokenizer splits the text anyway (before an added token such
        as ``<|im_start|>``: :meth:`ChatTokenizer.splits_before`), so its tokens are those of the whole text.
        Prefixes are tokenised growing (twice as long each time, from about 4 characters a token) until one
        has more tokens than the pack length, or reaches past the last response whose length bound fits.  So
        a huge record costs about twice the text that fits, not the whole record.  Raises
        ``DataError(reason="too_long")`` when no response can fit by the bound alone.
        """
        ends, pos = [], 0
        for seg in segs:
            pos += len(seg.text)
            ends.append(pos)
        bounds = self.tokenizer.min_tokens_at(text, ends)
        fits = [k for k, seg in enumerate(segs) if seg.kind == "response" and bounds[k] <= self.max_length]
        if not fits:
            raise DataError(
                f"at least {bounds[-1]} tokens and no whole assistant turn fits in {self.max_length} (not tokenised)",
                "too_long",
            )
        target = 4 * self.max_length  # characters
        for k in range(fits[0], len(segs)):
            last = k >= fits[-1]
            if not self.tokenizer.splits_before(text, ends[k]) or (ends[k] < target and not last):
                continue
            prefix = text[: ends[k]]
            enc = self.tokenizer.tokenize(prefix)
            if last or len(enc.ids) > self.max_length:
                return segs[: k + 1], prefix, enc
            target = 2 * ends[k]
        raise AssertionError("unreachable: the end of the text is always a split point")


def _response_token_ranges(tokens: ByteTokens | OffsetTokens, spans: list[tuple[int, int]], text_len: int):
    """Token ranges ``[first, end)`` of character spans: every token overlapping a span belongs to it (as
    transformers' ``return_assistant_tokens_mask`` has it: the tokens holding the span's first and last character,
    and those between).

    ``aligned[k]``: the span ends exactly at a token boundary (a safe truncation point).
    """
    at = tokens.first_tokens([c for a, b in spans for c in (a, b - 1, b)]).reshape(-1, 3)
    ta, tb, tnext = at[:, 0], at[:, 1], at[:, 2]
    inside = np.array([b < text_len for _, b in spans])
    if (ta < 0).any() or (tb < 0).any() or (inside & (tnext < 0)).any():  # characters no token holds
        return _response_token_ranges_from_offsets(tokens.encoding, spans, text_len)
    return ta, tb + 1, ~inside | (tnext != tb)


def _response_token_ranges_from_offsets(enc, spans, text_len):
    offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
    tok_start, tok_end = offsets[:, 0], offsets[:, 1]
    span_start = np.array([a for a, _ in spans], dtype=np.int64)
    span_end = np.array([b for _, b in spans], dtype=np.int64)
    first = np.searchsorted(tok_end, span_start, side="right")  # first token ending after the span start
    end = np.searchsorted(tok_start, span_end, side="left")  # tokens starting before the span end
    last = np.minimum(end, len(tok_start) - 1)
    aligned = (end >= len(tok_start)) | (tok_start[last] == span_end)
    return first, end, aligned
