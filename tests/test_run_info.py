"""What a run tells its user, on a real tiny run of tools/train.py (in this process, two launches: stopped at
iteration 2 by --exit-interval, then resumed to 4 with validation and an export): the configuration block at
the start, the resume and save lines with their numbers, timestamps; ``run_config.json`` and
``metrics.jsonl`` hold what the run did; missing logging packages stop the run before anything is built; the
exported folders (training's and the converter's) carry a model card of what the run recorded."""

from __future__ import annotations

import contextlib
import io
import json
import re
import signal
import sys
from pathlib import Path

import pytest

from megatron_focusft.data.preprocess import Stats
from megatron_focusft.run_record import METRICS_FILE, RUN_CONFIG_FILE, read_metrics, to_json
from megatron_focusft.training import loop
from megatron_focusft.training.arguments import parse_args
from megatron_focusft.training.plan import plan
from tests.training_fixtures import tiny_dataset

STAMP = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] ")
ITERS, HALF = 4, 2


def _argv(ckpt: Path, data: str, valid: str, save: Path, *extra: str) -> list[str]:
    return [
        *("--pretrained-checkpoint", str(ckpt), "--data-path", data, "--valid-data-path", valid),
        *("--device", "cpu", "--focusft-lora-rank", "8", "--global-batch-size", "2", "--seed", "3"),
        *("--train-iters", str(ITERS), "--eval-interval", "2", "--save-interval", "2", "--log-interval", "1"),
        *("--save", str(save), "--load", str(save), "--tensorboard-dir", str(save / "tensorboard"), *extra),
    ]


