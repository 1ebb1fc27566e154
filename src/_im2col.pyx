"""Compiled im2row / row2im kernels (module ``npapprox._im2col``).

The pure-``xp`` reference, the layout and the dispatch live in
``npapprox/kernels/im2col.py``; these kernels must stay bit-identical to it.
Layout (row = one output position, columns ordered (p, q, c))::

    rows[(n*OH + i)*OW + j, (p*kw + q)*C + c] = xpad[n, c, i*stride + p, j*stride + q]

* float32 and float64 through the ``floating`` fused type, C-contiguous typed
  memoryviews, no GIL.
* ``prange`` over samples with ``num_threads`` OpenMP threads (default 1: the
  convolution runs whole chunks on each core, ``npapprox.parallel``; a serial
  loop when the extension was built without OpenMP). Each thread owns a scratch buffer holding one sample
  zero-padded and transposed to (H + 2*pad, W + 2*pad, C): in that layout the
  kw kernel offsets of one output position and one kernel row p are kw*C
  *contiguous* values, so im2row is one kw*C-wide copy per (i, j, p) and
  row2im one kw*C-wide add per (i, j, p), both inline vectorised loops.
* Each sample reads and writes a disjoint part of the output, so the
  accumulation in row2im is race-free and its order does not depend on the
  thread count: each gx element starts from +0.0 and receives its
  contributions in increasing (i, j) order, which for one gx element is
  decreasing (p, q) order, exactly like the reference.

* ``transpose_samples`` turns a chunk's GEMM rows (B, L, F) into its NCHW output
  (B, F, L) and the gradient back, with the blocked transpose that im2row and
  row2im use for their samples (``_transpose.pxi``).

Compiler directives (boundscheck=False, wraparound=False, cdivision=True, ...)
and flags (-O3 -ffp-contract=off, OpenMP) are set once, in setup.py.
"""
from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

include "_transpose.pxi"   # _transpose (shared with src/_winograd.pyx)


cdef _check(Py_ssize_t N, Py_ssize_t C, Py_ssize_t H, Py_ssize_t W,
            Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t stride, Py_ssize_t pad,
            Py_ssize_t rR, Py_ssize_t rK, int num_threads):
    """Shapes are trusted inside the nogil loops, so check them once here."""
    if num_threads < 1:
        raise ValueError("num_threads must be >= 1")
    if kh < 1 or kw < 1 or stride < 1 or pad < 0:
        raise ValueError("need kh, kw, stride >= 1 and pad >= 0")
    if H + 2 * pad < kh or W + 2 * pad < kw:
        raise ValueError("window larger than the padded input")
    cdef Py_ssize_t OH = (H + 2 * pad - kh) // stride + 1
    cdef Py_ssize_t OW = (W + 2 * pad - kw) // stride + 1
    if rR != N * OH * OW or rK != kh * kw * C:
        raise ValueError(f"rows shape ({rR}, {rK}) does not match x shape ({N}, {C}, {H}, {W}) "
                         f"with kh={kh} kw={kw} stride={stride} pad={pad}")


cdef inline void* _scratch(size_t nbytes, int* failed) noexcept nogil:
    """One thread's scratch buffer; a failed malloc sets ``failed[0]`` (read after the region)."""
    cdef void* t = malloc(nbytes)
    if t == NULL:
        failed[0] = 1
    return t


