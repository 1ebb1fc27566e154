"""Compiled Winograd tile transforms (module ``npapprox._winograd``).

The pure-``xp`` reference, the layouts and the dispatch live in
``npapprox/kernels/winograd.py``; these kernels must stay bit-identical to it.
Every transform is ``Y = L X L^T`` on a tile ``X`` whose entries are vectors of
K channels, computed in two stages with the same order of operations as the
reference (``_rows``: for each output row, the terms with a non-zero
coefficient in increasing column order, the first one assigned, the others
added)::

    T[i, l] = sum_j L[i, j] X[j, l]        (rows)
    Y[i, k] = sum_l L[k, l] T[i, l]        (columns)

A multiplication by a coefficient 1 or -1 is exact, so ``x + (-1)*y`` is the
``x - y`` of a hand-written transform, bit for bit.

* float32 and float64 through the ``floating`` fused type, C-contiguous typed
  memoryviews, no GIL.
* One row of TW tiles at a time: in the tile stacks (a*a, P, K) the row's
  tiles are TW*K contiguous values per tile position, so ``_tx`` runs on
  vectors of TW*K values (the inner, vectorised loop) rather than K: a few
  dozen long loops per row of tiles instead of per tile. The image side is
  copied into / out of a per-thread scratch laid out the same way.
* ``prange`` over samples with ``num_threads`` OpenMP threads (default 1: the
  convolution runs whole chunks on each core, ``npapprox.parallel``).
* ``input_tiles_adjoint`` sums overlapping tiles: each gx element starts from
  +0.0 and receives its tiles' contributions in increasing (tile row, tile
  column) order, the order of the reference.

Compiler directives and flags (-O3 -ffp-contract=off, OpenMP) are set once, in setup.py.
"""
from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.stdlib cimport free, malloc
from libc.string cimport memset

include "_transpose.pxi"   # _transpose (shared with src/_im2col.pyx)


cdef inline void _rows(const floating* L, Py_ssize_t r, Py_ssize_t a,
                       const floating* src, Py_ssize_t s_j, Py_ssize_t s_l, Py_ssize_t nl,
                       floating* dst, Py_ssize_t d_i, Py_ssize_t d_l, Py_ssize_t K) noexcept nogil:
    """dst[i, l, :] = sum_j L[i, j] * src[j, l, :] for i < r, l < nl (element (j, l) of
    src at src + j*s_j + l*s_l, (i, l) of dst at dst + i*d_i + l*d_l; a <= 8). One pass
    over K per output, the row's non-zero terms summed left to right in registers
    (the same roundings as adding them one at a time: no contraction, no reassociation)."""
    cdef Py_ssize_t i, j, l, k, nz
    cdef floating c0, c1, c2, c3, c4, c5
    cdef floating cs[8]
    cdef Py_ssize_t js[8]
    cdef floating* d
    cdef const floating* s0
    cdef const floating* s1
    cdef const floating* s2
    cdef const floating* s3
    cdef const floating* s4
    cdef const floating* s5
    for j in range(8):
        cs[j], js[j] = 0, 0
    for i in range(r):
        nz = 0
        for j in range(a):
            if L[i * a + j] != 0:
                cs[nz] = L[i * a + j]
                js[nz] = j
                nz += 1
        c0, c1, c2, c3, c4, c5 = cs[0], cs[1], cs[2], cs[3], cs[4], cs[5]
        for l in range(nl):
            d = dst + i * d_i + l * d_l
            s0 = src + js[0] * s_j + l * s_l
            s1 = src + js[1] * s_j + l * s_l
            s2 = src + js[2] * s_j + l * s_l
            s3 = src + js[3] * s_j + l * s_l
            s4 = src + js[4] * s_j + l * s_l
            s5 = src + js[5] * s_j + l * s_l
            if nz == 1:
                for k in range(K):
                    d[k] = c0 * s0[k]
            elif nz == 2:
                for k in range(K):
                    d[k] = c0 * s0[k] + c1 * s1[k]
            elif nz == 3:
                for k in range(K):
                    d[k] = (c0 * s0[k] + c1 * s1[k]) + c2 * s2[k]
            elif nz == 4:
                for k in range(K):
                    d[k] = ((c0 * s0[k] + c1 * s1[k]) + c2 * s2[k]) + c3 * s3[k]
            elif nz == 5:
                for k in range(K):
                    d[k] = (((c0 * s0[k] + c1 * s1[k]) + c2 * s2[k]) + c3 * s3[k]) + c4 * s4[k]
            elif nz == 6:
                for k in range(K):
                    d[k] = ((((c0 * s0[k] + c1 * s1[k]) + c2 * s2[k]) + c3 * s3[k]) + c4 * s4[k]) \
                        + c5 * s5[k]
            else:                                   # a row of zeros, or more terms than unrolled
                for k in range(K):
                    d[k] = 0
                for j in range(nz):
                    s0 = src + js[j] * s_j + l * s_l
                    for k in range(K):
                        d[k] = (c0 * s0[k]) if j == 0 else d[k] + cs[j] * s0[k]


