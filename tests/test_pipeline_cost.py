"""The pipeline cost model: its FLOPs are flops.sft_flops' at PP=1, the stages add up to the whole model, and
the schedule's time, bubble and imbalance follow from the stages."""

from __future__ import annotations

import pytest
import torch

from megatron_focusft import memory_plan as mp
from megatron_focusft.data.packed_input import PackedInput
from megatron_focusft.flops import attention_flops, causal_pairs, sft_flops
from megatron_focusft.models.qwen2 import PRESETS, ConfigError, tiny_arch
from megatron_focusft.pipeline.cost import DEFAULT_ACHIEVED_TFLOPS, pipeline_cost

ARCH = tiny_arch(num_layers=8)
QWEN72B = PRESETS["qwen2.5-72b"]


def _pack(seq: int, docs: int, responses_per_doc: int) -> PackedInput:
    """``docs`` equal documents, each ending in ``responses_per_doc`` response tokens (as many loss positions:
    the token before each one predicts it)."""
    n = seq // docs
    loss = torch.zeros(n)
    loss[n - responses_per_doc :] = 1
    return PackedInput.from_documents([(torch.arange(n) % 7, loss) for _ in range(docs)], pad_to=seq)


def _total(cost) -> float:
    return sum(s.forward_flops + s.backward_flops + s.inner_flops for s in cost.stages)


def test_pp1_sft_flops_are_sft_flops():
    inp = _pack(512, 4, 16)
    assert inp.num_response_tokens == 64 and inp.num_tokens == 512
    work = mp.Workload(seq_length=512, focusft=False, documents_per_pack=4, response_fraction=64 / 512)
    (stage,) = pipeline_cost(ARCH, mp.Layout(), work, micro_batches=1).stages
    assert stage.forward_flops + stage.backward_flops == sft_flops(ARCH, inp)
    assert stage.backward_flops == 2 * stage.forward_flops and stage.inner_flops == 0
    # TP x CP split every FLOP over their GPUs; the time is FLOPs at the assumed throughput
    split = pipeline_cost(ARCH, mp.Layout(tp=2, cp=2), work, 1).stages[0]
    assert split.forward_flops == pytest.approx(stage.forward_flops / 4)
    assert stage.seconds == pytest.approx(sft_flops(ARCH, inp) / (DEFAULT_ACHIEVED_TFLOPS * 1e12))
    assert DEFAULT_ACHIEVED_TFLOPS == pytest.approx(0.4 * 989)


def test_recompute_adds_what_it_runs_again():
    def stage(recompute):
        work = mp.Workload(seq_length=512, focusft=False, recompute=recompute, response_fraction=0.0)
        return pipeline_cost(ARCH, mp.Layout(), work, 1).stages[0]

    none, selective, full = stage("none"), stage("selective"), stage("full")
    assert none.forward_flops == selective.forward_flops == full.forward_flops
    attention = attention_flops(ARCH, causal_pairs([64] * 8))  # 8 documents of 64 tokens
    assert selective.backward_flops - none.backward_flops == ARCH.num_layers * attention
    assert full.backward_flops - none.backward_flops == none.forward_flops  # every layer once more


@pytest.mark.parametrize("focusft", [False, True])
def test_stages_add_up_to_the_whole_model(focusft):
    work = mp.Workload(seq_length=1024, focusft=focusft, layer_fraction=0.25)  # fast layers 6, 7: local at PP<=4
    whole = pipeline_cost(ARCH, mp.Layout(), work, micro_batches=4)
    for layout in (mp.Layout(pp=2), mp.Layout(pp=4), mp.Layout(pp=3, first_stage_layers=2, last_stage_layers=2)):
        cost = pipeline_cost(ARCH, layout, work, micro_batches=4)
        assert cost.case == ("local" if focusft else "none")
        assert [len(s.layers) for s in cost.stages] == [len(r) for r in layout.split(8).ranges()]
        assert _total(cost) == pytest.approx(_total(whole), rel=1e-12)
        assert [s.inner_flops > 0 for s in cost.stages] == [focusft and s.stage == layout.pp - 1 for s in cost.stages]