def _launch(argv: list[str]) -> tuple[str, str]:
    """``tools/train.py argv`` in this process: (stdout, stderr); the stop-signal handlers are put back."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            assert loop.main(argv) == 0, err.getvalue()
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    return out.getvalue(), err.getvalue()


# What tools/preprocess_data.py adds to PREFIX.json (its Stats, and how it rendered), made up for these packs.
PREPROCESSED = {
    "renderer": "qwen2.5",
    "loss_on": "all",
    "stats": Stats(
        conversations_read=43,
        conversations_emitted=40,
        skipped={"overlong": 2, "bad_record": 1},
        truncated=0,
        tokens=820,
        response_tokens=301,
        packs=14,
        pack_length=64,
        packing_efficiency=0.9151785714285714,
        response_fraction=301 / 820,
    ).to_dict(),
}


@pytest.fixture(scope="module")
def run(setup_files, tmp_path_factory) -> dict:
    ckpt, _ = setup_files
    root = tmp_path_factory.mktemp("runinfo")
    data = tiny_dataset(root / "train", num_docs=40, meta=PREPROCESSED)
    valid = tiny_dataset(root / "valid", num_docs=8, seed=3)
    save = root / "run"
    first = _argv(ckpt, data, valid, save, "--exit-interval", str(HALF))
    second = _argv(ckpt, data, valid, save, "--export-hf", str(root / "hf"))
    logs = [_launch(first), _launch(second)]
    return {"root": root, "save": save, "argv": [first, second], "logs": logs, "ckpt": ckpt, "data": data}


def test_the_log_starts_with_the_configuration_and_says_resumes_and_saves(run):
    save = run["save"]
    (out1, _), (out2, _) = run["logs"]
    for out in (out1, out2):
        lines = out.splitlines()
        assert all(STAMP.match(line) or line.startswith("  ") for line in lines), out  # indented: a block's body
        assert STAMP.sub("", lines[0]) == f"run configuration (saved as {save / RUN_CONFIG_FILE}):"
        body = [line for line in lines[1:] if line.startswith("  ")]
        assert body[0].startswith("  world size 1 = TP 1 x PP 1 x CP 1 x DP 1 (sequence parallel off); 4 iterations")
        assert "focusft: bilevel=True, inner_steps=2, inner_lr=1.0, inner_grad_clip=1.0, lora_rank=8" in out
    assert "resumed from" not in out1 and "(a fresh start)" in out1
    assert f"resumed from iter_0000002 of {save} (iteration 2 of 4, 4 packs consumed)" in out2
    assert f"weights from {save / 'iter_0000002'} (resuming iteration 2)" in out2
    saved = {}
    for out in (out1, out2):
        for m in re.finditer(r"\] saved (iter_\d{7}) in (\d+\.\d) s \((\d+\.\d) (KiB|MiB)\) under (\S+)\n", out):
            saved[m[1]] = (float(m[2]), float(m[3]) * {"KiB": 2**10, "MiB": 2**20}[m[4]], m[5])
    assert sorted(saved) == ["iter_0000002", "iter_0000004"]
    for name, (seconds, size, under) in saved.items():
        on_disk = sum(f.stat().st_size for f in (save / name).rglob("*") if f.is_file())
        assert under == str(save) and 0 <= seconds < 60
        assert size == pytest.approx(on_disk, rel=0.05)  # printed to 0.1 of its unit
    assert "stopped by --exit-interval at iteration 2; checkpoint saved" in out1
    assert f"exported the model to {run['root'] / 'hf'} in " in out2


def test_run_config_json_keeps_every_launch_and_holds_what_it_ran_with(run):
    save, (first, second) = run["save"], run["argv"]
    records = sorted(save.glob("run_config*.json"))
    assert [p.name for p in records][-1] == RUN_CONFIG_FILE and len(records) == 2
    latest = json.loads((save / RUN_CONFIG_FILE).read_text())
    older = json.loads(records[0].read_text())
    assert records[0].name == f"run_config.{older['started'].replace('-', '').replace(':', '')}.json"
    assert older["started"] <= latest["started"]
    data_meta = json.loads(Path(run["data"] + ".json").read_text())
    for record, argv, resumed in ((older, first, None), (latest, second, 2)):
        assert record["config"] == json.loads(to_json(parse_args(argv).to_dict()))  # every setting, resolved
        assert record["world_size"] == 1 and record["layout"]["data_parallel_size"] == 1
        assert (record["train_iters"], record["warmup_iters"], record["micro_batches_per_step"]) == (4, 0, 2)
        assert record["data"] == data_meta
        assert record["base_model"] == {"hf_dir": str((run["ckpt"].parent / "hf").resolve())}
        if resumed is None:
            assert record["resumed_from"] is None and record["weights_from"] == str(run["ckpt"])
        else:
            assert record["resumed_from"] == {
                "checkpoint": str(save / "iter_0000002"),
                "iteration": 2,
                "consumed_samples": 4,
            }
            assert record["weights_from"] == str(save / "iter_0000002")


def test_the_record_states_the_data_parallel_size_of_the_layout(setup_files):
    """4 processes at TP=2: the record of such a launch (planned, not run) says DP=2."""
    ckpt, data = setup_files
    argv = ["--pretrained-checkpoint", str(ckpt), "--data-path", data, "--device", "cpu", "--train-iters", "1"]
    argv += ["--tensor-model-parallel-size", "2", "--global-batch-size", "4"]
    record = loop.run_record(plan(parse_args(argv), world_size=4), started=0.0)
    assert record["world_size"] == 4 and record["started"] == "1970-01-01T00:00:00Z"
    assert record["layout"] == {
        "tensor_model_parallel_size": 2,
        "pipeline_model_parallel_size": 1,
        "context_parallel_size": 1,
        "data_parallel_size": 2,
        "sequence_parallel": False,
    }
    assert record["micro_batches_per_step"] == 2


def _console(out: str) -> dict[tuple[str, int], dict[str, float]]:
    """(kind, iteration) -> the fields of each ``step i/N | name value | ...`` line."""
    lines = {}
    for line in out.splitlines():
        m = re.match(r"\[[^\]]+\] step (\d+)/\d+ \| (.*)", line)
        if m is None:
            continue
        if m[2].startswith("valid loss "):
            lines["valid", int(m[1])] = {"loss": float(m[2].split()[2])}
            continue
        fields = dict(part.split(" ", 1) for part in m[2].split(" | "))
        lines["train", int(m[1])] = {k: float(v) for k, v in fields.items() if k not in ("eta",)}
    return lines


def test_metrics_jsonl_holds_every_step_as_the_run_logged_it(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    save = run["save"]
    records = read_metrics(save / METRICS_FILE)
    launches = [
        json.loads(p.read_text())["started"] for p in sorted(save.glob("run_config*.json"), key=lambda p: p.name)
    ]
    launches = sorted(launches)
    assert [(r["kind"], r["iteration"], r["launch"]) for r in records] == [
        ("train", 1, launches[0]),
        ("train", 2, launches[0]),
        ("valid", 2, launches[0]),
        ("train", 3, launches[1]),
        ("train", 4, launches[1]),
        ("valid", 4, launches[1]),
    ]
    console = {**_console(run["logs"][0][0]), **_console(run["logs"][1][0])}
    tb = EventAccumulator(str(save / "tensorboard"))
    tb.Reload()
    for r in records:
        logged = console[r["kind"], r["iteration"]]
        tag = "valid/{}" if r["kind"] == "valid" else "train/{}"
        for name, value in logged.items():
            key = "consumed_samples" if name == "consumed" else name
            assert r[key] == pytest.approx(value, rel=1e-3, abs=1e-4), (r["iteration"], name)
            if key != "consumed_samples":
                [event] = [e for e in tb.Scalars(tag.format(key)) if e.step == r["iteration"]]
                assert r[key] == pytest.approx(event.value, rel=1e-6), (r["iteration"], name)
    train = [r for r in records if r["kind"] == "train"]
    assert all(r["step_s"] > 0 and r["skipped"] is False for r in train)
    assert [r["consumed_samples"] for r in train] == [2, 4, 6, 8]
    assert all(a["wall_time"] < b["wall_time"] for a, b in zip(records, records[1:]))
    for r in train:  # the step's speed is its own tokens over its own time
        assert r["global_tokens_per_s"] == pytest.approx(r["tokens"] / r["step_s"])


def test_without_a_terminal_no_progress_bar_is_drawn(run):
    assert all("megatron -> hf" not in err and "step/s" not in err for _, err in run["logs"])


def test_on_a_terminal_the_export_shows_a_progress_bar(setup_files, tmp_path, monkeypatch):
    ckpt, data = setup_files

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    argv = ["--pretrained-checkpoint", str(ckpt), "--data-path", data, "--device", "cpu", "--train-iters", "1"]
    argv += ["--global-batch-size", "2", "--focusft-lora-rank", "8", "--export-hf", str(tmp_path / "hf")]
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    err = io.StringIO()
    try:
        monkeypatch.setattr(sys, "stdout", Terminal())
        with contextlib.redirect_stderr(err):
            assert loop.main(argv) == 0
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    bars = err.getvalue()
    assert re.search(r"megatron -> hf: 100%\|[^|]*\| (\d+)/\1 ", bars), bars  # every tensor, on rank 0
    assert "step/s, loss=" in bars or "s/step, loss=" in bars  # the training bar too


@pytest.mark.parametrize(
    "flag, value, module, package",
    [
        ("--tensorboard-dir", "TMP", "torch.utils.tensorboard", "tensorboard"),
        ("--wandb-project", "p", "wandb", "wandb"),
    ],
)
def test_a_missing_logging_package_is_a_one_line_error_before_anything_is_built(
    setup_files, tmp_path, monkeypatch, capsys, flag, value, module, package
):
    ckpt, data = setup_files
    monkeypatch.setitem(sys.modules, module, None)  # import -> ImportError, as where it is not installed

    def not_reached(*_args):
        raise AssertionError("planned or built although a logging package is missing")

    monkeypatch.setattr(loop, "plan", not_reached)
    monkeypatch.setattr(loop, "setup", not_reached)
    argv = ["--pretrained-checkpoint", str(ckpt), "--data-path", data, "--device", "cpu", "--train-iters", "1"]
    argv += ["--save", str(tmp_path / "save"), flag, str(tmp_path / "tb") if value == "TMP" else value]
    assert loop.main(argv) == 2
    captured = capsys.readouterr()
    want = f"error: {flag} needs the {package} package, which is not installed (pip install {package})\n"
    assert captured.err == want and captured.out == ""
    assert not (tmp_path / "save").exists()


def _card(folder: Path) -> tuple[str, dict[str, str]]:
    """A model card's text and its two-column table rows (``| name | value |``)."""
    text = (folder / "README.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")] if line.startswith("| ") else []
        if len(cells) == 2 and cells[0]:
            rows[cells[0]] = cells[1]
    return text, rows


