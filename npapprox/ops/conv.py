"""2-D convolution (cross-correlation, as in every deep-learning framework)."""
from __future__ import annotations

import os

import numpy as np

from ..backend import array_module
from ..function import ACTIVATION, PARAM, Function
from ..kernels import winograd as wino
from ..kernels.im2col import im2row, row2im, transpose_samples
from ..parallel import deal, run, workers
from ..validate import affine_args, check_int, out_size

#: im2row rows are built for a few samples at a time, about this many bytes per
#: worker: the rows then stay in that core's cache between im2row and the matrix
#: product, instead of a 9x-activation-sized buffer going through main memory.
CHUNK_BYTES = 2 << 20
#: Winograd's tile stacks of a chunk (V, M: T x P x channels) take about this many bytes
#: per worker: half a MiB keeps a ResNet-20 step as fast as 1 MiB (within 3% per conv,
#: one quiet run) and its measured peak 2.7 MiB lower
WINOGRAD_CHUNK_BYTES = 1 << 19
#: On the GPU the cache argument does not hold and every chunk costs a few kernel
#: launches: a whole batch is one chunk (one im2row, one GEMM), up to this many
#: bytes of rows (a bound on the workspace in device memory).
GPU_CHUNK_BYTES = 1 << 30


#: the environment variable that picks the algorithm of 3x3 stride-1 convolutions on the CPU
CONV_ENV = "NPAPPROX_CONV"
#: "auto": the measured rule of ``winograd_tile``; "im2row"; "winograd": F(WINOGRAD_TILE x WINOGRAD_TILE, 3x3);
#: "winograd2" / "winograd4": that tile
ALGORITHMS = ("auto", "im2row", "winograd", "winograd2", "winograd4")
#: the Winograd output tile m of "auto" and "winograd" (docs/kernels.md, "Winograd convolution")
WINOGRAD_TILE = 4
_forced_algorithm: str | None = None


def use_algorithm(name: str | None) -> None:
    """Force the algorithm of 3x3 stride-1 convolutions (one of ``ALGORITHMS``);
    ``None``: back to ``$NPAPPROX_CONV`` (default "auto")."""
    global _forced_algorithm
    if name is not None and name not in ALGORITHMS:
        raise ValueError(f"conv algorithm must be one of {', '.join(ALGORITHMS)}, got {name!r}")
    _forced_algorithm = name


def conv_algorithm() -> str:
    """The algorithm in force: ``use_algorithm``'s, else ``$NPAPPROX_CONV``, else "auto"."""
    if _forced_algorithm is not None:
        return _forced_algorithm
    name = os.environ.get(CONV_ENV, "").strip().lower() or "auto"
    if name not in ALGORITHMS:
        raise ValueError(f"{CONV_ENV} must be one of {', '.join(ALGORITHMS)}, got {name!r}")
    return name


def winograd_tile(x_shape, w_shape, stride: int, padding: int, xp=np) -> int:
    """The Winograd tile m of F(m x m, 3 x 3) this convolution runs with, 0 for im2row.

    Only 3x3 stride-1 convolutions of NumPy arrays have a Winograd path. "auto"
    takes F(4x4, 3x3) where it measured faster than im2row side by side
    (``benchmarks/bench_conv.py --more``; docs/kernels.md): with h = C*F/(C+F)
    (the transforms cost ~C+F per pixel, the products ~C*F), h >= 8, an output
    of at least one whole tile each way (a 2x2 output would fill a fourth of a
    4x4 tile) and h*OH*OW >= 1024 (below, per-chunk overheads ate the gain:
    16->16 at 8x8 ran 1.09x im2row's time). A function of the shapes and the
    switch only, so a run is deterministic."""
    if xp is not np or tuple(w_shape[2:]) != (3, 3) or stride != 1:
        return 0
    name = conv_algorithm()
    if name == "im2row":
        return 0
    if name == "auto":
        f, c = w_shape[:2]
        oh, ow = (s + 2 * padding - 2 for s in x_shape[2:])
        h = c * f / (c + f)
        return WINOGRAD_TILE if h >= 8 and min(oh, ow) >= WINOGRAD_TILE and h * oh * ow >= 1024 else 0
    return int(name[-1]) if name[-1].isdigit() else WINOGRAD_TILE


def _weight_rows(w):
    """w (F, C, KH, KW) -> W2 (F, KH*KW*C): the column order of im2row's rows."""
    f, c, kh, kw = w.shape
    return w.transpose(0, 2, 3, 1).reshape(f, kh * kw * c)


