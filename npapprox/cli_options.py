"""The command line's option types (argparse ``type=`` functions: a bad value is
a one-line usage error) and the checks run on the parsed options before any work
(``check_outputs``, ``check_args``; ValueError with a one-line message)."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import re

from . import limits
from .backend import gpu_status
from .data.cifar import CIFAR10, CIFAR100
from .data.dataset import NATIVE
from .ledger import footprint
from .limits import fmt_bytes
from .nn.resnet import ACTIVATIONS
from .nn.zoo import MODELS, input_divisor
from .ops.conv import conv_algorithm
from .optim import OPTIMIZER_NAMES
from .policy import policy_from_name
from .runfolder import check_out
from .train import TrainConfig
from .validate import int_rule, is_int, is_number, number_rule


def number(text, kind, ok, rule: str):
    """``kind(text)`` if ``ok`` holds for it, else argparse's one-line error naming ``rule``
    (the rules and tests are ``npapprox.validate``'s, shared with the Python API)."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {rule}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
    return value


def positive_int(text):
    return number(text, int, is_int, int_rule(1))


def int_to(top):
    """An integer from 1 to ``top`` (a model's input channels or classes: the
    models are built at that size before any check)."""
    return lambda text: number(text, int, lambda v: is_int(v, 1, top), int_rule(1, top))


def natural(text):
    return number(text, int, lambda v: is_int(v, 0), int_rule(0))


def positive_float(text):
    return number(text, float, lambda v: is_number(v, lo=0, lo_open=True), number_rule(lo=0, lo_open=True))


def nonnegative_float(text):
    return number(text, float, lambda v: is_number(v, lo=0), number_rule(lo=0))


def byte_size(text):
    """``2GiB``, ``512MiB``, ``1e9`` (bytes); K, M, G, T count powers of 1024."""
    m = re.fullmatch(r"\s*((?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:e[+-]?[0-9]+)?)\s*([KMGT]?)(i?B?)\s*", text, re.IGNORECASE)
    if not m or (m.group(3) and m.group(3).lower() not in ("b", "ib")):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 2GiB, 512MiB, 1e9)")
    value = float(m.group(1)) * 1024 ** "_KMGT".index(m.group(2).upper() or "_")
    if not 1 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"must be between 1 byte and 8 EiB, got {text!r}")
    return int(value)


def comma_list(text, check=None):
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


def seed_list(text):
    return comma_list(text, natural)


def name_list(text):
    return comma_list(text)


def activation_list(text):
    def check(name):
        if name not in ACTIVATIONS:
            raise argparse.ArgumentTypeError(f"unknown activation {name!r}; expected {', '.join(ACTIVATIONS)}")
    return comma_list(text, check)


def optimizer_list(text):
    def check(item):
        name, colon, lr = item.partition(":")
        if name.strip().lower() not in OPTIMIZER_NAMES:
            raise argparse.ArgumentTypeError(f"unknown optimizer {name.strip()!r} in {item!r}; expected "
                                             f"{', '.join(OPTIMIZER_NAMES)}, each optionally :lr")
        try:
            if colon:
                positive_float(lr)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"learning rate in {item!r}: {e}") from None
    return comma_list(text, check)


def split_list(text) -> list:
    return [t.strip() for t in text.split(",") if t.strip()]


def check_outputs(args) -> None:
    """Every output path proven writable (folders created) before any work; ValueError."""
    if args.command == "memory":
        if args.json:
            check_out(args.json, "--json", file=True)
    elif args.out:
        check_out(args.out)


