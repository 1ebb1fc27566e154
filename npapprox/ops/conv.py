"""2-D convolution (cross-correlation, as in every deep-learning framework)."""
from __future__ import annotations

from ..backend import array_module
from ..function import Function
from ..kernels.im2col import col2im, im2col
from ..policy import ACTIVATION, PARAM
from ._checks import as_tensor, check_float, check_positive_int, check_rank, out_size


#: im2col columns are built for a few samples at a time, about this many bytes:
#: the columns then stay in cache between im2col and the matrix product, instead of
#: a 9x-activation-sized buffer going through main memory (3x faster at CIFAR shapes).
CHUNK_BYTES = 4 << 20


def _is_pointwise(kh, kw, pad):
    return kh == kw == 1 and pad == 0


def _columns(x, kh, kw, stride, pad, out=None):
    """x (B,C,H,W) -> cols (B, C*KH*KW, OH*OW); a free reshape for 1x1 convs."""
    b, c = x.shape[:2]
    if _is_pointwise(kh, kw, pad):
        if stride != 1:
            x = array_module(x).ascontiguousarray(x[:, :, ::stride, ::stride])
        return x.reshape(b, c, -1)  # (B, C, OH*OW)
    return im2col(x, kh, kw, stride, pad, out=out)


def _chunks(n, rows, cols, itemsize):
    """Batch slices whose im2col columns take about CHUNK_BYTES."""
    step = max(1, CHUNK_BYTES // max(1, rows * cols * itemsize))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


class Conv2d(Function):
    """y[n,f,i,j] = b[f] + sum_{c,p,q} w[f,c,p,q] * xpad[n,c,i*s+p,j*s+q]

    Shapes: x (N,C,H,W), w (F,C,KH,KW), b (F,) or None -> y (N,F,OH,OW),
    OH = (H + 2*pad - KH) // s + 1.

    As matrices (per sample n): Y_n = W2 @ X_n with W2 = w.reshape(F, C*KH*KW)
    and X_n = im2col(x)[n] (C*KH*KW, OH*OW). Backward:
    gW2 = sum_n gY_n @ X_n^T, gX_n = W2^T @ gY_n -> col2im, gb = sum gY.
    The input (not its im2col columns) is what is saved: columns are rebuilt in
    backward, a few samples at a time, so the ledger counts one
    activation-sized tensor and the columns never exist for the whole batch.
    """

    SAVES = {"x": ACTIVATION, "w": PARAM}

    @staticmethod
    def forward(ctx, x, w, b, *, stride=1, padding=0):
        xp = array_module(x)
        n, _, h, wd = x.shape
        f, _, kh, kw = w.shape
        oh = (h + 2 * padding - kh) // stride + 1
        ow = (wd + 2 * padding - kw) // stride + 1
        w2 = w.reshape(f, -1)                                     # (F, C*KH*KW)
        if _is_pointwise(kh, kw, padding):
            y = xp.matmul(w2, _columns(x, kh, kw, stride, padding))     # (N, F, OH*OW)
        else:
            y = xp.empty((n, f, oh * ow), dtype=x.dtype)
            chunks = _chunks(n, w2.shape[1], oh * ow, x.dtype.itemsize)
            work = xp.empty((chunks[0].stop, w2.shape[1], oh * ow), dtype=x.dtype)
            for sl in chunks:
                cols = _columns(x[sl], kh, kw, stride, padding, out=work[:sl.stop - sl.start])
                xp.matmul(w2, cols, out=y[sl])                    # (B, F, OH*OW)
        if b is not None:
            y += b.reshape(1, f, 1)
        ctx.save(x=x, w=w)
        ctx.stride, ctx.padding = stride, padding
        return y.reshape(n, f, oh, ow)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.restore("x", "w")
        xp = array_module(gy)
        n, f = gy.shape[:2]
        kh, kw = w.shape[2:]
        s, pad = ctx.stride, ctx.padding
        need_x, need_w, need_b = ctx.needs_input_grad
        gy3 = xp.ascontiguousarray(gy).reshape(n, f, -1)          # (N, F, OH*OW)
        w2 = w.reshape(f, -1)                                     # (F, C*KH*KW)
        gb = gy3.sum(axis=(0, 2)) if need_b else None
        if _is_pointwise(kh, kw, pad):
            gw = gx = None
            if need_w:
                cols = _columns(x, kh, kw, s, pad)                # (N, C, OH*OW)
                gw = xp.matmul(gy3, cols.transpose(0, 2, 1)).sum(axis=0).reshape(w.shape)
            if need_x:
                gcols = xp.matmul(w2.T, gy3)                      # (N, C, OH*OW)
                gx = gcols.reshape(x.shape) if s == 1 else col2im(gcols, x.shape, 1, 1, s, 0)
            return gx, gw, gb
        chunks = _chunks(n, w2.shape[1], gy3.shape[2], gy.dtype.itemsize)
        work = xp.empty((chunks[0].stop, w2.shape[1], gy3.shape[2]), dtype=gy.dtype)
        gw = xp.zeros(w2.shape, dtype=gy.dtype) if need_w else None
        gx = xp.empty(x.shape, dtype=gy.dtype) if need_x else None
        for sl in chunks:
            buf = work[:sl.stop - sl.start]
            if need_w:
                cols = _columns(x[sl], kh, kw, s, pad, out=buf)   # (B, C*KH*KW, OH*OW)
                gw += xp.matmul(gy3[sl], cols.transpose(0, 2, 1)).sum(axis=0)
            if need_x:
                gcols = xp.matmul(w2.T, gy3[sl], out=buf)         # (B, C*KH*KW, OH*OW)
                col2im(gcols, gx[sl].shape, kh, kw, s, pad, out=gx[sl])
        return gx, (gw.reshape(w.shape) if need_w else None), gb


def conv2d(x, w, b=None, stride: int = 1, padding: int = 0):
    """Functional 2-D convolution on NCHW tensors (see ``Conv2d``)."""
    x, w = as_tensor(x, "x"), as_tensor(w, "w")
    b = None if b is None else as_tensor(b, "b")
    check_rank("conv2d", "x", x, 4, "(N, C, H, W)")
    check_rank("conv2d", "w", w, 4, "(F, C, KH, KW)")
    check_float("conv2d", x=x, w=w, b=b)
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"conv2d: input has {x.shape[1]} channels but the kernel expects {w.shape[1]} "
                         f"(x {tuple(x.shape)}, w {tuple(w.shape)})")
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"conv2d: bias shape {tuple(b.shape)} should be ({w.shape[0]},)")
    stride = check_positive_int("conv2d", "stride", stride)
    padding = check_positive_int("conv2d", "padding", padding, minimum=0)
    out_size("conv2d", x.shape[2], w.shape[2], stride, padding)
    out_size("conv2d", x.shape[3], w.shape[3], stride, padding)
    return Conv2d.apply(x, w, b, stride=stride, padding=padding)