def chunk_plan(n, rows_per_sample, k, itemsize, xp, budget=None):
    """Batch slices whose rows ``(B*OH*OW, k)`` take at most about ``budget`` bytes
    (default CHUNK_BYTES, GPU_CHUNK_BYTES on the GPU), as many per worker and of
    sizes differing by at most one sample (the larger ones first), dealt to the
    workers (``npapprox.parallel``): every worker gets the same number of samples
    give or take one, so none waits for another at the end -> (one list of slices
    per worker, rows of the largest chunk: the first). A function of the shapes,
    the backend and the worker count only."""
    if budget is None:
        budget = CHUNK_BYTES if xp is np else GPU_CHUNK_BYTES
    step = max(1, budget // max(1, rows_per_sample * k * itemsize))
    w = workers(xp)
    c = min(n, w * -(-n // (w * step)))                         # chunks; an empty batch: none
    size, big = divmod(n, c) if c else (0, 0)
    starts = [i * size + min(i, big) for i in range(c + 1)]
    shares = deal([slice(starts[i], starts[i + 1]) for i in range(c)], xp)
    return shares, (size + (big > 0)) * rows_per_sample


class Conv2d(Function):
    """y[n,f,i,j] = b[f] + sum_{c,p,q} w[f,c,p,q] * xpad[n,c,i*s+p,j*s+q]

    Shapes: x (N,C,H,W), w (F,C,KH,KW), b (F,) or None -> y (N,F,OH,OW),
    OH = (H + 2*pad - KH) // s + 1.

    Two algorithms, chosen per layer shape at forward (``winograd_tile``), the
    backward using the forward's: im2row + GEMM (any shape) and Winograd
    (3x3 stride 1 on the CPU). Both work on chunks of a few samples, the chunks
    run on all cores at once, whole chunks per core (``npapprox.parallel``).

    im2row, as matrices, for a chunk of B samples: R = im2row(x_chunk)
    (B*OH*OW, K) with K = KH*KW*C, W2 = w moved to (F, KH, KW, C) and reshaped
    to (F, K), and Yr = R @ W2^T (B*OH*OW, F), the chunk's output with channels
    last (moved to NCHW by one transposing copy). Backward, per chunk, with gYr
    the output gradient moved to (B*OH*OW, F): gW2^T += R^T @ gYr, gR = gYr @ W2
    -> row2im -> gx, and gb = sum gY. Tall products like these run much faster
    in OpenBLAS than one small product per sample (kernels/im2col.py).

    Winograd F(m x m, 3 x 3) (kernels/winograd.py), for a chunk with P tiles:
    U = filter_tiles(w) (T, C, F) with T = (m+2)^2, V = input_tiles(x_chunk)
    (T, P, C), M[t] = V[t] @ U[t] (T batched GEMMs) and y = output_tiles(M).
    Backward, the transposes: gM = output_tiles_adjoint(gy) (T, P, F),
    gU[t] += V[t]^T @ gM[t], gV[t] = gM[t] @ U[t]^T -> input_tiles_adjoint -> gx,
    and gw = filter_tiles_adjoint(gU).

    The input (not its rows or tiles) is what is saved: rows / tiles are rebuilt
    in backward, a few samples at a time, so the ledger counts one
    activation-sized tensor and the rows never exist for the whole batch. An
    input stored as a unit's codes (or its exact BN input) is rebuilt chunk by
    chunk too (``Stored.sample_reader``): no rebuilt input of the whole batch
    exists either.
    """

    SAVES = {"x": ACTIVATION, "w": PARAM}

    @staticmethod
    def forward(ctx, x, w, b, *, stride=1, padding=0):
        xp = array_module(x)
        tile = winograd_tile(x.shape, w.shape, stride, padding, xp)
        y = _winograd_forward(x, w, padding, tile) if tile else _im2row_forward(x, w, stride, padding)
        if b is not None:
            y += b.reshape(1, -1, 1, 1)
        ctx.save(x=x, w=w)
        ctx.stride, ctx.padding, ctx.tile = stride, padding, tile
        return y

    @staticmethod
    def backward(ctx, gy):
        w = ctx.restore("w")
        need_x, need_w, need_b = ctx.needs_input_grad
        x_of = ctx.sample_reader("x") if need_w else None         # a chunk's samples -> their input
        x_shape = (gy.shape[0], w.shape[1]) + tuple(ctx.saved["x"].shape[2:])
        n, f, oh, ow = gy.shape
        gb = gy.reshape(n, f, oh * ow).sum(axis=(0, 2)) if need_b else None
        if ctx.tile:
            gx, gw = _winograd_backward(gy, w, x_of, x_shape, ctx.padding, ctx.tile, need_x, need_w)
        else:
            gx, gw = _im2row_backward(gy, w, x_of, x_shape, ctx.stride, ctx.padding, need_x, need_w)
        return gx, gw, gb


def _sum_partials(parts):
    """The workers' partial sums, added in worker order (deterministic for a worker count)."""
    for part in parts[1:]:
        parts[0] += part
    return parts[0]


def _im2row_forward(x, w, stride, padding):
    xp = array_module(x)
    n, _, h, wd = x.shape
    f, _, kh, kw = w.shape
    oh = (h + 2 * padding - kh) // stride + 1
    ow = (wd + 2 * padding - kw) // stride + 1
    L = oh * ow
    w2 = _weight_rows(w)                                          # (F, K)
    y = xp.empty((n, f, L), dtype=x.dtype)
    shares, m_max = chunk_plan(n, L, w2.shape[1], x.dtype.itemsize, xp)
    # every worker's buffers, made before any worker starts (a deterministic peak)
    rows_ws = [xp.empty((m_max, w2.shape[1]), dtype=x.dtype) for _ in shares]
    yr_ws = [xp.empty((m_max, f), dtype=x.dtype) for _ in shares]

    def work(k):                                                  # worker k's chunks
        for sl in shares[k]:
            m = (sl.stop - sl.start) * L
            r = im2row(x[sl], kh, kw, stride, padding, out=rows_ws[k][:m])    # (B*L, K)
            yr = xp.matmul(r, w2.T, out=yr_ws[k][:m])                         # (B*L, F)
            transpose_samples(yr.reshape(m // L, L, f), out=y[sl])             # (B, F, L)

    run(work, len(shares))
    return y.reshape(n, f, oh, ow)


def _im2row_backward(gy, w, x_of, x_shape, s, pad, need_x, need_w):
    xp = array_module(gy)
    n, f, oh, ow = gy.shape
    c, kh, kw = w.shape[1:]
    L = oh * ow
    gy3 = gy.reshape(n, f, L)                                     # (N, F, L)
    w2 = _weight_rows(w)                                          # (F, K)
    shares, m_max = chunk_plan(n, L, w2.shape[1], gy.dtype.itemsize, xp)
    gx = xp.empty(x_shape, dtype=gy.dtype) if need_x else None
    # every worker's buffers, made before any worker starts (a deterministic peak)
    rows_ws = [xp.empty((m_max, w2.shape[1]), dtype=gy.dtype) for _ in shares]
    gyr_ws = [xp.empty((m_max, f), dtype=gy.dtype) for _ in shares]
    gw2t = [xp.zeros(w2.shape[::-1], dtype=gy.dtype) for _ in shares] if need_w else None   # (K, F)
    prod = [xp.empty(w2.shape[::-1], dtype=gy.dtype) for _ in shares] if need_w else None

    def work(k):                                                  # worker k's chunks -> gw2t[k]
        for sl in shares[k]:
            m = (sl.stop - sl.start) * L
            gyr = gyr_ws[k][:m]
            transpose_samples(gy3[sl], out=gyr.reshape(m // L, L, f))          # (B*L, F)
            if need_w:
                r = im2row(x_of(sl), kh, kw, s, pad, out=rows_ws[k][:m])       # (B*L, K)
                gw2t[k] += xp.matmul(r.T, gyr, out=prod[k])      # (K, F): faster than gyr.T @ r
            if need_x:
                grows = xp.matmul(gyr, w2, out=rows_ws[k][:m])                 # (B*L, K)
                row2im(grows, gx[sl].shape, kh, kw, s, pad, out=gx[sl])

    run(work, len(shares))
    gw = None
    if need_w:  # (KH, KW, C, F) -> (F, C, KH, KW)
        gw = xp.ascontiguousarray(_sum_partials(gw2t).reshape(kh, kw, c, f).transpose(3, 2, 0, 1))
    return gx, gw


def _winograd_plan(n, c, f, tiles, T, itemsize):
    """chunk_plan for Winograd: a chunk's tile stacks V (T, P, C) and M (T, P, F)
    take about WINOGRAD_CHUNK_BYTES -> (shares, P of the largest chunk)."""
    return chunk_plan(n, tiles, T * max(c, f), itemsize, np, WINOGRAD_CHUNK_BYTES)


def winograd_workspace(x_shape, w_shape, padding: int, m: int, itemsize: int = 4) -> int:
    """Bytes of Winograd's backward workspace (``_winograd_backward``): per worker the
    input samples of one chunk (decoded from their stored form), V / gV (T, P, C), gM
    (T, P, F) and two (T, C, F) weight-gradient partials; and U (T, C, F)."""
    n, c, h, w = x_shape
    f = w_shape[0]
    th, tw = wino.tile_grid(h + 2 * padding - 2, w + 2 * padding - 2, m)
    T = (m + 2) ** 2
    shares, p_max = _winograd_plan(n, c, f, th * tw, T, itemsize)
    per_worker = p_max // (th * tw) * c * h * w + T * p_max * (c + f) + 2 * T * c * f
    return itemsize * (min(len(shares), workers(np)) * per_worker + T * c * f)


def _winograd_forward(x, w, pad, m):
    n, c, h, wd = x.shape
    f = w.shape[0]
    oh, ow = h + 2 * pad - 2, wd + 2 * pad - 2
    th, tw = wino.tile_grid(oh, ow, m)
    T = (m + 2) ** 2
    u = wino.filter_tiles(w, m)                                   # (T, C, F)
    tf = wino.ChunkTransforms(m, x.dtype, wino.compiled_for(x))
    y = np.empty((n, f, oh, ow), dtype=x.dtype)
    shares, p_max = _winograd_plan(n, c, f, th * tw, T, x.dtype.itemsize)
    # every worker's buffers, made before any worker starts (a deterministic peak)
    v_ws = [np.empty(T * p_max * c, dtype=x.dtype) for _ in shares]
    m_ws = [np.empty(T * p_max * f, dtype=x.dtype) for _ in shares]

    def work(k):                                                  # worker k's chunks
        for sl in shares[k]:
            p = (sl.stop - sl.start) * th * tw
            v = tf.input_tiles(x[sl], pad, v_ws[k][:T * p * c].reshape(T, p, c))
            mt = np.matmul(v, u, out=m_ws[k][:T * p * f].reshape(T, p, f))    # (T, P, F)
            tf.output_tiles(mt, y[sl])

    run(work, len(shares))
    return y


def _winograd_backward(gy, w, x_of, x_shape, pad, m, need_x, need_w):
    n, f, oh, ow = gy.shape
    c = w.shape[1]
    th, tw = wino.tile_grid(oh, ow, m)
    T = (m + 2) ** 2
    u = wino.filter_tiles(w, m)                                   # (T, C, F)
    tf = wino.ChunkTransforms(m, gy.dtype, wino.compiled_for(gy))
    shares, p_max = _winograd_plan(n, c, f, th * tw, T, gy.dtype.itemsize)
    gx = np.empty(x_shape, dtype=gy.dtype) if need_x else None
    # every worker's buffers, made before any worker starts (a deterministic peak)
    v_ws = [np.empty(T * p_max * c, dtype=gy.dtype) for _ in shares]
    gm_ws = [np.empty(T * p_max * f, dtype=gy.dtype) for _ in shares]
    gu = [np.zeros(u.shape, dtype=gy.dtype) for _ in shares] if need_w else None
    prod = [np.empty(u.shape, dtype=gy.dtype) for _ in shares] if need_w else None

    def work(k):                                                  # worker k's chunks -> gu[k]
        for sl in shares[k]:
            p = (sl.stop - sl.start) * th * tw
            gm = tf.output_tiles_adjoint(gy[sl], gm_ws[k][:T * p * f].reshape(T, p, f))
            v = v_ws[k][:T * p * c].reshape(T, p, c)
            if need_w:
                tf.input_tiles(x_of(sl), pad, v)                               # (T, P, C)
                gu[k] += np.matmul(v.transpose(0, 2, 1), gm, out=prod[k])      # (T, C, F)
            if need_x:
                np.matmul(gm, u.transpose(0, 2, 1), out=v)                     # gV (T, P, C)
                tf.input_tiles_adjoint(v, pad, gx[sl])

    run(work, len(shares))
    gw = wino.filter_tiles_adjoint(_sum_partials(gu), m) if need_w else None
    return gx, gw


def conv2d(x, w, b=None, stride: int = 1, padding: int = 0):
    """Functional 2-D convolution on NCHW tensors (see ``Conv2d``)."""
    x, w, b = affine_args("conv2d", x, w, b, "(N, C, H, W)", "(F, C, KH, KW)")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"conv2d: input has {x.shape[1]} channels but the kernel expects {w.shape[1]} "
                         f"(x {tuple(x.shape)}, w {tuple(w.shape)})")
    stride = check_int("conv2d", "stride", stride)
    padding = check_int("conv2d", "padding", padding, minimum=0)
    out_size("conv2d", x.shape[2], w.shape[2], stride, padding)
    out_size("conv2d", x.shape[3], w.shape[3], stride, padding)
    return Conv2d.apply(x, w, b, stride=stride, padding=padding)
