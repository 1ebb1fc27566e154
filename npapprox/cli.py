"""The npapprox command.

    npapprox train    one run: model, data, storage policy, optimizer, schedule
    npapprox compare  several storage policies (and seeds) from the same seed: table + plots
    npapprox memory   the ledger of one model and policy, and the largest batch under a budget
    npapprox study    gradient-error study: approximate against exact gradients, per layer and over training

npapprox <command> --help lists the options. Defaults train on the digits
data that ship with scikit-learn, so every command runs offline."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from pathlib import Path

from . import __version__
from .backend import DeviceError
from .nn.zoo import MODEL_NAMES
from .policy import POLICY_HELP
from .runfolder import check_out, claim

DEFAULT_POLICIES = "exact,paper8,paper4,naive4"


class _Parser(argparse.ArgumentParser):
    """A usage error is one line, the message and where to read more, not the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(text, kind, test, wanted):
    """``kind(text)`` if ``test`` holds for it, else argparse's one-line error."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
    if not test(value):
        raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
    return value


def _positive_int(text):
    return _number(text, int, lambda v: v >= 1, "an integer >= 1")


def _int_to(top):
    """An integer from 1 to ``top`` (a model's input channels or classes: the
    models are built at that size before any check)."""
    return lambda text: _number(text, int, lambda v: 1 <= v <= top, f"an integer from 1 to {top}")


def _natural(text):
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def _positive_float(text):
    return _number(text, float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def _nonnegative_float(text):
    return _number(text, float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def _bytes(text):
    """``2GiB``, ``512MiB``, ``1e9`` (bytes); K, M, G, T count powers of 1024."""
    m = re.fullmatch(r"\s*((?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:e[+-]?[0-9]+)?)\s*([KMGT]?)(i?B?)\s*", text, re.IGNORECASE)
    if not m or (m.group(3) and m.group(3).lower() not in ("b", "ib")):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 2GiB, 512MiB, 1e9)")
    value = float(m.group(1)) * 1024 ** "_KMGT".index(m.group(2).upper() or "_")
    if not 1 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"must be between 1 byte and 8 EiB, got {text!r}")
    return int(value)


def _items(text, check=None):
    """Checks a comma-separated list (no empty or repeated item; ``check`` on each)
    and returns the text: the command splits it."""
    items = [t.strip() for t in text.split(",")]
    if not any(items):
        raise argparse.ArgumentTypeError("expected a comma-separated list, got nothing")
    if not all(items):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty item")
    if repeated := sorted({t for t in items if items.count(t) > 1}):
        raise argparse.ArgumentTypeError(f"{text!r} repeats {', '.join(repeated)}")
    for item in items if check else ():
        check(item)
    return text


def _seed_list(text):
    return _items(text, _natural)


def _name_list(text):
    return _items(text)


def _activation_list(text):
    from .nn.models import ACTIVATIONS  # noqa: PLC0415

    def check(name):
        if name not in ACTIVATIONS:
            raise argparse.ArgumentTypeError(f"unknown activation {name!r}; expected {', '.join(ACTIVATIONS)}")
    return _items(text, check)


def _optimizer_list(text):
    from .optim import OPTIMIZER_NAMES  # noqa: PLC0415

    def check(item):
        name, colon, lr = item.partition(":")
        if name.strip().lower() not in OPTIMIZER_NAMES:
            raise argparse.ArgumentTypeError(f"unknown optimizer {name.strip()!r} in {item!r}; expected "
                                             f"{', '.join(OPTIMIZER_NAMES)}, each optionally :lr")
        try:
            if colon:
                _positive_float(lr)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"learning rate in {item!r}: {e}") from None
    return _items(text, check)


def _run_options(p):
    p.add_argument("--model", default="resnet20", help=f"one of {', '.join(MODEL_NAMES)} (default resnet20)")
    p.add_argument("--width", type=_positive_int, default=None, help="base width of the model")
    p.add_argument("--data", default="digits", choices=["digits", "cifar10", "cifar100"])
    p.add_argument("--data-path", default=None, help="CIFAR archive (.tar.gz) or its folder")
    p.add_argument("--size", type=_positive_int, default=None, help="pad images to SIZE x SIZE (at least "
                   "their own size: digits 8, CIFAR 32)")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "rmsprop"])
    p.add_argument("--lr", type=_positive_float, default=0.1)
    p.add_argument("--momentum", type=_nonnegative_float, default=0.9)
    p.add_argument("--nesterov", action="store_true")
    p.add_argument("--weight-decay", type=_nonnegative_float, default=2e-4)
    p.add_argument("--decay", default="kernels", choices=["kernels", "all"],
                   help="weight decay on conv/linear kernels only (the paper) or on all parameters")
    p.add_argument("--schedule", default="cosine", choices=["paper", "step", "cosine", "constant"])
    p.add_argument("--epochs", type=_positive_int, default=15)
    p.add_argument("--iterations", type=_positive_int, default=None, help="overrides --epochs")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--augment", action="store_true", help="pad-4 random crop and horizontal flip")
    p.add_argument("--normalize", default="image-mean", choices=["image-mean", "channel"])
    p.add_argument("--eval-batch-stats", action="store_true",
                   help="evaluate BN with batch statistics, as the paper's code")
    p.add_argument("--preset", choices=["paper"], help="the paper's CIFAR protocol (ResNet-164, 64k iterations); "
                                                        "explicit options still override it")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"], help="gpu needs CuPy (npapprox[gpu])")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _typed(argv) -> set:
    """The option names the user actually typed (parsed again with every default
    suppressed), so a preset yields only to those, even when a typed value equals
    the option's default."""
    parser = build_parser()
    for sub in parser.subcommands.values():
        for action in sub._actions:  # argparse has no public list of a parser's options
            action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command"}


