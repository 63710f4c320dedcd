"""Qwen2 architecture description: presets, config mapping, layouts, TP checks, the TE fallback."""

from __future__ import annotations

import pytest
import torch

from megatron_focusft.convert import layout
from megatron_focusft.models import qwen2

# Published parameter counts (Qwen2.5 technical report / model cards), in billions.
PUBLISHED_PARAMS_B = {
    "qwen2.5-0.5b": 0.49,
    "qwen2.5-1.5b": 1.54,
    "qwen2.5-3b": 3.09,
    "qwen2.5-7b": 7.61,
    "qwen2.5-14b": 14.7,
    "qwen2.5-32b": 32.5,
    "qwen2.5-72b": 72.7,
}


def _param_count(arch: qwen2.Qwen2Arch) -> int:
    return sum(torch.Size(layout.hf_shape(n, arch)).numel() for n in layout.hf_names(arch))


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS_B))
def test_presets_have_the_published_sizes(name):
    arch = qwen2.get_preset(name)
    assert _param_count(arch) / 1e9 == pytest.approx(PUBLISHED_PARAMS_B[name], rel=0.01)
    assert arch.padded_vocab_size == arch.vocab_size  # real Qwen2.5 tables need no padding


def test_transformer_config_overrides_megatron_defaults_that_change_qwen_numbers():
    cfg = qwen2.transformer_config(qwen2.get_preset("qwen2.5-7b"), tensor_model_parallel_size=4)
    assert cfg.layernorm_epsilon == 1e-6 and cfg.normalization == "RMSNorm"
    assert cfg.hidden_dropout == 0.0 and cfg.attention_dropout == 0.0
    assert cfg.add_qkv_bias and not cfg.add_bias_linear and cfg.gated_linear_unit
    assert cfg.num_query_groups == 4 and cfg.kv_channels == 128 and cfg.ffn_hidden_size == 18944


def test_hf_config_round_trip_and_errors():
    arch = qwen2.get_preset("qwen2.5-0.5b")
    assert qwen2.Qwen2Arch.from_hf_config(arch.to_hf_config()) == arch
    cfg = arch.to_hf_config()
    del cfg["hidden_size"]
    with pytest.raises(qwen2.ConfigError, match="config.json: missing field 'hidden_size'"):
        qwen2.Qwen2Arch.from_hf_config(cfg)
    with pytest.raises(qwen2.ConfigError, match="tensor-parallel size 4 does not divide num_key_value_heads"):
        arch.check_tensor_parallel(4)
    with pytest.raises(qwen2.ConfigError, match="unknown preset 'qwen3'"):
        qwen2.get_preset("qwen3")


def test_qkv_layout_is_per_kv_group():
    """Rows of Megatron's fused QKV: for each KV group g, its query heads, then k_g, then v_g."""
    arch = qwen2.tiny_arch(hidden_size=48, num_attention_heads=6, num_key_value_heads=2)
    d = arch.head_dim
    # Tag every row with (tensor, head): q heads 0..5, k heads 0..1, v heads 0..1.
    q = torch.arange(6).repeat_interleave(d).float()
    k = 100 + torch.arange(2).repeat_interleave(d).float()
    v = 200 + torch.arange(2).repeat_interleave(d).float()
    fused = layout.qkv_to_megatron(q, k, v, arch)
    heads_in_order = fused.reshape(-1, d)[:, 0].tolist()
    assert heads_in_order == [0, 1, 2, 100, 200, 3, 4, 5, 101, 201]
    assert all(torch.equal(a, b) for a, b in zip(layout.qkv_from_megatron(fused, arch), (q, k, v)))


def test_tp_shards_line_up_with_megatron_local_layouts():
    gate, up = torch.arange(8.0), 100 + torch.arange(8.0)
    fc1 = torch.cat([gate, up])
    # rank 1 of 2 holds [gate_1; up_1]
    assert layout.tp_shard("x.linear_fc1.weight", fc1, 0, 1, 2).tolist() == [4, 5, 6, 7, 104, 105, 106, 107]
    w = torch.arange(12.0).reshape(3, 4)
    assert torch.equal(layout.tp_shard("x.linear_fc2.weight", w, 1, 1, 2), w[:, 2:])
    assert torch.equal(layout.tp_shard("x.input_layernorm.weight", w, None, 1, 2), w)


def test_hf_config_token_ids_are_written_as_given():
    arch = qwen2.get_preset("qwen2.5-0.5b")
    base = {"bos_token_id": 151643, "eos_token_id": 151643, "pad_token_id": None}
    assert qwen2.hf_token_ids(base) == {"bos_token_id": 151643, "eos_token_id": 151643}  # null is no id
    cfg = arch.to_hf_config(token_ids=qwen2.hf_token_ids(base))
    assert (cfg["eos_token_id"], "pad_token_id" in cfg) == (151643, False)
    assert arch.to_hf_config(token_ids={"eos_token_id": [151645, 151643]})["eos_token_id"] == [151645, 151643]
    assert not {"bos_token_id", "eos_token_id"} & set(arch.to_hf_config(token_ids={}))
    # No source config (a preset): the Instruct models' ids, where the vocabulary has them.
    assert (arch.to_hf_config()["bos_token_id"], arch.to_hf_config()["eos_token_id"]) == (151643, 151645)
    assert "eos_token_id" not in qwen2.tiny_arch().to_hf_config()
