"""Answer checking by the published rules of RULER and BABILong.

- RULER ``string_match_all`` (NIAH multi-value, CWE, VT): the share of reference values that occur in the
  prediction, case-insensitively (``sum(r.lower() in pred.lower()) / len(refs)``); a task's score is the
  mean over samples, x100.
- BABILong ``compare_answers`` (booydar/babilong ``babilong/metrics.py``): the prediction is cut to its first
  sentence by ``preprocess_output`` (lower-cased, cut at the first ``.``, then at ``<context>`` /
  ``<example>`` / ``Question``); the task labels found in it as *substrings* (labels also named in the
  question do not count) must be exactly the target (or, for a comma-separated target as in qa8, exactly
  its parts): listing every location is not an answer.
- Held-out conversations (``exact``): the prediction equals the reference turn up to case, surrounding white
  space and a final full stop.
"""

from __future__ import annotations


def string_match_all(prediction: str, references: list[str]) -> float:
    """RULER: fraction of the references present in the prediction (case-insensitive substring)."""
    if not references:
        raise ValueError("no reference answers")
    pred = prediction.lower()
    return sum(1.0 for r in references if r.lower() in pred) / len(references)


def babilong_preprocess_output(output: str) -> str:
    """BABILong's ``preprocess_output``: the lower-cased first sentence of the prediction.

    Ported from booydar/babilong ``metrics.py`` (written from memory of the official code, not copied):
    lower-case, keep the text before the first ``.``, then before ``<context>``, ``<example>`` and
    ``Question``.  As in the official code the ``Question`` cut comes after the lower-casing and so never
    fires (a capitalised marker cannot occur in lower-cased text); kept as is so that scores match.
    """
    output = output.lower()
    output = output.split(".")[0]
    output = output.split("<context>")[0]
    output = output.split("<example>")[0]
    output = output.split("Question")[0]  # no-op after lower(), as in the official metrics.py
    return output


def babilong_match(prediction: str, target: str, labels: list[str] | tuple[str, ...], question: str = "") -> float:
    """BABILong ``compare_answers``: 1.0 when the labels named (as substrings) in the prediction's first
    sentence, less those named in the question, are exactly ``target`` (or its comma-separated parts)."""
    output = babilong_preprocess_output(prediction)
    target = target.lower()
    task_labels = {lab.lower() for lab in labels}
    in_question = {lab for lab in task_labels if lab in question.lower()}
    in_output = {lab for lab in task_labels if lab in output} - in_question
    if "," in target and len(target) > 3:  # several sub-targets (qa8 "apple,milk")
        parts = target.split(",")
        return 1.0 if all(t in in_output for t in parts) and len(in_output) == len(parts) else 0.0
    return 1.0 if target in in_output and len(in_output) == 1 else 0.0


def normalize_answer(text: str) -> str:
    return text.strip().rstrip(".").strip().lower()


def exact_match(prediction: str, reference: str) -> float:
    """Held-out conversations: the answer in the data's own form, up to case, surrounding white space and a
    final full stop."""
    return 1.0 if normalize_answer(prediction) == normalize_answer(reference) else 0.0


def score_sample(sample: dict, prediction: str) -> float:
    """Score of one generated sample (a dict from :mod:`megatron_focusft.analysis.tasks`)."""
    if sample["metric"] == "babilong":
        return babilong_match(prediction, sample["outputs"][0], sample["labels"], sample.get("question", ""))
    if sample["metric"] == "exact":  # held-out conversations (megatron_focusft.analysis.conversations)
        return exact_match(prediction, sample["outputs"][0])
    return string_match_all(prediction, sample["outputs"])
