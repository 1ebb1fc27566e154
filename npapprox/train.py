"""The training loop: one run of one model, data set and storage policy.

``Trainer(config).run()`` trains for a number of iterations (or epochs), with
progress bars, evaluation on the test split after every epoch, a metrics log
(``metrics.jsonl``: one line per epoch; ``steps.jsonl``: one line per
iteration) and atomic checkpoints (``checkpoint.safetensors``, see
``npapprox.checkpoint``) in the output folder, which holds one run
(``npapprox.runfolder``).

Reproducibility: the model is initialised from ``seed``; the batch order and
augmentation of batch ``i`` of epoch ``e`` derive from ``(seed, e, i)`` alone
(``data.batches``), and the checkpoint holds the model, the optimizer, the
policy's noise counter and the iteration. So ``--resume`` after an
interruption (Ctrl-C or SIGTERM writes a checkpoint at the current iteration)
continues bit for bit as the uninterrupted run would have (on the CPU). The logs
are flushed to the disk before each checkpoint, so after a crash they reach at
least as far as the checkpoint, and ``--resume`` cuts them back to it.

A non-finite loss stops training with a clear message; the last checkpoint
(written before the bad step) is kept.
"""
from __future__ import annotations

import dataclasses
import json
import signal
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import checkpoint, nn, ops, optim
from .backend import array_module, to_device
from .config import RESUMABLE, Interrupted, NonFiniteLoss, TrainConfig
from .data import batches, load_dataset
from .ledger import ledger
from .peak import PeakProbe
from .policy import policy_from_name, storage_policy
from .runfolder import CHECKPOINT, METRICS, STEPS, claim, cut_logs, sync
from .tensor import Tensor, no_grad
from .window import watch_training

OPTIMIZER = "optimizer/"                 # array names: the model's own, then optimizer/<parameter>/<key>


