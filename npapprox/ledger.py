"""The memory ledger: every saved entry of one forward pass, and a measured peak.

``ledger(model, x, labels, policy)`` runs one recorded forward pass and lists
what the graph keeps for backward: module, op, entry, kind, form, bits, shape,
payload and metadata bytes. Totals are set against two baselines:

* ``float32 per unit``: what the same engine keeps in exact mode (the paper's
  exact baseline): one float32 tensor per BN -> ReLU unit, a reference for every
  consumer of a unit's output, float32 for the other activations;
* ``standard autodiff``: what a framework that saves each op's inputs keeps: the
  BN input *and* the ReLU output of every unit, and its own float32 copy of
  every consumer's input (conv input, projection input).

The measured peak and the budget search are in ``npapprox.peak``.

``footprint(name, policy, ...)`` predicts a model's parameter bytes and the
bytes stored per image without building it at full size (size checks use it
before allocating anything).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import ops
from .function import Function
from .nn import build_model, input_divisor
from .ops.conv import chunk_plan, winograd_tile, winograd_workspace
from .parallel import workers
from .policy import ACTIVATION, PARAM, UNIT, Policy, current_policy, storage_policy
from .storage import UnitRef
from .tensor import Tensor, topological_order
from .units import Unit
from .window import WindowMonitor, monitoring
from .window import table as window_table


@dataclass
class Entry:
    module: str
    op: str
    name: str
    kind: str
    form: str
    bits: int
    shape: tuple
    payload: int
    meta: int
    policy: str
    conv: tuple | None = None        # a conv's input entry: (weight shape, stride, padding)

    @property
    def float32_bytes(self) -> int:
        """This entry's size as one float32 tensor (0 for parameters)."""
        return 0 if self.kind == PARAM else 4 * int(np.prod(self.shape))


@dataclass
class Ledger:
    entries: list
    policy: str
    windows: list | None = None      # per stored BN window: ``window.unit_row`` (clipped fraction, |beta/gamma|)

    @property
    def stored(self) -> int:
        return sum(e.payload + e.meta for e in self.entries)

    @property
    def activation_stored(self) -> int:
        """Bytes of ACTIVATION and UNIT entries only (what the method compresses)."""
        return sum(e.payload + e.meta for e in self.entries if e.kind in (ACTIVATION, UNIT))

    @property
    def float32_per_unit(self) -> int:
        return sum(0 if e.form.startswith("ref:") else
                   e.float32_bytes if e.kind in (ACTIVATION, UNIT) else e.payload + e.meta
                   for e in self.entries)

    @property
    def standard_autodiff(self) -> int:
        return sum(2 * e.float32_bytes if e.kind == UNIT else
                   e.float32_bytes if e.kind == ACTIVATION else e.payload + e.meta
                   for e in self.entries)

    def table(self) -> str:
        head = (f"{'module':<22} {'op':<20} {'entry':<10} {'form':<14} {'bits':>4} {'shape':<18} "
                f"{'payload B':>11} {'meta B':>8}  policy")
        lines = [head, "-" * len(head)]
        for e in self.entries:
            lines.append(f"{e.module[:22]:<22} {e.op[:20]:<20} {e.name:<10} {e.form[:14]:<14} {e.bits:>4} "
                         f"{str(e.shape)[:18]:<18} {e.payload:>11,} {e.meta:>8,}  {e.policy}")
        lines.append("-" * len(head))
        lines.append(self.summary())
        if self.windows:
            lines += ["", "BN windows: values clipped per unit, channels whose |beta/gamma| exceeds the window",
                      window_table(self.windows)]
        return "\n".join(lines)

    def summary(self) -> str:
        s = self.stored
        return (f"stored for backward ({self.policy}): {s:,} B;  float32 per unit: {self.float32_per_unit:,} B "
                f"({self.float32_per_unit / max(s, 1):.2f}x);  standard autodiff: {self.standard_autodiff:,} B "
                f"({self.standard_autodiff / max(s, 1):.2f}x)")


def forward_loss(model, x, labels):
    """The model's output on ``x``, and its cross-entropy with ``labels`` when they are given."""
    out = model(x if isinstance(x, Tensor) else Tensor(x))
    return ops.cross_entropy(out, labels) if labels is not None else out


def ledger(model, x, labels=None, policy: Policy | None = None) -> Ledger:
    """Run one recorded forward pass under ``policy`` (default: the current one)
    and list every saved entry, in forward order."""
    policy = current_policy() if policy is None else policy
    names = {id(m): (n or type(m).__name__) for n, m in model.named_modules()}
    with storage_policy(policy), monitoring(policy, WindowMonitor(names)) as monitor:
        root = forward_loss(model, x, labels)
    entries = []
    for ctx in (topological_order(root._ctx) if root._ctx is not None else []):
        module = names.get(id(ctx.module), "-") if ctx.module is not None else "-"
        for name, stored in ctx.saved.items():
            kind = ctx.fn.SAVES[name]
            conv = ((tuple(ctx.saved["w"].shape), ctx.stride, ctx.padding)
                    if ctx.fn.__name__ == "Conv2d" and name == "x" else None)
            entries.append(Entry(module, ctx.fn.__name__, name, kind, stored.form, stored.bits,
                                 tuple(stored.shape), stored.payload_nbytes, stored.meta_nbytes,
                                 repr(ctx.policy), conv))
    return Ledger(entries, repr(policy), monitor.rows if monitor is not None else None)