def check_args(args) -> None:
    """What argparse cannot check option by option, named as on the command line:
    policy and model names, the data and --data-path, --size against the images
    and the model, and whether the model and a batch fit in memory (before
    anything large is allocated). Raises ValueError."""
    cmd, state = args.command, False
    conv_algorithm()                                   # a bad $NPAPPROX_CONV, before any work
    if cmd in ("train", "compare"):
        run = train_config(args, "exact", 0, None)                     # after --preset
        model, data, size, width, batch = run.model, run.data, run.size, run.width, run.batch_size
        named = {"--policy": [args.policy]} if cmd == "train" else {"--policies": split_list(args.policies)}
        measured, state = list(named), run.optimizer != "sgd" or run.momentum > 0
        if run.nesterov and (run.optimizer != "sgd" or not run.momentum):
            raise ValueError(f"--nesterov needs --optimizer sgd and --momentum > 0, got --optimizer {run.optimizer} "
                             f"--momentum {run.momentum}")
        source = f"--preset {args.preset} (on {data})" if args.preset and "data" not in args.typed else None
        images = check_images(model, data, run.data_path, size, source)
        check_engine(run, next(iter(named.values())))
    elif cmd == "study":
        model = args.model or ("resnet8" if args.experiment == "optimizers" else "resnet20")
        data, size, width, batch = args.data, args.size, args.width, args.batch_size
        named = {"--policies": ["exact"] + split_list(args.policies), "--opt-policies": split_list(args.opt_policies)}
        measured = {"optimizers": ["--opt-policies"], "all": list(named)}.get(args.experiment, ["--policies"])
        if args.experiment in ("activations", "all") and not model.startswith("resnet"):
            raise ValueError(f"--experiment {args.experiment} swaps the activations of a ResNet; --model {model} "
                             f"is not one")
        images = check_images(model, data, args.data_path, size)
    else:
        model, size, width, batch = args.model, args.size, args.width, args.batch
        named = {"--policy": [args.policy]}
        measured = list(named)
        check_images(model, None, None, size)
        images = (args.channels, size, args.classes)
    policies = {}
    for option, names in named.items():
        for name in names:
            try:
                policies[name] = policy_from_name(name)
            except ValueError as e:
                raise ValueError(f"{option}: {e}") from None
    channels, side, classes = images
    check_memory(model, [policies[name] for option in measured for name in named[option]], classes=classes,
                  channels=channels, size=side, width=width, batch=batch,
                  batch_option="--batch" if cmd == "memory" else "--batch-size",
                  gpu=getattr(args, "device", "cpu") in ("gpu", "cuda"), optimizer_state=state)
    budget = getattr(args, "budget", None)
    if budget:

        if budget > (avail := limits.available_memory()):
            raise ValueError(f"--budget {fmt_bytes(budget)} is more than the {fmt_bytes(avail)} of memory "
                             f"available (the search measures batches up to the budget)")


def check_engine(run, policies) -> None:
    """--engine, --nproc and --device together, before any process starts."""
    if run.engine != "torch":
        if run.nproc > 1:
            raise ValueError(f"--nproc {run.nproc} needs --engine torch (data parallel through PyTorch's DDP)")
        if run.device == "cuda":
            raise ValueError("--device cuda needs --engine torch (the engine's own GPU device is --device gpu)")
        return
    if importlib.util.find_spec("torch") is None:
        raise ValueError("--engine torch needs PyTorch: pip install 'npapprox[torch]'")
    if run.device == "gpu":
        raise ValueError("--engine torch runs on --device cpu or cuda (gpu is the engine's CuPy device)")
    if run.nproc > run.batch_size:
        raise ValueError(f"--nproc {run.nproc} is larger than --batch-size {run.batch_size}: a rank would "
                         "have no images")
    if run.batch_size % run.nproc:
        raise ValueError(f"--batch-size {run.batch_size} is not divisible by --nproc {run.nproc}: every rank "
                         "takes an equal shard of each batch")
    from .bridge.storage import check_policy
    from .bridge.train import torch_device
    for name in policies:
        check_policy(policy_from_name(name))
    torch_device(run.device)
    if run.device == "cuda":   # the K-bit kernels and the optimizer's views of CUDA tensors are CuPy's
        if not gpu_status().available:
            raise ValueError(f"--engine torch --device cuda needs CuPy for the K-bit kernels and the "
                             f"optimizer: {gpu_status().reason}")
    if run.device == "cuda" and run.nproc > 1:
        import torch
        if run.nproc > torch.cuda.device_count():
            raise ValueError(f"--nproc {run.nproc} with --device cuda: torch sees {torch.cuda.device_count()} "
                             "GPU(s), one per process")


def check_images(model, data, data_path, size, source=None) -> tuple:
    """``(channels, side, classes)`` of the images the model will see, after checking
    --model, --data-path against --data (``source``: what chose the data, when not
    --data), and --size against the images (padded, never shrunk) and the model."""
    if model not in MODELS:
        raise ValueError(f"--model {model!r} is not a model; expected one of {', '.join(MODELS)}")
    channels, native, classes = NATIVE[data] if data else (None, size, None)
    if data == "digits" and data_path is not None:
        raise ValueError("--data-path is for --data cifar10 and cifar100; the digits data are embedded")
    if data in ("cifar10", "cifar100") and data_path is None:

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


def check_memory(model, policies, *, classes, channels, size, width, batch, batch_option, gpu,
                  optimizer_state) -> None:
    """Refuse a model or batch that cannot fit in the memory available. What the
    end of a forward pass holds at least: the parameters (twice with an optimizer
    state of one array per parameter, kept from the step before) and the bytes the
    batch stores for backward, predicted by ``ledger.footprint`` from small
    models. On the GPU only the parameters are checked (they are made on the host)."""
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


def train_config(args, policy, seed, out):

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields}
    if args.preset == "paper":  # what the user did not type stays the paper's
        cfg = TrainConfig.paper(**{k: v for k, v in given.items() if k in args.typed})
    else:
        cfg = TrainConfig(**given)
    return dataclasses.replace(cfg, policy=policy, seed=seed, out=out)