def test_the_export_carries_a_model_card_of_what_the_run_recorded(run):
    hf, save = run["root"] / "hf", run["save"]
    text, rows = _card(hf)
    assert text.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags:\n")
    assert "- focusft\n---\n\n# hf\n" in text
    base = (run["ckpt"].parent / "hf").resolve()
    assert f"The Hugging Face folder `{base}`, converted into the megatron_focusft checkpoint `{run['ckpt']}`" in text
    assert "162,624) parameters (3 layers, hidden size 64" in text  # the exported tensors
    stats = PREPROCESSED["stats"]
    assert (rows["documents (conversations)"], rows["tokens"], rows["packs"]) == ("40", "820", "14")
    assert rows["response tokens (trained on)"] == f"301 ({100 * stats['response_fraction']:.1f}%)" == "301 (36.7%)"
    assert (rows["skipped when preprocessing"], rows["conversations read"], rows["chat rendering"]) == (
        "3",
        "43",
        "qwen2.5",
    )
    want = {
        "inner steps K": "2",
        "inner learning rate": "1",
        "inner gradient clip (per tensor)": "1",
        "fast-weight LoRA rank / alpha": "8 / 64",
        "layer fraction (fast layers)": "0.35 (layers 1-2, 0-based, of 3)",
        "attention mask": "glm",
        "iterations": "4 of 4 planned",
        "global batch (packs)": "2",
        "seed": "3",
        "layout": "1 CPU process: TP 1 x PP 1 x CP 1 x DP 1",
    }
    assert {k: rows[k] for k in want} == want
    records = read_metrics(save / METRICS_FILE)
    last, valid = records[-2], records[-1]
    assert (last["kind"], last["iteration"], valid["kind"], valid["iteration"]) == ("train", 4, "valid", 4)
    assert rows["train loss (iteration 4)"] == f"{last['loss']:.4f}"
    assert rows["validation loss (iteration 4)"] == f"{valid['loss']:.4f}"
    assert "Not recorded: no `eval.json`" in text and "not recorded |" not in text  # the run recorded the rest
    assert json.loads((hf / "training_args.json").read_text()) == json.loads((save / RUN_CONFIG_FILE).read_text())