cdef inline void _tx(const floating* L, Py_ssize_t r, Py_ssize_t a,
                     const floating* src, Py_ssize_t s_row, Py_ssize_t s_col, floating* tmp,
                     floating* dst, Py_ssize_t d_row, Py_ssize_t d_col, Py_ssize_t K) noexcept nogil:
    """dst = L src L^T: src (a, a, K) with strides (s_row, s_col, 1), dst (r, r, K) with
    strides (d_row, d_col, 1), tmp an (r, a, K) scratch."""
    _rows(L, r, a, src, s_row, s_col, a, tmp, a * K, K, K)
    _rows(L, r, a, tmp, K, a * K, r, dst, d_col, d_row, K)


cdef inline void _copy(const floating* src, floating* dst, Py_ssize_t k) noexcept nogil:
    """dst[0:k] = src[0:k] (a vectorised loop: k is a channel count, too short for memcpy's call)."""
    cdef Py_ssize_t i
    for i in range(k):
        dst[i] = src[i]


cdef inline void _zero_fill(floating* dst, Py_ssize_t k) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(k):
        dst[i] = 0


cdef int _plan(str name, Py_ssize_t B, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t m, Py_ssize_t a,
               Py_ssize_t s0, Py_ssize_t s1, Py_ssize_t s2, Py_ssize_t K, int num_threads,
               Py_ssize_t* TH, Py_ssize_t* TW) except -1:
    """Shapes are trusted inside the nogil loops, so check them once here: an OH x OW
    output in TH x TW tiles of m x m, the tile stack (s0, s1, s2) = (a*a, B*TH*TW, K).
    Returns 1 when there is work to do (no tile or no channel: 0)."""
    if m < 1 or a != m + 2 or OH < 1 or OW < 1:
        raise ValueError(f"{name}: need a = m + 2, m >= 1 and an output of at least 1x1")
    TH[0] = (OH + m - 1) // m
    TW[0] = (OW + m - 1) // m
    if s0 != a * a or s1 != B * TH[0] * TW[0] or s2 != K:
        raise ValueError(f"{name}: shapes do not match")
    if num_threads < 1:
        raise ValueError("num_threads must be >= 1")
    return 1 if s1 > 0 and K > 0 else 0


def transform(const floating[:, :, :, ::1] src,   # IN:  (N, a, a, K)
              floating[:, :, :, ::1] dst,         # OUT: (N, r, r, K)
              const floating[:, ::1] L):          # (r, a)
    """dst[n] = L src[n] L^T (the filter transform and its adjoint)."""
    cdef Py_ssize_t N = src.shape[0], a = src.shape[1], K = src.shape[3], r = L.shape[0]
    if L.shape[1] != a or src.shape[2] != a or dst.shape[0] != N or dst.shape[1] != r \
            or dst.shape[2] != r or dst.shape[3] != K or a > 8:
        raise ValueError("transform: shapes do not match")
    if N == 0 or K == 0:
        return
    cdef floating* tmp = <floating*> malloc(r * a * K * sizeof(floating))
    if tmp == NULL:
        raise MemoryError("winograd transform scratch")
    cdef Py_ssize_t n
    with nogil:
        for n in range(N):
            _tx(&L[0, 0], r, a, &src[n, 0, 0, 0], a * K, K, tmp, &dst[n, 0, 0, 0], r * K, K, K)
    free(tmp)


