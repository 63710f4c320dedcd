"""The model card (``README.md``) and ``training_args.json`` of an exported Hugging Face folder, so that it can
be published as it is: written by training's ``--export-hf`` and by ``tools/convert_megatron_to_hf.py``.

The card states only what the run recorded, each with where it comes from, and says "not recorded" for the
rest; it never estimates:

- base model: the ``origin`` the converter wrote into the pretrained checkpoint (``focusft_checkpoint.json``),
  which every checkpoint trained from it carries on;
- data: the ``PREFIX.json`` of ``--data-path`` as the run read it at its start (``run_config.json``'s
  ``data``: documents, tokens, packs; the response fraction and what was skipped where
  ``tools/preprocess_data.py`` wrote its statistics);
- settings (FocuSFT's K, inner lr and clip, LoRA rank and alpha, layer fraction, mask; the optimisation, the
  batch, the layout): ``run_config.json`` of the run (its latest launch), also written as ``training_args.json``;
- steps, final train and validation losses: the exported iteration and ``metrics.jsonl``;
- evaluation: ``RUN/eval.json`` (``tools/evaluate.py --json``) where there is one, with the model it names.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from megatron_focusft.config import FocuSFTConfig
from megatron_focusft.convert.layout import hf_shape, megatron_sources
from megatron_focusft.convert.megatron_io import CheckpointMeta
from megatron_focusft.models.qwen2 import Qwen2Arch
from megatron_focusft.run_record import METRICS_FILE, latest_by_iteration, read_metrics, read_run_config, to_json

CARD_FILE = "README.md"
ARGS_FILE = "training_args.json"
EVAL_FILE = "eval.json"  # tools/evaluate.py --json, in the run folder (as tools/collect_runs.py reads it)
_ITER_DIR = re.compile(r"iter_\d+")


@dataclass(frozen=True)
class RunFacts:
    """What a card is made of.  ``record``: the run's ``run_config.json`` (None: no training run recorded);
    ``train``/``valid``: the ``metrics.jsonl`` records of the exported iteration's step and of the last
    validation up to it; ``evaluation``: (path, document) of the run's ``eval.json``; ``tokenizer``: whether
    the export carries a tokenizer (``tokenizer.json``)."""

    arch: Qwen2Arch
    dtype: torch.dtype
    iteration: int
    origin: dict | None
    tokenizer: bool
    record: dict | None = None
    train: dict | None = None
    valid: dict | None = None
    evaluation: tuple[Path, dict] | None = None


def facts_from_records(
    arch: Qwen2Arch,
    dtype: torch.dtype,
    iteration: int,
    origin: dict | None,
    tokenizer_dir: Path | None,
    record: dict | None,
    metrics: list[dict],
    run_folder: Path | None,
) -> RunFacts:
    """The facts of iteration ``iteration`` of a run from its records (``metrics``: its ``metrics.jsonl``);
    ``tokenizer_dir``: the tokenizer files the export copies; ``run_folder``: where an ``eval.json`` would be."""
    train = latest_by_iteration(metrics, "train", up_to=iteration)
    evaluation = None
    if run_folder is not None and (Path(run_folder) / EVAL_FILE).is_file():
        path = Path(run_folder) / EVAL_FILE
        try:
            evaluation = (path, json.loads(path.read_text()))
        except (OSError, ValueError):
            evaluation = None  # unreadable: the card says there is no evaluation it could read
    return RunFacts(
        arch=arch,
        dtype=dtype,
        iteration=iteration,
        origin=origin,
        tokenizer=tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer.json").is_file(),
        record=record,
        train=train if train is not None and train["iteration"] == iteration else None,
        valid=latest_by_iteration(metrics, "valid", up_to=iteration),
        evaluation=evaluation,
    )


def facts_of_checkpoint(ckpt_dir: Path, dtype: torch.dtype | None = None) -> RunFacts:
    """The facts of a checkpoint folder: its metadata, and where it is ``iter_N`` of a training ``--save``
    folder, that folder's records (``dtype``: the export's, default the checkpoint's)."""
    ckpt_dir = Path(ckpt_dir)
    meta = CheckpointMeta.read(ckpt_dir)
    run = ckpt_dir.parent if _ITER_DIR.fullmatch(ckpt_dir.name) else None
    record = read_run_config(run) if run is not None else None
    metrics = read_metrics(run / METRICS_FILE) if record is not None and (run / METRICS_FILE).is_file() else []
    return facts_from_records(
        meta.arch,
        dtype or meta.dtype,
        meta.iteration,
        meta.origin,
        ckpt_dir / "tokenizer",
        record,
        metrics,
        run if record else None,
    )


