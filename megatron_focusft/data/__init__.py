"""Chat trajectories -> tokens, loss masks, context/response blocks -> packed long sequences on disk.

``data/`` knows no model, attention backend or training loop: it yields token arrays and masks only.
"""

from .chat import (
    ChatEncoder,
    Document,
    Qwen25Renderer,
    TemplateRenderer,
    blocks_from_loss_mask,
    normalize_conversation,
)
from .errors import DataError
from .reading import FieldNames, iter_records, parse_record
from .tokenizer import ChatTokenizer, load_tokenizer

__all__ = [
    "ChatEncoder",
    "ChatTokenizer",
    "DataError",
    "Document",
    "FieldNames",
    "Qwen25Renderer",
    "TemplateRenderer",
    "blocks_from_loss_mask",
    "iter_records",
    "load_tokenizer",
    "normalize_conversation",
    "parse_record",
]