class Trainer:
    """One run. ``overwrite``: a fresh run may replace another run's files in
    ``out`` (otherwise it refuses them; ``resume()`` continues them). ``probe``:
    called as ``probe(trainer)`` at each epoch end, its dict joins the epoch's row.
    ``model``, ``data``: train these instead of building them from the config (the
    study trains the model it measures)."""

    def __init__(self, config: TrainConfig, progress: bool = True, log=print, overwrite: bool = False,
                 probe=None, model=None, data=None):
        self.cfg, self.progress, self.log = config, progress, log
        self.overwrite, self.probe, self.resumed, self._steps_log = overwrite, probe, False, None
        c = config
        if c.engine != "npapprox" and type(self) is Trainer:
            raise ValueError(f"Trainer runs the npapprox engine; engine {c.engine!r}: use make_trainer(config)")
        self.data = data if data is not None else load_dataset(c.data, path=c.data_path, size=c.size,
                                                                normalize=c.normalize, seed=c.seed)
        if model is None:
            nn.manual_seed(c.seed)
            model = nn.build_model(c.model, num_classes=self.data.num_classes, in_channels=self.data.in_channels,
                                   input_size=self.data.image_size, width=c.width)
        if c.eval_batch_stats:
            for _, m in model.named_modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval_batch_stats = True
        self.writes = True                # False: a run's state is read, nothing is written (other ranks)
        self.model = self.place(model)
        self.policy = policy_from_name(c.policy, seed=c.seed)
        self.window_watch = watch_training(self.policy, self.model, self.log)   # warns when a BN window saturates
        self.per_epoch = -(-len(self.data.y_train) // c.batch_size)
        self.total = c.iterations if c.iterations is not None else c.epochs * self.per_epoch
        if self.total < 1:
            raise ValueError("nothing to train: give at least one epoch or iteration")
        self.optimizer = optim.make_optimizer(c.optimizer, self.optimized(), lr=c.lr, momentum=c.momentum,
                                              weight_decay=c.weight_decay, decay=c.decay, nesterov=c.nesterov)
        self.schedule = optim.make_schedule(c.schedule, c.lr, self.total)
        self.iteration, self.train_time, self.history = 0, 0.0, []
        self.epoch_stats = {"losses": [], "correct": 0, "seen": 0, "timed_images": 0, "timed": 0.0}
        self.out = Path(c.out) if c.out else None
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)

    # --- the engine: a subclass runs the same loop on another one (npapprox.bridge.train) ---
    def place(self, model):
        """The model as this engine trains it, on the configured device."""
        if self.cfg.device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {self.cfg.device!r}")
        return model.to(self.cfg.device)   # a clear error without CuPy; the optimizer state follows the parameters

    def optimized(self) -> list:
        """What ``npapprox.optim`` updates: objects with ``.data`` and ``.grad`` arrays."""
        return self.model.parameters()

    def engine_model(self):
        """The model as an ``npapprox.nn`` model (the study and the probes measure it)."""
        return self.model

    def model_arrays(self) -> dict:
        """The model's parameters and buffers as NumPy arrays, by name."""
        return self.model.state_dict()

    def load_model_arrays(self, arrays: dict) -> None:
        self.model.load_state_dict(arrays)

    def param_names(self) -> list:
        return [n for n, _ in self.model.named_parameters()]

    def peak_probe(self):
        """``.stop() -> peak bytes of the step, or None`` (not measurable)."""
        return PeakProbe(self.cfg.device)

    def on_signal(self, signum: int) -> None:
        """SIGINT/SIGTERM during ``run``: stop after the current step."""
        self.interrupted.append(signum)

    def summary(self) -> str:
        c, d = self.cfg, self.data
        return (f"{c.model} on {c.data} ({len(d.y_train)} train / {len(d.y_test)} test, "
                f"{d.image_size}x{d.image_size}x{d.in_channels}), policy {c.policy}, "
                f"{c.optimizer} lr {c.lr} ({c.schedule}), {self.total} iterations of batch {c.batch_size}"
                + (f", engine {c.engine}" + (f" x {c.nproc} processes" if c.nproc > 1 else "")
                   if c.engine != "npapprox" else "") + (f", output {c.out}" if c.out else ""))

    # --- state ---------------------------------------------------------------------
    def state(self) -> tuple[dict, dict]:
        """``(arrays, meta)`` of a checkpoint: the model's parameters and buffers under
        their own names, the optimizer's per-parameter state as
        ``optimizer/<parameter>/<key>``; everything else (config, counters, history,
        the optimizer's hyperparameters and step counts, the policy's counters) as JSON."""
        arrays = self.model_arrays()
        opt = self.optimizer.state_dict()
        names = self.param_names()
        for name, slots in zip(names, opt.pop("state"), strict=True):
            arrays.update((f"{OPTIMIZER}{name}/{k}", v) for k, v in slots.items())
        meta = {"config": dataclasses.asdict(self.cfg), "iteration": self.iteration, "train_time": self.train_time,
                "optimizer": opt, "policy": self.policy.state_dict(), "history": self.history,
                "epoch_stats": self.epoch_stats}
        return arrays, meta

    def save_checkpoint(self) -> None:
        """Flush the logs, then write the checkpoint (atomically): after a crash the
        logs reach at least as far as the checkpoint."""
        if self.out and self.writes:
            if self._steps_log:
                sync(self._steps_log)
            checkpoint.save(self.out / CHECKPOINT, *self.state())

    def resume(self) -> None:
        """Load ``checkpoint.safetensors`` from the output folder (its config and its
        arrays' names and shapes must match this run's) and cut the logs back to it."""
        if self.out is None:
            raise ValueError("--resume needs --out: the folder of the run to continue")
        path = self.out / CHECKPOINT
        if not (path.exists() or path.is_symlink()):
            raise FileNotFoundError(f"--resume: no checkpoint at {path} (to start this run again: --overwrite)")
        arrays, meta = checkpoint.load(path)
        try:
            saved = {k: v for k, v in meta["config"].items() if k not in RESUMABLE}
            opt, history = meta["optimizer"], meta["history"]
            iteration, train_time, epoch_stats = int(meta["iteration"]), float(meta["train_time"]), meta["epoch_stats"]
            policy = meta["policy"]
        except (KeyError, TypeError, AttributeError, ValueError):
            raise checkpoint.CheckpointError(f"checkpoint {path}: its metadata lacks the run's state") from None
        mine = {k: v for k, v in dataclasses.asdict(self.cfg).items() if k not in RESUMABLE}
        changed = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if changed:
            raise ValueError("--resume: the checkpoint was made with other settings: "
                             + ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in changed.items()))
        own, names = self.model_arrays(), self.param_names()

        def expected(k):  # this model's array for the name k (optimizer/<parameter>/<key>: the parameter's)
            return own.get(k) if not k.startswith(OPTIMIZER) else \
                own.get(next((n for n in names if k.startswith(f"{OPTIMIZER}{n}/")), ""))

        checkpoint.check_arrays(path, arrays, own, expected)
        model = {k: v for k, v in arrays.items() if not k.startswith(OPTIMIZER)}
        slots = [{k.rsplit("/", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{OPTIMIZER}{n}/")}
                 for n in names]
        try:
            hyper = {k: tuple(v) if isinstance(v, list) else v for k, v in opt["hyper"].items()}   # JSON: lists
            self.optimizer.load_state_dict({**opt, "hyper": hyper, "state": slots})
            self.policy.load_state_dict(policy)
        except (KeyError, TypeError, ValueError) as e:
            raise checkpoint.CheckpointError(f"checkpoint {path}: {e}") from None
        self.load_model_arrays(model)
        self.iteration, self.train_time, self.history, self.epoch_stats = iteration, train_time, history, epoch_stats
        self.resumed = True
        if not self.writes:
            return
        cut_logs(self.out, self.iteration, self.history)

    # --- one step, evaluation ------------------------------------------------------
    def step(self, xb, yb) -> tuple[float, int]:
        self.optimizer.lr = self.schedule.lr_at(self.iteration)
        with storage_policy(self.policy):
            logits = self.model(Tensor(to_device(xb, self.cfg.device)))
            loss = ops.cross_entropy(logits, yb)          # host labels: range-checked on the host
        self.optimizer.zero_grad()
        try:  # on the GPU, backward's own check of the loss is the step's one read-back before the update
            loss.backward()
        except FloatingPointError:
            if np.isfinite(loss.item()):
                raise
            raise NonFiniteLoss(f"iteration {self.iteration}: the loss is {loss.item()}; training stopped "
                                f"(lower --lr?). The last good checkpoint is kept.") from None
        self.optimizer.step()
        xp = array_module(logits.data)                    # loss and predictions: one read-back
        host = to_device(xp.concatenate([logits.data.argmax(axis=1).astype(np.float64),
                                         loss.data.reshape(1).astype(np.float64)]), "cpu")
        return float(host[-1]), int((host[:-1] == yb).sum())

    def evaluate(self, batch_size: int = 500) -> tuple[float, float]:
        x, y = self.data.x_test, self.data.y_test
        self.model.eval()
        total, correct = 0.0, 0
        with no_grad():
            for i in range(0, len(y), batch_size):
                logits = self.model(Tensor(to_device(x[i:i + batch_size], self.cfg.device)))
                total += ops.cross_entropy(logits, to_device(y[i:i + batch_size], self.cfg.device)).item() * len(logits)
                correct += int((logits.numpy().argmax(axis=1) == y[i:i + batch_size]).sum())
        self.model.train()
        return total / len(y), correct / len(y)

    def stored_bytes(self) -> int:
        """Stored-activation bytes of one training batch under the run's policy (ledger)."""
        c = self.cfg
        xb, yb = self.data.x_train[:c.batch_size], self.data.y_train[:c.batch_size]
        state = self.model.state_dict()                   # the ledger's forward updates BN statistics
        led = ledger(self.model, to_device(xb, c.device), to_device(yb, c.device),
                     policy_from_name(c.policy, seed=c.seed))
        self.model.load_state_dict(state)
        return led.activation_stored

    # --- the loops -----------------------------------------------------------------
    def fit(self, every: int | None = None, on_checkpoint=None) -> list:
        """Train to the configured length without a run's bookkeeping (folder, epoch rows,
        checkpoints, progress). ``on_checkpoint(i, losses)``: before iteration i = 0, every,
        2 every, ... and after the last, with the losses since its previous call."""
        c, d = self.cfg, self.data
        losses, since = [], []
        self.model.train()
        while self.iteration < self.total:
            epoch, start = divmod(self.iteration, self.per_epoch)
            for xb, yb in batches(d.x_train, d.y_train, c.batch_size, seed=c.seed, epoch=epoch,
                                  augment=c.augment, start=start):
                if on_checkpoint is not None and every and self.iteration % every == 0:
                    on_checkpoint(self.iteration, since)
                    since = []
                losses.append(self.step(xb, yb)[0])
                since.append(losses[-1])
                self.iteration += 1
                if self.iteration >= self.total:
                    break
        if on_checkpoint is not None:
            on_checkpoint(self.iteration, since)
        return losses

    def start(self, resume: bool = False) -> dict:
        """``npapprox train``: continue from the checkpoint when asked, say what runs, run."""
        if resume:
            self.resume()
            self.log(f"resumed from iteration {self.iteration} of {self.total}")
        self.log(self.summary())
        return self.run()

    def run(self) -> dict:
        """Train to the configured length; returns the last epoch's metrics row.

        A new run first claims its output folder (``runfolder.claim``). Ctrl-C
        (SIGINT) and SIGTERM are deferred to the end of the current step, then a
        checkpoint is written (with ``out``) and ``Interrupted`` raised, so a
        resumed run sees a consistent state."""
        c, d = self.cfg, self.data
        writes = self.out and self.writes
        if writes and not self.resumed:
            claim(self.out, self.overwrite)
        stored = self.stored_bytes()
        steps_log = self._steps_log = open(self.out / STEPS, "a") if writes else None
        bar = tqdm(total=self.total, initial=self.iteration, unit="it", disable=not self.progress,
                   desc=f"{c.model} {c.policy}", dynamic_ncols=True, leave=False)
        interrupted = self.interrupted = []
        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:  # only the main thread may set a handler; elsewhere the signal is not deferred
                previous[signum] = signal.signal(signum, lambda n, _: self.on_signal(n))
            except ValueError:
                pass
        try:
            while self.iteration < self.total and not interrupted:
                epoch, start = divmod(self.iteration, self.per_epoch)
                acc = self.epoch_stats                         # carried over by a resumed checkpoint
                if start == 0:
                    acc.update(losses=[], correct=0, seen=0, timed_images=0, timed=0.0)
                peak, measured = None, False
                for xb, yb in batches(d.x_train, d.y_train, c.batch_size, seed=c.seed, epoch=epoch,
                                      augment=c.augment, start=start):
                    if self.iteration >= self.total or interrupted:
                        break
                    measure = not measured  # the first step of an epoch measures the peak
                    if measure:
                        probe = self.peak_probe()
                    t0 = time.perf_counter()
                    try:
                        loss, right = self.step(xb, yb)
                    finally:  # also when the step raises: no tracer or memory hook left behind
                        dt = time.perf_counter() - t0
                        if measure:
                            peak, measured = probe.stop(), True
                    if not measure:  # a traced step is slower: it is not counted in the wall-clock
                        self.train_time += dt
                        acc["timed"] += dt
                        acc["timed_images"] += len(yb)
                    self.iteration += 1
                    acc["losses"].append(loss)
                    acc["correct"] += right
                    acc["seen"] += len(yb)
                    if steps_log:
                        steps_log.write(json.dumps({"iteration": self.iteration, "loss": loss,
                                                    "time": self.train_time}) + "\n")
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc['correct'] / acc['seen']:.3f}",
                                    img_s=f"{len(yb) / dt:.0f}", act=f"{stored / 2**20:.1f}MiB")
                if acc["seen"] and (self.iteration % self.per_epoch == 0 or self.iteration >= self.total):
                    self._end_epoch(epoch, peak, stored)
            if interrupted:
                self.save_checkpoint()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            bar.close()
            if steps_log:
                steps_log.close()
                self._steps_log = None
        if interrupted:
            name = signal.Signals(interrupted[0]).name
            self.log(f"{name}: stopped at iteration {self.iteration} of {self.total}; "
                     + (f"checkpoint written to {self.out / CHECKPOINT}" if self.out else "nothing saved (no --out)"))
            raise Interrupted(interrupted[0])
        return self.history[-1] if self.history else {}

    def _end_epoch(self, epoch, peak, stored) -> None:
        acc = self.epoch_stats
        test_loss, test_acc = self.evaluate()
        row = {"epoch": epoch + 1, "iteration": self.iteration, "time": self.train_time, "lr": self.optimizer.lr,
               "train_loss": float(np.mean(acc["losses"])), "train_acc": acc["correct"] / acc["seen"],
               "test_loss": test_loss, "test_acc": test_acc, "stored_bytes": stored,
               "peak_bytes": peak,
               "images_per_s": acc["timed_images"] / acc["timed"] if acc["timed"] else None}
        if self.probe:
            row.update(self.probe(self))
        self.history.append(row)
        if self.out and self.writes:
            with open(self.out / METRICS, "a") as f:
                f.write(json.dumps(row) + "\n")
                sync(f)
        peak_text = f"{peak / 2**20:.1f} MiB" if peak is not None else "-"
        self.log(f"epoch {epoch + 1:>3}  it {self.iteration:>6}  loss {row['train_loss']:.4f}  "
                 f"train acc {row['train_acc']:.3f}  test acc {test_acc:.3f}  "
                 f"act {stored / 2**20:.2f} MiB  peak {peak_text}")
        if (epoch + 1) % self.cfg.checkpoint_every == 0 or self.iteration >= self.total:
            self.save_checkpoint()


