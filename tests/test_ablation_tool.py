"""tools/ablation.py: its budgets and arms, and the table and figure it makes from the tools' own JSON.

(The study itself trains four real models: it runs as a command, not in the suite; BENCHMARKS.md has its output.)
"""

from __future__ import annotations

import pytest

from tools import ablation


def _eval(acc_qa1: float, acc_qa2: float) -> dict:
    return {"accuracy": {"babilong_qa1": {"512": acc_qa1}, "babilong_qa2": {"512": acc_qa2}}, "results": []}


def _attention(sink: list[float], engagement: list[float]) -> dict:
    layers = [{"layer": i, "sink_mass": s, "context_engagement": e} for i, (s, e) in enumerate(zip(sink, engagement))]
    return {"layers": layers, "average": {"sink_mass": sum(sink) / 3, "context_engagement": sum(engagement) / 3}}


def _arm(acc, step_s, sink):
    return {
        "train": {"step_s": step_s, "first_loss": 2.0, "last_loss": 1.0},
        "eval": _eval(*acc),
        "attention": _attention(sink, [0.5, 0.6, 0.7]),
    }


def test_the_cpu_budget_is_the_default_and_fields_override_it():
    args = ablation.parse_args(["--out", "x"])
    assert args.budget == ablation.CPU_BUDGET and args.arm_list == list(ablation.ARMS)
    args = ablation.parse_args(["--out", "x", "--device", "cuda", "--train-iters", "7", "--arms", "sft,focusft"])
    assert args.budget.train_iters == 7 and args.budget.length == ablation.GPU_BUDGET.length
    assert args.arm_list == ["sft", "focusft"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--arms", "sft,dpo"], "--arms: unknown ['dpo']"),
        (["--length", "4096", "--pack-length", "1024"], "--length 4096 exceeds --pack-length 1024"),
        (["--train-iters", "0"], "counts must be >= 1"),
    ],
)
def test_bad_arguments_exit_2_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        ablation.parse_args(["--out", "x", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_every_arm_has_its_training_flags():
    assert ablation.ARMS["sft"] == ("--no-bilevel", "--attention-mask", "causal")
    assert ablation.ARMS["focusft"] == ("--bilevel", "--attention-mask", "glm")
    assert {a[2] for a in ablation.ARMS.values()} == {"causal", "glm"} and set(ablation.ARM_NAMES) == set(ablation.ARMS)


def test_the_table_and_figure_come_from_the_tools_json(tmp_path):
    arms = {"sft": _arm((40.0, 20.0), 2.0, [0.3, 0.2, 0.1]), "focusft": _arm((60.0, 50.0), 5.0, [0.2, 0.1, 0.0])}
    summary = ablation.summarize(_eval(10.0, 30.0), _attention([0.4, 0.3, 0.2], [0.1, 0.2, 0.3]), arms,
                                 ablation.CPU_BUDGET)  # fmt: skip
    focusft = summary["arms"]["focusft"]
    assert summary["base"]["accuracy"] == 20.0 and focusft["accuracy_before"] == 20.0
    assert focusft["accuracy_after"] == 55.0 and focusft["step_time_vs_sft"] == 2.5
    assert focusft["sink_mass_per_layer"] == [0.2, 0.1, 0.0]
    table = ablation.markdown(summary)
    row = "| FocuSFT (bidirectional + bilevel) | 20.0 | 55.0 | +35.0 | 0.100 | 0.600 | 2.50x | 2.000 -> 1.000 |"
    assert row in table
    assert "| Standard SFT | 20.0 | 30.0 | +10.0 |" in table and "| base model (untrained) | 20.0 |" in table
    ablation.plot(summary, tmp_path / "ablation.png")
    from PIL import Image

    assert Image.open(tmp_path / "ablation.png").size == (1870, 528)
