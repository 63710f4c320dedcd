"""The training program: arguments (flags -> TrainConfig) -> plan (checks and reads, once) -> loop (build, train),
with checkpoints, the optimizer and the logs (optimizer and scheduler from megatron-core)."""
