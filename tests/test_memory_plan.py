"""The memory plan: exact parameter/gradient/optimizer bytes, how activations scale, the CLI, and (on a GPU)
the prediction against torch.cuda.max_memory_allocated."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from megatron_focusft import memory_plan as mp
from megatron_focusft.models.qwen2 import PRESETS, ConfigError, Qwen2Arch, tp_partition_dim
from megatron_focusft.pipeline import planner
from tools import memory_plan as cli

REPO = Path(__file__).resolve().parents[1]
QWEN7B = PRESETS["qwen2.5-7b"]


def _act(arch=QWEN7B, layout=None, **work) -> int:
    return mp.plan(arch, layout or mp.Layout(), mp.Workload(**work))["activations"].bytes


# ---- (1) parameters, gradients, optimizer ----------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_gradient_optimizer_bytes_equal_the_built_model(megatron_cpu, tied):
    from megatron_focusft.attention import core_attention_class
    from megatron_focusft.models.qwen2 import build_model

    arch = Qwen2Arch(128, 3, 8, 4, 352, 1000, tied)  # vocabulary padded to 1024
    model = build_model(arch, core_attention_class("dense"), perform_initialization=False)
    params = list(model.named_parameters())
    assert mp.parameter_count(arch) == sum(p.numel() for _, p in params)
    for tp in (2, 4):  # local shards: split parameters / TP, the rest replicated
        local = sum(p.numel() // (tp if tp_partition_dim(n) is not None else 1) for n, p in params)
        assert mp.parameter_count(arch, tp) == local
        layout = mp.Layout(tp=tp, cp=2, dp=3, sequence_parallel=True)
        plan = mp.plan(arch, layout, mp.Workload(seq_length=256))
        assert plan["parameters"].bytes == 2 * local
        assert plan["gradient buffer"].bytes == 4 * local
        assert plan["optimizer state"].bytes == math.ceil(12 * local / 6)


def test_published_qwen25_7b_parameter_count():
    assert mp.parameter_count(QWEN7B) == 7_615_616_512  # Qwen2.5-7B: 7.62B (vocabulary 152064 needs no padding)


# ---- (2) activations ---------------------------------------------------------------------------------------


def test_flex_activations_are_linear_and_dense_quadratic_in_sequence_length():
    assert _act(seq_length=8192) == pytest.approx(2 * _act(seq_length=4096), rel=1e-6)
    assert _act(seq_length=32768) == pytest.approx(8 * _act(seq_length=4096), rel=1e-6)
    extra = [_act(seq_length=s, attention_backend="dense") - _act(seq_length=s) for s in (4096, 8192)]
    assert extra[1] == pytest.approx(4 * extra[0], rel=1e-6)  # the S x S scores per head
    assert extra[0] > _act(seq_length=4096)


def test_tensor_and_sequence_parallelism_halve_activations():
    one = _act(seq_length=8192)
    assert _act(layout=mp.Layout(tp=2, sequence_parallel=True), seq_length=8192) == pytest.approx(one / 2, rel=0.01)
    assert _act(layout=mp.Layout(tp=2), seq_length=8192) > 0.55 * one  # without SP the norms are replicated
    # CP=2 halves the tokens of every layer, but each layer then keeps the whole sequence's K and V
    # (all-gathered, 2 kv x CP per local token) instead of the local fused QKV output (h + 2 kv) and
    # rotated K (kv); Q is rotated either way (h).
    h, kv = QWEN7B.hidden_size, QWEN7B.num_key_value_heads * QWEN7B.head_dim
    per_token_change = 2 * ((h + 2 * kv * 2) - ((h + 2 * kv) + (h + kv)))  # bf16
    want = one / 2 + QWEN7B.num_layers * 4096 * per_token_change
    assert _act(layout=mp.Layout(cp=2), seq_length=8192) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("backend", ["flex", "dense"])
def test_full_recompute_below_selective_at_most_none(backend):
    def total(r):
        p = mp.plan(QWEN7B, mp.Layout(tp=2, sequence_parallel=True), mp.Workload(32768, r, backend))
        return p["activations"].bytes + p["activation working set"].bytes

    assert total("full") < total("selective") <= total("none")


def test_focusft_adds_about_the_top_layers_share():
    sft = _act(seq_length=8192, focusft=False)
    kept = _act(seq_length=8192, inner_graph="kept")
    n_top = 28 - int(28 * 0.65)  # layers 18..27
    assert (kept - sft) / sft == pytest.approx(n_top / 28, rel=0.02)
    # the step drops the last inner graph before the outer pass: only the LoRA activations remain
    freed = _act(seq_length=8192)
    assert sft < freed < 1.01 * sft
    assert _act(seq_length=8192, inner_steps=0) == sft  # K=0 is plain SFT


def test_fast_weights_and_head_sizes():
    plan = mp.plan(QWEN7B, mp.Layout(tp=2), mp.Workload(seq_length=4096, documents_per_pack=4))
    h, f, r = 3584, 18944, 32
    per_doc_layer = 3 * (r * h + f // 2 * r)  # gate/up: A [r, h], B [f/tp, r]; down: A [r, f/tp], B [h, r]
    assert plan["fast weights"].bytes == 3 * 4 * per_doc_layer * 4 * 10
    resp = math.ceil(0.15 * 4096)
    assert plan["output head"].bytes >= 4 * resp * 152064 // 2
    assert "fast weights" not in mp.plan(QWEN7B, mp.Layout(), mp.Workload(focusft=False)).to_dict()["components"]


def test_overhead_is_explicit_and_fit():
    work = mp.Workload(seq_length=4096)
    a = mp.plan(QWEN7B, mp.Layout(tp=2, dp=4), work, overhead_gib=0, overhead_fraction=0)
    b = mp.plan(QWEN7B, mp.Layout(tp=2, dp=4), work, overhead_gib=2, overhead_fraction=0.1)
    assert a["overhead"].bytes == 0
    assert b.total_bytes == pytest.approx(a.total_bytes * 1.1 + 2 * mp.GiB, abs=1)
    assert a.fits and not replace(a, gpu_memory_gib=10).fits


def test_bad_layouts_are_config_errors():
    with pytest.raises(ConfigError, match="does not divide num_key_value_heads = 4"):
        mp.plan(QWEN7B, mp.Layout(tp=8), mp.Workload())
    with pytest.raises(ConfigError, match="divisible by 2\\*CP"):
        mp.plan(QWEN7B, mp.Layout(cp=4), mp.Workload(seq_length=4100))


# ---- (3) command line -------------------------------------------------------------------------------------


def test_cli_prints_the_table(capsys):
    args = ["--preset", "qwen2.5-7b", "--seq-length", "4096", "--tp", "2", "--sequence-parallel", "--dp", "4"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    for name in ("parameters", "gradient buffer", "optimizer state", "activations", "fast weights", "overhead"):
        assert f"| {name} |" in out
    assert "| **total** |" in out and "fits in 80 GiB" in out


def test_cli_json_and_hf_config(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["qwen2.5-0.5b"].to_hf_config()))
    assert cli.main(["--hf-config", str(tmp_path), "--json", "--no-bilevel", "--num-gpus", "8"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["layout"]["dp"] == 8 and got["workload"]["focusft"] is False
    assert got["total_bytes"] == sum(c["bytes"] for c in got["components"].values())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "qwen9"], "unknown preset 'qwen9'"),
        (["--preset", "qwen2.5-7b", "--tp", "8"], "tensor-parallel size 8 does not divide num_key_value_heads = 4"),
        (["--tp", "2", "--cp", "2", "--num-gpus", "6"], "--num-gpus 6 is not a multiple of TP*CP = 4"),
    ],
)
def test_cli_bad_model_or_layout_exits_2_with_one_line(args, message, capsys):
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_cli_exit_status_in_a_subprocess():
    run = subprocess.run(
        [sys.executable, "tools/memory_plan.py", "--preset", "qwen2.5-7b", "--tp", "8"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("error: tensor-parallel size 8")


# ---- (4) the prediction against a GPU's peak ----------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("seq_length", [4096, 8192])
def test_prediction_matches_cuda_peak(seq_length):
    """Standard SFT through BilevelStep, bf16, flex: the growth of allocated memory over one forward+backward
    (bf16 .grad + activations + working set + head) within 10% of the plan."""
    from megatron_focusft import runtime
    from megatron_focusft.benchmark import synthetic_input
    from megatron_focusft.bilevel import BilevelStep
    from megatron_focusft.config import FocuSFTConfig
    from megatron_focusft.models.focusft import build_focusft_model

    runtime.initialize("cuda")
    try:
        arch = Qwen2Arch(1024, 4, 16, 4, 2816, 32000, False)
        cfg = FocuSFTConfig(inner_steps=0, attention_backend="flex")
        model = build_focusft_model(arch, cfg, params_dtype=torch.bfloat16).cuda()
        step = BilevelStep(model, cfg)
        inp = synthetic_input(seq_length, arch.vocab_size).to(torch.device("cuda"))
        step(inp, 1.0)  # compile the kernel
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(inp, 1.0)
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() - base
        fraction = float(inp.label_mask.sum()) / seq_length
        plan = mp.plan(arch, mp.Layout(), mp.Workload(seq_length, focusft=False, response_fraction=fraction))
        names = ("parameters", "activations", "activation working set", "output head")  # .grad = bf16 params
        predicted = sum(plan[n].bytes for n in names)
        assert measured == pytest.approx(predicted, rel=0.10), (measured / 2**20, predicted / 2**20)
    finally:
        runtime.destroy()


# ---- (5) pipeline stages ----------------------------------------------------------------------------------


def _built_stage_parameters(cases):
    """On every rank of a PP=2 group: build each (arch, first, last) case's stage; all ranks' (stage, layers,
    parameter count) per case."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_focusft.config import FocuSFTConfig
    from megatron_focusft.models.focusft import build_focusft_model

    mine = []
    for arch, first, last in cases:
        # The uneven split goes to Megatron's config here: build_focusft_model does not take it from the layout.
        model = build_focusft_model(
            arch,
            FocuSFTConfig(attention_backend="dense"),
            perform_initialization=False,
            num_layers_in_first_pipeline_stage=first,
            num_layers_in_last_pipeline_stage=last,
        )
        stage = parallel_state.get_pipeline_model_parallel_rank()
        mine.append((stage, list(model.stage_layers), sum(p.numel() for p in model.parameters())))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def test_stage_parameters_equal_the_built_pp2_models():
    from megatron_focusft import runtime
    from megatron_focusft.models.qwen2 import tiny_arch

    splits = [(None, None), (4, None), (None, 1)]
    cases = [(tiny_arch(num_layers=6, tie_word_embeddings=tied), f, la) for tied in (False, True) for f, la in splits]
    built = runtime.launch_cpu_processes(
        _built_stage_parameters, 2, runtime.ParallelLayout(pipeline_model_parallel_size=2), (cases,)
    )
    for i, (arch, first, last) in enumerate(cases):
        layout = mp.Layout(pp=2, first_stage_layers=first, last_stage_layers=last)
        for stage, layers, count in (rank[i] for rank in built):
            assert layers == list(layout.split(arch.num_layers).ranges()[stage])
            plan = mp.plan(arch, layout, mp.Workload(seq_length=256), stage=stage, micro_batches=4)
            assert plan["parameters"].bytes == 2 * count, (arch.tie_word_embeddings, first, last, stage)
            assert plan["gradient buffer"].bytes == 4 * count and plan["optimizer state"].bytes == 12 * count
    # a tied table is held twice once the output layer's stage is not the embedding's
    tied = cases[3][0]
    one = mp.parameter_count(tied)
    two = sum(mp.parameter_count(tied, layers=3, first=s == 0, last=s == 1) for s in (0, 1))
    assert two - one == tied.padded_vocab_size * tied.hidden_size


