"""``npapprox train --engine torch``: the engine's training run on a torch model.

``TorchTrainer`` is ``npapprox.train.Trainer`` with the engine hooks
(``place``, ``optimized``, ``step``, ``evaluate``, the state's arrays) done in
torch: the model is ``to_torch`` of the engine's model built from the same
seed, every forward runs under ``bridge.storage_policy`` with the run's policy
object, and the data, augmentation, schedule, logs, progress bar, checkpoints
and ``--resume`` are the Trainer's own. The optimizer is ``npapprox.optim``'s,
updating the torch tensors in place through zero-copy array views
(``TorchParam``: NumPy on the CPU, CuPy through DLPack on CUDA), so its formulas
are the engine's by construction. Checkpoints hold the same names, shapes and
dtypes as the engine's: either engine resumes the other's run.

Data parallel (``nproc`` > 1, or launched by ``torchrun``): each rank wraps the
model in ``DistributedDataParallel`` and takes its ``ddp.shard`` of every batch;
its loss is weighted by its share of the batch, so DDP's average over the ranks
is the whole batch's mean gradient also when a last batch splits unevenly. One
``all_reduce`` per step sums the loss and the correct predictions and agrees on
a stop (SIGINT/SIGTERM reaching any rank stops every rank after the same step).
Evaluation is sharded over the ranks with rank 0's BN running statistics (the
ones DDP broadcasts). Rank 0 alone writes logs and checkpoints and shows the
progress bar. BN statistics are per rank (each rank's shard), as in plain DDP;
stochastic rounding draws per-rank noise (seeded from the run's seed and the rank).
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import multiprocessing
import os
import signal
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from ..policy import policy_from_name
from ..runfolder import CHECKPOINT
from ..train import Interrupted, NonFiniteLoss, Trainer
from ..window import watch_training
from . import ddp
from .modules import arrays_to_state_dict, from_torch, state_dict_to_arrays, to_torch
from .storage import as_array, ledger, storage_policy

#: the bounded wait of every collective (a rank that died is noticed after it)
TIMEOUT = 300.0


def _quiet(*_):
    pass


def torch_device(device: str, local_rank: int = 0) -> torch.device:
    """``cpu``, or ``cuda`` (this rank's GPU: ``cuda:<local rank>``); a clear error otherwise."""
    if device == "cpu":
        return torch.device("cpu")
    if device != "cuda":
        raise ValueError(f"--engine torch runs on --device cpu or cuda, not {device!r}")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no GPU (torch.cuda.is_available() is False)")
    return torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")


class TorchParam:
    """A torch parameter as ``npapprox.optim`` sees a Parameter: ``data`` and ``grad``
    are zero-copy arrays of the tensor and of its gradient, so the optimizer's
    in-place update ``data -= delta`` updates the tensor."""

    __slots__ = ("data", "tensor")

    def __init__(self, tensor):
        self.tensor, self.data = tensor, as_array(tensor)

    @property
    def grad(self):
        g = self.tensor.grad
        return None if g is None else as_array(g)

    @grad.setter
    def grad(self, value):            # the optimizer's zero_grad
        if value is not None:
            raise ValueError("TorchParam.grad can only be cleared")
        self.tensor.grad = None


class _NoPeak:
    def stop(self):
        return None                   # torch's CPU allocations are not traced


class _CudaPeak:
    def __init__(self, device):
        self.device = device
        torch.cuda.reset_peak_memory_stats(device)

    def stop(self):
        return int(torch.cuda.max_memory_allocated(self.device))


class TorchTrainer(Trainer):
    """``Trainer`` on torch (module docstring). ``rank``, ``world_size``: this
    process's place in an initialised process group (1: no group, no DDP)."""

    def __init__(self, config, progress: bool = True, log=print, overwrite: bool = False, probe=None,
                 rank: int = 0, world_size: int = 1, local_rank: int = 0):
        self.rank, self.world_size = rank, world_size
        self.device = torch_device(config.device, local_rank)
        super().__init__(config, progress=progress and rank == 0, log=log if rank == 0 else _quiet,
                         overwrite=overwrite, probe=probe)
        self.writes, self.pending = rank == 0, []
        if world_size > 1:   # each rank its own rounding noise (independent over the shards, as within a batch)
            seed = int(np.random.SeedSequence([config.seed, rank]).generate_state(1)[0])
            self.policy = policy_from_name(config.policy, seed=seed)
        # the units named as the engine names them (not DDP's module.<name>)
        self.window_watch = watch_training(self.policy, self.module, self.log)
        last = len(self.data.y_train) % config.batch_size
        if world_size > 1 and (config.batch_size % world_size or 0 < last < world_size):
            raise ValueError(f"batch {config.batch_size} (last batch of an epoch: {last or config.batch_size}) "
                             f"does not split into {world_size} non-empty equal shards")

    # --- engine hooks ------------------------------------------------------------
    def place(self, model):
        self.module = to_torch(model).to(self.device)
        if self.world_size == 1:
            return self.module
        cuda = self.device.type == "cuda"
        return DistributedDataParallel(self.module, device_ids=[self.device.index] if cuda else None)

    def optimized(self) -> list:
        return [TorchParam(p) for p in self.module.parameters()]

    def engine_model(self):
        return from_torch(self.module)

    def model_arrays(self) -> dict:
        return state_dict_to_arrays(self.module.state_dict())

    def load_model_arrays(self, arrays: dict) -> None:
        self.module.load_state_dict(arrays_to_state_dict(arrays))   # copies in place: the views stay valid

    def param_names(self) -> list:
        return [n for n, _ in self.module.named_parameters()]

    def peak_probe(self):
        return _CudaPeak(self.device) if self.device.type == "cuda" else _NoPeak()

    def on_signal(self, signum: int) -> None:
        if self.world_size == 1:
            super().on_signal(signum)
        else:                          # every rank stops after the step where the ranks agree on it
            self.pending.append(signum)

    def _tensor(self, a, dtype=None):
        return torch.from_numpy(np.ascontiguousarray(a, dtype)).to(self.device)

    def _sum(self, values, op=None) -> list:
        """``values`` summed (``op``: another reduction) over the ranks, as Python floats."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            torch.distributed.all_reduce(t, op=op or torch.distributed.ReduceOp.SUM)
        return t.tolist()

    # --- one step, evaluation ----------------------------------------------------
    def step(self, xb, yb) -> tuple[float, int]:
        self.optimizer.lr = self.schedule.lr_at(self.iteration)
        r, w = self.rank, self.world_size
        x, y = self._tensor(ddp.shard(xb, r, w)), self._tensor(ddp.shard(yb, r, w), np.int64)
        try:
            with storage_policy(self.policy):
                logits = self.model(x)
                loss = F.cross_entropy(logits, y)
        except FloatingPointError as e:   # a K-bit policy met a non-finite activation
            raise NonFiniteLoss(f"iteration {self.iteration}: {e}; training stopped (lower --lr?). "
                                "The last good checkpoint is kept.") from None
        self.optimizer.zero_grad()
        # DDP divides the ranks' summed gradients by w: weight = this shard's share of the batch times w
        (loss * (len(y) * w / len(yb)) if w > 1 else loss).backward()
        right = (logits.detach().argmax(dim=1) == y).sum()
        if w == 1:
            value, right = float(loss.detach()), int(right)
        else:
            total, right, stop = self._sum([float(loss.detach()) * len(y), int(right), len(self.pending)])
            value, right = total / len(yb), int(right)
            if stop:                        # the largest signal number among the ranks that got one
                signum = self._sum([self.pending[0] if self.pending else 0], torch.distributed.ReduceOp.MAX)[0]
                self.interrupted.append(int(signum))
        if not math.isfinite(value):
            raise NonFiniteLoss(f"iteration {self.iteration}: the loss is {value}; training stopped "
                                f"(lower --lr?). The last good checkpoint is kept.")
        self.optimizer.step()
        return value, right

    def evaluate(self, batch_size: int = 500) -> tuple[float, float]:
        x, y = self.data.x_test, self.data.y_test
        if self.world_size > 1:           # rank 0's running statistics everywhere, as DDP's forward
            for b in self.module.buffers():
                torch.distributed.broadcast(b, 0)
        idx = ddp.shard(np.arange(len(y)), self.rank, self.world_size)
        lo, hi = (int(idx[0]), int(idx[-1]) + 1) if len(idx) else (0, 0)
        self.module.eval()
        total, correct = 0.0, 0
        with torch.no_grad():
            for i in range(lo, hi, batch_size):
                j = min(i + batch_size, hi)
                logits, labels = self.module(self._tensor(x[i:j])), self._tensor(y[i:j], np.int64)
                total += float(F.cross_entropy(logits, labels)) * (j - i)
                correct += int((logits.argmax(dim=1) == labels).sum())
        self.module.train()
        total, correct = self._sum([total, correct])
        return total / len(y), correct / len(y)

    def stored_bytes(self) -> int:
        """Stored-activation bytes of this rank's shard of one training batch (bridge ledger)."""
        c = self.cfg
        xb, yb = (ddp.shard(a[:c.batch_size], self.rank, self.world_size) for a in (self.data.x_train,
                                                                                      self.data.y_train))
        state = {k: v.clone() for k, v in self.module.state_dict().items()}   # its forward updates BN statistics
        led = ledger(self.module, self._tensor(xb), self._tensor(yb, np.int64), policy_from_name(c.policy, seed=c.seed))
        self.module.load_state_dict(state)
        return led.activation_stored


# --------------------------------------------------------------------------- #
# one command, one process or many
# --------------------------------------------------------------------------- #
def _rank(rank, world_size, local_rank, cfg, resume, overwrite, progress, log):
    """One rank's run; its outcome as data, so that the parent can raise it as the
    single-process command would."""
    try:
        trainer = TorchTrainer(cfg, progress=progress, log=log, overwrite=overwrite, rank=rank,
                               world_size=world_size, local_rank=local_rank)
        return "done", trainer.start(resume)
    except Interrupted as e:
        return "interrupted", e.signum
    except NonFiniteLoss as e:
        return "nonfinite", str(e)
    except (ValueError, OSError) as e:        # a user error: every rank meets it the same way
        return "error", f"{type(e).__name__}\0{e}"


def _spawned(rank, world_size, cfg, resume, overwrite, progress):
    return _rank(rank, world_size, rank, cfg, resume, overwrite, progress, print)


def _outcome(kind, value):
    if kind == "done":
        return value
    if kind == "interrupted":
        raise Interrupted(value)
    if kind == "nonfinite":
        raise NonFiniteLoss(value)
    name, _, message = value.partition("\0")
    raise (FileNotFoundError if name == "FileNotFoundError" else ValueError)(message)


def torchrun_env() -> tuple[int, int, int] | None:
    """``(rank, world size, local rank)`` when torchrun (or another launcher
    setting ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
    ``MASTER_PORT``) started this process; None otherwise."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (set by torchrun)") from None


_received: list = []         # signals the parent of spawned ranks passed on


def _forward_signals(signum, _frame):
    """The parent of spawned ranks: pass SIGINT/SIGTERM on, keep waiting for their checkpoint."""
    _received.append(signum)
    for p in multiprocessing.active_children():
        try:
            os.kill(p.pid, signum)
        except OSError:
            pass


def train(cfg, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
          timeout: float = TIMEOUT) -> dict:
    """Run ``cfg`` (``engine="torch"``) as ``npapprox train`` does and return the last
    epoch's row: in this process; in ``cfg.nproc`` spawned processes (gloo on
    127.0.0.1, NCCL on CUDA; rank r on GPU r); or, under torchrun, as the rank
    its environment names. Raises as the engine's trainer does (``Interrupted``,
    ``NonFiniteLoss``, ``ValueError``); a rank that fails: ``ddp.RankError``."""
    backend = "nccl" if cfg.device == "cuda" else "gloo"
    env = torchrun_env()
    if env is not None:
        rank, world, local = env
        if cfg.nproc > 1:
            raise ValueError("--nproc starts its own processes; under torchrun, give torchrun --nproc-per-node")
        if cfg.batch_size % world:
            raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the {world} torchrun processes")
        cfg = dataclasses.replace(cfg, nproc=world)
        if world > 1:
            if backend == "nccl":
                torch.cuda.set_device(local % torch.cuda.device_count())
            torch.distributed.init_process_group(backend, init_method="env://",
                                                 timeout=datetime.timedelta(seconds=timeout))
        try:
            return _outcome(*_rank(rank, world, local, cfg, resume, overwrite, progress,
                                   print if rank == 0 else _quiet))
        finally:
            if world > 1:
                torch.distributed.destroy_process_group()
    if cfg.nproc == 1:
        return _outcome(*_rank(0, 1, 0, cfg, resume, overwrite, progress, print))
    if resume and cfg.out and not (Path(cfg.out) / CHECKPOINT).exists():   # before any process starts
        raise FileNotFoundError(f"--resume: no checkpoint at {Path(cfg.out) / CHECKPOINT} "
                                "(to start this run again: --overwrite)")
    threads = max(1, (os.cpu_count() or 1) // cfg.nproc)
    previous = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        try:   # only the main thread may; elsewhere the signals reach the ranks alone
            previous[s] = signal.signal(s, _forward_signals)
        except ValueError:
            pass
    _received.clear()
    try:
        results = ddp.launch(_spawned, cfg.nproc, cfg, resume, overwrite, progress, backend=backend,
                             timeout=timeout, deadline=float("inf"), threads=threads)
    except ddp.RankError:
        if _received:   # the signal reached a rank before its training loop could defer it: nothing saved
            stop = KeyboardInterrupt(signal.Signals(_received[0]).name)
            stop.signum = _received[0]
            raise stop from None
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    kinds = [kind for kind, _ in results]
    for kind in ("error", "nonfinite", "interrupted"):   # the ranks agree; rank 0's word otherwise
        if kind in kinds:
            return _outcome(*results[kinds.index(kind)])
    return _outcome(*results[0])


__all__ = ["TIMEOUT", "TorchParam", "TorchTrainer", "torch_device", "torchrun_env", "train"]
