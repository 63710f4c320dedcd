"""Qwen2 / Qwen2.5 as a Megatron-Core ``GPTModel``.

Three things live here: the architecture description (:class:`Qwen2Arch`, read from a Hugging Face
``config.json`` or taken from :data:`PRESETS`), its translation into Megatron's ``TransformerConfig``, and
the layer specs that say which module implements each part of a layer.  Everything FocuSFT changes in the
model (the core attention, the fast-weight linears) is injected through those specs.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from megatron_focusft.models.norm import RMSNorm

TransformerImpl = Literal["local", "te"]

# Megatron pads the embedding table so that it splits evenly over tensor-parallel ranks.  We pad to a
# multiple of this constant *independent of the TP size*, so that one checkpoint loads at any TP size that
# divides it (every power of two up to 128).  Real Qwen2.5 tables (151936, 152064 rows) need no padding.
VOCAB_PAD_MULTIPLE = 128


class ConfigError(ValueError):
    """A model configuration or checkpoint that cannot describe a Qwen2 model (message names the cause)."""


# The special-token ids of ``config.json`` that conversions carry from the source checkpoint to the export:
# they are not architecture (a base model ends with <|endoftext|> 151643, an Instruct one with <|im_end|>
# 151645), so they live in the checkpoint metadata (``CheckpointMeta.token_ids``), not in :class:`Qwen2Arch`.
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def hf_token_ids(config: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`TOKEN_ID_KEYS` that ``config`` sets (not null), as it sets them (an id or a list of ids)."""
    return {k: config[k] for k in TOKEN_ID_KEYS if config.get(k) is not None}


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a Hugging Face folder as a dict; errors name the file."""
    path = Path(hf_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (is {hf_dir} a Hugging Face checkpoint folder?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: unreadable ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return config


@dataclass(frozen=True)
class Qwen2Arch:
    """The architecture numbers of a Qwen2 / Qwen2.5 checkpoint (what ``config.json`` says)."""

    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    ffn_hidden_size: int
    vocab_size: int
    tie_word_embeddings: bool
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE

    def check_tensor_parallel(self, tp: int) -> None:
        """Raise :class:`ConfigError` if ``tp`` cannot split this model."""
        if tp < 1:
            raise ConfigError(f"tensor-parallel size must be >= 1, got {tp}")
        for what, n in (
            ("num_key_value_heads", self.num_key_value_heads),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.ffn_hidden_size),
            ("padded vocabulary", self.padded_vocab_size),
        ):
            if n % tp:
                raise ConfigError(f"tensor-parallel size {tp} does not divide {what} = {n}")

    # ---- Hugging Face config.json <-> Qwen2Arch -------------------------------------------------------

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], source: str = "config.json") -> Qwen2Arch:
        """Read a Hugging Face ``Qwen2ForCausalLM`` config; errors name ``source`` and the bad field."""
        archs = config.get("architectures") or []
        model_type = config.get("model_type")
        if model_type != "qwen2" or (archs and "Qwen2ForCausalLM" not in archs):
            raise ConfigError(
                f"{source}: model_type={model_type!r}, architectures={archs} is not a Qwen2ForCausalLM "
                "checkpoint (only Qwen2 / Qwen2.5 are supported)"
            )
        if config.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act={config['hidden_act']!r}, expected 'silu'")
        if config.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported")
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ConfigError(f"{source}: rope scaling {rope} is not supported")
        rope_theta = config.get("rope_theta", rope.get("rope_theta", 1_000_000.0))
        try:
            arch = cls(
                hidden_size=int(config["hidden_size"]),
                num_layers=int(config["num_hidden_layers"]),
                num_attention_heads=int(config["num_attention_heads"]),
                num_key_value_heads=int(config.get("num_key_value_heads", config["num_attention_heads"])),
                ffn_hidden_size=int(config["intermediate_size"]),
                vocab_size=int(config["vocab_size"]),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta),
                max_position_embeddings=int(config.get("max_position_embeddings", 32768)),
                initializer_range=float(config.get("initializer_range", 0.02)),
            )
        except KeyError as e:
            raise ConfigError(f"{source}: missing field {e.args[0]!r}") from None
        if arch.hidden_size % arch.num_attention_heads:
            raise ConfigError(f"{source}: hidden_size is not divisible by num_attention_heads")
        if arch.num_attention_heads % arch.num_key_value_heads:
            raise ConfigError(f"{source}: num_attention_heads is not divisible by num_key_value_heads")
        return arch

    @classmethod
    def from_hf_dir(cls, hf_dir: str | Path) -> Qwen2Arch:
        return cls.from_hf_config(read_hf_config(hf_dir), source=str(Path(hf_dir) / "config.json"))

    def to_hf_config(self, torch_dtype: str = "bfloat16", token_ids: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The ``config.json`` that ``transformers`` loads as ``Qwen2ForCausalLM``.

        ``token_ids`` (:func:`hf_token_ids` of the source config) are written as given; without them (a model
        of no source checkpoint) an Instruct model's ids are assumed where the vocabulary has them.
        """
        if token_ids is None:
            # Qwen2.5's <|endoftext|> / <|im_end|>, where the vocabulary has them (not in tiny test models).
            token_ids = {"bos_token_id": 151643, "eos_token_id": 151645} if self.vocab_size > 151645 else {}
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.ffn_hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "use_cache": True,
            "torch_dtype": torch_dtype,
            **{k: token_ids[k] for k in TOKEN_ID_KEYS if token_ids.get(k) is not None},
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The published Qwen2.5 sizes, as in the Instruct models' configs: RMSNorm eps 1e-6, RoPE base 1e6, QKV bias,
# SwiGLU (the base 14B/32B/72B configs say eps 1e-5; a conversion always reads the checkpoint's config.json).
PRESETS: dict[str, Qwen2Arch] = {
    "qwen2.5-0.5b": Qwen2Arch(896, 24, 14, 2, 4864, 151936, True),
    "qwen2.5-1.5b": Qwen2Arch(1536, 28, 12, 2, 8960, 151936, True),
    "qwen2.5-3b": Qwen2Arch(2048, 36, 16, 2, 11008, 151936, True),
    "qwen2.5-7b": Qwen2Arch(3584, 28, 28, 4, 18944, 152064, False),
    "qwen2.5-14b": Qwen2Arch(5120, 48, 40, 8, 13824, 152064, False),
    "qwen2.5-32b": Qwen2Arch(5120, 64, 40, 8, 27648, 152064, False),
    "qwen2.5-72b": Qwen2Arch(8192, 80, 64, 8, 29568, 152064, False),
}


