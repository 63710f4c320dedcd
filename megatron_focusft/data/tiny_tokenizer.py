"""A tiny byte-level BPE tokenizer (vocabulary <= 1000) in Qwen2.5's shape, trained on the synthetic corpus.

For the quickstart on a machine without the Qwen2 vocabulary: a ~1000-token vocabulary fits the ``tiny``
model preset (``vocab_size=1000``), and the data pipeline treats it like Qwen2.5's:

* the same normaliser (NFC), pre-tokenizer (Qwen2's split pattern + byte level) and decoder;
* Qwen2.5's 22 added tokens (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ``<tool_call>``,
  ``</tool_call>``, ...) in Qwen2.5's order and with its ``special`` flags, as the last ids of the vocabulary
  (as in Qwen2.5, where they are 151643..151664), so the built-in ``qwen2.5`` renderer works and the pad
  token is ``<|endoftext|>``.

Load it with ``load_tokenizer(dir)`` (``added_tokens="file"``, the default): ``added_tokens="qwen2.5"`` keeps
only added tokens at Qwen2.5's ids 151643.., i.e. none of this vocabulary's, and :class:`ChatEncoder` then
refuses it (``<|im_start|>`` is not a single token).

Training is deterministic: a fixed corpus (conversations of :mod:`.synthetic` for a fixed seed, plus every
name, code word and filler phrase); the trainer breaks ties by token id.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from . import synthetic
from .chat import Qwen25Renderer
from .formats import normalize_conversation
from .tokenizer import QWEN2_PATTERN, QWEN25_ADDED_TOKENS

DEFAULT_VOCAB_SIZE = 1000  # the tiny model preset's vocabulary, added tokens included
CORPUS_CONVERSATIONS = 400
CORPUS_SEED = 0


def corpus(num_conversations: int = CORPUS_CONVERSATIONS, seed: int = CORPUS_SEED) -> Iterator[str]:
    """Training text: rendered synthetic conversations (added tokens removed) and the word lists."""
    renderer = Qwen25Renderer()
    spec = synthetic.SyntheticSpec(context_tokens=600)
    for rec in synthetic.generate(num_conversations, seed=seed, spec=spec):
        messages, tools = normalize_conversation(rec)
        text = "".join(s.text for s in renderer.render(messages, tools))
        for content, _ in QWEN25_ADDED_TOKENS:
            text = text.replace(content, "\n")
        yield text
    for k in range(len(synthetic.NAMES)):
        yield (
            synthetic.fact(synthetic.NAMES[k], synthetic.CODE_WORDS[k]) + " " + synthetic.question(synthetic.NAMES[k])
        )
    yield " ".join(synthetic.CODE_WORDS)
    for group in (synthetic._SUBJECTS, synthetic._VERBS, synthetic._OBJECTS, synthetic._PLACES):
        yield " ".join(group)


def _empty_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tiny_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """Byte-level BPE on ``texts`` (default: :func:`corpus`); ``vocab_size`` counts the 22 added tokens."""
    n_added = len(QWEN25_ADDED_TOKENS)
    if vocab_size < 256 + n_added:
        raise ValueError(f"vocab_size must be at least {256 + n_added} (256 bytes + {n_added} added tokens)")
    texts = list(corpus() if texts is None else texts)
    tok = _empty_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_added,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    # Deterministic: the trainer sorts its alphabet and breaks ties between equally frequent pairs by id.
    tok.train_from_iterator(texts, trainer=trainer)
    # The added tokens also enter the BPE model's vocabulary (no merge reaches them), under the same ids:
    # loaded with added_tokens="qwen2.5" (which drops added tokens not at Qwen2.5's ids), "<|im_start|>" then
    # still has an id but is no single token, and ChatEncoder refuses the tokenizer instead of silently
    # rendering the ChatML markers as plain text.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for content, _ in QWEN25_ADDED_TOKENS:
        vocab[content] = len(vocab)
    tok = Tokenizer.from_str(json.dumps(spec))
    for content, special in QWEN25_ADDED_TOKENS:
        tok.add_tokens([AddedToken(content, special=special, normalized=False)])
        assert tok.token_to_id(content) == vocab[content]
    return tok


def tokenizer_config(tok: Tokenizer) -> dict:
    """A Hugging Face ``tokenizer_config.json`` for ``tok`` (fast tokenizer, ChatML special tokens)."""
    added = {}
    for content, special in QWEN25_ADDED_TOKENS:
        added[str(tok.token_to_id(content))] = {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


def write_tiny_tokenizer(out_dir: str, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """Train the tiny tokenizer and write ``tokenizer.json`` + ``tokenizer_config.json`` into ``out_dir``."""
    tok = train_tiny_tokenizer(vocab_size=vocab_size)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(tok), f, indent=2, ensure_ascii=False)
        f.write("\n")
    return tok
