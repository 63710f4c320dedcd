#!/usr/bin/env python3
"""Chat conversations -> packed Megatron indexed dataset.

    python tools/preprocess_data.py --input data.jsonl --tokenizer CKPT_DIR --out data/train \\
        --pack-length 32768 --workers 8 --stats-json stats.json

Inputs: JSONL (plain or gzip), a JSON array (``.json``), Parquet files, folders of Parquet shards, and
``datasets`` ``save_to_disk`` folders.  Record formats (``--format``; by default each input's is detected from
its first records and named in the summary): ``openai`` (``messages`` with ``tool_calls`` / ``tool`` turns,
``tools``), ``sharegpt`` (LLaMA-Factory: ``conversations`` of ``from``/``value``, roles human, gpt, system,
function_call, observation; ``system`` and ``tools`` columns), ``swift`` (ms-swift's agent messages, roles
tool_call / tool_response) and ``alpaca`` (``instruction``, ``input``, ``output``, ``system``, ``history``).
Any of them may carry a top-level ``system`` prompt.  The field flags rename what a format calls its fields.

Writes ``OUT.bin/.idx`` (tokens), ``OUT.loss_mask.*`` and ``OUT.json`` (metadata).  A dataset already at
``OUT`` (any of those files) is refused unless ``--overwrite``.
Exit status: 0 on success; 1 on a data error under ``--on-error fail``, when every record was skipped, or on a
bad tokenizer folder (a missing, truncated or corrupt file of it, named); 2 on bad usage and file-system
problems, each a one-line error naming the path: an input that is missing, unreadable, of an unknown format or
corrupt, or whose record format cannot be told (naming the fields seen); a dataset already at ``OUT`` without
``--overwrite``; an output folder or ``--stats-json`` folder that is missing, not a folder or not writable; a
write that fails (full disk, read-only file system).
Every input, the output prefix and the stats file's folder are checked before anything is read or written.  On
any error nothing is written and an existing dataset at the output prefix is left as it was (the files are
written under a temporary name and renamed at the end).
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_focusft.data.chat import add_renderer_flag
from megatron_focusft.data.errors import DataError
from megatron_focusft.data.formats import FORMATS, FieldNames
from megatron_focusft.data.preprocess import (
    PreprocessConfig,
    check_output,
    format_summary,
    preprocess,
    write_stats_json,
)
from megatron_focusft.data.reading import check_inputs

# DataError reasons that are usage / file-system problems (exit 2, one line) rather than data problems (exit 1)
USAGE_REASONS = ("bad_file", "exists", "write_failed")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="JSONL (.jsonl/.ndjson[.gz]), JSON (.json[.gz]: an array, or lines), Parquet files, folders of "
        "Parquet files, datasets save_to_disk folders",
    )
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="checkpoint folder with the tokenizer")
    p.add_argument("--out", required=True, metavar="PREFIX", help="output prefix")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already at --out (else refused)")
    p.add_argument("--pack-length", type=int, required=True, metavar="L", help="tokens per packed sequence")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="tokenizer processes")
    p.add_argument("--stats-json", metavar="F", help="write the summary numbers to this JSON file")
    p.add_argument("--on-error", choices=["skip", "fail"], default="skip", help="bad records (default skip)")
    p.add_argument(
        "--overlong",
        choices=["drop", "truncate", "error"],
        default="drop",
        help="conversations longer than the pack length: drop them, truncate at a whole turn, or error",
    )
    p.add_argument("--loss-on", choices=["all", "last"], default="all", help="assistant turns to train on")
    add_renderer_flag(p, "auto: the folder's chat_template if any, else the built-in Qwen2.5 ChatML renderer")
    p.add_argument(
        "--added-tokens",
        choices=["file", "qwen2.5"],
        help="qwen2.5: keep only Qwen2.5's 22 added tokens (ids 151643..151664); file: all the folder has "
        "(the default, with a warning when a Qwen2-family tokenizer adds tokens after Qwen2.5's)",
    )
    p.add_argument(
        "--model-vocab-size",
        type=int,
        metavar="N",
        help="tokens of the model's own tokenizer (Qwen2.5: 151665): warn when this tokenizer has more",
    )
    p.add_argument(
        "--format",
        choices=["auto", *FORMATS],
        default="auto",
        help="record format of every input (default auto: each input's own, from its first records)",
    )
    p.add_argument("--messages-field", help="the list of turns (default messages; sharegpt: conversations)")
    p.add_argument("--role-field", help="a turn's role (default role; sharegpt: from)")
    p.add_argument("--content-field", help="a turn's text (default content; sharegpt: value)")
    p.add_argument("--tool-calls-field", default="tool_calls", help="an OpenAI assistant turn's tool calls")
    p.add_argument("--tools-field", default="tools", help="the function schemas (a list or a JSON string)")
    p.add_argument("--system-field", default="system", help="a top-level system prompt")
    p.add_argument("--instruction-field", default="instruction", help="alpaca")
    p.add_argument("--input-field", default="input", help="alpaca")
    p.add_argument("--output-field", default="output", help="alpaca")
    p.add_argument("--history-field", default="history", help="alpaca: [[instruction, response], ...]")
    p.add_argument("--role-map", default="", help="role renames before anything else, e.g. bot=assistant,me=user")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.pack_length < 1 or args.workers < 1 or (args.model_vocab_size or 1) < 1:
        p.error("--pack-length, --workers and --model-vocab-size must be positive")
    if not os.path.basename(args.out):
        p.error(f"--out is a prefix (e.g. data/train), not a folder: {args.out!r}")
    try:
        args.role_map = dict(kv.split("=", 1) for kv in args.role_map.split(",") if kv)
    except ValueError:
        p.error("--role-map expects name=role pairs separated by commas")
    return args


def check_stats_path(path: str) -> None:
    """``--stats-json``'s file must be writable: its folder exists and is writable, and it is not a folder."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise DataError(f"{path}: the folder {folder} does not exist (--stats-json)", "write_failed")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a folder, not a file (--stats-json)", "write_failed")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DataError(f"{path}: the folder {folder} is not writable (--stats-json)", "write_failed")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:  # usage and file-system checks, before any work: nothing is read or written when one fails
        check_inputs(args.input)
        check_output(args.out, args.overwrite)
        if args.stats_json:
            check_stats_path(args.stats_json)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = PreprocessConfig(
        inputs=args.input,
        tokenizer=args.tokenizer,
        out=args.out,
        pack_length=args.pack_length,
        workers=args.workers,
        on_error=args.on_error,
        overlong=args.overlong,
        loss_on=args.loss_on,
        renderer=args.renderer,
        added_tokens=args.added_tokens,
        model_vocab_size=args.model_vocab_size,
        fields=FieldNames(
            messages=args.messages_field,
            role=args.role_field,
            content=args.content_field,
            tool_calls=args.tool_calls_field,
            tools=args.tools_field,
            system=args.system_field,
            instruction=args.instruction_field,
            input=args.input_field,
            output=args.output_field,
            history=args.history_field,
            role_map=args.role_map,
        ),
        record_format=args.format,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    try:
        stats = preprocess(cfg, log=lambda message: print(message, file=sys.stderr))
    except DataError as e:
        if e.reason in USAGE_REASONS:
            print(f"error: {e}; nothing was written", file=sys.stderr)
            return 2
        print(f"error: {e}", file=sys.stderr)
        print("nothing was written", file=sys.stderr)
        return 1
    for msg in stats.errors:
        print(f"skipped: {msg}", file=sys.stderr)
    print(format_summary(stats))
    if args.stats_json:
        try:
            write_stats_json(args.stats_json, stats)
        except DataError as e:
            print(f"error: {e}; the dataset at {args.out} was written", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
