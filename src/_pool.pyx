"""Compiled average-pooling kernels (module ``npapprox._pool``).

The pure-``xp`` reference (the spec) and the dispatch live in
``npapprox/ops/pool.py`` (``AvgPool2d``); these kernels are bit-identical to it:

* forward: ``y[n, c, i, j] = (((0 + x[.., i*s, j*s]) + x[.., i*s, j*s + 1]) + ...) * (1/k^2)``,
  the k*k window offsets (p, q) added in row-major order to +0.0, then one
  multiplication by the rounded 1/k^2 (``inv``);
* backward: ``gx = 0``, then for each (p, q) in row-major order
  ``gx[.., i*s + p, j*s + q] += gy[.., i, j] * inv`` -- each gx element receives
  its windows' terms in that order, starting from +0.0.

One (n, c) plane at a time (it stays in L1 between the k*k passes), samples
``n0 <= n < n1``: ``npapprox.parallel.run_ranges`` gives each worker a range,
with the GIL released. float32 and float64 through the ``floating`` fused type.
Flags (-O3 -ffp-contract=off) are set once, in setup.py.
"""
from cython cimport floating


cdef inline int _check(Py_ssize_t N, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W, Py_ssize_t N2, Py_ssize_t C2,
                       Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t k, Py_ssize_t s, Py_ssize_t n0,
                       Py_ssize_t n1) except -1:
    """Shapes are trusted inside the nogil loops, so check them once here: the image
    (N, C, H, W), the pooled (N2, C2, OH, OW)."""
    if N2 != N or C2 != C:
        raise ValueError("avg_pool: the image and the pooled array differ in samples or channels")
    if k < 1 or s < 1 or OH != (H - k) // s + 1 or OW != (W - k) // s + 1 or OH < 1 or OW < 1:
        raise ValueError("avg_pool: shapes do not match the kernel and stride")
    if not 0 <= n0 <= n1 <= N:
        raise ValueError(f"sample range [{n0}, {n1}) is not inside [0, {N})")
    return 0


def avg_pool_forward(const floating[:, :, :, ::1] x,   # IN:  (N, C, H, W)
                     floating[:, :, :, ::1] y,         # OUT: (N, C, OH, OW), samples n0..n1-1 written
                     Py_ssize_t k, Py_ssize_t s, double inv, Py_ssize_t n0, Py_ssize_t n1):
    """y = the k x k, stride s average of x (no padding), as the reference computes it."""
    cdef Py_ssize_t C = x.shape[1], H = x.shape[2], W = x.shape[3], OH = y.shape[2], OW = y.shape[3]
    cdef Py_ssize_t n, c, i, j, p, q
    cdef floating scale = <floating> inv
    cdef floating* acc
    cdef const floating* r0
    cdef const floating* r1
    _check(x.shape[0], C, H, W, y.shape[0], y.shape[1], OH, OW, k, s, n0, n1)
    with nogil:
        for n in range(n0, n1):
            for c in range(C):
                for i in range(OH):
                    acc = &y[n, c, i, 0]            # the output row accumulates its windows
                    if k == 2 and s == 2:           # the common case, fused: one pass, vectorised
                        r0 = &x[n, c, 2 * i, 0]
                        r1 = r0 + W
                        for j in range(OW):
                            acc[j] = ((((<floating> 0) + r0[2 * j]) + r0[2 * j + 1]) + r1[2 * j]) \
                                + r1[2 * j + 1]
                            acc[j] = acc[j] * scale
                        continue
                    for j in range(OW):
                        acc[j] = 0
                    for p in range(k):
                        for q in range(k):
                            r0 = &x[n, c, i * s + p, q]
                            for j in range(OW):
                                acc[j] = acc[j] + r0[j * s]
                    for j in range(OW):
                        acc[j] = acc[j] * scale


def avg_pool_backward(const floating[:, :, :, ::1] gy,   # IN:  (N, C, OH, OW)
                      floating[:, :, :, ::1] gx,         # OUT: (N, C, H, W), samples n0..n1-1 written
                      Py_ssize_t k, Py_ssize_t s, double inv, Py_ssize_t n0, Py_ssize_t n1):
    """gx = 0, then gx[.., i*s + p, j*s + q] += gy[.., i, j] * inv for (p, q) in row-major order."""
    cdef Py_ssize_t C = gx.shape[1], H = gx.shape[2], W = gx.shape[3], OH = gy.shape[2], OW = gy.shape[3]
    cdef Py_ssize_t n, c, h, w, i, j, p, q
    cdef floating scale = <floating> inv
    cdef floating t
    cdef floating* d0
    cdef floating* d1
    _check(gx.shape[0], C, H, W, gy.shape[0], gy.shape[1], OH, OW, k, s, n0, n1)
    with nogil:
        for n in range(n0, n1):
            for c in range(C):
                if k == 2 and s == 2 and H == 2 * OH and W == 2 * OW:   # every gx element in one window
                    for i in range(OH):
                        d0 = &gx[n, c, 2 * i, 0]
                        d1 = d0 + W
                        for j in range(OW):
                            t = (<floating> 0) + gy[n, c, i, j] * scale
                            d0[2 * j] = t
                            d0[2 * j + 1] = t
                            d1[2 * j] = t
                            d1[2 * j + 1] = t
                    continue
                for h in range(H):
                    for w in range(W):
                        gx[n, c, h, w] = 0
                for p in range(k):
                    for q in range(k):
                        for i in range(OH):
                            d0 = &gx[n, c, i * s + p, q]
                            for j in range(OW):
                                d0[j * s] = d0[j * s] + gy[n, c, i, j] * scale
