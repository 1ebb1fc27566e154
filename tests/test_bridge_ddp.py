"""Multi-process data parallel (npapprox.bridge.ddp): 2 CPU processes, gloo on 127.0.0.1."""
from __future__ import annotations

import copy
import os
import time

import numpy as np
import pytest
from conftest import require_torch

import npapprox as na

torch = require_torch()
from npapprox import bridge
from npapprox.bridge import ddp

LR = 0.1


def test_two_ranks_agree_and_equal_one_process_averaging_the_shards():
    """ResNet-8 under Paper(4), 3 SGD steps on batches of 8 (4 per rank): the ranks'
    parameters are identical after every step, and equal, to float32 tolerance, one
    process that computes both shards' gradients itself, averages them and steps
    (DDP sums the shards' gradients divided by 2 in another order: 1e-5 of each
    tensor's largest entry)."""
    na.nn.manual_seed(0)
    module = bridge.to_torch(na.nn.build_model("resnet8"))
    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((8, 3, 16, 16)).astype(np.float32), rng.integers(0, 10, 8)) for _ in range(3)]
    ranks = ddp.train(module, batches, na.Paper(4), nproc=2, lr=LR, timeout=60, deadline=240)

    ref = copy.deepcopy(module)
    params = dict(ref.named_parameters())
    for step, (x, y) in enumerate(batches):
        grads = []
        for r in range(2):
            ref.zero_grad()
            with bridge.storage_policy(na.Paper(4)):
                loss = torch.nn.functional.cross_entropy(ref(torch.from_numpy(ddp.shard(x, r, 2))),
                                                         torch.from_numpy(ddp.shard(y, r, 2)))
            loss.backward()
            grads.append({n: p.grad.clone() for n, p in params.items()})
        with torch.no_grad():
            for n, p in params.items():
                p -= LR * (grads[0][n] + grads[1][n]) / 2
        for n, p in params.items():
            a, b = ranks[0][step][n], ranks[1][step][n]
            assert np.array_equal(a, b), f"ranks differ in {n} after step {step}"
            want = p.detach().numpy()
            np.testing.assert_allclose(a, want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=f"{n} step {step}")


def _fails_on_rank_1(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank 1")
    torch.distributed.barrier()   # rank 0 waits for a rank that is gone
    return rank


def _dies_on_rank_1(rank, world_size):
    if rank == 1:
        os._exit(3)                # no exception, no result: a crash
    torch.distributed.barrier()
    return rank


def test_a_failing_rank_fails_the_run_with_its_error_quickly():
    """The rank that raised is named with its error, though the other rank then
    fails too (its peer closed the connection); nobody waits for the group's 60 s timeout."""
    start = time.monotonic()
    with pytest.raises(ddp.RankError, match=r"rank 1 failed: ValueError: boom on rank 1") as err:
        ddp.launch(_fails_on_rank_1, 2, timeout=60, deadline=120)
    assert err.value.rank == 1 and "Traceback" in err.value.error
    assert time.monotonic() - start < 45
    start = time.monotonic()
    with pytest.raises(ddp.RankError, match=r"rank 1 failed: exit code 3"):
        ddp.launch(_dies_on_rank_1, 2, timeout=60, deadline=120)
    assert time.monotonic() - start < 45


def test_launch_rejects_bad_arguments():
    with pytest.raises(ValueError, match="nproc must be a positive integer"):
        ddp.launch(_fails_on_rank_1, 0)
    with pytest.raises(ValueError, match="backend must be 'gloo'"):
        ddp.launch(_fails_on_rank_1, 2, backend="mpi")
    assert [list(ddp.shard(np.arange(7), r, 3)) for r in range(3)] == [[0, 1], [2, 3], [4, 5, 6]]
