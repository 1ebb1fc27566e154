"""Inline copies shared by the convolution kernels (``_im2col.pyx``, ``_winograd.pyx``)."""
from cython cimport floating


cdef inline void nhwc_to_nchw(const floating* t, Py_ssize_t row, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
                              floating* out) noexcept nogil:
    """out[c, h, w] = t[h*row + w*C + c]: an H x W channels-last image whose rows start
    ``row`` values apart into one C-contiguous (C, H, W) sample."""
    cdef Py_ssize_t c, h, w
    cdef const floating* src
    cdef floating* dst
    for c in range(C):
        for h in range(H):
            src = t + h * row + c
            dst = out + (c * H + h) * W
            for w in range(W):
                dst[w] = src[w * C]