def make_trainer(config: TrainConfig, **options) -> Trainer:
    """The trainer of ``config.engine``: ``Trainer``, or the torch engine's
    ``npapprox.bridge.train.TorchTrainer`` (one process)."""
    if config.engine == "torch":
        from .bridge.train import TorchTrainer
        return TorchTrainer(config, **options)
    if config.engine != "npapprox":
        raise ValueError(f"engine must be 'npapprox' or 'torch', got {config.engine!r}")
    return Trainer(config, **options)


def load_run(folder, progress: bool = False) -> Trainer:
    """The engine's ``Trainer`` of the run in ``folder`` (made by either engine,
    ``--engine npapprox`` or ``torch``, any ``--nproc``), at its checkpoint: its
    ``model`` (an ``npapprox.nn`` model), ``data``, optimizer and iteration.
    Nothing in the folder changes. E.g. the gradient error at that point:
    ``study.study_gradients(run.model, run.data.x_train[:64], run.data.y_train[:64])``."""
    path = Path(folder) / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"load_run: no checkpoint at {path}")
    _, meta = checkpoint.load(path)
    try:
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        config = {k: v for k, v in meta["config"].items() if k in fields}
        cfg = TrainConfig(**{**config, "engine": "npapprox", "nproc": 1, "device": "cpu", "out": str(folder)})
    except (KeyError, TypeError, AttributeError):
        raise checkpoint.CheckpointError(f"checkpoint {path}: its metadata lacks the run's settings") from None
    trainer = Trainer(cfg, progress=progress, log=lambda *_: None)
    trainer.writes = False
    trainer.resume()
    return trainer
