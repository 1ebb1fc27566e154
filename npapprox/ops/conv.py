"""2-D convolution (cross-correlation, as in every deep-learning framework)."""
from __future__ import annotations

from ..backend import array_module
from ..function import Function
from ..kernels.im2col import col2im, im2col
from ..policy import ACTIVATION, PARAM
from ._checks import as_tensor, check_float, check_positive_int, check_rank, out_size


def _columns(x, kh, kw, stride, pad):
    """x (N,C,H,W) -> cols (N, C*KH*KW, OH*OW); a free reshape for 1x1 convs."""
    n, c = x.shape[:2]
    if kh == kw == 1 and pad == 0:
        if stride != 1:
            x = array_module(x).ascontiguousarray(x[:, :, ::stride, ::stride])
        return x.reshape(n, c, -1)  # (N, C, OH*OW)
    return im2col(x, kh, kw, stride, pad)


class Conv2d(Function):
    """y[n,f,i,j] = b[f] + sum_{c,p,q} w[f,c,p,q] * xpad[n,c,i*s+p,j*s+q]

    Shapes: x (N,C,H,W), w (F,C,KH,KW), b (F,) or None -> y (N,F,OH,OW),
    OH = (H + 2*pad - KH) // s + 1.

    As matrices (per sample n): Y_n = W2 @ X_n with W2 = w.reshape(F, C*KH*KW)
    and X_n = im2col(x)[n] (C*KH*KW, OH*OW). Backward:
    gW2 = sum_n gY_n @ X_n^T, gX_n = W2^T @ gY_n -> col2im, gb = sum gY.
    The input (not its im2col columns) is what is saved: columns are rebuilt in
    backward, so the ledger counts one activation-sized tensor.
    """

    SAVES = {"x": ACTIVATION, "w": PARAM}

    @staticmethod
    def forward(ctx, x, w, b, *, stride=1, padding=0):
        xp = array_module(x)
        n, _, h, wd = x.shape
        f, _, kh, kw = w.shape
        oh = (h + 2 * padding - kh) // stride + 1
        ow = (wd + 2 * padding - kw) // stride + 1
        cols = _columns(x, kh, kw, stride, padding)          # (N, C*KH*KW, OH*OW)
        y = xp.matmul(w.reshape(f, -1), cols)                  # (N, F, OH*OW)
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
        need_x, need_w, need_b = ctx.needs_input_grad
        gy3 = gy.reshape(n, f, -1)                            # (N, F, OH*OW)
        gx = gw = gb = None
        if need_w:
            cols = _columns(x, kh, kw, ctx.stride, ctx.padding)  # (N, C*KH*KW, OH*OW)
            gw = xp.matmul(gy3, cols.transpose(0, 2, 1)).sum(axis=0).reshape(w.shape)
            del cols
        if need_b:
            gb = gy3.sum(axis=(0, 2))
        if need_x:
            gcols = xp.matmul(w.reshape(f, -1).T, gy3)         # (N, C*KH*KW, OH*OW)
            if kh == kw == 1 and ctx.padding == 0 and ctx.stride == 1:
                gx = gcols.reshape(x.shape)
            else:
                gx = col2im(gcols, x.shape, kh, kw, ctx.stride, ctx.padding)
        return gx, gw, gb


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