def card_files(facts: RunFacts, name: str) -> dict[str, str]:
    """``{file name: text}`` for the exported folder ``name``: the card, and the run's settings where the
    run recorded them."""
    files = {CARD_FILE: model_card(facts, name)}
    if facts.record is not None:
        files[ARGS_FILE] = to_json(facts.record, indent=2) + "\n"
    return files


def model_card(facts: RunFacts, name: str) -> str:
    """The ``README.md`` text (Hugging Face's front matter, then Markdown)."""
    record = facts.record
    focusft = None if record is None else FocuSFTConfig(**_focusft_fields(record["config"]["focusft"]))
    method = "FocuSFT" if focusft is not None and focusft.uses_fast_weights else "standard SFT"
    tags = ["megatron-focusft", "qwen2", "focusft" if method == "FocuSFT" else "sft"]
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:"]
    lines += [f"- {t}" for t in tags] + ["---", "", f"# {name}", ""]
    arch = facts.arch
    trained = "" if record is None else f", fine-tuned with {method} by megatron_focusft (Megatron-Core)"
    lines += [
        f"A Qwen2-architecture causal language model{trained}: {_count(_parameters(arch))} parameters "
        f"({arch.num_layers} layers, hidden size {arch.hidden_size}, {arch.num_attention_heads} attention heads with "
        f"{arch.num_key_value_heads} key/value heads, FFN {arch.ffn_hidden_size}, vocabulary {arch.vocab_size}"
        f"{', tied embeddings' if arch.tie_word_embeddings else ''}), weights in "
        f"{str(facts.dtype).removeprefix('torch.')}, exported from iteration {facts.iteration} of a megatron_focusft "
        "checkpoint.",
        "",
        "This card states what the training run recorded and nothing else; what it did not record is marked as such.",
        "",
        "## Base model",
        "",
        _base_model(facts),
        "",
    ]
    if record is None:
        lines += ["## Training", "", "Not recorded: no training run's `run_config.json` is beside this checkpoint.", ""]
    else:
        lines += _data_section(record) + _training_section(record, facts, focusft, method)
        lines += _results_section(record, facts)
    lines += _evaluation_section(facts)
    lines += [
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")' if facts.tokenizer else "# no tokenizer in this folder",
        "```",
        "",
    ]
    if record is not None:
        lines += [f"`{ARGS_FILE}` holds every setting of the run as it recorded it (`run_config.json`).", ""]
    return "\n".join(lines)


def _focusft_fields(values: dict) -> dict:
    """A recorded ``focusft`` group as :class:`FocuSFTConfig` arguments (JSON made the tuple a list; a setting
    this version does not know is left out, one it has and the record lacks takes its default)."""
    known = {f.name for f in fields(FocuSFTConfig)}
    return {k: tuple(v) if k == "targets" else v for k, v in values.items() if k in known}


def _parameters(arch: Qwen2Arch) -> int:
    """The parameters of the exported tensors (the vocabulary unpadded)."""
    return sum(math.prod(hf_shape(n, arch)) for _, sources in megatron_sources(arch) for n in sources)


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit} ({n:,})"
    return f"{n:,}"


