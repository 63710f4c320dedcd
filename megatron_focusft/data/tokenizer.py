"""The checkpoint's tokenizer, loaded from its folder: ``tokenizer.json``, or ``vocab.json`` + ``merges.txt``.

Only the Rust ``tokenizers`` library is used (no model code).  The chat template, when the folder has one
(``chat_template.jinja`` or ``tokenizer_config.json``'s ``chat_template``), travels with the tokenizer.

``added_tokens="qwen2.5"`` keeps exactly the 22 added tokens Qwen2.5 defines (ids 151643..151664) and drops
any later additions (e.g. ``<tool_response>``, ``<think>`` = 151665..151668 in Qwen3-era files), so that such
strings are tokenized as ordinary text, exactly as Qwen2.5 does.  ``"file"`` keeps what the folder says.

Length bounds without tokenising (:meth:`ChatTokenizer.min_tokens_at`): in a byte-level BPE every token stands
for at most ``max_token_bytes`` bytes of text (the longest vocabulary entry, in bytes; 128 for Qwen2), so a
text of ``n`` UTF-8 bytes has at least ``ceil(n / max_token_bytes)`` tokens.  That lets the chat encoder reject
a record far longer than the pack length before tokenising it (tokenising 5 MB of text takes ~20 s and more
than 1 GB).  The bound is only claimed where it holds: a BPE model with a ByteLevel pre-tokenizer, every byte in
its vocabulary, no normaliser other than NFC, and no added token that swallows the whitespace beside
it; for any other tokenizer ``max_token_bytes`` is None and nothing is rejected early.
"""

from __future__ import annotations

import json
import os
import unicodedata
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from .errors import DataError

AddedTokens = Literal["file", "qwen2.5"]

# Qwen2 / Qwen2.5 pre-tokenizer pattern (as in their tokenizer.json).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2.5's added tokens, in id order from 151643; ``special`` as in Qwen2.5's tokenizer.json.
QWEN25_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
QWEN25_FIRST_ADDED_ID = 151643

# NFC normalisation shrinks a text's UTF-8 length by at most this factor (a decomposed character such as
# U+0390 = iota + two combining marks, 6 bytes, composes into 2 bytes: 3x; 4 leaves a margin).  Only text that is
# not already NFC needs it.
NFC_MAX_SHRINK = 4
_UTF8_CHUNK = 1 << 20


def utf8_length(text: str, start: int = 0, end: int | None = None) -> int:
    """UTF-8 bytes of ``text[start:end]`` without encoding it whole (1 MiB characters at a time)."""
    end = len(text) if end is None else end
    if text.isascii():
        return max(0, end - start)
    return sum(
        len(text[i : min(end, i + _UTF8_CHUNK)].encode("utf-8", "surrogatepass"))
        for i in range(start, end, _UTF8_CHUNK)
    )


class OffsetTokens:
    """A text's token ids, from a ``tokenizers.Encoding``: the token holding a character comes from its offsets."""

    def __init__(self, encoding):
        self.encoding = encoding
        self.ids = np.asarray(encoding.ids, dtype=np.int32)

    def first_tokens(self, chars: list[int]) -> np.ndarray:
        """For each character position, the token holding it (-1: none, or past the end)."""
        at = (self.encoding.char_to_token(c) for c in chars)
        return np.fromiter((-1 if t is None else t for t in at), dtype=np.int64, count=len(chars))


class ByteTokens:
    """A text's token ids with the end of each in the text's UTF-8 bytes (a byte-level BPE's tokens stand for fixed
    bytes): the token holding a character is the one holding its first byte, which is what ``char_to_token``
    gives (a character split across tokens belongs to the first)."""

    def __init__(self, text: str, ids: np.ndarray, ends: np.ndarray):
        self.text, self.ids, self.ends = text, ids, ends

    def first_tokens(self, chars: list[int]) -> np.ndarray:
        """For each character position (non-decreasing), the token holding it (-1: past the end)."""
        if self.text.isascii():
            starts = np.asarray(chars, dtype=np.int64)
        else:
            starts, nbytes, prev = np.empty(len(chars), dtype=np.int64), 0, 0
            for k, c in enumerate(chars):
                nbytes += utf8_length(self.text, prev, c)
                starts[k], prev = nbytes, c
        tokens = np.searchsorted(self.ends, starts, side="right")
        return np.where(np.asarray(chars) < len(self.text), tokens, -1)


