#!/usr/bin/env python3
"""Data-preprocessing throughput and packing efficiency on synthetic agentic conversations.

    TOKENIZERS_PARALLELISM=false python tools/benchmark_data.py --tokenizer ../shared/qwen2-tokenizer \\
        --added-tokens qwen2.5 --conversations 300 --pack-length 32768

Conversation lengths are log-normal around ``--median-tokens`` (default 6K); each is a system prompt with a
tool schema, a user request, and rounds of assistant text + tool calls + tool results (English words drawn
from a word list, numbers, JSON, some non-ASCII).  Measures one worker (this process, one thread): JSON
parsing + rendering + tokenisation + loss masks, then best-fit-decreasing packing of the lengths.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import numpy as np

from megatron_focusft.data.chat import ChatEncoder
from megatron_focusft.data.packing import best_fit_decreasing, packing_efficiency
from megatron_focusft.data.reading import RawRecord, parse_record
from megatron_focusft.data.tokenizer import load_tokenizer

WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there been one all we their has would when if so no what up out more about into "
    "function result value error file data model token context response attention query search document "
    "training sequence length memory layer weight gradient update step batch loss answer question tool call "
    "paper method results table figure section analysis experiment baseline improvement accuracy benchmark"
).split()
EXTRA = ["数据", "模型", "注意力", "ü", "é", "—", "→", "°C", "λ", "π"]
TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the document collection",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
    },
}


def words(rng: random.Random, n_tokens: int) -> str:
    n = max(1, int(n_tokens * 0.8))
    out = rng.choices(WORDS, k=n)
    for i in range(0, n, 23):
        out[i] = str(rng.randint(0, 99999))
    for i in range(7, n, 97):
        out[i] = rng.choice(EXTRA)
    for i in range(11, n, 17):
        out[i] += "."
    return " ".join(out)


def conversation(rng: random.Random, n_tokens: int) -> dict:
    msgs = [{"role": "system", "content": "You are a research assistant. " + words(rng, 60)}]
    msgs.append({"role": "user", "content": words(rng, min(400, n_tokens // 10))})
    budget = n_tokens - 400
    while budget > 0:
        q = " ".join(rng.choices(WORDS, k=5))
        msgs.append(
            {
                "role": "assistant",
                "content": words(rng, 80),
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {"name": "search", "arguments": json.dumps({"query": q})},
                    }
                ],
            }
        )
        result = words(rng, min(budget, rng.randint(300, 2500)))
        msgs.append({"role": "tool", "content": json.dumps({"hits": [result]}, ensure_ascii=False)})
        budget -= len(result) // 5 + 150
    msgs.append({"role": "assistant", "content": words(rng, 200)})
    return {"messages": msgs, "tools": [TOOL]}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--added-tokens", default="file", choices=["file", "qwen2.5"])
    p.add_argument("--conversations", type=int, default=300)
    p.add_argument("--median-tokens", type=int, default=6000)
    p.add_argument("--sigma", type=float, default=0.8)
    p.add_argument("--pack-length", type=int, default=32768)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    rng = random.Random(args.seed)
    nrng = np.random.default_rng(args.seed)
    targets = nrng.lognormal(np.log(args.median_tokens), args.sigma, args.conversations).astype(int)
    lines = [json.dumps(conversation(rng, int(t)), ensure_ascii=False) for t in targets]
    enc = ChatEncoder(load_tokenizer(args.tokenizer, args.added_tokens), renderer="auto", max_length=args.pack_length)
    enc.encode(parse_record(RawRecord("warmup", lines[0])))

    lengths, dropped, tokens = [], 0, 0
    t0 = time.perf_counter()
    for i, line in enumerate(lines):
        rec = RawRecord(f"synthetic:{i + 1}", line)
        try:
            doc = enc.encode(parse_record(rec), rec.location)
        except Exception:
            dropped += 1
            continue
        lengths.append(len(doc))
        tokens += len(doc)
    dt = time.perf_counter() - t0
    t1 = time.perf_counter()
    bins = best_fit_decreasing(lengths, args.pack_length)
    dt_pack = time.perf_counter() - t1
    eff = packing_efficiency(int(sum(lengths)), len(bins), args.pack_length)
    lengths = np.asarray(lengths)
    print(f"conversations {len(lines)} (dropped as longer than {args.pack_length}: {dropped})")
    print(f"document tokens: median {int(np.median(lengths))}, mean {int(lengths.mean())}, max {int(lengths.max())}")
    print(f"tokens {tokens} in {dt:.2f} s: {tokens / dt:,.0f} tokens/s per worker (parse + render + tokenize + mask)")
    print(
        f"packs {len(bins)} x {args.pack_length}: packing efficiency {100 * eff:.2f}% (BFD in {dt_pack * 1e3:.1f} ms)"
    )


if __name__ == "__main__":
    main()
