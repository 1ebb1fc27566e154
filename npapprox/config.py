"""A training run's settings (``TrainConfig``) and how a run ends early
(``NonFiniteLoss``, ``Interrupted``): shared by the trainer, the torch engine,
the study and the command line."""
from __future__ import annotations

import dataclasses
import signal

#: settings a resumed run may change: where it runs, not what it computes
RESUMABLE = ("out", "engine", "nproc", "device")


@dataclasses.dataclass
class TrainConfig:
    model: str = "resnet20"
    data: str = "digits"
    data_path: str | None = None
    size: int | None = None              # resize / pad the images (digits: 8 by default)
    width: int | None = None             # model width multiplier / base width
    policy: str = "exact"
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 2e-4
    decay: str = "kernels"               # weight decay on conv/linear kernels only (the paper) or "all"
    schedule: str = "cosine"
    epochs: int | None = 15
    iterations: int | None = None        # overrides epochs when given
    batch_size: int = 64
    augment: bool = False                # pad-and-crop + flip (CIFAR); off for digits
    normalize: str = "image-mean"
    eval_batch_stats: bool = False       # evaluate with batch statistics, as the paper's code
    seed: int = 0
    device: str = "cpu"                  # "gpu": model, optimizer state and batches on the GPU (CuPy)
    engine: str = "npapprox"             # or "torch": the same run on a torch model (npapprox.bridge.train)
    nproc: int = 1                       # torch engine: data-parallel processes
    out: str | None = None
    checkpoint_every: int = 1            # epochs

    @classmethod
    def paper(cls, **overrides) -> "TrainConfig":
        """The paper's CIFAR protocol (docs/method.md section 6): ResNet-164, batch 128,
        SGD momentum 0.9, weight decay 2e-4 on kernels, the piecewise schedule with
        warm-up over 64k iterations, pad-4 crop + flip, per-image mean, BN batch
        statistics at evaluation."""
        base = dict(model="resnet164", data="cifar10", batch_size=128, optimizer="sgd", lr=0.1,
                    momentum=0.9, weight_decay=2e-4, decay="kernels", schedule="paper", epochs=None,
                    iterations=64000, augment=True, normalize="image-mean", eval_batch_stats=True)
        base.update(overrides)
        return cls(**base)


class NonFiniteLoss(RuntimeError):
    pass


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT or SIGTERM (``signum``) after a clean step."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
