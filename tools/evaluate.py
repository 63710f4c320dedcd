#!/usr/bin/env python3
"""Offline long-context evaluation: BABILong-style qa1-qa5 and RULER-style NIAH multi-value, CWE and VT,
generated from a seed at the requested lengths, answered by greedy decoding, scored by the published rules.

    python tools/evaluate.py --ckpt ckpt/focusft --tasks babilong_qa1,ruler_cwe --lengths 4k,8k,16k,32k \\
        --samples 20 --json eval.json --markdown eval.md
    python tools/evaluate.py --hf-dir exported/ --tasks all --lengths 4k
    python tools/evaluate.py --hf-dir exported/ --data heldout.jsonl --show 10   # your own held-out chats

Megatron decoding uses a KV cache (Megatron's static inference context) with chunked prefill, on any
``--tp`` size; ``--hf-dir`` decodes with the exported Hugging Face model instead (greedy whatever its
generation_config.json says), in the checkpoint's dtype unless ``--dtype``.  A prompt of length N is, as
in RULER, the chat prompt (with RULER's answer prefix) plus the generation budget in at most N positions.
``--data`` evaluates held-out conversations instead of (or besides) the generated tasks: each one's last
assistant turn is the reference, its prompt everything before it, rendered as preprocessing renders the
training data (pass the same ``--renderer``), scored by exact match (up to case, white space and a final full
stop).  Token ids beyond the model's vocabulary (a foreign tokenizer) are an error.  Exit status: 0 on success,
2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from megatron_focusft import flags, runtime
from megatron_focusft.analysis.cli import add_launch_args
from megatron_focusft.data.chat import add_renderer_flag


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="megatron_focusft checkpoint (or a training --save folder)")
    src.add_argument("--hf-dir", help="a Hugging Face folder (e.g. tools/convert_megatron_to_hf.py output)")
    p.add_argument(
        "--tasks",
        default=None,
        help="comma list (babilong_qa1..qa5, ruler_niah_mv, ruler_cwe, ruler_vt), 'babilong', 'ruler' or 'all' "
        "(default: all, or none with --data)",
    )
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="FILE",
        help="held-out conversations (any format preprocess_data.py reads): the model answers each last "
        "assistant turn, scored by exact match; repeatable; --samples takes the first N (all by default)",
    )
    add_renderer_flag(p, "how --data is rendered: the same choice as preprocess_data.py's for the training data")
    p.add_argument(
        "--show", type=int, default=0, metavar="N", help="print the first N answers of each task next to the reference"
    )
    p.add_argument("--lengths", default="4k", help="comma list of prompt lengths in tokens, e.g. 4k,8k,16k")
    p.add_argument("--samples", type=int, default=None, help="samples per task and length (default 10; --data: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--haystack",
        default=None,
        metavar="FILE",
        help="text file for the haystack (default: generated filler)",
    )
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: per task (16 .. 128)")
    p.add_argument("--prefill-chunk", type=int, default=4096, help="prompt tokens per prefill pass")
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="weights' dtype for decoding (default auto: the checkpoint's own)",
    )
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="default: CKPT/tokenizer or HF_DIR")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="accuracy table + predictions")
    p.add_argument("--markdown", type=Path, default=None, metavar="OUT", help="accuracy table (Markdown)")
    add_launch_args(p, tp_help="tensor-parallel processes (Megatron, CPU)")
    args = p.parse_args(argv)
    validate_args(args, p.prog)
    return args


def _fail(prog: str, message: str):
    """A one-line usage error naming the flag; exit status 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def validate_args(args, prog: str = "evaluate.py") -> None:
    from megatron_focusft.analysis.tasks import parse_length

    if args.tasks is None:
        args.tasks = "" if args.data else "all"
    try:
        args.task_names = task_list(args.tasks)
    except ValueError as e:
        _fail(prog, f"--tasks: {e}")
    if not args.task_names and not args.data:
        _fail(prog, f"--tasks: no task in {args.tasks!r}")
    for path in args.data:
        if not Path(path).exists():
            _fail(prog, f"--data: {path} does not exist")
    try:
        args.length_values = [parse_length(x) for x in args.lengths.split(",") if x.strip()]
    except ValueError as e:
        _fail(prog, f"--lengths: {e}")
    if not args.length_values:
        _fail(prog, f"--lengths: no length in {args.lengths!r}")
    if any(n < 1 for n in args.length_values):
        _fail(prog, f"--lengths: lengths must be positive, got {args.lengths!r}")
    for flag, value in [
        ("--samples", args.samples),
        ("--show", args.show + 1),
        ("--max-new-tokens", args.max_new_tokens),
        ("--prefill-chunk", args.prefill_chunk),
        ("--tp", args.tensor_model_parallel_size),
    ]:
        if value is not None and value < 1:
            _fail(prog, f"{flag} must be at least 1, got {value}")