def test_balanced_sft_bubble_and_an_uneven_split_imbalance():
    work = mp.Workload(seq_length=1024, focusft=False, response_fraction=0.0)  # no output layer: equal stages
    even = pipeline_cost(ARCH, mp.Layout(pp=4), work, micro_batches=6)
    assert even.imbalance == pytest.approx(1.0)
    assert even.bubble == pytest.approx(3 / 9)  # (P - 1) / (m + P - 1)
    assert even.step_seconds == pytest.approx(9 * even.stages[0].seconds)
    uneven = pipeline_cost(ARCH, mp.Layout(pp=2, first_stage_layers=6), work, micro_batches=6)
    per_layer = even.stages[0].seconds / 2
    assert [s.seconds for s in uneven.stages] == pytest.approx([6 * per_layer, 2 * per_layer])
    assert uneven.imbalance == pytest.approx(6 / 4) and uneven.slowest_stage == 0
    assert uneven.step_seconds == pytest.approx(7 * 6 * per_layer)
    assert uneven.bubble == pytest.approx(1 - 6 * 8 * per_layer / (2 * 7 * 6 * per_layer))


def test_spanning_fast_layers_cost_more_than_local_ones():
    work = mp.Workload(seq_length=4096)

    def best(case):  # the fastest PP=2 split of 72B whose fast layers 52..79 are local / spanning
        costs = [pipeline_cost(QWEN72B, mp.Layout(tp=8, pp=2, first_stage_layers=f), work, 32) for f in range(20, 61)]
        return min((c for c in costs if c.case == case), key=lambda c: c.step_seconds)

    local, spanning = best("local"), best("spanning")
    assert local.inner_phase_seconds == 0 and spanning.inner_phase_seconds > 0
    assert spanning.step_seconds > 1.5 * local.step_seconds

    # PP=4: the same inner steps as the local split, plus one forward without a graph of the layers below the
    # fast ones (stages 0, 1 and stage 2's layers 40..51)
    a = pipeline_cost(QWEN72B, mp.Layout(tp=8, pp=4, first_stage_layers=18, last_stage_layers=28), work, 32)
    b = pipeline_cost(QWEN72B, mp.Layout(tp=8, pp=4), work, 32)  # fast layers on stages 2 and 3
    assert (a.case, b.case) == ("local", "spanning")
    one_layer = b.stages[0].forward_flops / 20
    assert _total(b) - _total(a) == pytest.approx(52 * one_layer, rel=1e-9)
    # the inner phase: the chain of stages 2 and 3 takes each of the 32 micro-batches in turn, after the first
    # one's way up through stages 0 and 1 (which run ahead at their own pace)
    chain = b.stages[2].inner_seconds + b.stages[3].inner_seconds
    assert b.inner_phase_seconds == pytest.approx(2 * b.stages[0].inner_seconds + 32 * chain)
    assert b.step_seconds == pytest.approx(b.inner_phase_seconds + 35 * max(s.seconds for s in b.stages))


def test_the_table_and_bad_inputs():
    cost = pipeline_cost(QWEN72B, mp.Layout(tp=8, pp=2, sequence_parallel=True), mp.Workload(), 16)
    table = cost.table()
    assert table.count("\n| ") == 3 and "| 1 | 40-79 | 28 |" in table
    assert "1F1B (16 + 2 - 1)" in table and "bubble" in table and "imbalance" in table
    assert cost.to_dict()["step_seconds"] == cost.step_seconds
    with pytest.raises(ConfigError, match="--achieved-tflops must be > 0"):
        pipeline_cost(ARCH, mp.Layout(), mp.Workload(), 1, achieved_tflops=0)
    with pytest.raises(ConfigError, match="--micro-batches"):
        pipeline_cost(ARCH, mp.Layout(pp=2), mp.Workload(), None)