def test_the_converter_writes_the_card_of_the_checkpoint_it_exports(run, tmp_path):
    from megatron_focusft.analysis.evaluate import results_document
    from tools import convert_megatron_to_hf

    save = run["save"]
    results = [
        {"task": "babilong_qa1", "length": 1024, "score": 1.0, "dtype": "float32"},
        {"task": "babilong_qa1", "length": 1024, "score": 0.0, "dtype": "float32"},
        {"task": "ruler_vt", "length": 2048, "score": 1.0, "dtype": "float32"},
    ]
    (save / "eval.json").write_text(json.dumps(results_document(str(save), 5, 2, results)))
    out = tmp_path / "iter2-hf"
    argv = ["--ckpt", str(save / "iter_0000002"), "--out", str(out), "--no-progress"]
    assert convert_megatron_to_hf.main(argv) == 0
    text, rows = _card(out)
    records = read_metrics(save / METRICS_FILE)
    train2 = next(r for r in records if (r["kind"], r["iteration"]) == ("train", 2))
    valid2 = next(r for r in records if (r["kind"], r["iteration"]) == ("valid", 2))
    assert rows["iterations"] == "2 of 4 planned" and "exported from iteration 2 of" in text
    assert rows["train loss (iteration 2)"] == f"{train2['loss']:.4f}"
    assert rows["validation loss (iteration 2)"] == f"{valid2['loss']:.4f}"
    assert f"`tools/evaluate.py` on `{save}` (2 samples per task and length, seed 5, float32)" in text
    assert (
        "| task | 1024 tokens | 2048 tokens |\n|---|---:|---:|\n| babilong_qa1 | 50.0 | - |\n| ruler_vt | - | 100.0 |"
        in text
    )
    assert (out / "training_args.json").is_file()
    # A checkpoint that is no training run's: the model and its origin only, no settings file.
    plain = tmp_path / "plain-hf"
    assert convert_megatron_to_hf.main(["--ckpt", str(run["ckpt"]), "--out", str(plain), "--no-progress"]) == 0
    text, _ = _card(plain)
    assert "Not recorded: no training run's `run_config.json` is beside this checkpoint." in text
    assert (
        f"The Hugging Face folder `{(run['ckpt'].parent / 'hf').resolve()}`, converted into a megatron_focusft" in text
    )
    assert not (plain / "training_args.json").exists()