def get_preset(name: str) -> Qwen2Arch:
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def transformer_config(
    arch: Qwen2Arch,
    *,
    tensor_model_parallel_size: int = 1,
    sequence_parallel: bool = False,
    context_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    params_dtype: torch.dtype = torch.float32,
    use_cpu_initialization: bool = False,
    perform_initialization: bool = True,
    **overrides: Any,
) -> TransformerConfig:
    """Megatron ``TransformerConfig`` for ``arch``.

    Megatron's defaults that would silently change Qwen2.5's numbers are overridden: RMSNorm eps 1e-6
    (not 1e-5), no hidden/attention dropout (not 0.1), bias only on QKV, SwiGLU, no fused kernels that
    need CUDA or apex.
    """
    arch.check_tensor_parallel(tensor_model_parallel_size)
    if sequence_parallel and tensor_model_parallel_size == 1:
        sequence_parallel = False  # Megatron treats SP at TP=1 as a no-op; keep the config honest.
    kwargs: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_key_value_heads,
        ffn_hidden_size=arch.ffn_hidden_size,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        add_bias_linear=False,
        add_qkv_bias=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=arch.initializer_range,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tensor_model_parallel_size,
        sequence_parallel=sequence_parallel,
        context_parallel_size=context_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        pipeline_dtype=params_dtype,  # the dtype of the activations sent between stages
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=perform_initialization,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def layer_spec(
    core_attention: type | ModuleSpec,
    mlp_linear_fc1: type | ModuleSpec = ColumnParallelLinear,
    mlp_linear_fc2: type | ModuleSpec = RowParallelLinear,
) -> ModuleSpec:
    """A Qwen2 decoder layer from Megatron-Core's local (non-TE) modules.

    ``core_attention`` is the attention backend (dense, flex, ...); the FFN linears are parameters so the
    top layers can carry fast weights.
    """
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=core_attention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=_mlp_spec(MLPSubmodules(linear_fc1=mlp_linear_fc1, linear_fc2=mlp_linear_fc2)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def _mlp_spec(submodules: MLPSubmodules) -> Callable[..., Any] | ModuleSpec:
    """The layer's ``mlp`` entry.  megatron-core >= 0.18 builds a dense MLP through the
    ``MLP.as_mlp_submodule`` builder (a ``ModuleSpec(module=MLP)`` still works there, but is re-wrapped
    with a warning for every layer); older releases take the ``ModuleSpec``."""
    if hasattr(MLP, "as_mlp_submodule"):
        return functools.partial(MLP.as_mlp_submodule, submodules=submodules)
    return ModuleSpec(module=MLP, submodules=submodules)


def block_spec(
    config: TransformerConfig,
    layer_spec_for: Callable[[int], ModuleSpec],
    final_norm: type = RMSNorm,
) -> TransformerBlockSubmodules:
    """Per-layer specs of this pipeline stage's layers (global layer ``i`` -> ``layer_spec_for(i)``) plus the
    final norm.  Megatron builds every spec of a ``TransformerBlockSubmodules``, so the stage's slice is taken
    here, with Megatron's own offset and count (even or uneven split)."""
    offset = get_transformer_layer_offset(config)
    layers = range(offset, offset + get_num_layers_to_build(config))
    return TransformerBlockSubmodules(layer_specs=[layer_spec_for(i) for i in layers], layer_norm=final_norm)


def build_gpt_model(
    arch: Qwen2Arch,
    config: TransformerConfig,
    spec: TransformerBlockSubmodules | ModuleSpec,
    max_sequence_length: int | None = None,
    parallel_output: bool = True,
    model_class: type[GPTModel] = GPTModel,
    model_kwargs: Mapping[str, Any] | None = None,
) -> GPTModel:
    """The ``GPTModel`` (or ``model_class``, a subclass taking ``model_kwargs`` too) for ``arch``: RoPE (base
    from the arch), tied or untied output layer; under pipeline parallelism this stage's part (the embedding
    on the first stage, the final norm and output layer on the last)."""
    from megatron.core import parallel_state

    return model_class(
        config=config,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        transformer_layer_spec=spec,
        vocab_size=arch.padded_vocab_size,
        max_sequence_length=max_sequence_length or arch.max_position_embeddings,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta),
        parallel_output=parallel_output,
        **(model_kwargs or {}),
    )


