"""Answer checking by the published rules of RULER and BABILong.

- RULER ``string_match_all`` (NIAH multi-value, CWE, VT): the share of reference values that occur in the
  prediction, case-insensitively (``sum(r.lower() in pred.lower()) / len(refs)``); a task's score is the
  mean over samples, x100.
- BABILong ``compare_answers``: the prediction (lower-cased, its first line) must contain the target label,
  and no *other* label of the task (labels also named in the question do not count): listing every
  location is not an answer.
"""

from __future__ import annotations

import re


def string_match_all(prediction: str, references: list[str]) -> float:
    """RULER: fraction of the references present in the prediction (case-insensitive substring)."""
    if not references:
        raise ValueError("no reference answers")
    pred = prediction.lower()
    return sum(1.0 for r in references if r.lower() in pred) / len(references)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def babilong_match(prediction: str, target: str, labels: list[str] | tuple[str, ...], question: str = "") -> float:
    """BABILong: 1.0 when the first line of the prediction names ``target`` and no other task label."""
    first = prediction.strip().split("\n", 1)[0] if prediction.strip() else ""
    said = _words(first)
    target = target.lower()
    in_question = _words(question)
    others = {lab.lower() for lab in labels} - {target} - in_question
    return 1.0 if target in said and not (others & said) else 0.0


def score_sample(sample: dict, prediction: str) -> float:
    """Score of one generated sample (a dict from :mod:`megatron_focusft.analysis.tasks`)."""
    if sample["metric"] == "babilong":
        return babilong_match(prediction, sample["outputs"][0], sample["labels"], sample.get("question", ""))
    return string_match_all(prediction, sample["outputs"])
