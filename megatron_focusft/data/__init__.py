"""Chat trajectories -> tokens, loss masks, context/response blocks -> packed long sequences on disk.

``data/`` knows no model, attention backend or training loop: it yields token arrays and masks only.
"""

from .chat import (
    ChatEncoder,
    Document,
    Qwen25Renderer,
    TemplateRenderer,
)
from .dataset import PackedDataset, PackLoader, write_documents, write_packs
from .errors import DataError
from .formats import FieldNames, detect_format, normalize_conversation
from .packing import best_fit_decreasing, pad_multiple
from .reading import iter_records, parse_record
from .tokenizer import ChatTokenizer, load_tokenizer

__all__ = [
    "PackLoader",
    "PackedDataset",
    "PackedInput",
    "best_fit_decreasing",
    "pad_multiple",
    "write_documents",
    "write_packs",
    "ChatEncoder",
    "ChatTokenizer",
    "DataError",
    "Document",
    "FieldNames",
    "Qwen25Renderer",
    "TemplateRenderer",
    "detect_format",
    "iter_records",
    "load_tokenizer",
    "normalize_conversation",
    "parse_record",
]


def __getattr__(name: str):
    """``PackedInput`` on first use: it needs torch, which nothing else here does (preprocessing never loads it)."""
    if name == "PackedInput":
        from .packed_input import PackedInput

        return PackedInput
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