def input_tiles(const floating[:, :, :, ::1] x,   # IN:  (B, C, H, W)
                floating[:, :, ::1] v,            # OUT: (a*a, B*TH*TW, C), fully overwritten
                const floating[:, ::1] L,         # (a, a): B^T
                Py_ssize_t m, Py_ssize_t pad, int num_threads=1):
    """v[u*a + w, (n*TH + ti)*TW + tj, c] = (L d L^T)[u, w], d = the a x a tile of
    xpad[n, c] at (ti*m, tj*m), zero beyond the padded input.

    The sample is first copied into a column-split scratch s[h, l, tj, c] =
    xpad[n, c, h, tj*m + l] (l < a: overlapping columns copied twice), so that a
    whole row of tiles is one ``_tx`` on vectors of TW*C contiguous values, its
    output going straight to the TW*C contiguous values v[t, p0:p0 + TW, :]. The
    sample goes through one (C, H*W) -> (H*W, C) transpose first (8 channels at a
    time: 8 memory streams, which the prefetchers follow), so that the scratch is
    filled with vectors of C values."""
    cdef Py_ssize_t B = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3], a = L.shape[1]
    cdef Py_ssize_t TH, TW
    if L.shape[0] != a or pad < 0:
        raise ValueError("input_tiles: L must be square and pad >= 0")
    if not _plan("input_tiles", B, H + 2 * pad - 2, W + 2 * pad - 2, m, a, v.shape[0], v.shape[1], v.shape[2],
                 C, num_threads, &TH, &TW):
        return
    cdef Py_ssize_t Hs = TH * m + 2, P = B * TH * TW, R = a * TW * C     # R: one scratch row
    cdef Py_ssize_t n, h, l, tj, ti, col
    cdef floating* t
    cdef floating* tmp
    cdef floating* img
    cdef int err = 0
    cdef int* failed = &err        # written through a pointer: shared, not thread-private
    with nogil, parallel(num_threads=num_threads):
        # the sample, a row of tiles' scratch, the transposed sample (H*W, C)
        t = <floating*> malloc(((Hs + a) * R + H * W * C) * sizeof(floating))
        if t == NULL:
            failed[0] = 1
        else:
            memset(t, 0, Hs * R * sizeof(floating))               # the padding stays zero
        for n in prange(B, schedule="static"):
            if t != NULL:
                tmp = t + Hs * R
                img = tmp + a * R
                _transpose(&x[n, 0, 0, 0], H * W, C, H * W, img, C)
                for h in range(H):
                    for l in range(a):
                        for tj in range(TW):
                            col = tj * m + l - pad
                            if 0 <= col < W:
                                _copy(img + (h * W + col) * C, t + (h + pad) * R + (l * TW + tj) * C, C)
                for ti in range(TH):
                    _tx(&L[0, 0], a, a, t + ti * m * R, R, TW * C, tmp,
                        &v[0, (n * TH + ti) * TW, 0], a * P * C, P * C, TW * C)
        free(t)
    if err:
        raise MemoryError("winograd input scratch")