def _base_model(facts: RunFacts) -> str:
    origin = facts.origin
    pretrained = None if facts.record is None else facts.record["config"]["model"]["pretrained_checkpoint"]
    into = (
        f"the megatron_focusft checkpoint `{pretrained}` this run started from"
        if pretrained
        else "a megatron_focusft checkpoint"
    )
    if origin is None:
        started = f" (this run started from `{pretrained}`)" if pretrained else ""
        return f"Not recorded: the checkpoint's `focusft_checkpoint.json` names no origin{started}."
    if set(origin) == {"hf_dir"}:
        return f"The Hugging Face folder `{origin['hf_dir']}`, converted into {into}."
    return "Recorded as " + ", ".join(f"{k} `{v}`" for k, v in origin.items()) + f", converted into {into}."


def _data_section(record: dict) -> list[str]:
    data, path = record.get("data") or {}, record["config"]["data"]["data_path"]
    prefix = path if isinstance(path, str) else " ".join(str(p) for p in path)  # one PREFIX, or a blend's words
    lines = ["## Training data", ""]
    if not data:
        return [*lines, f"`{prefix}`: its statistics are not recorded.", ""]
    if "blend" in data:  # Megatron-LM's weighted blend: each part's own PREFIX.json
        lines.append(f"A blend, `--data-path {prefix}`:")
        lines.append("")
        rows = [
            (f"part {i}: tokens ({part.get('num_packs', '?')} packs)", _int(part.get("num_tokens")))
            for i, part in enumerate(data["blend"])
        ]
        return [*lines, *_table(rows)]
    stats = data.get("stats") or {}
    rows = [
        ("documents (conversations)", _int(data.get("num_documents"))),
        ("tokens", _int(data.get("num_tokens"))),
        (
            "response tokens (trained on)",
            f"{stats['response_tokens']:,} ({100 * stats['response_fraction']:.1f}%)"
            if "response_tokens" in stats and "response_fraction" in stats
            else None,
        ),
        ("packs", _int(data.get("num_packs"))),
        ("pack length (tokens)", _int(data.get("pack_length"))),
        ("packing efficiency", f"{100 * stats['packing_efficiency']:.1f}%" if "packing_efficiency" in stats else None),
        ("conversations read", _int(stats.get("conversations_read"))),
        ("skipped when preprocessing", _int(sum(stats["skipped"].values())) if "skipped" in stats else None),
        ("truncated when preprocessing", _int(stats.get("truncated"))),
        ("chat rendering", data.get("renderer")),
        ("loss on assistant turns", data.get("loss_on")),
    ]
    lines += [f"`{prefix}`, as its `{Path(prefix).name}.json` described it when the run started:", ""]
    lines += _table(rows)
    if not stats:
        lines.append("The response fraction and the preprocessing statistics are not recorded in it.")
        lines.append("")
    return lines


def _training_section(record: dict, facts: RunFacts, focusft: FocuSFTConfig, method: str) -> list[str]:
    cfg = record["config"]
    opt, batch, lay = cfg["optimization"], cfg["batch"], record["layout"]
    lines = ["## Training", "", f"Method: **{method}**, with `megatron_focusft` (Megatron-Core).", ""]
    world, device = record["world_size"], cfg["model"]["device"].upper()
    if method == "FocuSFT":
        layers = facts.arch.num_layers
        fast = focusft.fast_layers(layers)
        rows = [
            ("inner steps K", str(focusft.inner_steps)),
            ("inner learning rate", f"{focusft.inner_lr:g}"),
            ("inner gradient clip (per tensor)", f"{focusft.inner_grad_clip:g}"),
            ("fast-weight LoRA rank / alpha", f"{focusft.lora_rank} / {focusft.lora_alpha:g}"),
            (
                "layer fraction (fast layers)",
                f"{focusft.layer_fraction:g} (layers {fast.start}-{fast.stop - 1}, 0-based, of {layers})",
            ),
            ("fast-weight targets", ", ".join(focusft.targets)),
        ]
    else:
        rows = []
    rows += [
        ("attention mask", focusft.attention_mask),
        ("loss reduction", focusft.loss_reduction),
        ("optimizer", opt["optimizer"]),
        ("learning rate (min)", f"{opt['lr']:g} ({opt['min_lr']:g}), {opt['lr_decay_style']}"),
        ("warm-up iterations", str(record["warmup_iters"])),
        ("weight decay", f"{opt['weight_decay']:g}"),
        ("gradient clip", f"{opt['clip_grad']:g}"),
        ("global batch (packs)", str(batch["global_batch_size"])),
        ("micro-batch (packs)", str(batch["micro_batch_size"])),
        *([("epochs", f"{batch['epochs']:g}")] if batch["epochs"] is not None else []),
        ("iterations", f"{facts.iteration} of {record['train_iters']} planned"),
        ("seed", str(batch["seed"])),
        ("precision", "bf16 (fp32 master weights)" if cfg["model"]["bf16"] else "fp32"),
        (
            "layout",
            f"{world} {device} process{'es' if world > 1 else ''}: TP {lay['tensor_model_parallel_size']} x PP "
            f"{lay['pipeline_model_parallel_size']} x CP {lay['context_parallel_size']} x DP "
            f"{lay['data_parallel_size']}" + (", sequence parallel" if lay["sequence_parallel"] else ""),
        ),
    ]
    return [*lines, *_table(rows)]