def im2row(const floating[:, :, :, ::1] x,    # IN:  (N, C, H, W)
           floating[:, ::1] rows,              # OUT: (N*OH*OW, kh*kw*C), fully overwritten
           Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t stride, Py_ssize_t pad, int num_threads=1):
    """rows[(n*OH+i)*OW+j, (p*kw+q)*C+c] = xpad[n, c, i*stride+p, j*stride+q]."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    _check(N, C, H, W, kh, kw, stride, pad, rows.shape[0], rows.shape[1], num_threads)
    cdef Py_ssize_t OH = (H + 2 * pad - kh) // stride + 1
    cdef Py_ssize_t OW = (W + 2 * pad - kw) // stride + 1
    cdef Py_ssize_t Hp = H + 2 * pad, Wp = W + 2 * pad, K = kh * kw * C
    cdef Py_ssize_t n, h, i, j, p, k
    cdef floating* t
    cdef floating* dst
    cdef const floating* src
    cdef int err = 0
    cdef int* failed = &err        # written through a pointer: shared, not thread-private
    if rows.shape[0] == 0 or K == 0:
        return
    with nogil, parallel(num_threads=num_threads):
        t = <floating*> _scratch(Hp * Wp * C * sizeof(floating), failed)   # one padded NHWC sample
        if t != NULL:
            memset(t, 0, Hp * Wp * C * sizeof(floating))          # the border stays zero
        for n in prange(N, schedule="static"):   # every thread must reach the prange
            if t != NULL:
                for h in range(H):
                    _transpose(&x[n, 0, h, 0], H * W, C, W, t + ((h + pad) * Wp + pad) * C, C)
                for i in range(OH):
                    for j in range(OW):
                        dst = &rows[(n * OH + i) * OW + j, 0]
                        for p in range(kh):
                            src = t + ((i * stride + p) * Wp + j * stride) * C
                            for k in range(kw * C):   # an inline loop: short copies, no call
                                dst[p * kw * C + k] = src[k]
        free(t)
    if err:
        raise MemoryError("im2row scratch buffer")


def row2im(const floating[:, ::1] rows,       # IN:  (N*OH*OW, kh*kw*C)
           floating[:, :, :, ::1] gx,          # OUT: (N, C, H, W), fully overwritten
           Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t stride, Py_ssize_t pad, int num_threads=1):
    """gx = 0; for p, q (decreasing): gx[n, c, i*stride+p-pad, j*stride+q-pad] += rows[...]."""
    cdef Py_ssize_t N = gx.shape[0], C = gx.shape[1], H = gx.shape[2], W = gx.shape[3]
    _check(N, C, H, W, kh, kw, stride, pad, rows.shape[0], rows.shape[1], num_threads)
    cdef Py_ssize_t OH = (H + 2 * pad - kh) // stride + 1
    cdef Py_ssize_t OW = (W + 2 * pad - kw) // stride + 1
    cdef Py_ssize_t Hp = H + 2 * pad, Wp = W + 2 * pad
    cdef Py_ssize_t n, h, i, j, p, k
    cdef floating* t
    cdef floating* dst
    cdef const floating* src
    cdef int err = 0
    cdef int* failed = &err
    if gx.shape[0] == 0 or C * H * W == 0:
        return
    with nogil, parallel(num_threads=num_threads):
        t = <floating*> _scratch(Hp * Wp * C * sizeof(floating), failed)   # one padded NHWC gradient
        for n in prange(N, schedule="static"):   # every thread must reach the prange
            if t != NULL:
                memset(t, 0, Hp * Wp * C * sizeof(floating))
                for i in range(OH):
                    for j in range(OW):
                        for p in range(kh):
                            src = &rows[(n * OH + i) * OW + j, p * kw * C]
                            dst = t + ((i * stride + p) * Wp + j * stride) * C
                            for k in range(kw * C):   # the window row's kw*C values are contiguous
                                dst[k] = dst[k] + src[k]
                for h in range(H):
                    _transpose(t + ((h + pad) * Wp + pad) * C, C, W, C, &gx[n, 0, h, 0], H * W)
        free(t)
    if err:
        raise MemoryError("row2im scratch buffer")


def transpose_samples(const floating[:, :, ::1] src,   # IN:  (N, R, S)
                      floating[:, :, ::1] dst):        # OUT: (N, S, R), fully overwritten
    """dst[n] = src[n].T: a conv chunk's GEMM rows (B, L, F) to its NCHW output (B, F, L),
    or the gradient (B, F, L) to GEMM rows (B, L, F)."""
    cdef Py_ssize_t N = src.shape[0], R = src.shape[1], S = src.shape[2], n
    if dst.shape[0] != N or dst.shape[1] != S or dst.shape[2] != R:
        raise ValueError(f"transpose_samples: dst must have shape {(N, S, R)}")
    if R * S == 0:
        return
    with nogil:
        for n in range(N):
            _transpose(&src[n, 0, 0], S, R, S, &dst[n, 0, 0], R)