def _stages(layout, micro_batches, **work):
    return mp.pipeline_plan(QWEN7B, layout, mp.Workload(**work), micro_batches=micro_batches).stages


def test_stage_s_keeps_the_graphs_of_min_p_minus_s_and_m_micro_batches():
    layout = mp.Layout(tp=2, sequence_parallel=True, pp=4)  # 7 layers per stage
    sft = [p["activations"].bytes for p in _stages(layout, 8, focusft=False)]
    assert sft == pytest.approx([4 * sft[3], 3 * sft[3], 2 * sft[3], sft[3]], abs=4)
    assert [p["activations"].bytes for p in _stages(layout, 2, focusft=False)] == pytest.approx(
        [sft[3] * 2, sft[3] * 2, sft[3] * 2, sft[3]], abs=4
    )
    one = mp.plan(QWEN7B, mp.Layout(tp=2, sequence_parallel=True), mp.Workload(focusft=False))["activations"].bytes
    assert sft[3] == pytest.approx(one / 4, abs=2)
    stages = _stages(layout, 8, focusft=False)
    assert ["output head" in p.to_dict()["components"] for p in stages] == [False, False, False, True]
    assert all(p["pipeline buffers"].bytes > 0 for p in stages)
    # without PP the pipeline plan is the one plan, as before
    one_stage = mp.pipeline_plan(QWEN7B, mp.Layout(), mp.Workload())
    assert one_stage.to_dict() == mp.plan(QWEN7B, mp.Layout(), mp.Workload()).to_dict()
    assert "pipeline buffers" not in one_stage.to_dict()["components"]


