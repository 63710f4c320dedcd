"""tools/benchmark.py runs the four ablation modes side by side (CPU smoke run; timings are not tested)."""

from __future__ import annotations

from megatron_focusft.benchmark import synthetic_input
from megatron_focusft.flops import sft_flops
from megatron_focusft.models.qwen2 import tiny_arch
from tools import benchmark as tool


def test_four_modes_side_by_side_at_each_length(capsys):
    argv = "--preset tiny --seq-length 128,256 --device cpu --dtype bf16 --warmup 0 --iters 1".split()
    assert tool.main(argv) == 0
    out = capsys.readouterr().out
    for n in (128, 256):
        for mode in ("standard SFT", "SFT + bidir", "causal bilevel", "FocuSFT"):
            assert f"| {n} | {mode} |" in out
        row = next(line for line in out.splitlines() if line.startswith(f"| {n} | standard SFT |"))
        assert row.endswith("| 1.00x |")
        cells = [c.strip() for c in row.split("|")]
        assert cells[7] == "-" and cells[8] != "-"  # no CUDA peak on CPU; the memory plan's prediction (bf16)


def test_bad_length_is_a_clear_error(capsys):
    assert tool.main(["--seq-length", "4m", "--device", "cpu"]) == 2
    assert "--seq-length" in capsys.readouterr().err


def test_sft_flops_counts_layers_attention_and_response_logits():
    arch = tiny_arch()
    inp = synthetic_input(512, arch.vocab_size)
    h, f, d = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    per_layer = 2 * (h * (4 + 2 * 2) * d + 4 * d * h + 3 * h * f)  # qkv, proj, gate/up/down
    tokens = int((inp.document_ids >= 0).sum())
    lens = (inp.cu_seqlens[1:] - inp.cu_seqlens[:-1]).tolist()[: len(inp.document_keys)]
    attn = 4 * 4 * d * sum(n * (n + 1) // 2 for n in lens)
    out = 2 * int(inp.label_mask.sum()) * h * arch.vocab_size
    assert sft_flops(arch, inp) == 3.0 * (arch.num_layers * (tokens * per_layer + attn) + out)


def test_synthetic_input_has_a_response_in_every_document():
    inp = synthetic_input(2048, 1000, seed=1)
    docs = inp.document_ids[0]
    for d in docs[docs >= 0].unique().tolist():
        assert inp.label_mask[0][docs == d].sum() > 0
