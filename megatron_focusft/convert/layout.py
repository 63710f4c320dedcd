"""Pure tensor-layout functions between Hugging Face Qwen2 and Megatron-Core ``GPTModel``.

Megatron's layouts (TP=1 view, which is also the global layout a distributed checkpoint stores):
- ``linear_qkv``: rows grouped by KV group, ``[q heads of group g; k_g; v_g]`` for g = 0..G-1, so that a
  tensor-parallel rank owning groups i*G/tp .. (i+1)*G/tp - 1 holds one contiguous row block;
- ``linear_fc1``: ``[gate; up]``; under TP rank i holds ``[gate_i; up_i]`` (see :func:`tp_shard`);
- embedding / output layer: ``padded_vocab_size`` rows, the rows past the real vocabulary zero.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from megatron_focusft.models.qwen2 import Qwen2Arch

LAYER_PREFIX = "decoder.layers."


def qkv_to_megatron(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: Qwen2Arch) -> torch.Tensor:
    """Interleave HF q/k/v projections (weights [out, h] or biases [out]) per KV group."""
    g, d = arch.num_key_value_heads, arch.head_dim
    per_group = arch.num_attention_heads // g
    rest = q.shape[1:]
    return torch.cat(
        [q.reshape(g, per_group * d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)], dim=1
    ).reshape(-1, *rest)


def qkv_from_megatron(qkv: torch.Tensor, arch: Qwen2Arch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`qkv_to_megatron`."""
    g, d = arch.num_key_value_heads, arch.head_dim
    per_group = arch.num_attention_heads // g
    rest = qkv.shape[1:]
    grouped = qkv.reshape(g, (per_group + 2) * d, *rest)
    q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def pad_vocab(table: torch.Tensor, arch: Qwen2Arch) -> torch.Tensor:
    """Append zero rows up to ``arch.padded_vocab_size``."""
    extra = arch.padded_vocab_size - table.shape[0]
    return table if extra == 0 else torch.cat([table, table.new_zeros(extra, *table.shape[1:])])


def hf_names(arch: Qwen2Arch) -> list[str]:
    """Every tensor a Hugging Face Qwen2ForCausalLM checkpoint of ``arch`` holds."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not arch.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [p + f"self_attn.{x}_proj.{w}" for x in "qkv" for w in ("weight", "bias")]
        names += [p + "self_attn.o_proj.weight"]
        names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    return names


def hf_shape(name: str, arch: Qwen2Arch) -> tuple[int, ...]:
    """The shape Hugging Face stores ``name`` with."""
    h, d = arch.hidden_size, arch.head_dim
    q_out, kv_out, ffn = arch.num_attention_heads * d, arch.num_key_value_heads * d, arch.ffn_hidden_size
    leaf = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
    shapes = {
        "model.embed_tokens.weight": (arch.vocab_size, h),
        "lm_head.weight": (arch.vocab_size, h),
        "model.norm.weight": (h,),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q_out, h),
        "self_attn.q_proj.bias": (q_out,),
        "self_attn.k_proj.weight": (kv_out, h),
        "self_attn.k_proj.bias": (kv_out,),
        "self_attn.v_proj.weight": (kv_out, h),
        "self_attn.v_proj.bias": (kv_out,),
        "self_attn.o_proj.weight": (h, q_out),
        "mlp.gate_proj.weight": (ffn, h),
        "mlp.up_proj.weight": (ffn, h),
        "mlp.down_proj.weight": (h, ffn),
    }
    return shapes[leaf]


# One entry per Megatron parameter: (megatron name, the HF names it is made of).
def megatron_sources(arch: Qwen2Arch) -> Iterator[tuple[str, tuple[str, ...]]]:
    yield "embedding.word_embeddings.weight", ("model.embed_tokens.weight",)
    for i in range(arch.num_layers):
        m, p = f"{LAYER_PREFIX}{i}.", f"model.layers.{i}."
        yield m + "input_layernorm.weight", (p + "input_layernorm.weight",)
        for w in ("weight", "bias"):
            srcs = tuple(p + f"self_attn.{x}_proj.{w}" for x in "qkv")
            yield m + f"self_attention.linear_qkv.{w}", srcs
        yield m + "self_attention.linear_proj.weight", (p + "self_attn.o_proj.weight",)
        yield m + "pre_mlp_layernorm.weight", (p + "post_attention_layernorm.weight",)
        yield m + "mlp.linear_fc1.weight", (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
        yield m + "mlp.linear_fc2.weight", (p + "mlp.down_proj.weight",)
    yield "decoder.final_layernorm.weight", ("model.norm.weight",)
    if not arch.tie_word_embeddings:
        yield "output_layer.weight", ("lm_head.weight",)


def to_megatron(name: str, sources: list[torch.Tensor], arch: Qwen2Arch) -> torch.Tensor:
    """Build Megatron parameter ``name`` (global layout) from its HF source tensors."""
    if name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias"):
        return qkv_to_megatron(*sources, arch)
    if name.endswith("linear_fc1.weight"):
        return torch.cat(sources, dim=0)
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return pad_vocab(sources[0], arch)
    (tensor,) = sources
    return tensor


def to_hf(name: str, tensor: torch.Tensor, arch: Qwen2Arch) -> list[torch.Tensor]:
    """Inverse of :func:`to_megatron`: the HF tensors (in :func:`megatron_sources` order)."""
    if name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias"):
        return list(qkv_from_megatron(tensor, arch))
    if name.endswith("linear_fc1.weight"):
        return list(torch.chunk(tensor, 2, dim=0))
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return [tensor[: arch.vocab_size]]
    return [tensor]


def tp_shard(name: str, full: torch.Tensor, partition_dim: int | None, rank: int, size: int) -> torch.Tensor:
    """The slice of global parameter ``full`` that tensor-parallel ``rank`` of ``size`` holds.

    ``partition_dim`` comes from :func:`~megatron_focusft.models.qwen2.tp_partition_dim` (None: replicated).
    The gated fc1 is the one layout that is not a plain chunk: rank i holds ``[gate_i; up_i]``.
    """
    if partition_dim is None or size == 1:
        return full
    if name.endswith("linear_fc1.weight"):
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)
    return full.chunk(size, dim=partition_dim)[rank]


def tp_unshard(name: str, shards: list[torch.Tensor], partition_dim: int | None) -> torch.Tensor:
    """Inverse of :func:`tp_shard`: the global tensor from every rank's shard (rank order)."""
    if partition_dim is None or len(shards) == 1:
        return shards[0]
    if name.endswith("linear_fc1.weight"):
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=partition_dim)
