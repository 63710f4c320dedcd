"""Hugging Face <-> Megatron-Core checkpoint conversion for Qwen2 / Qwen2.5."""