def _config(args, policy, seed, out):
    from .train import TrainConfig  # noqa: PLC0415

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields}
    if args.preset == "paper":  # what the user did not type stays the paper's
        cfg = TrainConfig.paper(**{k: v for k, v in given.items() if k in args.typed})
    else:
        cfg = TrainConfig(**given)
    return dataclasses.replace(cfg, policy=policy, seed=seed, out=out)


def _train(args) -> int:
    from .policy import policy_from_name  # noqa: PLC0415
    from .train import Interrupted, NonFiniteLoss, Trainer  # noqa: PLC0415

    policy_from_name(args.policy)  # fail early on a bad name
    if args.out:
        if not args.resume:  # before any work (the trainer checks again when it starts)
            claim(args.out, args.overwrite)
    cfg = _config(args, args.policy, args.seed, args.out)
    trainer = Trainer(cfg, progress=not args.quiet, overwrite=args.overwrite)
    if args.resume:
        trainer.resume()
        print(f"resumed from iteration {trainer.iteration} of {trainer.total}")
    print(f"{cfg.model} on {cfg.data} ({len(trainer.data.y_train)} train / {len(trainer.data.y_test)} test, "
          f"{trainer.data.image_size}x{trainer.data.image_size}x{trainer.data.in_channels}), policy {cfg.policy}, "
          f"{cfg.optimizer} lr {cfg.lr} ({cfg.schedule}), {trainer.total} iterations of batch {cfg.batch_size}"
          + (f", output {cfg.out}" if cfg.out else ""))
    try:
        trainer.run()
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except Interrupted:
        if cfg.out:
            print("continue with the same command and --resume", file=sys.stderr)
        raise
    return 0


def _compare(args) -> int:
    from . import compare  # noqa: PLC0415
    from .policy import policy_from_name  # noqa: PLC0415

    policies = [p.strip() for p in args.policies.split(",")]     # _items refused empty and repeated ones
    for p in policies:
        policy_from_name(p)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    compare.start(out, policies, seeds)
    runs = {}
    for seed in seeds:               # the policies take turns within each seed: load drift spreads over all
        for policy in policies:
            cfg = _config(args, policy, seed, str(out / compare.run_folder(policy, seed)))
            print(f"== {policy}, seed {seed}", flush=True)
            try:
                runs[(policy, seed)] = compare.run_one(cfg, progress=not args.quiet)
            except KeyboardInterrupt:
                print(f"comparison stopped: no table; compare has no --resume (running it again into {out} "
                      "replaces this partial comparison)", file=sys.stderr)
                raise
    heading = compare.title(cfg)
    table = compare.summarize(runs, policies, seeds, heading)
    print()
    print(table)
    (out / "results.md").write_text(table + "\n")
    compare.write_csv(runs, out / "results.csv")
    written = compare.plot(runs, policies, seeds, out, heading)
    print(f"\nresults: {out / 'results.md'}, {out / 'results.csv'}"
          + (f"; plots: {', '.join(str(p) for p in written)}" if written else
             "; plots skipped (pip install 'npapprox[plot]' for matplotlib)"))
    return 0