def task_list(spec: str) -> list[str]:
    from megatron_focusft.analysis.tasks import TASKS, check_task

    out: list[str] = []
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        if name in ("all", "babilong", "ruler"):
            out += [t for t in TASKS if name == "all" or t.startswith(name + "_")]
            continue
        full = next((t for t in (name, f"ruler_{name}", f"babilong_{name}") if t in TASKS), None)
        if full is None:
            raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}, babilong, ruler, all")
        check_task(full)
        out.append(full)
    return list(dict.fromkeys(out))


def _tokenizer_dir(args) -> str:
    if args.tokenizer:
        return args.tokenizer
    if args.hf_dir:
        return args.hf_dir
    from megatron_focusft.convert.megatron_io import resolve_checkpoint

    return str(resolve_checkpoint(args.ckpt) / "tokenizer")


def run(args) -> list[dict]:
    """Every rank: generate the samples, decode, score (rank 0 shows the progress bar)."""
    import torch
    import torch.distributed as dist

    from megatron_focusft.analysis import evaluate as ev
    from megatron_focusft.analysis.conversations import conversation_samples
    from megatron_focusft.analysis.prompts import eos_ids
    from megatron_focusft.analysis.tasks import generate, parse_length
    from megatron_focusft.data import load_tokenizer

    tok_dir = _tokenizer_dir(args)
    tokenizer = load_tokenizer(tok_dir)
    lengths = [parse_length(x) for x in args.lengths.split(",") if x.strip()]
    if not lengths:
        raise ValueError("--lengths: no length given")
    samples = generate(
        task_list(args.tasks), lengths, args.samples or 10, tokenizer, args.seed, args.haystack, args.max_new_tokens
    )
    for path in args.data:
        samples += conversation_samples(path, tokenizer, args.renderer, args.samples)
    eos = eos_ids(tokenizer)
    if args.hf_dir:
        from transformers import AutoModelForCausalLM

        from megatron_focusft.analysis.generate import hf_greedy

        dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
        model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=dtype).eval()
        if args.device == "cuda":
            model = model.cuda()
        vocab = model.config.vocab_size

        def decode(ids, n):
            return hf_greedy(model, ids, n, eos)
    else:
        from megatron_focusft.analysis.generate import load_generation_model, megatron_greedy

        dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
        model, arch = load_generation_model(args.ckpt, dtype, checksums=not args.no_verify_checksums)
        if args.device == "cuda":
            model = model.cuda()
        vocab = arch.vocab_size

        def decode(ids, n):
            return megatron_greedy(
                model, ids, n, vocab, eos, prefill_chunk=args.prefill_chunk, max_positions=arch.max_position_embeddings
            )

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    dtype_used = str(next(model.parameters()).dtype).removeprefix("torch.")
    results = ev.evaluate(
        decode,
        samples,
        tokenizer,
        args.max_new_tokens,
        vocab,
        progress=rank0 and not args.no_progress,
        fold_vocab=args.fold_oversized_ids,
        source=f"tokenizer {tok_dir}, checkpoint {args.ckpt or args.hf_dir}",
    )
    for r in results:
        r["dtype"] = dtype_used
    return results


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:  # usage errors (and --help): the exit status
        return e.code if isinstance(e.code, int) else 2
    from megatron_focusft.analysis import evaluate as ev
    from megatron_focusft.data import DataError
    from megatron_focusft.models.qwen2 import ConfigError

    try:
        task_list(args.tasks)
        if args.hf_dir:  # transformers decodes in this process: no process group to start
            results = run(args)
        elif args.device == "cpu":
            nproc = args.tensor_model_parallel_size
            results = runtime.launch_cpu_processes(run, nproc, runtime.ParallelLayout(nproc), (args,))
        else:
            runtime.initialize("cuda", flags.parallel_layout(args))
            results = run(args)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return 0
    table = ev.accuracy_table(results)
    md = ev.markdown_table(table)
    print(md, end="")
    if args.show:
        print(ev.answers_listing(results, args.show), end="")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(md)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        per_cell = max(Counter((r["task"], r["length"]) for r in results).values())
        doc = ev.results_document(args.ckpt or args.hf_dir, args.seed, per_cell, results)
        args.json.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