def build_model(
    arch: Qwen2Arch,
    core_attention: type | ModuleSpec,
    *,
    params_dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    perform_initialization: bool = True,
    mlp_linears_for_layer: Callable[[int], tuple[type | ModuleSpec, type | ModuleSpec]] | None = None,
    model_class: type[GPTModel] = GPTModel,
    model_kwargs: Mapping[str, Any] | None = None,
    **config_overrides: Any,
) -> GPTModel:
    """The Qwen2 ``GPTModel`` for the tensor-parallel group Megatron's parallel state holds.

    Weights are created on the CPU (``use_cpu_initialization``) so that every TP size draws the same
    global tensors from the same seed and TP=2 computes exactly what TP=1 does (callers move the model
    to the GPU); ``perform_initialization``
    False skips the random draws when a checkpoint is about to overwrite them.
    ``mlp_linears_for_layer(i)`` gives layer i's (fc1, fc2) classes, e.g. fast-weight linears on top layers;
    ``model_class``/``model_kwargs`` a ``GPTModel`` subclass (``models.focusft.FocuSFTModel``).
    """
    from megatron.core import parallel_state

    config = transformer_config(
        arch,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        use_cpu_initialization=True,
        perform_initialization=perform_initialization,
        **config_overrides,
    )

    def spec_for(i: int) -> ModuleSpec:
        fc1, fc2 = mlp_linears_for_layer(i) if mlp_linears_for_layer else (ColumnParallelLinear, RowParallelLinear)
        return layer_spec(core_attention, fc1, fc2)

    model = build_gpt_model(
        arch, config, block_spec(config, spec_for), model_class=model_class, model_kwargs=model_kwargs
    )
    if not perform_initialization:
        _mark_tensor_parallel_parameters(model)
    return model


# Tensor-parallel partition dimension of every Qwen2 parameter, by name suffix (absent: replicated).  The
# gated fc1 is split along dim 0 per half (rank i holds [gate_i; up_i]).
TP_PARTITION_DIM: dict[str, int] = {
    "embedding.word_embeddings.weight": 0,
    "output_layer.weight": 0,
    "linear_qkv.weight": 0,
    "linear_qkv.bias": 0,
    "linear_fc1.weight": 0,
    "linear_proj.weight": 1,
    "linear_fc2.weight": 1,
}


def tp_partition_dim(name: str) -> int | None:
    """The dimension along which Qwen2 parameter ``name`` is split over tensor-parallel ranks, or None."""
    for suffix, dim in TP_PARTITION_DIM.items():
        if name.endswith(suffix):
            return dim
    return None


def _mark_tensor_parallel_parameters(model: torch.nn.Module) -> None:
    """Set Megatron's ``tensor_model_parallel``/``partition_dim`` attributes from :data:`TP_PARTITION_DIM`.

    Megatron sets them only while drawing random initial weights on the CPU; a model built without that
    draw (a checkpoint is about to be loaded) would otherwise count split weights as duplicates in the
    gradient-norm computation.
    """
    for name, param in model.named_parameters():
        dim = tp_partition_dim(name)
        if dim is not None:
            param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, dim, 1


def tiny_arch(**changes: Any) -> Qwen2Arch:
    """A few-hundred-kilobyte Qwen2 for tests and the quickstart (vocabulary needs padding)."""
    base = Qwen2Arch(
        hidden_size=64,
        num_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        ffn_hidden_size=160,
        vocab_size=1000,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
    )
    return replace(base, **changes)