def input_tiles_adjoint(const floating[:, :, ::1] gv,   # IN:  (a*a, B*TH*TW, C)
                        floating[:, :, :, ::1] gx,      # OUT: (B, C, H, W), fully overwritten
                        const floating[:, ::1] L,       # (a, a): B, the transpose of input_tiles' L
                        Py_ssize_t m, Py_ssize_t pad, int num_threads=1):
    """gx = 0; for each tile in increasing (ti, tj): gxpad[n, c, tile] += (L g L^T), g the
    tile's (a, a) values of gv; the padding is dropped.

    A row of tiles is one ``_tx`` on vectors of TW*C values, into tile[u, w, tj, c]. The
    sample is summed in a column-split scratch s[h, l, b, c] = gxpad[n, c, h, b*m + l]
    (l < m: each column once), where all tiles' (u, w) values of a row are one vector
    add of TW*C values (into blocks b = tj for w < m, b = tj + 1 for w >= m); w
    decreasing, so each element receives tile tj - 1 before tile tj, rows of tiles in
    increasing ti. The sample is then copied out as (H*W, C) and transposed to gx[n] once."""
    cdef Py_ssize_t B = gx.shape[0], C = gx.shape[1], H = gx.shape[2], W = gx.shape[3], a = L.shape[1]
    cdef Py_ssize_t TH, TW
    if L.shape[0] != a or pad < 0:
        raise ValueError("input_tiles_adjoint: L must be square and pad >= 0")
    if not _plan("input_tiles_adjoint", B, H + 2 * pad - 2, W + 2 * pad - 2, m, a, gv.shape[0], gv.shape[1],
                 gv.shape[2], C, num_threads, &TH, &TW):
        return
    # Q: one column phase of a scratch row ((TW + 1) blocks of C), m*Q: one scratch row
    cdef Py_ssize_t Hs = TH * m + 2, P = B * TH * TW, R = a * TW * C, Q = (TW + 1) * C
    cdef Py_ssize_t n, h, l, b, col, ti, u, w, k
    cdef floating* t
    cdef floating* tmp
    cdef floating* tile
    cdef floating* img
    cdef floating* dst
    cdef const floating* src
    cdef int err = 0
    cdef int* failed = &err
    with nogil, parallel(num_threads=num_threads):
        t = <floating*> malloc((Hs * m * Q + 2 * a * R + H * W * C) * sizeof(floating))
        if t == NULL:
            failed[0] = 1
        for n in prange(B, schedule="static"):
            if t != NULL:
                tmp = t + Hs * m * Q
                tile = tmp + a * R                                   # (a, a, TW, C)
                img = tile + a * R                                   # the sample (H*W, C)
                memset(t, 0, Hs * m * Q * sizeof(floating))
                for ti in range(TH):
                    _tx(&L[0, 0], a, a, &gv[0, (n * TH + ti) * TW, 0], a * P * C, P * C, tmp,
                        tile, R, TW * C, TW * C)
                    for u in range(a):
                        for w in range(a - 1, -1, -1):
                            dst = t + (ti * m + u) * m * Q + ((w - m) * Q + C if w >= m else w * Q)
                            src = tile + (u * a + w) * TW * C
                            for k in range(TW * C):
                                dst[k] = dst[k] + src[k]
                for h in range(H):
                    for l in range(m):
                        for b in range(TW + 1):
                            col = b * m + l - pad
                            if 0 <= col < W:
                                _copy(t + (h + pad) * m * Q + (l * (TW + 1) + b) * C, img + (h * W + col) * C, C)
                _transpose(img, C, H * W, C, &gx[n, 0, 0, 0], H * W)
        free(t)
    if err:
        raise MemoryError("winograd input-adjoint scratch")