def _memory(args) -> int:
    from . import nn  # noqa: PLC0415
    from .policy import policy_from_name  # noqa: PLC0415
    from .report import ledger, max_batch  # noqa: PLC0415

    policy = policy_from_name(args.policy)
    nn.manual_seed(0)
    model = nn.build_model(args.model, num_classes=args.classes, in_channels=args.channels,
                           input_size=args.size, width=args.width)
    import numpy as np  # noqa: PLC0415

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, args.channels, args.size, args.size), dtype=np.float32)
    y = rng.integers(0, args.classes, args.batch)
    led = ledger(model, x, y, policy)
    print(led.table() if args.verbose else led.summary())
    result = {"policy": repr(policy), "stored": led.stored, "float32_per_unit": led.float32_per_unit,
              "standard_autodiff": led.standard_autodiff}
    if args.budget:
        from .limits import fmt_bytes  # noqa: PLC0415
        shape = (args.channels, args.size, args.size)
        details = {}
        batch, peak = max_batch(model, shape, args.classes, policy, args.budget, log=print, details=details,
                                confirm=args.confirm)
        what = f"{args.model} on {'x'.join(map(str, shape))} inputs under {policy}"
        if peak is None:
            res = details["residual"]
            print(f"largest batch with predicted peak <= {fmt_bytes(args.budget)} ({args.budget:,} B): {batch} for "
                  f"{what}; from the line through the measured peaks of {', '.join(map(str, details['probes']))} "
                  f"images ({fmt_bytes(details['per_image'])} per image"
                  + ("" if res is None else f", missing the smallest by {res:,} B") + "); --confirm measures it")
        else:
            print(f"largest batch with measured peak <= {fmt_bytes(args.budget)} ({args.budget:,} B): {batch} "
                  f"for {what}; measured peak {fmt_bytes(peak)} ({peak:,} B)"
                  + ("" if details.get("confirmed", True) else f"; batch {batch + 1} predicted over, not measured"))
        result["budget"] = {"model": args.model, "input": list(shape), "policy": repr(policy),
                            "budget": args.budget, "batch": batch, "peak": peak,
                            "measured": peak is not None, "predicted": details.get("predicted"),
                            "per_image": details.get("per_image"), "probes": details.get("probes"),
                            "confirmed": details.get("confirmed")}
    if args.json:
        Path(args.json).write_text(json.dumps(result))
    return 0


def _study(args) -> int:
    from . import study  # noqa: PLC0415
    from .policy import policy_from_name  # noqa: PLC0415

    split = lambda text: tuple(t.strip() for t in text.split(",") if t.strip())  # noqa: E731
    policies = split(args.policies)
    for p in policies + split(args.opt_policies):
        policy_from_name(p)  # fail early on a bad name
    cfg = study.StudyConfig(model=args.model, data=args.data, data_path=args.data_path, size=args.size,
                            width=args.width, batch_size=args.batch_size, policies=policies, repeats=args.repeats,
                            noise_batches=args.noise_batches, seed=args.seed, warmup=args.warmup, lr=args.lr,
                            activations=split(args.activations), iterations=args.iterations, every=args.every,
                            optimizers=split(args.optimizers), opt_policies=split(args.opt_policies),
                            seeds=tuple(int(s) for s in split(args.seeds)), systematic=not args.no_systematic,
                            out=args.out)
    result = study.run(args.experiment, cfg)
    results = result if args.experiment == "all" else {args.experiment: result}
    files = [str(f) for r in results.values() for f in r["files"]]
    print(f"\nwritten: {', '.join(files)}")
    return 0


def _split(text) -> list:
    return [t.strip() for t in text.split(",") if t.strip()]


def _check_outputs(args) -> None:
    """Every output path proven writable (folders created) before any work; ValueError."""
    if args.command == "memory":
        if args.json:
            check_out(args.json, "--json", file=True)
    elif args.out:
        check_out(args.out)


