"""Compiled im2col / col2im kernels (module ``npapprox._im2col``).

The pure-``xp`` reference, the layout and the dispatch live in
``npapprox/kernels/im2col.py``; these kernels must stay bit-identical to it.

* float32 and float64 through the ``floating`` fused type, C-contiguous typed
  memoryviews, no GIL.
* ``prange`` over the flattened (n, c) planes with OpenMP (a serial loop when the
  extension was built without OpenMP).  Each (n, c) plane reads and writes a
  disjoint part of the output -- ``cols[n, c*kh*kw:(c+1)*kw*kh]`` for im2col,
  ``gx[n, c]`` for col2im -- so the accumulation in col2im is race-free and its
  order does not depend on the thread count.
* Padding is never materialised: for each kernel offset (p, q) the range of
  output rows i and columns j that land inside the image is computed once, the
  rest is zero-filled (im2col) or skipped (col2im).  The inner loops are plain
  strided copies/adds, with a unit-stride special case the C
  compiler vectorises.
* col2im adds the contributions to each gx element in increasing (p, q) order,
  starting from +0.0, exactly like the reference, so the sums are bit-identical.

Compiler directives (boundscheck=False, wraparound=False, cdivision=True, ...)
and flags (-O3 -ffp-contract=off, OpenMP) are set once, in setup.py.
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.string cimport memset


cdef inline Py_ssize_t _first(Py_ssize_t d, Py_ssize_t s, Py_ssize_t n) noexcept nogil:
    """Smallest i >= 0 with i*s >= d, clipped to n."""
    cdef Py_ssize_t r
    if d <= 0:
        return 0
    r = (d + s - 1) // s
    return r if r < n else n


cdef inline Py_ssize_t _stop(Py_ssize_t m, Py_ssize_t s, Py_ssize_t n) noexcept nogil:
    """One past the largest i >= 0 with i*s <= m, clipped to [0, n]."""
    cdef Py_ssize_t r
    if m < 0:
        return 0
    r = m // s + 1
    return r if r < n else n


cdef _check(Py_ssize_t N, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
            Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t stride, Py_ssize_t pad,
            Py_ssize_t cN, Py_ssize_t cR, Py_ssize_t cL):
    """Shapes are trusted inside the nogil loops, so check them once here."""
    if kh < 1 or kw < 1 or stride < 1 or pad < 0:
        raise ValueError("need kh, kw, stride >= 1 and pad >= 0")
    cdef Py_ssize_t OH = (H + 2 * pad - kh) // stride + 1
    cdef Py_ssize_t OW = (W + 2 * pad - kw) // stride + 1
    if H + 2 * pad < kh or W + 2 * pad < kw:
        raise ValueError("window larger than the padded input")
    if cN != N or cR != C * kh * kw or cL != OH * OW:
        raise ValueError(f"cols shape ({cN}, {cR}, {cL}) does not match x shape "
                         f"({N}, {C}, {H}, {W}) with kh={kh} kw={kw} stride={stride} pad={pad}")


def im2col(const floating[:, :, :, ::1] x,    # IN:  (N, C, H, W)
           floating[:, :, ::1] cols,           # OUT: (N, C*kh*kw, OH*OW), fully overwritten
           Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t stride, Py_ssize_t pad):
    """cols[n, (c*kh+p)*kw+q, i*OW+j] = xpad[n, c, i*stride+p, j*stride+q]."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    _check(N, C, H, W, kh, kw, stride, pad, cols.shape[0], cols.shape[1], cols.shape[2])
    cdef Py_ssize_t OH = (H + 2 * pad - kh) // stride + 1
    cdef Py_ssize_t OW = (W + 2 * pad - kw) // stride + 1
    cdef Py_ssize_t NC = N * C
    cdef Py_ssize_t nc, n, c, p, q, i, k, i0, i1, j0, j1, cnt, ih
    cdef const floating* src
    cdef floating* row
    cdef floating* dst
    if NC == 0:
        return
    with nogil:
        for nc in prange(NC, schedule="static"):
            n = nc // C
            c = nc - n * C
            for p in range(kh):
                # output rows i whose input row i*stride + p - pad is inside [0, H)
                i0 = _first(pad - p, stride, OH)
                i1 = _stop(H - 1 + pad - p, stride, OH)
                if i1 < i0:
                    i1 = i0
                for q in range(kw):
                    # output columns j whose input column j*stride + q - pad is inside [0, W)
                    j0 = _first(pad - q, stride, OW)
                    j1 = _stop(W - 1 + pad - q, stride, OW)
                    if j1 < j0:
                        j1 = j0
                    cnt = j1 - j0
                    row = &cols[n, (c * kh + p) * kw + q, 0]
                    if cnt == 0 or i1 == i0:  # the whole row comes from the padding
                        memset(row, 0, OH * OW * sizeof(floating))
                    else:
                        if i0 > 0:
                            memset(row, 0, i0 * OW * sizeof(floating))
                        for i in range(i0, i1):
                            ih = i * stride + p - pad
                            dst = row + i * OW
                            src = &x[n, c, ih, j0 * stride + q - pad]
                            for k in range(j0):
                                dst[k] = 0
                            if stride == 1:
                                for k in range(cnt):
                                    dst[j0 + k] = src[k]
                            else:
                                for k in range(cnt):
                                    dst[j0 + k] = src[k * stride]
                            for k in range(j1, OW):
                                dst[k] = 0
                        if i1 < OH:
                            memset(row + i1 * OW, 0, (OH - i1) * OW * sizeof(floating))


