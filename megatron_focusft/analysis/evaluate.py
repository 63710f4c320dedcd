"""Offline long-context evaluation: generate task samples, decode greedily, score, tabulate.

``evaluate(decode, samples, tokenizer)`` is independent of the model: ``decode(prompt_ids, max_new)`` is
:func:`~megatron_focusft.analysis.generate.megatron_greedy` or
:func:`~megatron_focusft.analysis.generate.hf_greedy` bound to a model.  Prompts are one user turn
rendered with the checkpoint's chat template (the built-in Qwen2.5 renderer when it has none) followed by
the assistant header and the task's answer prefix (RULER tasks); held-out conversations
(:mod:`~megatron_focusft.analysis.conversations`) bring their own prompt ids, rendered as in training.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

from tqdm import tqdm

from megatron_focusft.analysis.prompts import check_token_ids, eos_ids, prompt_ids
from megatron_focusft.analysis.tasks import MAX_NEW_TOKENS, max_new_tokens_for, score_sample

__all__ = [
    "MAX_NEW_TOKENS",
    "accuracy_table",
    "answers_listing",
    "evaluate",
    "markdown_table",
    "max_new_tokens_for",
    "results_document",
]


def evaluate(
    decode: Callable[[list[int], int], list[int]],
    samples: list[dict],
    tokenizer,
    max_new_tokens: int | None = None,
    vocab_size: int | None = None,
    progress: bool = True,
    fold_vocab: bool = False,
    source: str = "",
) -> list[dict]:
    """Decode every sample and score it; one result dict per sample (prediction, score, sizes).

    Prompt ids beyond ``vocab_size`` (a tokenizer that is not the model's) are a ValueError naming ``source``,
    unless ``fold_vocab`` (tiny test models) folds them modulo the vocabulary."""
    results = []
    for s in tqdm(samples, desc="evaluate", unit="sample", disable=not progress):
        ids = s.get("prompt_ids") or prompt_ids(tokenizer, s["input"], s.get("answer_prefix", ""))
        if vocab_size is not None:
            ids = check_token_ids(ids, vocab_size, fold=fold_vocab, source=source)
        new = decode(ids, max_new_tokens or s.get("max_new_tokens") or max_new_tokens_for(s["task"]))
        stop = set(eos_ids(tokenizer))
        text = tokenizer.decode([t for t in new if t not in stop])
        results.append(
            {
                "task": s["task"],
                "length": s["length"],
                "index": s["index"],
                "prompt_tokens": len(ids),
                "outputs": s["outputs"],
                "prediction": text,
                "score": score_sample(s, text),
            }
        )
    return results


def accuracy_table(results: list[dict]) -> dict[str, dict[int, float]]:
    """``{task: {length: accuracy in %}}`` (mean of the per-sample scores x 100)."""
    acc: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        acc[r["task"]][r["length"]].append(r["score"])
    return {t: {n: 100.0 * sum(v) / len(v) for n, v in sorted(by.items())} for t, by in acc.items()}


def results_document(model: str, seed: int, samples_per_cell: int, results: list[dict]) -> dict:
    """What ``tools/evaluate.py --json`` writes: the accuracy table (lengths as strings: JSON keys) and every
    sample's result.  Defined here, once, because ``tools/collect_runs.py`` reads it back."""
    table = accuracy_table(results)
    return {
        "model": model,
        "seed": seed,
        "samples_per_cell": samples_per_cell,
        "dtype": results[0]["dtype"] if results else None,
        "accuracy": {t: {str(n): a for n, a in by.items()} for t, by in table.items()},
        "results": results,
    }


def answers_listing(results: list[dict], per_task: int) -> str:
    """The first ``per_task`` answers of each task next to their reference, marked right or wrong."""
    lines, shown = [], defaultdict(int)
    for r in results:
        if shown[r["task"]] >= per_task:
            continue
        shown[r["task"]] += 1
        mark = "right" if r["score"] == 1.0 else "wrong" if r["score"] == 0.0 else f"{r['score']:.2f}"
        expected = "; ".join(r["outputs"])
        lines.append(f"{r['task']} #{r['index']}: expected {expected!r}, model {r['prediction']!r} ({mark})")
    return "\n".join(lines) + "\n" if lines else ""


def _length_name(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def markdown_table(table: dict[str, dict[int, float]]) -> str:
    lengths = sorted({n for by in table.values() for n in by})
    lines = [
        "| task | " + " | ".join(_length_name(n) for n in lengths) + " | avg |",
        "|---|" + "---:|" * (len(lengths) + 1),
    ]
    for task, by in table.items():
        cells = [f"{by[n]:.1f}" if n in by else "-" for n in lengths]
        avg = sum(by.values()) / len(by)
        lines.append(f"| {task} | " + " | ".join(cells) + f" | {avg:.1f} |")
    return "\n".join(lines) + "\n"