def _validate(args) -> None:
    """What argparse cannot check option by option, named as on the command line:
    policy and model names, the data and --data-path, --size against the images
    and the model, and whether the model and a batch fit in memory (before
    anything large is allocated). Raises ValueError."""
    from .policy import policy_from_name  # noqa: PLC0415

    cmd, state = args.command, False
    if cmd in ("train", "compare"):
        run = _config(args, "exact", 0, None)                     # after --preset
        model, data, size, width, batch = run.model, run.data, run.size, run.width, run.batch_size
        named = {"--policy": [args.policy]} if cmd == "train" else {"--policies": _split(args.policies)}
        measured, state = list(named), run.optimizer != "sgd" or run.momentum > 0
        if run.nesterov and (run.optimizer != "sgd" or not run.momentum):
            raise ValueError(f"--nesterov needs --optimizer sgd and --momentum > 0, got --optimizer {run.optimizer} "
                             f"--momentum {run.momentum}")
        source = f"--preset {args.preset} (on {data})" if args.preset and "data" not in args.typed else None
        images = _check_images(model, data, run.data_path, size, source)
    elif cmd == "study":
        model = args.model or ("resnet8" if args.experiment == "optimizers" else "resnet20")
        data, size, width, batch = args.data, args.size, args.width, args.batch_size
        named = {"--policies": ["exact"] + _split(args.policies), "--opt-policies": _split(args.opt_policies)}
        measured = {"optimizers": ["--opt-policies"], "all": list(named)}.get(args.experiment, ["--policies"])
        if args.experiment in ("activations", "all") and not model.startswith("resnet"):
            raise ValueError(f"--experiment {args.experiment} swaps the activations of a ResNet; --model {model} "
                             f"is not one")
        images = _check_images(model, data, args.data_path, size)
    else:
        model, size, width, batch = args.model, args.size, args.width, args.batch
        named = {"--policy": [args.policy]}
        measured = list(named)
        _check_images(model, None, None, size)
        images = (args.channels, size, args.classes)
    policies = {}
    for option, names in named.items():
        for name in names:
            try:
                policies[name] = policy_from_name(name)
            except ValueError as e:
                raise ValueError(f"{option}: {e}") from None
    channels, side, classes = images
    _check_memory(model, [policies[name] for option in measured for name in named[option]], classes=classes,
                  channels=channels, size=side, width=width, batch=batch,
                  batch_option="--batch" if cmd == "memory" else "--batch-size",
                  gpu=getattr(args, "device", "cpu") == "gpu", optimizer_state=state)
    budget = getattr(args, "budget", None)
    if budget:
        from .limits import available_memory, fmt_bytes  # noqa: PLC0415

        if budget > (avail := available_memory()):
            raise ValueError(f"--budget {fmt_bytes(budget)} is more than the {fmt_bytes(avail)} of memory "
                             f"available (the search measures batches up to the budget)")