def test_local_fast_layers_run_the_one_stage_step_on_the_last_stage():
    layout = mp.Layout(tp=2, sequence_parallel=True, pp=2)  # fast layers 18..27 all on stage 1 (14..27)
    first, last = _stages(layout, 8)
    whole = mp.plan(QWEN7B, mp.Layout(tp=2, sequence_parallel=True), mp.Workload())
    assert last.description["stage"]["case"] == "local"
    # the one-stage step's graph = stage 0's layers (of one micro-batch; it keeps two) + the last stage's
    assert whole["activations"].bytes == pytest.approx(
        first["activations"].bytes / 2 + last["activations"].bytes, abs=2
    )
    for name in ("fast weights", "output head"):
        assert last[name] == whole[name] and name not in first.to_dict()["components"]


def test_spanning_fast_stages_keep_every_micro_batchs_fast_weights():
    layout = mp.Layout(tp=2, sequence_parallel=True, pp=4)  # fast layers 18..27: stage 2 holds 3, stage 3 all 7
    stages = _stages(layout, 8)
    one_copy = mp.fast_weight_bytes(QWEN7B, layout, mp.Workload(), layers=1)
    assert [p.description["stage"]["fast_layers"] for p in stages] == [0, 0, 3, 7]
    for p, n in zip(stages[2:], (3, 7)):
        phase = p.description["stage"]["phase"]
        copies = {"schedule": 8, "inner": 8 + 2}[phase]  # every micro-batch's adapted copy (+ the one adapting)
        assert p["fast weights"].bytes == copies * n * one_copy
    assert all("fast weights" not in p.to_dict()["components"] for p in stages[:2])
    assert sum(mp.fast_weight_bytes(QWEN7B, layout, mp.Workload(), layers=n) for n in (3, 7)) == (
        mp.fast_weight_bytes(QWEN7B, layout, mp.Workload())
    )


