#!/usr/bin/env python3
"""Write a synthetic long-context, multi-turn retrieval data set (JSONL, OpenAI ``messages`` form).

    python tools/make_synthetic_data.py --out data/synthetic.jsonl --num-conversations 2000 \\
        --context-tokens 3500 --seed 0 --write-tokenizer data/tiny-tokenizer
    python tools/preprocess_data.py --input data/synthetic.jsonl --tokenizer data/tiny-tokenizer \\
        --out data/synthetic --pack-length 4096

Each conversation hides facts "The secret code of <name> is <word>." in a haystack of filler sentences,
has a ``lookup`` tool call and its results, and ends with "What is the secret code of <name>?" answered by
the code word (see ``megatron_focusft/data/synthetic.py``).  The output depends on the arguments only.

``--write-tokenizer DIR`` also writes a tiny byte-level BPE tokenizer (``tokenizer.json`` +
``tokenizer_config.json``, <= 1000 tokens, Qwen2.5's added tokens) for machines without the Qwen2
vocabulary; it is the same whatever the other arguments.  Load it with the default ``--added-tokens file``.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_focusft.data import synthetic


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--out", required=True, help="output JSONL file")
    p.add_argument("--num-conversations", type=int, default=1000, help="conversations (default 1000)")
    p.add_argument(
        "--context-tokens",
        type=int,
        default=2000,
        help="approximate tokens per conversation (Qwen2-style; default 2000)",
    )
    p.add_argument("--num-facts", type=int, default=6, help="facts hidden in each haystack (default 6)")
    p.add_argument("--max-lookups", type=int, default=2, help="most lookup tool calls a conversation (2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-tokenizer", metavar="DIR", default=None, help="also write the tiny tokenizer here")
    p.add_argument("--tokenizer-vocab-size", type=int, default=1000, help="its vocabulary size (default 1000)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        spec = synthetic.SyntheticSpec(args.context_tokens, args.num_facts, args.max_lookups)
        if args.num_conversations < 1:
            raise ValueError(f"--num-conversations must be positive, got {args.num_conversations}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    tmp = args.out + ".tmp"
    n = synthetic.write_jsonl(tmp, synthetic.generate(args.num_conversations, args.seed, spec))
    os.replace(tmp, args.out)
    print(f"wrote {n} conversations (~{args.context_tokens} tokens each, seed {args.seed}) to {args.out}")
    if args.write_tokenizer:
        from megatron_focusft.data.tiny_tokenizer import write_tiny_tokenizer

        try:
            tok = write_tiny_tokenizer(args.write_tokenizer, vocab_size=args.tokenizer_vocab_size)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"wrote a {tok.get_vocab_size()}-token tokenizer to {args.write_tokenizer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
