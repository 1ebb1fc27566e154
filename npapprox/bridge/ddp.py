"""Multi-process data parallel training with torch's DistributedDataParallel.

``launch(fn, nproc, *args)`` starts ``nproc`` processes (spawn: a script that
calls it needs the ``if __name__ == "__main__":`` guard), joins them in one
process group (gloo on the CPU, NCCL when ``backend="nccl"``) at
``tcp://127.0.0.1:<free port>``, runs ``fn(rank, world_size, *args)`` in each and
returns the ranks' results in rank order. Tensors in ``args`` reach the children
in shared memory (torch's pickling): a worker that changes them copies them first.

Every wait is bounded: the group's collectives time out after ``timeout``
seconds, and the parent watches the children. When a rank fails (an exception,
reported before it leaves the group, or a crash), the others are stopped and
``RankError`` names the rank that failed first (a crashed rank, else the
earliest report: the others' "connection closed" errors follow from it) and
carries its traceback. A run that outlives ``deadline`` seconds is stopped the
same way (``TimeoutError``).

``train(module, batches, policy, ...)`` is the ready-made worker: each rank
trains a copy of ``module`` (a bridge module, ``npapprox.bridge.to_torch``)
wrapped in ``DistributedDataParallel`` on its shard (``shard``) of every batch,
with the storage policy in force, plain SGD; DDP averages the gradients. It
returns every rank's parameters after every step, so callers can check that
the ranks agree.
"""
from __future__ import annotations

import copy
import datetime
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from .storage import storage_policy


class RankError(RuntimeError):
    """A rank failed; ``rank`` and its formatted ``error`` (the child's traceback)."""

    def __init__(self, rank: int, error: str):
        last = error.strip().splitlines()[-1] if error.strip() else "exited without a result"
        super().__init__(f"rank {rank} failed: {last}")
        self.rank, self.error = rank, error


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def shard(batch, rank: int, world_size: int):
    """Rank ``rank``'s contiguous part of ``batch`` along axis 0 (sizes differ by at most 1)."""
    n = len(batch)
    lo, hi = rank * n // world_size, (rank + 1) * n // world_size
    return batch[lo:hi]


def _child(fn, rank, world_size, addr, backend, timeout, threads, results, args):
    if threads:
        torch.set_num_threads(threads)
    if addr.startswith("tcp://127.0.0.1"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    joined = False
    try:
        torch.distributed.init_process_group(backend, init_method=addr, rank=rank, world_size=world_size,
                                             timeout=datetime.timedelta(seconds=timeout))
        joined = True
        results.put((rank, True, fn(rank, world_size, *args), time.time()))
    except BaseException:  # any failure goes back to the parent, named by rank
        # reported before leaving the group: the other ranks fail only after this one did
        results.put((rank, False, traceback.format_exc(), time.time()))
    finally:
        if joined:
            torch.distributed.destroy_process_group()


def _first_failure(results, first, procs, grace=1.0):
    """The root failure: a rank that died without reporting (a crash), else the
    earliest of ``first`` and the failures arriving within ``grace`` seconds (a
    rank's failure makes the others fail after it)."""
    failures, end = [first], time.monotonic() + grace
    while time.monotonic() < end:
        try:
            item = results.get(timeout=max(0.0, end - time.monotonic()))
        except queue.Empty:
            break
        if not item[1]:
            failures.append(item)
    reported = {f[0] for f in failures}
    crashed = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in reported]
    if crashed:
        return RankError(crashed[0], f"exit code {procs[crashed[0]].exitcode}")
    rank, _, error, _ = min(failures, key=lambda f: f[3])
    return RankError(rank, error)


def launch(fn, nproc: int, *args, backend: str = "gloo", timeout: float = 60.0, deadline: float = 600.0,
           threads: int | None = 1, host: str = "127.0.0.1") -> list:
    """Run ``fn(rank, nproc, *args)`` in ``nproc`` processes of one process group;
    their results in rank order. ``fn`` and ``args`` must be picklable (spawn)."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive integer, got {nproc!r}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' (CPU) or 'nccl' (CUDA), got {backend!r}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    addr = f"tcp://{host}:{free_port(host)}"
    procs = [ctx.Process(target=_child, args=(fn, r, nproc, addr, backend, timeout, threads, results, args),
                         daemon=True) for r in range(nproc)]
    for p in procs:
        p.start()
    out, end = {}, time.monotonic() + deadline
    try:
        while len(out) < nproc:
            try:
                item = results.get(timeout=0.2)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in out]
                if dead:
                    try:   # its error may still be on its way
                        item = results.get(timeout=2.0)
                    except queue.Empty:
                        raise RankError(dead[0], f"exit code {procs[dead[0]].exitcode}") from None
                elif time.monotonic() > end:
                    raise TimeoutError(f"data-parallel run exceeded its deadline of {deadline:g} s; "
                                       f"ranks without a result: {sorted(set(range(nproc)) - set(out))}") from None
                else:
                    continue
            if not item[1]:
                raise _first_failure(results, item, procs)
            out[item[0]] = item[2]
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
    return [out[r] for r in range(nproc)]


def _train_worker(rank, world_size, module, batches, policy, lr):

    nccl = torch.distributed.get_backend() == "nccl"
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}") if nccl else torch.device("cpu")
    # tensors arrive in shared memory (torch's pickling): each rank trains its own copy
    module = copy.deepcopy(module).to(device)
    model = DistributedDataParallel(module, device_ids=[device.index] if nccl else None)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    snapshots = []
    for x, y in batches:
        x, y = (shard(torch.as_tensor(a), rank, world_size).to(device) for a in (x, y))
        opt.zero_grad()
        with storage_policy(policy):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()                       # DDP averages the gradients over the ranks
        opt.step()
        snapshots.append({n: p.detach().cpu().numpy().copy() for n, p in module.named_parameters()})
    return snapshots


def train(module, batches, policy, nproc: int = 2, lr: float = 0.1, **launch_options) -> list:
    """Train ``module`` with SGD on ``batches`` ((x, labels) pairs, whole batches:
    each rank takes its ``shard``) under ``policy``, in ``nproc`` processes (with
    ``backend="nccl"``: rank r on GPU r).
    Returns, per rank, the parameters (NumPy, by name) after every step."""
    batches = [(np.asarray(x), np.asarray(y)) for x, y in batches]
    return launch(_train_worker, nproc, module, batches, policy, lr, **launch_options)


__all__ = ["RankError", "free_port", "launch", "shard", "train"]