#: the transient bound: at most this many float32 buffers the size of the largest
#: activation coexist with the stored state, plus one conv's im2row workspace
TRANSIENT_BUFFERS = 2.5


def conv_workspace(x_shape, w_shape, stride: int, padding: int, xp=np) -> int:
    """Bytes of one conv's backward workspace (``ops.conv``: per worker the input
    samples of one chunk, decoded from their stored form (m / L, C, H, W), its rows
    (m, K), its output rows (m, F) and two (K, F) weight-gradient partials; on
    Winograd's path ``ops.conv.winograd_workspace``)."""
    tile = winograd_tile(x_shape, w_shape, stride, padding, xp)
    if tile:                                    # a 3x3 stride-1 conv on Winograd's path
        return winograd_workspace(x_shape, w_shape, padding, tile)
    n, _, h, w = x_shape
    f, c, kh, kw = w_shape
    L = ((h + 2 * padding - kh) // stride + 1) * ((w + 2 * padding - kw) // stride + 1)
    k = kh * kw * c
    shares, m_max = chunk_plan(n, L, k, 4, xp)
    return 4 * min(len(shares), workers(xp)) * (m_max // L * c * h * w + m_max * (k + f) + 2 * k * f)


def transient_bound(led: Ledger) -> int:
    """Bytes the measured peak may exceed the ledger by (docs/storage.md, "Transients"):
    ``TRANSIENT_BUFFERS`` float32 buffers of the largest activation plus the largest
    conv workspace (``conv_workspace``), from the shapes the ledger lists."""
    act = max((4 * int(np.prod(e.shape)) for e in led.entries if e.kind in (ACTIVATION, UNIT)), default=0)
    ws = max((conv_workspace(e.shape, e.conv[0], *e.conv[1:]) for e in led.entries if e.conv), default=0)
    return int(TRANSIENT_BUFFERS * act + ws)


__all__ = ["Entry", "Ledger", "Unit", "UnitRef", "footprint", "forward_loss", "ledger"]


def saves_table() -> str:
    """Markdown table of every op's ``SAVES`` declaration (docs/storage.md embeds
    it; a test keeps the two in step)."""
    def subclasses(cls):
        for sub in sorted(cls.__subclasses__(), key=lambda c: (c.__module__, c.__name__)):
            yield sub
            yield from subclasses(sub)

    rows = ["| op | module | saves (name: kind) |", "|---|---|---|"]
    for fn in subclasses(Function):
        if not fn.__module__.startswith("npapprox.ops"):
            continue
        saves = ", ".join(f"`{n}`: {k}" for n, k in fn.SAVES.items()) or "nothing"
        rows.append(f"| `{fn.__name__}` | `{fn.__module__.rsplit('.', 1)[-1]}` | {saves} |")
    return "\n".join(rows)


def footprint(name: str, policy: Policy, *, num_classes: int = 10, in_channels: int = 3, size: int = 32,
              width: int | None = None) -> tuple[int, int]:
    """``(parameter bytes, activation bytes stored per image)`` of model ``name``
    (``nn.build_model``) on ``size`` x ``size`` inputs under ``policy``, without
    building it at that size or width. The bytes one more image adds (ledgers of
    batches of 4 and 2, so what a batch stores once is left out) at the two
    smallest sizes the model takes above 4, r and 2r, are fitted as a + b size^2
    (the feature maps grow as size^2; what follows the global pool does not).
    Stored bytes grow linearly with the width and parameters quadratically
    (exactly so where channel counts are multiples of the width): widths above 24
    are extrapolated from models of width 8, 16 and 24."""

    d = input_divisor(name)
    ref = d * -(-5 // d)
    rng = np.random.default_rng(0)

    def measure(w):
        """(parameter bytes, stored bytes per image at `size`) at width w."""
        model = build_model(name, num_classes=num_classes, in_channels=in_channels, input_size=ref, width=w)

        def stored(n, s):
            x = rng.standard_normal((n, in_channels, s, s), dtype=np.float32)
            return ledger(model, x, np.arange(n) % num_classes, policy).activation_stored
        per_image = [(stored(4, s) - stored(2, s)) / 2 for s in (ref, 2 * ref)]
        b = (per_image[1] - per_image[0]) / (3 * ref * ref)
        return sum(p.data.nbytes for p in model.parameters()), per_image[0] + b * (size * size - ref * ref)

    if width is None or width <= 24:
        params, per_image = measure(width)
    else:
        (p8, a8), (p16, _), (p24, a24) = (measure(w) for w in (8, 16, 24))
        t = (width - 16) / 8                # the parabola through the three parameter counts
        params = p16 + t * (p24 - p8) / 2 + t * t * (p24 - 2 * p16 + p8) / 2
        per_image = a8 + (a24 - a8) * (width - 8) / 16
    return int(params), int(per_image)
