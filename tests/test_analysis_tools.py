"""tools/analyze_attention.py and tools/evaluate.py end to end on a tiny model (plumbing, not numbers)."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest
import torch

from megatron_focusft import runtime
from megatron_focusft.convert.hf_io import copy_tokenizer_files
from megatron_focusft.convert.pipeline import hf_to_megatron, megatron_to_hf
from megatron_focusft.models.qwen2 import tiny_arch
from megatron_focusft.models.random_hf import make_random_hf_checkpoint

QWEN2_DIR = os.environ.get("QWEN2_TOKENIZER_DIR", "/work/shared/qwen2-tokenizer")
CONV = {
    "messages": [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Rain in Paris?"},
        {"role": "assistant", "tool_calls": [{"name": "search", "arguments": {"q": "Paris"}}]},
        {"role": "tool", "content": "Paris: light rain."},
        {"role": "assistant", "content": "Yes, light rain."},
    ]
}


def load_tool(name):
    """``tools.NAME`` imported as a module, so that its functions pickle into spawned ranks."""
    return importlib.import_module(f"tools.{name}")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    hf = make_random_hf_checkpoint(tiny_arch(num_layers=2), root / "hf", seed=1)
    copy_tokenizer_files(Path(QWEN2_DIR), hf)
    runtime.initialize("cpu")
    try:
        hf_to_megatron(hf, root / "megatron", torch.float32, progress=False)
        megatron_to_hf(root / "megatron", root / "export", progress=False)
    finally:
        runtime.destroy()
    (root / "convs.jsonl").write_text("\n".join(json.dumps(CONV) for _ in range(3)) + "\n")
    return root


@pytest.mark.slow
def test_analyze_attention_tool_compare_and_plots(work):
    pytest.importorskip("matplotlib")
    tool = load_tool("analyze_attention")
    out = work / "attn.json"
    argv = ["--ckpt", str(work / "megatron"), "--data", str(work / "convs.jsonl"), "--samples", "2"]
    argv += ["--json", str(out), "--plots", str(work / "plots"), "--compare", str(work / "megatron")]
    assert tool.main(argv + ["--compare-attention-mask", "glm", "--no-progress", "--fold-oversized-ids"]) == 0
    doc = json.loads(out.read_text())
    assert len(doc["a"]["layers"]) == 2 and doc["a"]["attention_mask"] == "causal"
    assert doc["b"]["attention_mask"] == "glm"
    assert doc["a"]["iteration"] == doc["b"]["iteration"] == 0  # a converted checkpoint
    layer = doc["a"]["layers"][0]
    assert {"layer", "sink_mass", "context_engagement", "system_user", "tool", "profile"} <= set(layer)
    assert layer["tool"] > 0 and layer["system_user"] > 0
    assert len(doc["ratios"]["sink_mass_a_over_b"]) == 2
    for png in ("heatmap", "sink_mass_per_layer", "context_engagement_per_layer", "positional_profile"):
        assert (work / "plots" / f"{png}.png").stat().st_size > 1000


@pytest.mark.slow
def test_analyze_attention_tool_reads_a_packed_prefix(work):
    pre = load_tool("preprocess_data")
    prefix = work / "packed"
    argv = ["--input", str(work / "convs.jsonl"), "--tokenizer", str(work / "megatron" / "tokenizer")]
    assert pre.main(argv + ["--out", str(prefix), "--pack-length", "512"]) == 0
    tool = load_tool("analyze_attention")
    out = work / "attn_packed.json"
    argv = ["--ckpt", str(work / "megatron"), "--data", str(prefix), "--json", str(out), "--no-progress"]
    assert tool.main(argv + ["--attention-mask", "glm", "--fold-oversized-ids"]) == 0
    doc = json.loads(out.read_text())
    assert doc["num_samples"] == 3 and doc["attention_mask"] == "glm"
    assert doc["layers"][0]["tool"] > 0 and doc["layers"][0]["system_user"] > 0


@pytest.mark.slow
def test_evaluate_tool_megatron_and_hf_agree(work):
    tool = load_tool("evaluate")
    common = [
        "--tasks",
        "babilong_qa1,ruler_vt",
        "--lengths",
        "1k",
        "--samples",
        "2",
        "--max-new-tokens",
        "6",
    ]
    common += ["--no-progress", "--fold-oversized-ids"]
    a, b, md = work / "eval_megatron.json", work / "eval_hf.json", work / "eval.md"
    assert tool.main(["--ckpt", str(work / "megatron"), "--json", str(a), "--markdown", str(md)] + common) == 0
    assert tool.main(["--hf-dir", str(work / "export"), "--json", str(b)] + common) == 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert set(ra["accuracy"]) == {"babilong_qa1", "ruler_vt"} and set(ra["accuracy"]["ruler_vt"]) == {"1024"}
    assert [r["prediction"] for r in ra["results"]] == [r["prediction"] for r in rb["results"]]
    assert all(900 < r["prompt_tokens"] < 1150 for r in ra["results"])
    assert md.read_text().startswith("| task | 1K | avg |")


def test_evaluate_tool_rejects_unknown_task(work, capsys):
    tool = load_tool("evaluate")
    assert tool.main(["--ckpt", str(work / "megatron"), "--tasks", "qa9"]) == 2
    assert "unknown task" in capsys.readouterr().err


def test_a_tokenizer_beyond_the_models_vocabulary_is_an_error(work, capsys):
    """The tiny model (vocabulary 1000) read with the Qwen2 tokenizer: a clear error naming both folders."""
    ckpt, tok_dir = work / "megatron", work / "megatron" / "tokenizer"
    tool = load_tool("evaluate")
    argv = ["--ckpt", str(ckpt), "--tasks", "babilong_qa1", "--lengths", "1k", "--samples", "1", "--no-progress"]
    assert tool.main(argv) == 2
    err = capsys.readouterr().err
    assert "outside the model's vocabulary of 1000" in err and str(tok_dir) in err and f"checkpoint {ckpt}" in err
    tool = load_tool("analyze_attention")
    argv = ["--ckpt", str(ckpt), "--data", str(work / "convs.jsonl"), "--samples", "1", "--no-progress"]
    assert tool.main(argv + ["--json", str(work / "never.json")]) == 2
    err = capsys.readouterr().err
    assert "outside the model's vocabulary of 1000" in err and str(tok_dir) in err
    assert not (work / "never.json").exists()


def test_analyze_attention_compare_reads_the_compared_checkpoints_tokenizer(work, capsys):
    """--compare B uses B/tokenizer (here missing), not the first checkpoint's."""
    import shutil

    other = work / "other"
    if not other.exists():
        shutil.copytree(work / "megatron", other)
        shutil.rmtree(other / "tokenizer")
    tool = load_tool("analyze_attention")
    argv = ["--ckpt", str(work / "megatron"), "--compare", str(other), "--data", str(work / "convs.jsonl")]
    argv += ["--samples", "1", "--json", str(work / "cmp.json"), "--no-progress", "--fold-oversized-ids"]
    assert tool.main(argv) == 2
    assert str(other / "tokenizer") in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra,flag",
    [
        (["--lengths", ","], "--lengths"),
        (["--lengths", "4m"], "--lengths"),
        (["--lengths", "0"], "--lengths"),
        (["--tasks", ""], "--tasks"),
        (["--tasks", " , "], "--tasks"),
        (["--tasks", "ruler_niah"], "unknown task 'ruler_niah'"),
        (["--samples", "0"], "--samples"),
        (["--samples", "-3"], "--samples"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--prefill-chunk", "0"], "--prefill-chunk"),
    ],
)
def test_evaluate_tool_rejects_bad_arguments(extra, flag, capsys):
    tool = load_tool("evaluate")
    assert tool.main(["--ckpt", "/nonexistent/ckpt"] + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and "error" in err[0], err
    assert "babilong_ruler" not in err[0]


@pytest.mark.parametrize(
    "extra,flag",
    [
        (["--samples", "0"], "--samples"),
        (["--samples", "-1"], "--samples"),
        (["--heatmap-layer", "-1"], "--heatmap-layer"),
        (["--bins", "0"], "--bins"),
    ],
)
def test_analyze_attention_tool_rejects_bad_arguments(extra, flag, capsys, tmp_path):
    tool = load_tool("analyze_attention")
    argv = ["--ckpt", "/nonexistent/ckpt", "--data", "x.jsonl", "--json", str(tmp_path / "o.json")]
    assert tool.main(argv + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0], err


def test_analyze_attention_tool_rejects_a_heatmap_layer_beyond_the_model(work, capsys):
    tool = load_tool("analyze_attention")
    argv = ["--ckpt", str(work / "megatron"), "--data", str(work / "convs.jsonl"), "--samples", "1"]
    argv += ["--json", str(work / "hm.json"), "--no-progress", "--fold-oversized-ids", "--heatmap-layer", "99"]
    assert tool.main(argv) == 2
    assert "--heatmap-layer 99" in capsys.readouterr().err and not (work / "hm.json").exists()


def test_load_samples_rejects_a_non_positive_limit(work):
    from megatron_focusft.analysis.analyze import load_samples
    from megatron_focusft.data import load_tokenizer

    tokenizer = load_tokenizer(work / "megatron" / "tokenizer")
    assert len(load_samples(str(work / "convs.jsonl"), tokenizer, limit=1)) == 1
    for limit in (0, -2):
        with pytest.raises(ValueError, match="limit"):
            load_samples(str(work / "convs.jsonl"), tokenizer, limit=limit)


@pytest.mark.slow
def test_evaluate_tool_decodes_in_the_checkpoints_dtype_or_dtype(work):
    import shutil

    bf16 = work / "export_bf16"
    if not bf16.exists():
        shutil.copytree(work / "export", bf16)
        cfg = json.loads((bf16 / "config.json").read_text())
        cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"
        (bf16 / "config.json").write_text(json.dumps(cfg))
    tool = load_tool("evaluate")
    common = ["--tasks", "babilong_qa1", "--lengths", "1k", "--samples", "1", "--max-new-tokens", "2"]
    common += ["--no-progress", "--fold-oversized-ids"]
    out = work / "dtype.json"
    for src, extra, want in [
        (["--hf-dir", str(bf16)], [], "bfloat16"),  # the folder's dtype, not always float32
        (["--hf-dir", str(bf16)], ["--dtype", "float32"], "float32"),
        (["--hf-dir", str(work / "export")], [], "float32"),
        (["--ckpt", str(work / "megatron")], ["--dtype", "bfloat16"], "bfloat16"),
    ]:
        assert tool.main(src + extra + common + ["--json", str(out)]) == 0
        doc = json.loads(out.read_text())
        assert doc["dtype"] == want and doc["results"][0]["dtype"] == want, (src, extra)