def test_cli_prints_every_stage_and_the_predicted_step(capsys):
    args = "--preset qwen2.5-7b --tp 2 --sequence-parallel --pp 2 --num-gpus 8".split()
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "PP=2 (even) DP=2 micro-batch=1 micro-batches=16" in out
    assert "| component (GiB) | stage 0 | stage 1 |" in out and "peak: stage 0, fits in 80 GiB" in out
    assert "| pipeline buffers |" in out and "1F1B (16 + 2 - 1)" in out
    assert cli.main([*args, "--json", "--decoder-first-pipeline-num-layers", "16", "--micro-batches", "4"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [s["stage"]["layers"] for s in got["stages"]] == [[0, 15], [16, 27]]
    assert got["stages"][0]["stage"]["in_flight"] == 2 and got["cost"]["micro_batches"] == 4
    assert got["peak_gib"] == max(s["total_gib"] for s in got["stages"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--pp", "3"], "--pipeline-model-parallel-size 3 does not divide the model's 28 layers"),
        (["--pp", "2", "--decoder-first-pipeline-num-layers", "28"], "leave 0 of the model's 28 layers"),
        (["--tp", "2", "--pp", "2", "--num-gpus", "6"], "--num-gpus 6 is not a multiple of TP*CP*PP = 4"),
        (["--pp", "2", "--dp", "3"], "--global-batch-size 32 is not divisible by --micro-batch-size 1 x DP 3"),
        (["--pp", "2", "--micro-batches", "0"], "--micro-batches must be >= 1"),
    ],
)
def test_cli_bad_pipeline_layout_exits_2_with_one_line(args, message, capsys):
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


# ---- (6) the layout search ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen72b_on_32():
    return planner.suggest(PRESETS["qwen2.5-72b"], mp.Workload(seq_length=4096), num_gpus=32, gpu_memory_gib=80)


def test_suggest_finds_a_72b_layout_on_32_gpus(qwen72b_on_32):
    best = qwen72b_on_32.best
    assert best is not None and best.layout.world_size == 32 and best.memory.fits
    assert best.memory.peak.total_gib <= 80 and best.layout.pp > 1 and best.layout.tp == 8
    steps = [f.cost.step_seconds for f in qwen72b_on_32.fits]
    assert steps == sorted(steps) and all(f.memory.fits for f in qwen72b_on_32.fits)
    # the plan and the cost of the best are what the single-layout plan says
    again = mp.pipeline_plan(
        PRESETS["qwen2.5-72b"], best.layout, mp.Workload(recompute=best.recompute), micro_batches=best.micro_batches
    )
    assert again.to_dict() == best.memory.to_dict() and best.micro_batches == 32 // best.layout.dp
    # TP=8 x DP=4 holds the whole model on each GPU: 18 GiB bf16 + 36 GiB fp32 grads + 27 GiB of Adam
    tp8 = [r for r in qwen72b_on_32.rejected if (r.tp, r.pp, r.cp, r.dp) == (8, 1, 1, 4)]
    assert [r.recompute for r in tp8] == ["none", "selective", "full"]
    assert all(
        r.kind == "memory" and re.fullmatch(r"does not fit: \d+\.\d GiB on stage 0 > 80 GiB", r.reason) for r in tp8
    )
    text = qwen72b_on_32.to_markdown()
    assert "| 1 | 8 |" in text and "| TP=8 PP=1 CP=1 DP=4 recompute=none | does not fit: " in text


def test_suggest_rejects_layouts_with_their_reasons():
    found = planner.suggest(QWEN7B, mp.Workload(seq_length=4104), num_gpus=24)  # 4104 = 8 x 513
    reasons = {(r.kind, r.tp, r.pp, r.cp, r.dp): r.reason for r in found.rejected}
    assert reasons[("tensor", 8, None, None, None)] == "tensor-parallel size 8 does not divide num_key_value_heads = 4"
    assert (
        reasons[("sequence", 1, None, 8, None)] == "context-parallel size 8 needs a sequence length divisible by 2*CP"
    )
    assert (
        reasons[("sequence", 4, None, 4, None)]
        == "sequence parallel: the per-CP-rank sequence is not divisible by TP=4"
    )
    assert reasons[("world", 1, 16, 1, None)] == "TP x CP x PP = 16 does not divide the 24 GPUs"
    assert reasons[("pipeline", None, 24, None, None)].startswith("PP=24 does not divide the model's 28 layers")
    assert reasons[("batch", 1, 1, 1, 24)] == "global batch 32 is not divisible by micro-batch 1 x DP 24"
    for f in found.fits:  # what fits is a layout of the 24 GPUs that the plan and Megatron accept
        mp.check(QWEN7B, f.layout, mp.Workload(seq_length=4104))
        assert f.layout.world_size == 24 and 32 % (f.layout.dp * f.micro_batches) == 0


def test_suggest_shell_line_evals_in_bash(capsys):
    args = ["--shell", "--preset", "qwen2.5-7b", "--num-gpus", "8", "--seq-length", "4096"]
    assert cli.main(args) == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1
    names = "TP PP CP DP SP RECOMPUTE FIRST_STAGE_LAYERS LAST_STAGE_LAYERS".split()
    script = f'eval "$1"; echo {" ".join("${" + n + "-unset}" for n in names)}'
    run = subprocess.run(["bash", "-c", script, "bash", line], capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["2", "1", "1", "4", "1", "none"]  # 7B at 4K on 8 GPUs: TP=2, even (empty)
    assert "FIRST_STAGE_LAYERS= LAST_STAGE_LAYERS=" in line
    assert cli.main(["--shell", "--preset", "qwen2.5-72b", "--num-gpus", "32"]) == 0
    assert capsys.readouterr().out.startswith("TP=8 PP=2 ")


def test_suggest_exit_status_json_and_refused_flags(capsys):
    assert cli.main(["--shell", "--preset", "qwen2.5-72b", "--num-gpus", "8"]) == 1  # 72B does not fit on 8 GPUs
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no layout of 8 GPUs fits qwen2.5-72b at S=4096 in 80 GiB") and "\n" not in err
    assert cli.main(["--suggest", "--json", "--preset", "qwen2.5-0.5b", "--num-gpus", "4", "--no-bilevel"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["fits"][0]["step_seconds"] <= got["fits"][-1]["step_seconds"] and got["workload"]["focusft"] is False
    assert {r["kind"] for r in got["rejected"]} <= set(planner.REJECTIONS)
    for extra, flag in ((["--tp", "2"], "--tensor-model-parallel-size"), (["--recompute", "full"], "--recompute")):
        assert cli.main(["--suggest", "--num-gpus", "8", *extra]) == 2
        assert flag in capsys.readouterr().err
    assert cli.main(["--suggest"]) == 2
    assert "--suggest needs --num-gpus" in capsys.readouterr().err