# Pre-tokenizers that only cut the text (every character stays, in order), so a byte-level BPE's tokens stand for
# fixed bytes of the input; Split and Punctuation only while they keep what they match.
_CUTTING = {"Split", "Digits", "Punctuation", "ByteLevel", "Sequence"}


def _only_cuts(state: dict) -> bool:
    if state.get("type") not in _CUTTING or state.get("behavior") == "Removed" or state.get("add_prefix_space"):
        return False
    return all(_only_cuts(p) for p in state.get("pretokenizers") or [] if isinstance(p, dict))


def _has_byte_level(state: dict) -> bool:
    if state.get("type") == "ByteLevel":
        return True
    return any(_has_byte_level(p) for p in state.get("pretokenizers") or [] if isinstance(p, dict))


@dataclass
class ChatTokenizer:
    """A ``tokenizers.Tokenizer`` plus what the chat renderer needs from the checkpoint folder."""

    tokenizer: Tokenizer
    chat_template: str | None
    folder: str
    added_tokens: str
    chat_template_file: str | None = None  # where chat_template comes from (for error messages)
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ...: template variables

    def tokenize(self, text: str) -> ByteTokens | OffsetTokens:
        """The ids of :meth:`encode_text`, and which token holds each character.

        Where each token id stands for fixed bytes of the input (:attr:`_byte_lengths`) and normalising ``text``
        changes nothing, the ids come from ``encode_batch_fast``, which skips the offsets (a quarter of the time
        of tokenising), and the token ends from the ids' byte lengths, checked to add up to the text's bytes.
        """
        lengths, tk = self._byte_lengths, self.tokenizer
        norm = tk.normalizer
        if lengths is None or not (norm is None or unicodedata.is_normalized("NFC", text)):
            return OffsetTokens(self.encode_text(text))
        tk.normalizer = None
        try:
            ids = np.asarray(tk.encode_batch_fast([text], add_special_tokens=False)[0].ids, dtype=np.int32)
        finally:
            tk.normalizer = norm
        ends = np.cumsum(lengths[ids])
        if (int(ends[-1]) if len(ends) else 0) != utf8_length(text):  # (the premise failed: use the offsets)
            return OffsetTokens(self.encode_text(text))
        return ByteTokens(text, ids, ends)

    @cached_property
    def _byte_lengths(self) -> np.ndarray | None:
        """The input bytes each token id stands for, where that is fixed, else None: a byte-level BPE as
        :attr:`max_token_bytes` requires (each character of a vocabulary entry is one byte; an added token is its
        UTF-8 text) whose pre-tokenizer only cuts the text, and a ``tokenizers`` with ``encode_batch_fast``."""
        tk = self.tokenizer
        if self.max_token_bytes is None or not hasattr(tk, "encode_batch_fast"):
            return None
        if not _only_cuts(json.loads(tk.pre_tokenizer.__getstate__())):
            return None
        vocab = tk.get_vocab(with_added_tokens=False)
        added = tk.get_added_tokens_decoder()
        lengths = np.zeros(max([*vocab.values(), *added, -1]) + 1, dtype=np.int64)
        for token, i in vocab.items():
            lengths[i] = len(token)
        for i, token in added.items():
            lengths[i] = len(token.content.encode("utf-8"))
        return lengths

    def encode_text(self, text: str):
        """``tokenizers.Encoding`` of ``text`` (no added BOS/EOS).

        NFC normalisation of text that is already NFC is the identity, so the normaliser is skipped for such
        text (identical ids and offsets, ~20% faster).  Not thread-safe (one tokenizer per worker process).
        """
        tk = self.tokenizer
        norm = tk.normalizer
        if type(norm).__name__ == "NFC" and unicodedata.is_normalized("NFC", text):
            tk.normalizer = None
            try:
                return tk.encode(text, add_special_tokens=False)
            finally:
                tk.normalizer = norm
        return tk.encode(text, add_special_tokens=False)

    @cached_property
    def max_token_bytes(self) -> int | None:
        """The most bytes of input text one token can stand for, or None where this module cannot bound it.

        Bounded for a byte-level BPE (a BPE model behind a ByteLevel pre-tokenizer, whose vocabulary holds all
        256 byte symbols, so every byte is in some token and none is dropped or fused into an unknown token)
        with no normaliser or NFC: the longest vocabulary entry (in byte symbols) or added token (in UTF-8
        bytes).  An added token that strips the whitespace beside it (``lstrip`` / ``rstrip``) stands for any
        number of bytes, so then there is no bound.
        """
        tk = self.tokenizer
        if not isinstance(tk.model, models.BPE):
            return None
        if tk.normalizer is not None and type(tk.normalizer).__name__ != "NFC":
            return None
        pre = tk.pre_tokenizer
        try:
            if pre is None or not _has_byte_level(json.loads(pre.__getstate__())):
                return None
        except (TypeError, ValueError, AttributeError):
            return None
        vocab = tk.get_vocab(with_added_tokens=False)
        if not set(pre_tokenizers.ByteLevel.alphabet()) <= vocab.keys():
            return None
        longest = max(map(len, vocab), default=1)
        for added in tk.get_added_tokens_decoder().values():
            if added.lstrip or added.rstrip:
                return None
            longest = max(longest, len(added.content.encode("utf-8")))
        return longest

    def min_tokens_at(self, text: str, ends: list[int]) -> list[int]:
        """For each ``end`` (increasing character offsets), a lower bound on the number of tokens
        :meth:`encode_text` gives ``text[:end]``, computed from its length alone; all 0 without a bound.

        Exact tokenising of a prefix is not needed: tokens >= bytes / :attr:`max_token_bytes`, with the bytes
        those the model sees: the text's own when it is NFC (or there is no normaliser), else at least its
        bytes / :data:`NFC_MAX_SHRINK`.
        """
        longest = self.max_token_bytes
        if longest is None:
            return [0] * len(ends)
        shrink = 1
        if self.tokenizer.normalizer is not None and not text.isascii():
            shrink = 1 if unicodedata.is_normalized("NFC", text) else NFC_MAX_SHRINK
        out, nbytes, prev = [], 0, 0
        for end in ends:
            nbytes += utf8_length(text, prev, end)
            prev = end
            out.append(-(-(nbytes // shrink) // longest))
        return out

    @cached_property
    def _added_splits(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(added tokens the tokenizer cuts the raw text at before anything else: not normalised, not
        stripping, not single-word, special ones only while special tokens are split; every added token)."""
        tk = self.tokenizer
        split_special = not getattr(tk, "encode_special_tokens", False)
        anchors, every = [], []
        for t in tk.get_added_tokens_decoder().values():
            if not t.content:
                continue
            every.append(t.content)
            if not (t.normalized or t.lstrip or t.rstrip or t.single_word) and (split_special or not t.special):
                anchors.append(t.content)
        return tuple(anchors), tuple(every)

    def splits_before(self, text: str, pos: int) -> bool:
        """True when the tokens of ``text[:pos]`` are exactly the first tokens of ``text``: ``pos`` is the end
        of the text, or an added token the tokenizer extracts first starts there and none runs across it (the
        pieces between added tokens are normalised, pre-tokenised and merged independently)."""
        if pos >= len(text):
            return True
        anchors, every = self._added_splits
        if pos <= 0 or not any(text.startswith(a, pos) for a in anchors):
            return False
        for c in every:  # an added token that starts before pos and ends after it would be matched instead
            if len(c) > 1 and text.find(c, max(0, pos - len(c) + 1), pos + len(c) - 1) != -1:
                return False
        return True

    def single_id(self, text: str) -> int:
        """The id of ``text``, which must tokenize as one token (a special token such as ``<|im_end|>``)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if len(ids) != 1:
            raise DataError(
                f"{self.folder}: {text!r} is not a single token in this tokenizer (got {len(ids)} ids)",
                reason="tokenizer",
            )
        return ids[0]

    @property
    def pad_id(self) -> int:
        """Token used for padding (``<|endoftext|>`` when present, else ``<|im_end|>``); never trained on."""
        for text in ("<|endoftext|>", "<|im_end|>"):
            tid = self.tokenizer.token_to_id(text)
            if tid is not None:
                return tid
        return 0

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(map(int, ids)), skip_special_tokens=False)


def added_token_warning(tok: ChatTokenizer, model_vocab_size: int | None = None) -> str | None:
    """Why this tokenizer may not tokenise as the model expects, from what can be known here, or None.

    Nothing here knows the model (only its tokenizer folder), so: with ``model_vocab_size`` (the number of
    tokens of the model's own tokenizer, e.g. 151,665 for Qwen2.5), the tokens at or past it, which the model
    never learned; without it, added tokens after Qwen2.5's 22 in a Qwen2-family tokenizer (Qwen3-era files add
    ``<tool_response>``, ``<think>``, ...): strings a Qwen2.5 model reads as several tokens become one new one.
    """
    added = sorted((i, t.content) for i, t in tok.tokenizer.get_added_tokens_decoder().items())
    size = tok.vocab_size
    if model_vocab_size is not None:
        if size <= model_vocab_size:
            return None
        beyond = [f"{i} {c!r}" for i, c in added if i >= model_vocab_size]
        return (
            f"{tok.folder}: the tokenizer has {size} tokens, the model {model_vocab_size} (--model-vocab-size): "
            f"ids from {model_vocab_size} on ({', '.join(beyond[:8]) or 'base vocabulary'}) are tokens the model "
            "never learned; pass the model's own tokenizer (Qwen2.5 with Qwen3-era files: --added-tokens qwen2.5)"
        )
    later = _keep_qwen25([{"id": i, "content": c} for i, c in added])
    if len(later) < len(QWEN25_ADDED_TOKENS):  # not a Qwen2-family tokenizer: nothing to compare with
        return None
    extra = [f"{i} {c!r}" for i, c in added if i >= QWEN25_FIRST_ADDED_ID + len(QWEN25_ADDED_TOKENS)]
    if not extra:
        return None
    return (
        f"{tok.folder}: the tokenizer adds {len(extra)} tokens after Qwen2.5's 22 ({', '.join(extra[:8])}): each is "
        "one token here, where Qwen2.5's own tokenizer spells it in several (e.g. '<tool_response>' as 4), so a "
        "Qwen2.5 model never learned them; for a Qwen2.5 model pass --added-tokens qwen2.5, for a model whose "
        "tokenizer has them (Qwen3) --added-tokens file or --model-vocab-size"
    )


def _first_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message as one short line (library messages can be long or span lines)."""
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _file_error(path: str, e: BaseException) -> DataError:
    """A tokenizer file that cannot be read or parsed, as one line naming the file."""
    if isinstance(e, OSError):
        why = f"cannot read it ({e.strerror or _first_line(e)})"
    elif isinstance(e, UnicodeDecodeError):
        why = (
            f"not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}: {e.reason}); "
            "the file is truncated or corrupt"
        )
    elif isinstance(e, json.JSONDecodeError):
        why = f"not valid JSON ({e.msg}: line {e.lineno} column {e.colno}); the file is truncated or corrupt"
    else:
        why = _first_line(e)
    return DataError(f"{path}: {why}", reason="tokenizer")


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise _file_error(path, e) from None


def _read_json(path: str) -> dict:
    """A JSON object from ``path``; a file that is unreadable, not UTF-8, not JSON or not an object is a
    ``DataError(reason="tokenizer")`` naming it."""
    text = _read_text(path)
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise _file_error(path, e) from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(obj).__name__}", reason="tokenizer")
    return obj


def _chat_template_and_file(folder: str) -> tuple[str | None, str | None]:
    """The folder's chat template and the file it comes from (``(None, None)`` when it has none)."""
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.exists(jinja):
        return _read_text(jinja), jinja
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.exists(cfg_path):
        return None, None
    tpl = _read_json(cfg_path).get("chat_template")
    if isinstance(tpl, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default") or next(iter(named.values()), None)
    if tpl is not None and not isinstance(tpl, str):
        raise DataError(f"{cfg_path}: chat_template must be a string, got {type(tpl).__name__}", reason="tokenizer")
    return (tpl or None), (cfg_path if tpl else None)


SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _special_tokens(folder: str) -> dict[str, str]:
    """The named special tokens ``tokenizer_config.json`` declares (a string, or an ``AddedToken`` object's
    ``content``): the variables ``apply_chat_template`` gives a chat template besides the messages."""
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    cfg = _read_json(cfg_path) if os.path.exists(cfg_path) else {}
    out = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = cfg.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            out[name] = value
    return out


def _keep_qwen25(added: list[dict]) -> list[dict]:
    wanted = {content: QWEN25_FIRST_ADDED_ID + i for i, (content, _) in enumerate(QWEN25_ADDED_TOKENS)}
    return [a for a in added if wanted.get(a["content"]) == a["id"]]


def _added_tokens_field(path: str, spec: dict) -> list[dict]:
    """``tokenizer.json``'s ``added_tokens``, checked: a list of objects with an ``id`` and a ``content``."""
    added = spec.get("added_tokens", [])
    ok = isinstance(added, list) and all(
        isinstance(a, dict) and isinstance(a.get("id"), int) and isinstance(a.get("content"), str) for a in added
    )
    if not ok:
        raise DataError(f"{path}: added_tokens must be a list of {{id, content}} objects", reason="tokenizer")
    return added


def _from_vocab_merges(folder: str, qwen25_only: bool) -> Tokenizer:
    vocab = os.path.join(folder, "vocab.json")
    merges = os.path.join(folder, "merges.txt")
    # The library's errors name neither file: check vocab.json here, so that what fails after is merges.txt.
    table = _read_json(vocab)
    if not all(isinstance(k, str) and type(v) is int for k, v in table.items()):
        raise DataError(f"{vocab}: must map token strings to integer ids", reason="tokenizer")
    _read_text(merges)  # (unreadable / not UTF-8)
    try:
        tok = Tokenizer(models.BPE.from_file(vocab, merges))
    except Exception as e:  # tokenizers raises a plain Exception on a bad merges file
        raise DataError(f"{merges}: cannot load the BPE merges ({_first_line(e)})", reason="tokenizer") from None
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # Added tokens: those the folder's tokenizer_config.json declares, else Qwen2.5's set.
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    declared = _read_json(cfg_path).get("added_tokens_decoder", {}) if os.path.exists(cfg_path) else {}
    if declared:
        try:
            entries = sorted((int(k), v["content"], bool(v.get("special", True))) for k, v in declared.items())
        except (AttributeError, KeyError, TypeError, ValueError):
            raise DataError(
                f"{cfg_path}: added_tokens_decoder must map token ids to {{content, special}} objects",
                reason="tokenizer",
            ) from None
        if qwen25_only:
            keep = {(a["id"], a["content"]) for a in _keep_qwen25([{"id": t, "content": c} for t, c, _ in entries])}
            entries = [e for e in entries if (e[0], e[1]) in keep]
    else:
        entries = [(QWEN25_FIRST_ADDED_ID + i, c, s) for i, (c, s) in enumerate(QWEN25_ADDED_TOKENS)]
    for tid, content, special in entries:
        tok.add_tokens([AddedToken(content, special=special, normalized=False)])
        if tok.token_to_id(content) != tid:
            raise DataError(
                f"{folder}: added token {content!r} would get id {tok.token_to_id(content)}, expected {tid}",
                reason="tokenizer",
            )
    return tok


def load_tokenizer(folder: str, added_tokens: AddedTokens = "file") -> ChatTokenizer:
    """Load a checkpoint folder's tokenizer (``tokenizer.json``, else ``vocab.json`` + ``merges.txt``)."""
    if not os.path.isdir(folder):
        raise DataError(f"tokenizer folder {folder!r} does not exist", reason="tokenizer")
    tj = os.path.join(folder, "tokenizer.json")
    if os.path.exists(tj):
        spec = _read_json(tj)
        added = _added_tokens_field(tj, spec)
        if added_tokens == "qwen2.5":
            spec["added_tokens"] = _keep_qwen25(added)
        try:
            tok = Tokenizer.from_str(json.dumps(spec))
        except Exception as e:  # tokenizers raises a plain Exception on bad specs
            raise DataError(f"{tj}: cannot load tokenizer ({_first_line(e)})", reason="tokenizer") from None
    elif os.path.exists(os.path.join(folder, "vocab.json")) and os.path.exists(os.path.join(folder, "merges.txt")):
        tok = _from_vocab_merges(folder, qwen25_only=added_tokens == "qwen2.5")
    else:
        raise DataError(
            f"tokenizer folder {folder!r} has neither tokenizer.json nor vocab.json + merges.txt",
            reason="tokenizer",
        )
    tok.no_padding()
    tok.no_truncation()
    template, template_file = _chat_template_and_file(folder)
    return ChatTokenizer(tok, template, folder, added_tokens, template_file, _special_tokens(folder))
