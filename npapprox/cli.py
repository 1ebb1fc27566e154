"""The npapprox command.

    npapprox train    one run: model, data, storage policy, optimizer, schedule
    npapprox compare  several storage policies (and seeds) from the same seed: table + plots
    npapprox memory   the ledger of one model and policy, and the largest batch under a budget
    npapprox study    gradient-error study: approximate against exact gradients, per layer and over training

npapprox <command> --help lists the options. Defaults train on the digits
data that ship with scikit-learn, so every command runs offline."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from . import __version__, compare, nn, study
from .backend import DeviceError
from .cli_options import (
    activation_list,
    byte_size,
    check_args,
    check_outputs,
    int_to,
    name_list,
    natural,
    nonnegative_float,
    optimizer_list,
    positive_float,
    positive_int,
    seed_list,
    train_config,
)
from .ledger import ledger
from .limits import fmt_bytes
from .nn.zoo import MODELS
from .peak import max_batch
from .policy import policy_from_name, policy_help
from .runfolder import claim
from .study import DEFAULT_POLICIES as STUDY_POLICIES
from .study import EXPERIMENTS
from .train import Interrupted, NonFiniteLoss, Trainer

DEFAULT_POLICIES = "exact,paper8,paper4,naive4"


class _Parser(argparse.ArgumentParser):
    """A usage error is one line, the message and where to read more, not the usage block."""
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _run_options(p):
    p.add_argument("--model", default="resnet20", help=f"one of {', '.join(MODELS)} (default resnet20)")
    p.add_argument("--width", type=positive_int, default=None, help="base width of the model")
    p.add_argument("--data", default="digits", choices=["digits", "cifar10", "cifar100"])
    p.add_argument("--data-path", default=None, help="CIFAR archive (.tar.gz) or its folder")
    p.add_argument("--size", type=positive_int, default=None, help="pad images to SIZE x SIZE (at least "
                   "their own size: digits 8, CIFAR 32)")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "rmsprop"])
    p.add_argument("--lr", type=positive_float, default=0.1)
    p.add_argument("--momentum", type=nonnegative_float, default=0.9)
    p.add_argument("--nesterov", action="store_true")
    p.add_argument("--weight-decay", type=nonnegative_float, default=2e-4)
    p.add_argument("--decay", default="kernels", choices=["kernels", "all"],
                   help="weight decay on conv/linear kernels only (the paper) or on all parameters")
    p.add_argument("--schedule", default="cosine", choices=["paper", "step", "cosine", "constant"])
    p.add_argument("--epochs", type=positive_int, default=15)
    p.add_argument("--iterations", type=positive_int, default=None, help="overrides --epochs")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--augment", action="store_true", help="pad-4 random crop and horizontal flip")
    p.add_argument("--normalize", default="image-mean", choices=["image-mean", "channel"])
    p.add_argument("--eval-batch-stats", action="store_true",
                   help="evaluate BN with batch statistics, as the paper's code")
    p.add_argument("--preset", choices=["paper"], help="the paper's CIFAR protocol (ResNet-164, 64k iterations); "
                                                        "explicit options still override it")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu", "cuda"],
                   help="gpu: the engine on CuPy (npapprox[gpu]); cuda: --engine torch on a GPU torch sees")
    p.add_argument("--engine", default="npapprox", choices=["npapprox", "torch"],
                   help="torch: the same run on a torch model through npapprox.bridge (npapprox[torch])")
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


def _train(args) -> int:

    policy_from_name(args.policy)  # fail early on a bad name
    if args.out:
        if not args.resume:  # before any work (the trainer checks again when it starts)
            claim(args.out, args.overwrite)
    cfg = train_config(args, args.policy, args.seed, args.out)
    try:
        if cfg.engine == "torch":   # one process, --nproc spawned ones, or one rank of torchrun
            from .bridge.ddp import RankError
            from .bridge.train import train as train_torch
            try:
                train_torch(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
            except RankError as e:
                print(e.error.rstrip(), file=sys.stderr)
                print(f"npapprox train: error: {e}", file=sys.stderr)
                return 1
        else:
            Trainer(cfg, progress=not args.quiet, overwrite=args.overwrite).start(args.resume)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except Interrupted:
        if cfg.out:
            print("continue with the same command and --resume", file=sys.stderr)
        raise
    return 0


def _compare(args) -> int:

    policies = [p.strip() for p in args.policies.split(",")]     # items refused empty and repeated ones
    for p in policies:
        policy_from_name(p)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    compare.start(out, policies, seeds)
    runs = {}
    for seed in seeds:               # the policies take turns within each seed: load drift spreads over all
        for policy in policies:
            cfg = train_config(args, policy, seed, str(out / compare.run_folder(policy, seed)))
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

    policy = policy_from_name(args.policy)
    nn.manual_seed(0)
    model = nn.build_model(args.model, num_classes=args.classes, in_channels=args.channels,
                           input_size=args.size, width=args.width)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, args.channels, args.size, args.size), dtype=np.float32)
    y = rng.integers(0, args.classes, args.batch)
    led = ledger(model, x, y, policy)
    print(led.table() if args.verbose else led.summary())
    result = {"policy": repr(policy), "stored": led.stored, "float32_per_unit": led.float32_per_unit,
              "standard_autodiff": led.standard_autodiff}
    if args.budget:
        shape = (args.channels, args.size, args.size)
        details = {}
        batch, peak = max_batch(model, shape, args.classes, policy, args.budget, log=print, details=details,
                                confirm=args.confirm, confirm_next=args.confirm)
        what = f"{args.model} on {'x'.join(map(str, shape))} inputs under {policy}"
        if peak is None:
            res = details["residual"]
            print(f"largest batch with predicted peak <= {fmt_bytes(args.budget)} ({args.budget:,} B): {batch} for "
                  f"{what}; from the lines through the measured peaks of each stretch between two ops at "
                  f"{', '.join(map(str, details['probes']))} images ({fmt_bytes(details['per_image'])} per image "
                  f"where it binds"
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

    def split(text):
        return tuple(t.strip() for t in text.split(",") if t.strip())
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="npapprox", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"npapprox {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one model under one storage policy")
    _run_options(t)
    t.add_argument("--policy", default="exact", help=policy_help())
    t.add_argument("--seed", type=natural, default=0)
    t.add_argument("--out", default=None, help="output folder: metrics.jsonl, steps.jsonl, checkpoint.safetensors "
                   "(one run per folder)")
    t.add_argument("--nproc", type=positive_int, default=1, help="with --engine torch: train in NPROC local "
                   "processes with DistributedDataParallel (gloo on cpu, NCCL on cuda), each on its shard of "
                   "every batch; under torchrun leave it out")
    again = t.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in OUT from its checkpoint")
    again.add_argument("--overwrite", action="store_true", help="start again in OUT: remove the run there first")

    c = sub.add_parser("compare", help="train under several storage policies; table and plots")
    _run_options(c)
    c.add_argument("--policies", type=name_list, default=DEFAULT_POLICIES,
                   help=f"comma-separated ({policy_help()})")
    c.add_argument("--seeds", type=seed_list, default="0,1,2",
                   help="comma-separated seeds; several give mean and spread (default 0,1,2)")
    c.add_argument("--out", default="runs/compare", help="output folder (default runs/compare); it holds one "
                   "comparison, which a new one replaces")

    m = sub.add_parser("memory", help="the ledger and the largest batch under a memory budget")
    m.add_argument("--model", default="resnet56", help=f"one of {', '.join(MODELS)} (default resnet56)")
    m.add_argument("--width", type=positive_int, default=None)
    m.add_argument("--size", type=positive_int, default=32)
    m.add_argument("--channels", type=int_to(10_000), default=3)
    m.add_argument("--classes", type=int_to(100_000), default=10)
    m.add_argument("--policy", default="paper4", help=policy_help())
    m.add_argument("--batch", type=positive_int, default=128, help="batch of the ledger (default 128)")
    m.add_argument("--budget", type=byte_size, default=None, help="e.g. 2GiB: search the largest batch whose "
                                                                "measured peak fits")
    m.add_argument("--confirm", action="store_true", help="with --budget: measure the predicted batch too "
                   "and the next one, until a batch fits and the next does not (forward + backward passes at those "
                   "batches; without it the answer is predicted from the "
                   "measured peaks of 128 and 256 images, a line per stretch between two ops)")
    m.add_argument("--verbose", action="store_true", help="every saved entry, not only the totals")
    m.add_argument("--json", default=None, help="also write the totals to this file")

    s = sub.add_parser("study", help="gradient-error study: approximate against exact gradients, with plots",
                       description="Measure each storage policy's gradient against the exact one (relative "
                       "L2 error, cosine, bias of stochastic rounding) per parameter and layer depth, against "
                       "SGD's own minibatch noise. Experiments: depth (error against layer depth, one batch), "
                       "activations (sigmoid/tanh/GELU in place of ReLU), training (error over exact training), "
                       "optimizers (SGD/Adam/RMSprop trained with approximate gradients), window (the paper's "
                       "BN window at several widths against the fitted window). See docs/study.md.")
    s.add_argument("--experiment", default="depth", choices=list(EXPERIMENTS) + ["all"])
    s.add_argument("--model", default=None, help=f"one of {', '.join(MODELS)} (default resnet20; "
                   "resnet8 for optimizers)")
    s.add_argument("--width", type=positive_int, default=None, help="base width of the model")
    s.add_argument("--data", default="digits", choices=["digits", "cifar10", "cifar100"])
    s.add_argument("--data-path", default=None, help="CIFAR archive (.tar.gz) or its folder")
    s.add_argument("--size", type=positive_int, default=None, help="pad images to SIZE x SIZE (at least "
                   "their own size: digits 8, CIFAR 32)")
    s.add_argument("--batch-size", type=positive_int, default=64)
    s.add_argument("--policies", type=name_list, default=",".join(STUDY_POLICIES),
                   help=f"comma-separated ({policy_help()}); exact is always measured first (its error is 0)")
    s.add_argument("--repeats", type=positive_int, default=None,
                   help="draws (seeds) of each stochastic policy (default 8; 4 for training)")
    s.add_argument("--noise-batches", type=int, default=None, help="minibatches of the SGD-noise yardstick "
                   "(default 16; 8 for training; below 2: no yardstick)")
    s.add_argument("--no-systematic", action="store_true", help="depth: skip the error of the gradient "
                   "averaged over the noise minibatches (saves one pass per policy and minibatch)")
    s.add_argument("--seed", type=natural, default=0)
    s.add_argument("--warmup", type=natural, default=0, help="depth, activations: exact SGD iterations before "
                   "measuring (default 0: at initialisation)")
    s.add_argument("--lr", type=positive_float, default=0.1, help="SGD learning rate of warm-up and training")
    s.add_argument("--activations", type=activation_list, default="relu,sigmoid,tanh,gelu",
                   help="activations: comma-separated")
    s.add_argument("--iterations", type=positive_int, default=None,
                   help="training: iterations (default 400); optimizers: iterations per run (default 200)")
    s.add_argument("--every", type=positive_int, default=50, help="training: measure every N iterations")
    s.add_argument("--optimizers", type=optimizer_list, default="sgd:0.1,adam:0.003,rmsprop:0.001",
                   help="optimizers: comma-separated name:lr")
    s.add_argument("--opt-policies", type=name_list, default="exact,paper4,naive4",
                   help="optimizers: policies to train with")
    s.add_argument("--seeds", type=seed_list, default="0,1", help="optimizers: comma-separated seeds")
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
        check_outputs(args)
        check_args(args)
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
