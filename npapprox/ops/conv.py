"""2-D convolution (cross-correlation, as in every deep-learning framework)."""
from __future__ import annotations

import numpy as np

from ..backend import array_module
from ..function import ACTIVATION, PARAM, Function
from ..kernels.im2col import im2row, row2im
from ..parallel import deal, run, workers
from ..validate import affine_args, check_int, out_size

#: im2row rows are built for a few samples at a time, about this many bytes per
#: worker: the rows then stay in that core's cache between im2row and the matrix
#: product, instead of a 9x-activation-sized buffer going through main memory.
CHUNK_BYTES = 2 << 20
#: On the GPU the cache argument does not hold and every chunk costs a few kernel
#: launches: a whole batch is one chunk (one im2row, one GEMM), up to this many
#: bytes of rows (a bound on the workspace in device memory).
GPU_CHUNK_BYTES = 1 << 30


def _weight_rows(w):
    """w (F, C, KH, KW) -> W2 (F, KH*KW*C): the column order of im2row's rows."""
    f, c, kh, kw = w.shape
    return w.transpose(0, 2, 3, 1).reshape(f, kh * kw * c)


def chunk_plan(n, rows_per_sample, k, itemsize, xp):
    """Batch slices whose im2row rows ``(B*OH*OW, k)`` take at most about
    CHUNK_BYTES (GPU_CHUNK_BYTES on the GPU), as many per worker and of sizes
    differing by at most one sample (the larger ones first), dealt to the
    workers (``npapprox.parallel``): every worker gets the same number of samples
    give or take one, so none waits for another at the end -> (one list of slices
    per worker, rows of the largest chunk: the first). A function of the shapes,
    the backend and the worker count only."""
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

    As matrices, for a chunk of B samples: R = im2row(x_chunk) (B*OH*OW, K) with
    K = KH*KW*C, W2 = w moved to (F, KH, KW, C) and reshaped to (F, K), and
    Yr = R @ W2^T (B*OH*OW, F), the chunk's output with channels last (moved
    to NCHW by one transposing copy). Backward, per chunk, with gYr the output
    gradient moved to (B*OH*OW, F): gW2^T += R^T @ gYr, gR = gYr @ W2 ->
    row2im -> gx, and gb = sum gY. Tall products like these run much faster in
    OpenBLAS than one small product per sample (kernels/im2col.py). On the CPU
    the chunks run on all cores at once, whole chunks per core
    (``npapprox.parallel``).
    The input (not its rows) is what is saved: rows are rebuilt in backward, a
    few samples at a time, so the ledger counts one activation-sized tensor and
    the rows never exist for the whole batch. An input stored as a unit's codes
    (or its exact BN input) is rebuilt chunk by chunk too (``Stored.sample_reader``):
    no rebuilt input of the whole batch exists either.
    """

    SAVES = {"x": ACTIVATION, "w": PARAM}

    @staticmethod
    def forward(ctx, x, w, b, *, stride=1, padding=0):
        xp = array_module(x)
        n, _, h, wd = x.shape
        f, _, kh, kw = w.shape
        oh = (h + 2 * padding - kh) // stride + 1
        ow = (wd + 2 * padding - kw) // stride + 1
        L = oh * ow
        w2 = _weight_rows(w)                                      # (F, K)
        y = xp.empty((n, f, L), dtype=x.dtype)
        shares, m_max = chunk_plan(n, L, w2.shape[1], x.dtype.itemsize, xp)
        # every worker's buffers, made before any worker starts (a deterministic peak)
        rows_ws = [xp.empty((m_max, w2.shape[1]), dtype=x.dtype) for _ in shares]
        yr_ws = [xp.empty((m_max, f), dtype=x.dtype) for _ in shares]

        def work(k):                                              # worker k's chunks
            for sl in shares[k]:
                m = (sl.stop - sl.start) * L
                r = im2row(x[sl], kh, kw, stride, padding, out=rows_ws[k][:m])   # (B*L, K)
                yr = xp.matmul(r, w2.T, out=yr_ws[k][:m])                     # (B*L, F)
                y[sl] = yr.reshape(m // L, L, f).transpose(0, 2, 1)           # (B, F, L)

        run(work, len(shares))
        if b is not None:
            y += b.reshape(1, f, 1)
        ctx.save(x=x, w=w)
        ctx.stride, ctx.padding = stride, padding
        return y.reshape(n, f, oh, ow)

    @staticmethod
    def backward(ctx, gy):
        w = ctx.restore("w")
        xp = array_module(gy)
        n, f, oh, ow = gy.shape
        c, kh, kw = w.shape[1:]
        s, pad = ctx.stride, ctx.padding
        need_x, need_w, need_b = ctx.needs_input_grad
        x_of = ctx.sample_reader("x") if need_w else None         # a chunk's samples -> their input
        L = oh * ow
        gy3 = gy.reshape(n, f, L)                                 # (N, F, L)
        gb = gy3.sum(axis=(0, 2)) if need_b else None
        w2 = _weight_rows(w)                                      # (F, K)
        shares, m_max = chunk_plan(n, L, w2.shape[1], gy.dtype.itemsize, xp)
        gx = xp.empty((n, c) + ctx.saved["x"].shape[2:], dtype=gy.dtype) if need_x else None
        # every worker's buffers, made before any worker starts (a deterministic peak)
        rows_ws = [xp.empty((m_max, w2.shape[1]), dtype=gy.dtype) for _ in shares]
        gyr_ws = [xp.empty((m_max, f), dtype=gy.dtype) for _ in shares]
        gw2t = [xp.zeros(w2.shape[::-1], dtype=gy.dtype) for _ in shares] if need_w else None   # (K, F)
        prod = [xp.empty(w2.shape[::-1], dtype=gy.dtype) for _ in shares] if need_w else None

        def work(k):                                              # worker k's chunks -> gw2t[k]
            for sl in shares[k]:
                m = (sl.stop - sl.start) * L
                gyr = gyr_ws[k][:m]
                gyr.reshape(m // L, L, f)[...] = gy3[sl].transpose(0, 2, 1)    # (B*L, F)
                if need_w:
                    r = im2row(x_of(sl), kh, kw, s, pad, out=rows_ws[k][:m])   # (B*L, K)
                    gw2t[k] += xp.matmul(r.T, gyr, out=prod[k])  # (K, F): faster than gyr.T @ r
                if need_x:
                    grows = xp.matmul(gyr, w2, out=rows_ws[k][:m])             # (B*L, K)
                    row2im(grows, gx[sl].shape, kh, kw, s, pad, out=gx[sl])

        run(work, len(shares))
        gw = None
        if need_w:  # sum the workers' partials in worker order; (KH, KW, C, F) -> (F, C, KH, KW)
            for part in gw2t[1:]:
                gw2t[0] += part
            gw = xp.ascontiguousarray(gw2t[0].reshape(kh, kw, c, f).transpose(3, 2, 0, 1))
        return gx, gw, gb


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
