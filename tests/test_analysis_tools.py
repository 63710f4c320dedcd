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
        "512",
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
    assert set(ra["accuracy"]) == {"babilong_qa1", "ruler_vt"} and set(ra["accuracy"]["ruler_vt"]) == {"512"}
    assert [r["prediction"] for r in ra["results"]] == [r["prediction"] for r in rb["results"]]
    assert all(400 < r["prompt_tokens"] <= 512 - 6 for r in ra["results"])
    assert md.read_text().startswith("| task | 512 | avg |")


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
    common = ["--tasks", "babilong_qa1", "--lengths", "256", "--samples", "1", "--max-new-tokens", "2"]
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


HELD_OUT = [
    {"role": "system", "content": "You answer with one word."},
    {"role": "user", "content": "The key is under the red mat. Where is the key?"},
    {"role": "assistant", "content": "mat"},
    {"role": "user", "content": "And what colour is the mat?"},
]


def _reference_answer(hf_dir: Path, messages: list[dict], max_new_tokens: int) -> tuple[int, str]:
    """transformers alone: Qwen2.5's own chat template's prompt (ids folded into the tiny vocabulary, as the
    tool is asked to), greedy ``generate``, the new tokens decoded without the stop tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    template = (Path(__file__).parent / "data" / "qwen25_chat_template.jinja").read_text()
    ids = tok.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    prompt = torch.tensor([[i % model.config.vocab_size for i in ids]])
    stop = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    out = model.generate(
        prompt, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop, pad_token_id=stop[0]
    )
    new = [t for t in out[0, prompt.shape[1] :].tolist() if t not in stop]
    return len(ids), tok.decode(new)


@pytest.mark.slow
def test_evaluate_tool_answers_held_out_conversations_as_transformers_does(work, capsys):
    """--data: the prompt is the conversation before its last assistant turn, rendered as training renders
    it (here the built-in Qwen2.5 renderer: the folder has no template), the answer greedy decoding's, the score
    an exact match.  The
    reference answer is computed by transformers alone; one conversation is given it as its reference
    (score 1), one a wrong one (score 0).  (Megatron decoding equals HF decoding: the test above.)"""
    prompt_tokens, answer = _reference_answer(work / "export", HELD_OUT, 5)
    assert answer.strip()
    data = work / "heldout.jsonl"
    rows = [{"messages": [*HELD_OUT, {"role": "assistant", "content": ref}]} for ref in (f" {answer.upper()}.", "red")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tool = load_tool("evaluate")
    common = ["--data", str(data), "--max-new-tokens", "5", "--show", "5", "--no-progress", "--fold-oversized-ids"]
    out_hf = work / "heldout_hf.json"
    assert tool.main(["--hf-dir", str(work / "export"), "--json", str(out_hf), *common]) == 0
    shown = capsys.readouterr().out
    hf = json.loads(out_hf.read_text())
    assert [r["prediction"] for r in hf["results"]] == [answer, answer]
    assert [r["prompt_tokens"] for r in hf["results"]] == [prompt_tokens, prompt_tokens]
    assert [r["score"] for r in hf["results"]] == [1.0, 0.0]
    assert hf["accuracy"] == {"data:heldout.jsonl": {str(prompt_tokens): 50.0}} and hf["samples_per_cell"] == 2
    assert f"expected 'red', model {answer!r} (wrong)" in shown


def test_evaluate_tool_refuses_held_out_data_without_a_final_answer(work, capsys):
    data = work / "no_answer.jsonl"
    data.write_text(json.dumps({"messages": HELD_OUT[:2]}) + "\n" + json.dumps({"messages": HELD_OUT}) + "\n")
    tool = load_tool("evaluate")
    assert tool.main(["--hf-dir", str(work / "export"), "--data", str(data), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{data.name}:1" in err and "last turn must be an assistant's text answer" in err
    assert tool.main(["--hf-dir", str(work / "export"), "--data", str(work / "missing.jsonl")]) == 2
    assert "--data:" in capsys.readouterr().err