def col2im(const floating[:, :, ::1] cols,    # IN:  (N, C*kh*kw, OH*OW)
           floating[:, :, :, ::1] gx,          # OUT: (N, C, H, W), fully overwritten
           Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t stride, Py_ssize_t pad):
    """gx = 0; for p, q (in that order): gx[n, c, i*stride+p-pad, j*stride+q-pad] += cols[...]."""
    cdef Py_ssize_t N = gx.shape[0], C = gx.shape[1], H = gx.shape[2], W = gx.shape[3]
    _check(N, C, H, W, kh, kw, stride, pad, cols.shape[0], cols.shape[1], cols.shape[2])
    cdef Py_ssize_t OH = (H + 2 * pad - kh) // stride + 1
    cdef Py_ssize_t OW = (W + 2 * pad - kw) // stride + 1
    cdef Py_ssize_t NC = N * C
    cdef Py_ssize_t nc, n, c, p, q, i, k, i0, i1, j0, j1, cnt, ih
    cdef const floating* row
    cdef const floating* src
    cdef floating* dst
    if NC == 0:
        return
    with nogil:
        for nc in prange(NC, schedule="static"):
            n = nc // C
            c = nc - n * C
            memset(&gx[n, c, 0, 0], 0, H * W * sizeof(floating))
            for p in range(kh):
                i0 = _first(pad - p, stride, OH)
                i1 = _stop(H - 1 + pad - p, stride, OH)
                if i1 < i0:
                    i1 = i0
                for q in range(kw):
                    j0 = _first(pad - q, stride, OW)
                    j1 = _stop(W - 1 + pad - q, stride, OW)
                    if j1 < j0:
                        j1 = j0
                    cnt = j1 - j0
                    if cnt == 0:
                        continue
                    row = &cols[n, (c * kh + p) * kw + q, 0]
                    for i in range(i0, i1):
                        ih = i * stride + p - pad
                        src = row + i * OW + j0
                        dst = &gx[n, c, ih, j0 * stride + q - pad]
                        if stride == 1:
                            for k in range(cnt):
                                dst[k] = dst[k] + src[k]
                        else:
                            for k in range(cnt):
                                dst[k * stride] = dst[k * stride] + src[k]
