"""The ``npapprox`` command.

    npapprox train [--depth 20] [--epochs 8] [--batch-size 64] [--lr 0.1] [--seed 0]

trains a pre-activation ResNet on the embedded digits data in exact mode and
prints loss and accuracy per epoch."""
from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np


def _train(args) -> int:
    from tqdm import tqdm  # noqa: PLC0415

    from . import nn, optim  # noqa: PLC0415
    from .data import load_digits  # noqa: PLC0415
    from .train import evaluate, train_epoch  # noqa: PLC0415

    x_train, y_train, x_test, y_test = load_digits(seed=args.seed)
    nn.manual_seed(args.seed)
    model = nn.PreActResNet(depth=args.depth, num_classes=10, in_channels=1, width=args.width)
    opt = optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=2e-4)
    rng = np.random.default_rng(args.seed)
    print(f"pre-activation ResNet-{args.depth} (width {args.width}, "
          f"{sum(p.size for p in model.parameters()):,} parameters) on digits: "
          f"{len(y_train)} train / {len(y_test)} test images, 8x8, exact storage")
    print(f"{'epoch':>5} {'train loss':>10} {'train acc':>9} {'test loss':>9} {'test acc':>8} {'img/s':>7} {'time':>6}")
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        opt.lr = args.lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / args.epochs))  # cosine decay
        with tqdm(total=len(y_train), desc=f"epoch {epoch}", unit="img", leave=False,
                  disable=args.quiet) as bar:
            stats = train_epoch(model, opt, x_train, y_train, args.batch_size, rng, bar)
        test_loss, test_acc = evaluate(model, x_test, y_test)
        print(f"{epoch:>5} {stats['loss']:>10.4f} {stats['acc']:>9.3f} {test_loss:>9.4f} {test_acc:>8.3f} "
              f"{stats['images_per_s']:>7.0f} {time.perf_counter() - t0:>5.0f}s", flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="npapprox", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a pre-activation ResNet on the embedded digits data")
    t.add_argument("--depth", type=int, default=20, help="6n+2: 8, 14, 20, 32, ... (default 20)")
    t.add_argument("--width", type=int, default=16, help="channels of the first stage (default 16)")
    t.add_argument("--epochs", type=int, default=8)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "width"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.lr <= 0:
        parser.error("--lr must be positive")
    if args.depth < 8 or (args.depth - 2) % 6:
        parser.error(f"--depth must be 6n+2 (8, 14, 20, 32, ...), got {args.depth}")
    try:
        return _train(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