def _check_images(model, data, data_path, size, source=None) -> tuple:
    """``(channels, side, classes)`` of the images the model will see, after checking
    --model, --data-path against --data (``source``: what chose the data, when not
    --data), and --size against the images (padded, never shrunk) and the model."""
    from .data.dataset import NATIVE  # noqa: PLC0415
    from .nn.zoo import input_divisor  # noqa: PLC0415

    if model not in MODEL_NAMES:
        raise ValueError(f"--model {model!r} is not a model; expected one of {', '.join(MODEL_NAMES)}")
    channels, native, classes = NATIVE[data] if data else (None, size, None)
    if data == "digits" and data_path is not None:
        raise ValueError("--data-path is for --data cifar10 and cifar100; the digits data are embedded")
    if data in ("cifar10", "cifar100") and data_path is None:
        from .data.cifar import CIFAR10, CIFAR100  # noqa: PLC0415

        spec = CIFAR10 if data == "cifar10" else CIFAR100
        raise ValueError(f"{source or f'--data {data}'} needs --data-path: {spec.accepted}; nothing is downloaded")
    if size is not None and size < native:
        raise ValueError(f"--size {size} is smaller than the {native}x{native} {data} images (they are padded "
                         f"to --size, never shrunk)")
    side, divisor = size or native, input_divisor(model)
    if side % divisor:
        fit = divisor * -(-side // divisor)
        raise ValueError(f"--size {size}: {model} needs a size divisible by {divisor} (e.g. --size {fit})" if size
                         else f"{model} needs images whose size is divisible by {divisor} and the {data} images "
                         f"are {native}x{native}: give --size {fit}")
    return channels, side, classes


def _check_memory(model, policies, *, classes, channels, size, width, batch, batch_option, gpu,
                  optimizer_state) -> None:
    """Refuse a model or batch that cannot fit in the memory available. What the
    end of a forward pass holds at least: the parameters (twice with an optimizer
    state of one array per parameter, kept from the step before) and the bytes the
    batch stores for backward, predicted by ``report.footprint`` from small
    models. On the GPU only the parameters are checked (they are made on the host)."""
    from . import limits  # noqa: PLC0415
    from .report import footprint  # noqa: PLC0415

    avail, copies = limits.available_memory(), 2 if optimizer_state else 1
    fmt = limits.fmt_bytes
    per_image = 0
    for policy in policies:
        params, stored = footprint(model, policy, num_classes=classes, in_channels=channels, size=size, width=width)
        if copies * params > avail:
            raise ValueError(f"{f'--width {width}: ' if width else ''}{model} has {params // 4:,} parameters: "
                             f"{fmt(copies * params)}{' with the optimizer state' if copies > 1 else ''}, more "
                             f"than the {fmt(avail)} of memory available")
        per_image = max(per_image, stored)
    need = copies * params + batch * per_image
    if not gpu and need > avail:
        raise ValueError(f"{batch_option} {batch} of {channels}x{size}x{size} images: {model} keeps about "
                         f"{fmt(per_image)} per image for backward, {fmt(need)} with its parameters, more than "
                         f"the {fmt(avail)} of memory available; lower {batch_option}, --size or --width")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="npapprox", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"npapprox {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one model under one storage policy")
    _run_options(t)
    t.add_argument("--policy", default="exact", help=POLICY_HELP)
    t.add_argument("--seed", type=_natural, default=0)
    t.add_argument("--out", default=None, help="output folder: metrics.jsonl, steps.jsonl, checkpoint.safetensors "
                   "(one run per folder)")
    again = t.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in OUT from its checkpoint")
    again.add_argument("--overwrite", action="store_true", help="start again in OUT: remove the run there first")

    c = sub.add_parser("compare", help="train under several storage policies; table and plots")
    _run_options(c)
    c.add_argument("--policies", type=_name_list, default=DEFAULT_POLICIES,
                   help=f"comma-separated ({POLICY_HELP})")
    c.add_argument("--seeds", type=_seed_list, default="0,1,2",
                   help="comma-separated seeds; several give mean and spread (default 0,1,2)")
    c.add_argument("--out", default="runs/compare", help="output folder (default runs/compare); it holds one "
                   "comparison, which a new one replaces")

    m = sub.add_parser("memory", help="the ledger and the largest batch under a memory budget")
    m.add_argument("--model", default="resnet56", help=f"one of {', '.join(MODEL_NAMES)} (default resnet56)")
    m.add_argument("--width", type=_positive_int, default=None)
    m.add_argument("--size", type=_positive_int, default=32)
    m.add_argument("--channels", type=_int_to(10_000), default=3)
    m.add_argument("--classes", type=_int_to(100_000), default=10)
    m.add_argument("--policy", default="paper4", help=POLICY_HELP)
    m.add_argument("--batch", type=_positive_int, default=128, help="batch of the ledger (default 128)")
    m.add_argument("--budget", type=_bytes, default=None, help="e.g. 2GiB: search the largest batch whose "
                                                                "measured peak fits")
    m.add_argument("--confirm", action="store_true", help="with --budget: measure the predicted batch too "
                   "(one forward + backward at that batch; without it the answer is the line through the "
                   "measured peaks of 32, 64 and 128 images)")
    m.add_argument("--verbose", action="store_true", help="every saved entry, not only the totals")
    m.add_argument("--json", default=None, help="also write the totals to this file")

    from .study import DEFAULT_POLICIES as STUDY_POLICIES, EXPERIMENTS  # noqa: PLC0415
    s = sub.add_parser("study", help="gradient-error study: approximate against exact gradients, with plots",
                       description="Measure each storage policy's gradient against the exact one (relative "
                       "L2 error, cosine, bias of stochastic rounding) per parameter and layer depth, against "
                       "SGD's own minibatch noise. Experiments: depth (error against layer depth, one batch), "
                       "activations (sigmoid/tanh/GELU in place of ReLU), training (error over exact training), "
                       "optimizers (SGD/Adam/RMSprop trained with approximate gradients). See docs/study.md.")
    s.add_argument("--experiment", default="depth", choices=list(EXPERIMENTS) + ["all"])
    s.add_argument("--model", default=None, help=f"one of {', '.join(MODEL_NAMES)} (default resnet20; "
                   "resnet8 for optimizers)")
    s.add_argument("--width", type=_positive_int, default=None, help="base width of the model")
    s.add_argument("--data", default="digits", choices=["digits", "cifar10", "cifar100"])
    s.add_argument("--data-path", default=None, help="CIFAR archive (.tar.gz) or its folder")
    s.add_argument("--size", type=_positive_int, default=None, help="pad images to SIZE x SIZE (at least "
                   "their own size: digits 8, CIFAR 32)")
    s.add_argument("--batch-size", type=_positive_int, default=64)
    s.add_argument("--policies", type=_name_list, default=",".join(STUDY_POLICIES),
                   help=f"comma-separated ({POLICY_HELP}); exact is always measured first (its error is 0)")
    s.add_argument("--repeats", type=_positive_int, default=None,
                   help="draws (seeds) of each stochastic policy (default 8; 4 for training)")
    s.add_argument("--noise-batches", type=int, default=None, help="minibatches of the SGD-noise yardstick "
                   "(default 16; 8 for training; below 2: no yardstick)")
    s.add_argument("--no-systematic", action="store_true", help="depth: skip the error of the gradient "
                   "averaged over the noise minibatches (saves one pass per policy and minibatch)")
    s.add_argument("--seed", type=_natural, default=0)
    s.add_argument("--warmup", type=_natural, default=0, help="depth, activations: exact SGD iterations before "
                   "measuring (default 0: at initialisation)")
    s.add_argument("--lr", type=_positive_float, default=0.1, help="SGD learning rate of warm-up and training")
    s.add_argument("--activations", type=_activation_list, default="relu,sigmoid,tanh,gelu",
                   help="activations: comma-separated")
    s.add_argument("--iterations", type=_positive_int, default=None,
                   help="training: iterations (default 400); optimizers: iterations per run (default 200)")
    s.add_argument("--every", type=_positive_int, default=50, help="training: measure every N iterations")
    s.add_argument("--optimizers", type=_optimizer_list, default="sgd:0.1,adam:0.003,rmsprop:0.001",
                   help="optimizers: comma-separated name:lr")
    s.add_argument("--opt-policies", type=_name_list, default="exact,paper4,naive4",
                   help="optimizers: policies to train with")
    s.add_argument("--seeds", type=_seed_list, default="0,1", help="optimizers: comma-separated seeds")
    s.add_argument("--out", default="runs/study", help="output folder (default runs/study; one subfolder "
                   "per experiment)")
    parser.subcommands = {"train": t, "compare": c, "memory": m, "study": s}
    return parser


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and e.filename:        # "[Errno 21] Is a directory: 'x'"
        return f"{e.filename}: {e.strerror}"
    return " ".join(str(e).splitlines()) or type(e).__name__


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.typed = _typed(sys.argv[1:] if argv is None else argv)
    if args.command in ("train", "compare") and args.iterations is None and args.epochs is None:
        parser.error("give --epochs or --iterations")
    try:
        _check_outputs(args)
        _validate(args)
        if args.command == "train":
            return _train(args)
        if args.command == "compare":
            return _compare(args)
        if args.command == "study":
            return _study(args)
        return _memory(args)
    except (ValueError, OSError, DeviceError) as e:
        print(f"npapprox {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except MemoryError as e:                # what the checks above did not foresee
        print(f"npapprox {args.command}: error: out of memory: {_one_line(e)}; lower the batch size, --size or "
              f"--width", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # the trainer has said what it wrote where
        print("interrupted", file=sys.stderr)
        return 128 + getattr(e, "signum", 2)


if __name__ == "__main__":
    sys.exit(main())
