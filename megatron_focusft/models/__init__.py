"""Model definitions (Qwen2 / Qwen2.5 on Megatron-Core)."""