def _results_section(record: dict, facts: RunFacts) -> list[str]:
    lines = ["## Results", ""]
    train, valid = facts.train, facts.valid
    rows = [
        (
            f"train loss (iteration {facts.iteration})",
            f"{train['loss']:.4f}" if train is not None else None,
        ),
    ]
    if train is not None and "inner_loss_before" in train:
        rows.append(
            (
                "inner-loop loss before adaptation / after (the outer pass)",
                f"{train['inner_loss_before']:.4f} / {train['inner_loss_after']:.4f}",
            )
        )
    valid_path = record["config"]["data"]["valid_data_path"]
    rows.append(
        (
            f"validation loss (iteration {valid['iteration']})" if valid is not None else "validation loss",
            f"{valid['loss']:.4f}" if valid is not None else (None if valid_path else "no validation set"),
        )
    )
    lines += _table(rows)
    per_sample = record["config"]["focusft"]["loss_reduction"] == "sample"
    fast = record["config"]["focusft"]["bilevel"] and record["config"]["focusft"]["inner_steps"] > 0
    lines.append(
        "Response-token cross entropy in nats, "
        + ("each document's mean averaged over the documents" if per_sample else "averaged over the response tokens")
        + ". The train loss is that of the exported step's global batch"
        + (" with the adapted fast weights in place (FocuSFT's outer loss)" if fast else "")
        + "; the validation loss uses the base weights alone (no inner loop)"
        + (f" on `{valid_path}`" if valid_path else "")
        + ". Source: the run's `metrics.jsonl`."
    )
    return [*lines, ""]


def _evaluation_section(facts: RunFacts) -> list[str]:
    lines = ["## Evaluation", ""]
    if facts.evaluation is None:
        return [*lines, "Not recorded: no `eval.json` (`tools/evaluate.py --json`) beside the run.", ""]
    path, doc = facts.evaluation
    accuracy = doc.get("accuracy") or {}
    lengths = sorted({int(n) for by in accuracy.values() for n in by})
    lines += [
        f"`tools/evaluate.py` on `{doc.get('model')}` ({doc.get('samples_per_cell')} samples per task and length, "
        f"seed {doc.get('seed')}, {doc.get('dtype')}); accuracy in %, from `{path.name}`:",
        "",
        "| task | " + " | ".join(f"{n} tokens" for n in lengths) + " |",
        "|---|" + "---:|" * len(lengths),
    ]
    for task, by in accuracy.items():
        lines.append(f"| {task} | " + " | ".join(f"{by[str(n)]:.1f}" if str(n) in by else "-" for n in lengths) + " |")
    return [*lines, ""]


def _int(value: object) -> str | None:
    return None if value is None else f"{int(value):,}"


def _table(rows: list[tuple[str, str | None]]) -> list[str]:
    """A two-column Markdown table; a value the run did not record reads "not recorded"."""
    out = ["| | value |", "|---|---|"]
    out += [f"| {k} | {'not recorded' if v is None else v} |" for k, v in rows]
    return [*out, ""]
