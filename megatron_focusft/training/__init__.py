"""The training program: flags, the loop, checkpoints, logs (optimizer and scheduler from megatron-core)."""
