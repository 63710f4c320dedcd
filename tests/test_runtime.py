"""The CPU runtime: gloo groups, Megatron parallel state, the RNG tracker on the CPU generator."""

import torch

from tests.distributed import run_distributed


def _ranks_and_rng():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():
        tp_draw = torch.rand(3)
    dp_draw = torch.rand(3)
    draws = [None] * dist.get_world_size()
    dist.all_gather_object(draws, (tp_draw, dp_draw))
    return {
        "tp_size": ps.get_tensor_model_parallel_world_size(),
        "dp_size": ps.get_data_parallel_world_size(),
        "draws": draws,
    }


def test_two_rank_tensor_parallel_group_and_rng():
    out = run_distributed(_ranks_and_rng, world_size=2, tp=2)
    assert out["tp_size"] == 2 and out["dp_size"] == 1
    (tp0, dp0), (tp1, dp1) = out["draws"]
    # The model-parallel state differs per TP rank (Megatron: seed + 2718 + tp_rank); the default one agrees.
    assert not torch.equal(tp0, tp1)
    assert torch.equal(dp0, dp1)