cdef void _output_pass(floating* mt, floating* y, const floating* L, Py_ssize_t B, Py_ssize_t F,
                       Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t m, Py_ssize_t TH, Py_ssize_t TW,
                       bint adjoint, int num_threads, int* failed) noexcept nogil:
    """``output_tiles`` (mt -> y, L = A^T (m, a)) or, ``adjoint``, its transpose (y -> mt,
    L = A (a, m)), one row of tiles at a time through a scratch o[i, k, tj, f] holding
    the row's m x m output tiles: one ``_tx`` on vectors of TW*F values between o and
    mt, and between o and y vectors of F values through the sample transposed to
    (OH*OW, F), one transpose per sample (zeros past OH, OW read, those outputs dropped)."""
    cdef Py_ssize_t a = m + 2, P = B * TH * TW, R = TW * F
    cdef Py_ssize_t n, i, k, tj, ti, h, w
    cdef floating* t
    cdef floating* o
    cdef floating* img
    with parallel(num_threads=num_threads):
        # o, then _tx's scratch, then the transposed sample
        t = <floating*> malloc(((m * m + m * a) * R + OH * OW * F) * sizeof(floating))
        if t == NULL:
            failed[0] = 1
        for n in prange(B, schedule="static"):
            if t != NULL:
                img = t + (m * m + m * a) * R
                if adjoint:
                    _transpose(y + n * F * OH * OW, OH * OW, F, OH * OW, img, F)
                for ti in range(TH):
                    if not adjoint:
                        _tx(L, m, a, mt + (n * TH + ti) * TW * F, a * P * F, P * F, t + m * m * R, t, m * R, R, R)
                    for i in range(m):
                        h = ti * m + i
                        for k in range(m):
                            for tj in range(TW):
                                w = tj * m + k
                                o = t + (i * m + k) * R + tj * F
                                if h < OH and w < OW:
                                    if adjoint:
                                        _copy(img + (h * OW + w) * F, o, F)
                                    else:
                                        _copy(o, img + (h * OW + w) * F, F)
                                elif adjoint:
                                    _zero_fill(o, F)
                    if adjoint:
                        _tx(L, a, m, t, m * R, R, t + m * m * R, mt + (n * TH + ti) * TW * F, a * P * F, P * F, R)
                if not adjoint:
                    _transpose(img, F, OH * OW, F, y + n * F * OH * OW, OH * OW)
        free(t)


def output_tiles(const floating[:, :, ::1] mt,    # IN:  (a*a, B*TH*TW, F)
                 floating[:, :, :, ::1] y,        # OUT: (B, F, OH, OW), fully overwritten
                 const floating[:, ::1] L,        # (m, a): A^T
                 int num_threads=1):
    """y[n, f, ti*m + i, tj*m + k] = (L M L^T)[i, k], M the tile's (a, a) values of mt
    (outputs beyond OH, OW dropped)."""
    cdef Py_ssize_t TH, TW
    cdef int err = 0
    if _plan("output_tiles", y.shape[0], y.shape[2], y.shape[3], L.shape[0], L.shape[1], mt.shape[0],
             mt.shape[1], mt.shape[2], y.shape[1], num_threads, &TH, &TW):
        _output_pass(<floating*> &mt[0, 0, 0], &y[0, 0, 0, 0], &L[0, 0], y.shape[0], y.shape[1], y.shape[2],
                     y.shape[3], L.shape[0], TH, TW, False, num_threads, &err)
    if err:
        raise MemoryError("winograd output scratch")


def output_tiles_adjoint(const floating[:, :, :, ::1] gy,   # IN:  (B, F, OH, OW)
                         floating[:, :, ::1] gm,            # OUT: (a*a, B*TH*TW, F), fully overwritten
                         const floating[:, ::1] L,          # (a, m): A, the transpose of output_tiles' L
                         int num_threads=1):
    """gm[u*a + w, (n*TH + ti)*TW + tj, f] = (L g L^T)[u, w], g the m x m tile of gy[n, f]
    at (ti*m, tj*m), zero beyond OH, OW."""
    cdef Py_ssize_t TH, TW
    cdef int err = 0
    if _plan("output_tiles_adjoint", gy.shape[0], gy.shape[2], gy.shape[3], L.shape[1], L.shape[0],
             gm.shape[0], gm.shape[1], gm.shape[2], gy.shape[1], num_threads, &TH, &TW):
        _output_pass(&gm[0, 0, 0], <floating*> &gy[0, 0, 0, 0], &L[0, 0], gy.shape[0], gy.shape[1], gy.shape[2],
                     gy.shape[3], L.shape[1], TH, TW, True, num_threads, &err)
    if err:
        raise MemoryError("winograd output-adjoint scratch")
