"""Compiled batch-norm kernels (module ``npapprox._bn``): fused passes over NCHW.

The ``xp`` reference and the dispatch live in ``npapprox/kernels/bn.py``.
Arrays are viewed as ``(N, C, M)`` with ``M = H*W``; a *row* is one ``(n, c)``,
M contiguous values. Every kernel walks the rows of samples ``n0 <= n < n1``
(default: all) in memory order -- so the hardware prefetchers see one stream,
not a jump to another page every row. The dispatch gives each worker of
``npapprox.parallel`` (the pool of the convolutions) a contiguous range of
samples and calls the kernel once per worker, with the GIL released; only the
backward's two phases can also split their rows over an OpenMP team themselves
(``threads``: the PyTorch bridge's kernels run on torch's own OpenMP threads).

* Element-wise results are bit-identical to the reference given the same
  per-channel constants (same float operations in the same order;
  ``-ffp-contract=off``): ``y = (x - mu) * scale + beta``, ``h = y * (y > 0)``,
  ``xhat = (src - mu) * inv_sigma``, the paper codes of y (``_paper_code``, as
  ``paper_pack``) and their decoded xhat (as ``paper_decode``).
* Reductions are done per row in float64, into a ``(2, N, C)`` table of row
  partials: the statistics' S = sum x and Q = sum (x - S/M)^2 (from the sums of
  the deviations from a shift and of their squares, ``_moments_row``), the
  backward's sum g and sum g * xhat (each product rounded to the array's
  precision, as the reference's). Each is a 32-lane sum (``_lanes.h``): lane j
  adds the terms i = j (mod 32) of the row in order of i, each widened to
  float64 (the squares fused: lane = fma(d, d, lane)), then lane j += lane j+16,
  j+8, j+4, j+2, j+1 gives the total (vector paths doing exactly these
  operations; tests/test_bn.py checks them bit for bit against that
  definition). The table is then summed per channel over n in order
  (``*_of_rows``). A row's partial does not
  depend on which worker computed it, so the results do not depend on the
  thread count. They are more accurate than the reference's float32 sums and
  differ from them in the last bits.
* One read of memory per input where the algebra allows: the statistics read x
  once (per row, in one loop, the sums of its deviations from a shift and of
  their squares, ``_moments_row``; rows combined with Chan's formula); the
  backward reads gy and its source twice (the sums, then gx), as the per-channel sums are needed
  before gx; the fused forward of a unit writes h and its K-bit codes in the one
  pass that computes y.
* The inner loops are plain loops over contiguous rows (raw pointers), written
  so that GCC vectorises them (``-fopt-info-vec``): selects instead of branches,
  no value computed only to be selected. The float64 sums are the exception:
  ``_lanes.h`` spells out their vector code (GCC splits the widening to float64,
  which bounds them, or keeps the partial sums in memory).
"""
cimport cython.parallel
from cython cimport floating
from libc.stdint cimport int32_t, uint8_t, uint32_t
from libc.string cimport memcpy

include "_codes.pxi"   # _pack, _unpack, _paper_code(s), _nonfinite (shared with src/_quant.pyx)


cdef enum:
    BLOCK = 1024  # values per block (a multiple of LANES): a block's g, xhat and codes live on the stack


cdef extern from "_lanes.h" nogil:
    # float64 sums in LANES interleaved partial sums (see the header): acc[LANES] zeroed,
    # the terms of consecutive pieces added (each piece starting at a multiple of LANES),
    # then the total in a fixed tree
    enum: LANES
    void lanes_zero(double* acc)
    double lanes_total(double* acc)
    void lanes_add_f(double* acc, const float* p, Py_ssize_t m)                   # p[i]
    void lanes_add_d(double* acc, const double* p, Py_ssize_t m)
    void lanes_add_dev_f(double* s, double* q, const float* p, Py_ssize_t m, double c)  # d = p[i] - c: d, d^2
    void lanes_add_dev_d(double* s, double* q, const double* p, Py_ssize_t m, double c)
    void lanes_add_dot_f(double* acc, const float* p, const float* q, Py_ssize_t m)     # p[i] * q[i]
    void lanes_add_dot_d(double* acc, const double* p, const double* q, Py_ssize_t m)


cdef inline Py_ssize_t _rows_end(Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t N) except -1:
    """The checked end of the sample range [n0, n1) (n1 = -1: N)."""
    if n1 == -1:
        n1 = N
    if not 0 <= n0 <= n1 <= N:
        raise ValueError(f"sample range [{n0}, {n1}) is not inside [0, {N})")
    return n1


cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int npa_team_size(void) { return omp_get_num_threads(); }
    #else
    static int npa_team_size(void) { return 1; }
    #endif
    """
    int npa_team_size() noexcept nogil


cdef inline Py_ssize_t _share(Py_ssize_t n0, Py_ssize_t n1, int shift) noexcept nogil:
    """Inside a parallel region: where share ``thread + shift`` of ``[n0, n1)`` starts, the
    range cut into one contiguous share per thread of the team (``parallel.run_ranges``'s cut)."""
    return n0 + (n1 - n0) * (cython.parallel.threadid() + shift) // npa_team_size()


cdef inline void _add(double* acc, const floating* p, Py_ssize_t m) noexcept nogil:
    """acc += the lanes of p[0:m] (``_lanes.h``)."""
    if floating is float:
        lanes_add_f(acc, p, m)
    else:
        lanes_add_d(acc, p, m)


cdef inline void _add_dot(double* acc, const floating* p, const floating* q, Py_ssize_t m) noexcept nogil:
    """acc += the lanes of p[0:m] * q[0:m], each product rounded to p's precision (as the
    reference's ``(g * xhat).sum()``)."""
    if floating is float:
        lanes_add_dot_f(acc, p, q, m)
    else:
        lanes_add_dot_d(acc, p, q, m)


cdef inline void _moments_row(const floating* p, Py_ssize_t m, double* S, double* Q) noexcept nogil:
    """S = sum p[0:m] and Q = sum (p[i] - S/m)^2 (float64), reading the row once: around
    c, the mean of its first m0 = min(m, 32) values (their lanes sum over m0), the lanes of
    d_i = p[i] - c give Sd = sum d_i and Qd = sum d_i^2 (``lanes_add_dev``), then
    S = c*m + Sd and Q = Qd - Sd*Sd/m. The shift keeps the subtraction harmless:
    by Cauchy-Schwarz m0 (c - S/m)^2 <= Q, so Qd = Q + m (c - S/m)^2 <= (1 + m/m0) Q
    and Q keeps all but about log2(1 + m/m0) bits of Qd's float64 accuracy."""
    cdef double sd[LANES]
    cdef double qd[LANES]
    cdef double c, ds
    cdef Py_ssize_t m0 = min(m, <Py_ssize_t> LANES)
    lanes_zero(sd)
    _add(sd, p, m0)       # a tree of depth 5, where a loop in order would wait on each addition
    c = lanes_total(sd) / <double> m0
    lanes_zero(sd)
    lanes_zero(qd)
    if floating is float:
        lanes_add_dev_f(sd, qd, p, m, c)
    else:
        lanes_add_dev_d(sd, qd, p, m, c)
    ds = lanes_total(sd)
    S[0] = c * <double> m + ds
    Q[0] = lanes_total(qd) - ds * ds / <double> m


def row_moments(const floating[:, :, ::1] x,   # IN:  (N, C, M)
                double[:, :, ::1] part,         # OUT: (2, N, C) rows n0 <= n < n1 written
                Py_ssize_t n0=0, Py_ssize_t n1=-1):
    """Per row: part[0, n, c] = S = sum(x[n, c]) and part[1, n, c] = sum((x[n, c] - S/M)^2)
    (float64, ``_moments_row``), each row read once."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], M = x.shape[2], n, c
    n1 = _rows_end(n0, n1, N)
    if part.shape[0] != 2 or part.shape[1] != N or part.shape[2] != C:
        raise ValueError("part must have shape (2, N, C)")
    if M == 0:
        raise ValueError("batch statistics need at least one value per channel")
    with nogil:
        for n in range(n0, n1):
            for c in range(C):
                _moments_row(&x[n, c, 0], M, &part[0, n, c], &part[1, n, c])


def moments_of_rows(const double[:, :, ::1] part,   # IN:  (2, N, C) from row_moments
                    Py_ssize_t M,
                    double[::1] mean,                # OUT: (C,)
                    double[::1] var):                # OUT: (C,) biased
    """Per channel, over n in order: mean = sum_n S_n / Mt and, by Chan's formula (the
    same sum of squared deviations in real arithmetic), var = sum_n (Q_n + M (S_n/M -
    mean)^2) / Mt, Mt = N*M. (The sums run over the channels in the inner loop, the
    table's memory order; each channel's terms are still added in order of n.)"""
    cdef Py_ssize_t N = part.shape[1], C = part.shape[2], n, c
    cdef double d, count = <double> (N * M)
    if mean.shape[0] != C or var.shape[0] != C:
        raise ValueError("mean and var must have one entry per channel")
    if N * M == 0:
        raise ValueError("batch statistics need at least one value per channel")
    mean[:] = 0
    var[:] = 0
    for n in range(N):
        for c in range(C):
            mean[c] = mean[c] + part[0, n, c]
    for c in range(C):
        mean[c] = mean[c] / count
    for n in range(N):
        for c in range(C):
            d = part[0, n, c] / <double> M - mean[c]
            var[c] = var[c] + (part[1, n, c] + <double> M * (d * d))
    for c in range(C):
        var[c] = var[c] / count


def bn_stats(const floating[:, :, ::1] x,     # IN:  (N, C, M)
             double[::1] mean,                 # OUT: (C,)
             double[::1] var):                 # OUT: (C,) biased
    """mean = sum(x)/(N*M), var = sum((x - mean)^2)/(N*M) per channel, on this thread
    (``row_moments`` then ``moments_of_rows``)."""
    import numpy as np
    if x.shape[0] * x.shape[2] == 0:
        raise ValueError("batch statistics need at least one value per channel")
    part = np.empty((2, x.shape[0], x.shape[1]))
    row_moments(x, part)
    moments_of_rows(part, x.shape[2], mean, var)


cdef inline void _apply_row(const floating* x, floating* y, floating* h, Py_ssize_t m,
                            floating mu, floating scale, floating beta) noexcept nogil:
    """y = (x - mu) * scale + beta and/or h = y * (y > 0) over one row (y or h may be NULL)."""
    cdef Py_ssize_t i
    cdef floating v
    if y != NULL and h != NULL:
        for i in range(m):
            v = (x[i] - mu) * scale + beta
            y[i] = v
            h[i] = v * (v > 0)
    elif y != NULL:
        for i in range(m):
            y[i] = (x[i] - mu) * scale + beta
    elif h != NULL:
        for i in range(m):
            v = (x[i] - mu) * scale + beta
            h[i] = v * (v > 0)


cdef inline floating* _ptr(floating[:, :, ::1] a) noexcept:
    return NULL if a is None else &a[0, 0, 0]


cdef inline void _check_like(floating[:, :, ::1] a, Py_ssize_t N, Py_ssize_t C, Py_ssize_t M,
                             str name) except *:
    if a is not None and (a.shape[0] != N or a.shape[1] != C or a.shape[2] != M):
        raise ValueError(f"{name} shape does not match the input")


def bn_apply(const floating[:, :, ::1] x,     # IN:  (N, C, M)
             const floating[::1] mu,           # IN:  (C,)
             const floating[::1] scale,        # IN:  (C,) gamma * inv_sigma
             const floating[::1] beta,         # IN:  (C,)
             floating[:, :, ::1] y,            # OUT: (N, C, M) or None
             floating[:, :, ::1] h,            # OUT: (N, C, M) or None
             Py_ssize_t n0=0, Py_ssize_t n1=-1):
    """y = (x - mu) * scale + beta and/or h = y * (y > 0), one pass over x."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], M = x.shape[2], n, c, row
    cdef floating* py
    cdef floating* ph
    _check_like(y, N, C, M, "y")
    _check_like(h, N, C, M, "h")
    if mu.shape[0] != C or scale.shape[0] != C or beta.shape[0] != C:
        raise ValueError("mu, scale and beta must have one entry per channel")
    n1 = _rows_end(n0, n1, N)
    if N * C * M == 0:
        return
    py, ph = _ptr(y), _ptr(h)
    with nogil:
        for n in range(n0, n1):
            for c in range(C):
                row = (n * C + c) * M
                _apply_row(&x[0, 0, 0] + row, (py + row) if py != NULL else NULL,
                           (ph + row) if ph != NULL else NULL, M, mu[c], scale[c], beta[c])


def bn_apply_pack(const float[:, :, ::1] x,      # IN:  (N, C, M) the BN input
                  const float[::1] mu,            # IN:  (C,)
                  const float[::1] scale,         # IN:  (C,) gamma * inv_sigma
                  const float[::1] beta,          # IN:  (C,)
                  const float[::1] k,             # IN:  (C,) paper encode scale (quant.paper_params)
                  const int32_t[::1] s,           # IN:  (C,) first positive code
                  int bits,
                  float[:, :, ::1] h,             # OUT: (N, C, M) relu(y)
                  uint8_t[::1] packed,            # OUT: N*C*M*bits/8 bytes, paper codes of y
                  Py_ssize_t n0=0, Py_ssize_t n1=-1):
    """A BN -> ReLU unit's forward under the paper's window, one pass over x: per block
    of a row, y = (x - mu) * scale + beta (on the stack only), h = y * (y > 0) and
    the K-bit codes of y (``paper_pack``'s). Returns the number of non-finite y.
    Rows must start on a byte boundary of the codes: M * bits % 8 == 0."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], M = x.shape[2], n, c, row, j0, nb, i, nf = 0
    cdef uint8_t cb[BLOCK]
    cdef float v, m_, s_, b_
    cdef uint32_t bad
    cdef const float* px
    cdef float* ph
    cdef PaperBounds pb
    if bits not in (1, 2, 4, 8):
        raise ValueError("bits must be 1, 2, 4 or 8")
    if (M * bits) % 8:
        raise ValueError("rows must start on a byte boundary: M * bits % 8 == 0")
    if h is None:
        raise ValueError("h is required")
    _check_like(h, N, C, M, "h")
    if packed.shape[0] != N * C * M * bits // 8:
        raise ValueError("packed does not hold N*C*M codes")
    if mu.shape[0] != C or scale.shape[0] != C or beta.shape[0] != C or k.shape[0] != C or s.shape[0] != C:
        raise ValueError("per-channel arrays must have one entry per channel")
    n1 = _rows_end(n0, n1, N)
    if N * C * M == 0:
        return 0
    with nogil:
        for n in range(n0, n1):
            for c in range(C):
                m_, s_, b_ = mu[c], scale[c], beta[c]
                pb = _paper_bounds(k[c], s[c], 1 << bits)
                row = (n * C + c) * M
                px = &x[0, 0, 0] + row
                ph = &h[0, 0, 0] + row
                j0 = 0
                while j0 < M:
                    nb = min(<Py_ssize_t> BLOCK, M - j0)
                    bad = 0
                    for i in range(nb):
                        v = (px[j0 + i] - m_) * s_ + b_
                        ph[j0 + i] = v * (v > 0)
                        bad |= _nonfinite(v)
                        cb[i] = _paper_code(v, &pb)
                    if bad:   # y is recomputed only for blocks holding NaN or inf
                        for i in range(nb):
                            v = (px[j0 + i] - m_) * s_ + b_
                            nf += _nonfinite(v)
                    _pack(cb, nb * bits // 8, bits, &packed[0] + (row + j0) * bits // 8)
                    j0 += BLOCK
    return nf


# --------------------------------------------------------------------------- #
# Backward: one row driver for every source (x, a rebuilt xhat, paper codes)
# --------------------------------------------------------------------------- #
cdef enum:
    SRC_PLAIN = 0    # g = gy (plain BN)
    SRC_RELU = 1     # g = gy * ((src - mu) * scale + beta > 0): the forward's mask rebuilt
    SRC_MASK = 2     # g = gy * mask
    SRC_CODES = 3    # xhat and the mask decoded from paper codes

cdef struct Source:
    # what the backward reads besides gy (pointers at the tensor's start, per-channel arrays)
    const void* src               # (N, C, M) x or xhat, in gy's precision (not SRC_CODES)
    const void* mu                # (C,) in gy's precision (not SRC_CODES)
    const void* inv_sigma
    const void* beta
    const uint8_t* mask           # (N, C, M) SRC_MASK
    const uint8_t* packed         # SRC_CODES: paper codes
    const int32_t* s              # SRC_CODES: (C,) first positive code
    const float* step             # SRC_CODES: (C,) xhat = (code - s + 0.5) * step + off
    const float* off
    int mode, bits


cdef inline void _codes_of(const uint8_t* packed, Py_ssize_t start, Py_ssize_t m, int bits,
                           uint8_t* cb) noexcept nogil:
    """The codes start .. start+m of a paper-scheme tensor into cb: unpacked a byte at a
    time when the block starts and ends on byte boundaries, else one by one."""
    cdef Py_ssize_t i, j, lv = 3 if bits == 1 else 2 if bits == 2 else 1 if bits == 4 else 0
    cdef Py_ssize_t vmask = (1 << lv) - 1
    cdef int cmask = (1 << bits) - 1
    if (start & vmask) == 0 and (m & vmask) == 0:
        _unpack(packed + (start >> lv), m >> lv, bits, cb)
        return
    for i in range(m):
        j = start + i
        cb[i] = (packed[j >> lv] >> ((j & vmask) * bits)) & cmask


cdef inline void _put(Py_ssize_t i, floating gv, floating xv, floating* g, floating* xh, floating* po,
                      floating scale, floating a, floating k) noexcept nogil:
    """Value i of a block: g[i], xh[i] = gv, xv, or, given po, po[i] = scale * (gv - a - xv * k)."""
    if po != NULL:
        po[i] = scale * (gv - a - xv * k)
    else:
        g[i] = gv
        xh[i] = xv


cdef inline const floating* _load_block(const Source* S, const floating* pg, Py_ssize_t start, Py_ssize_t nb,
                                        Py_ssize_t c, floating scale, floating* g, floating* xh,
                                        uint8_t* cb, floating* po, floating a, floating k) noexcept nogil:
    """Block [start, start + nb) of the flat tensor (inside one row of channel c; pg
    points at gy there): xh = xhat, and g = gy * mask, returned (pg itself without a
    mask, the buffer g otherwise); given po, instead po = scale * (g - a - xhat * k),
    the batch-statistics gx, with no g or xh stored. Selects, so each loop
    vectorises; gy * 0 keeps NumPy's bits for gy * False (-0.0, NaN). Codes decode as
    ``paper_decode``: float32(float32(code - s) + 0.5) * step + off, two roundings;
    the mask is code >= s."""
    cdef Py_ssize_t i
    cdef const floating* ps
    cdef const uint8_t* pm
    cdef floating mu, inv_sigma, beta
    cdef float t, half = 0.5, step, off
    cdef int s
    if S.mode == SRC_CODES:
        s, step, off = S.s[c], S.step[c], S.off[c]
        _codes_of(S.packed, start, nb, S.bits, cb)
        for i in range(nb):
            t = <float> (cb[i] - s) + half
            _put(i, pg[i] if cb[i] >= s else pg[i] * 0, t * step + off, g, xh, po, scale, a, k)
        return g
    mu, inv_sigma = (<const floating*> S.mu)[c], (<const floating*> S.inv_sigma)[c]
    ps = <const floating*> S.src + start
    if S.mode == SRC_RELU:
        beta = (<const floating*> S.beta)[c]
        for i in range(nb):
            _put(i, pg[i] if ((ps[i] - mu) * scale + beta) > 0 else pg[i] * 0, (ps[i] - mu) * inv_sigma,
                 g, xh, po, scale, a, k)
    elif S.mode == SRC_MASK:
        pm = S.mask + start
        for i in range(nb):
            _put(i, pg[i] if pm[i] != 0 else pg[i] * 0, (ps[i] - mu) * inv_sigma, g, xh, po, scale, a, k)
    elif po != NULL:
        for i in range(nb):
            po[i] = scale * (pg[i] - a - (ps[i] - mu) * inv_sigma * k)
    else:
        for i in range(nb):
            xh[i] = (ps[i] - mu) * inv_sigma
        return pg
    return g


cdef void _row_sums(const Source* S, const floating* gy, Py_ssize_t row, Py_ssize_t M, Py_ssize_t c,
                    floating scale, double* sum_g, double* sum_gx) noexcept nogil:
    """Over one row: *sum_g = sum g, *sum_gx = sum g * xhat (float64, ``_lanes.h``: the
    row's sums in lanes, block by block, then their totals)."""
    cdef floating g[BLOCK]
    cdef floating xh[BLOCK]
    cdef uint8_t cb[BLOCK]
    cdef double ag[LANES]
    cdef double agx[LANES]
    cdef Py_ssize_t j0 = 0, nb
    cdef const floating* gp
    lanes_zero(ag)
    lanes_zero(agx)
    while j0 < M:
        nb = min(<Py_ssize_t> BLOCK, M - j0)
        gp = _load_block(S, gy + row + j0, row + j0, nb, c, scale, g, xh, cb, NULL, 0, 0)
        _add(ag, gp, nb)
        _add_dot(agx, gp, xh, nb)
        j0 += BLOCK
    sum_g[0] = lanes_total(ag)
    sum_gx[0] = lanes_total(agx)


cdef void _row_grad(const Source* S, const floating* gy, Py_ssize_t row, Py_ssize_t M, Py_ssize_t c,
                    floating scale, bint batch_stats, floating a, floating k, floating* gx) noexcept nogil:
    """Over one row: gx = scale * (g - a - xhat * k) (batch statistics: computed as g and
    xhat are, ``_load_block``) or scale * g. gx may be gy: each value of gy is read
    before its gx is written."""
    cdef floating g[BLOCK]
    cdef floating xh[BLOCK]
    cdef uint8_t cb[BLOCK]
    cdef Py_ssize_t i, j0, nb
    cdef floating* po
    cdef const floating* gp
    j0 = 0
    while j0 < M:
        nb = min(<Py_ssize_t> BLOCK, M - j0)
        po = gx + row + j0
        if batch_stats:
            _load_block(S, gy + row + j0, row + j0, nb, c, scale, g, xh, cb, po, a, k)
        else:
            gp = _load_block(S, gy + row + j0, row + j0, nb, c, scale, g, xh, cb, NULL, 0, 0)
            for i in range(nb):
                po[i] = scale * gp[i]
        j0 += BLOCK


cdef void _sums_of_rows(const double* part, Py_ssize_t N, Py_ssize_t C, double* ggamma,
                        double* gbeta) noexcept nogil:
    """ggamma[c] = sum_n part[1, n, c], gbeta[c] = sum_n part[0, n, c], n in order (the
    channels in the inner loop, the table's memory order)."""
    cdef Py_ssize_t n, c
    for c in range(C):
        gbeta[c] = 0
        ggamma[c] = 0
    for n in range(N):
        for c in range(C):
            gbeta[c] += part[n * C + c]
            ggamma[c] += part[(N + n) * C + c]


cdef enum:
    PHASE_ALL = 0    # sums, then gx: the whole batch on this thread
    PHASE_SUMS = 1   # the row sums of rows n0 <= n < n1 into part
    PHASE_GRAD = 2   # gx of those rows, from the per-channel sums (ggamma, gbeta: given)


cdef void _backward(const Source* S, const floating* gy, Py_ssize_t N, Py_ssize_t C, Py_ssize_t M,
                    const floating* scale, bint batch_stats, int phase, Py_ssize_t n0, Py_ssize_t n1,
                    double* part, floating* gx, double* ggamma, double* gbeta) noexcept nogil:
    """The backward's phases over rows n0 <= n < n1. With Mt = N*M: gbeta = sum g,
    ggamma = sum g * xhat (row sums in part (2, N, C), then summed over n in order);
    gx with a, k = gbeta/Mt, ggamma/Mt rounded to gy's precision (batch statistics)."""
    cdef Py_ssize_t n, c, row
    cdef double count = <double> (N * M)
    if phase != PHASE_GRAD:
        for n in range(n0, n1):
            for c in range(C):
                row = n * C + c
                _row_sums(S, gy, row * M, M, c, scale[c], &part[row], &part[N * C + row])
    if phase == PHASE_ALL:
        _sums_of_rows(part, N, C, ggamma, gbeta)
    if phase == PHASE_SUMS or gx == NULL:
        return
    for n in range(n0, n1):
        for c in range(C):
            _row_grad(S, gy, (n * C + c) * M, M, c, scale[c], batch_stats,
                      <floating> (gbeta[c] / count) if batch_stats else 0,
                      <floating> (ggamma[c] / count) if batch_stats else 0, gx)


def sums_of_rows(const double[:, :, ::1] part,   # IN:  (2, N, C) row sums (bn_backward*, phase 1)
                 double[::1] ggamma,              # OUT: (C,) sum over n of part[1, n, c], n in order
                 double[::1] gbeta):              # OUT: (C,) the same of part[0]
    """The per-channel sums of the backward from its row sums."""
    if part.shape[0] != 2 or ggamma.shape[0] != part.shape[2] or gbeta.shape[0] != part.shape[2]:
        raise ValueError("part must be (2, N, C), ggamma and gbeta (C,)")
    if part.shape[1] * part.shape[2]:
        _sums_of_rows(&part[0, 0, 0], part.shape[1], part.shape[2], &ggamma[0], &gbeta[0])


cdef inline void _no_source(Source* S, int mode, int bits) noexcept:
    S.src = S.mu = S.inv_sigma = S.beta = NULL
    S.mask = S.packed = NULL
    S.s, S.step, S.off, S.mode, S.bits = NULL, NULL, NULL, mode, bits


cdef _backward_call(Source* S, const floating[:, :, ::1] gy, const floating[::1] scale, bint batch_stats,
                    floating[:, :, ::1] gx, double[::1] ggamma, double[::1] gbeta, double[:, :, ::1] part,
                    int phase, Py_ssize_t n0, Py_ssize_t n1, int threads):
    """The checks both entry points share, then ``_backward`` without the GIL: phases 1
    and 2 with ``threads > 1`` on an OpenMP team of that many threads started by the
    calling thread, each on its contiguous share of the rows (a row's results do not
    depend on which thread computes it). Phase 0 allocates its (2, N, C) table of row
    sums here and runs on the calling thread."""
    import numpy as np
    cdef Py_ssize_t N = gy.shape[0], C = gy.shape[1], M = gy.shape[2]
    _check_like(gx, N, C, M, "gx")
    if phase not in (PHASE_ALL, PHASE_SUMS, PHASE_GRAD):
        raise ValueError("phase must be 0 (all), 1 (row sums) or 2 (gx)")
    if ggamma.shape[0] != C or gbeta.shape[0] != C or scale.shape[0] != C:
        raise ValueError("per-channel arrays must have one entry per channel")
    if phase == PHASE_ALL and part is None:
        part = np.empty((2, N, C))
    if phase != PHASE_GRAD and (part is None or part.shape[0] != 2 or part.shape[1] != N or part.shape[2] != C):
        raise ValueError("part must have shape (2, N, C)")
    n1 = _rows_end(n0, n1, N)
    if C == 0:
        return
    if N * M == 0:
        ggamma[:] = 0
        gbeta[:] = 0
        return
    cdef double* ppart = NULL if phase == PHASE_GRAD else &part[0, 0, 0]
    cdef floating* pgx = _ptr(gx)
    cdef Py_ssize_t a = n0, b = n1
    if threads <= 1 or phase == PHASE_ALL:
        with nogil:
            _backward(S, &gy[0, 0, 0], N, C, M, &scale[0], batch_stats, phase, a, b, ppart, pgx,
                      &ggamma[0], &gbeta[0])
        return
    with nogil, cython.parallel.parallel(num_threads=threads):
        a = _share(n0, n1, 0)
        b = _share(n0, n1, 1)
        _backward(S, &gy[0, 0, 0], N, C, M, &scale[0], batch_stats, phase, a, b, ppart, pgx,
                  &ggamma[0], &gbeta[0])


def bn_backward(const floating[:, :, ::1] gy,       # IN:  (N, C, M) output gradient
                const floating[:, :, ::1] src,      # IN:  (N, C, M) x, or a rebuilt xhat (mu=0, inv_sigma=1)
                const floating[::1] mu,             # IN:  (C,)
                const floating[::1] inv_sigma,      # IN:  (C,)
                const floating[::1] scale,          # IN:  (C,) gamma * inv_sigma
                const floating[::1] beta,           # IN:  (C,) used by mask_mode 1
                const unsigned char[:, :, ::1] mask,  # IN: (N, C, M) used by mask_mode 2
                int mask_mode,                      # 0: none, 1: (src-mu)*scale+beta > 0, 2: mask != 0
                bint batch_stats,
                floating[:, :, ::1] gx,             # OUT: (N, C, M) or None (may be gy itself)
                double[::1] ggamma,                 # OUT: (C,) (IN in phase 2)
                double[::1] gbeta,                  # OUT: (C,) (IN in phase 2)
                double[:, :, ::1] part=None,        # (2, N, C) row sums: OUT in phase 1
                int phase=0, Py_ssize_t n0=0, Py_ssize_t n1=-1, int threads=1):
    """With xhat = (src - mu) * inv_sigma and g = gy * mask (gy without a mask):
    gbeta = sum g, ggamma = sum g * xhat (float64), then, when gx is given,
    gx = scale * (g - gbeta/Mt - xhat * ggamma/Mt) with Mt = N*M (batch
    statistics) or gx = scale * g (running statistics); the two per-channel
    constants are rounded to the array's precision first, as the reference does.
    Phase 0: all of it; phase 1: the row sums of samples n0 <= n < n1 into part
    (then ``sums_of_rows``); phase 2: gx of those samples from ggamma, gbeta. Phases 1
    and 2 split their samples over an OpenMP team of ``threads`` threads (the calling
    thread's; the same bytes for any count)."""
    cdef Py_ssize_t N = gy.shape[0], C = gy.shape[1], M = gy.shape[2]
    cdef Source S
    if src.shape[0] != N or src.shape[1] != C or src.shape[2] != M:
        raise ValueError("src shape does not match gy")
    if mask_mode == 2 and (mask is None or mask.shape[0] != N or mask.shape[1] != C or mask.shape[2] != M):
        raise ValueError("mask shape does not match gy")
    if mask_mode not in (0, 1, 2):
        raise ValueError("mask_mode must be 0, 1 or 2")
    if mu.shape[0] != C or inv_sigma.shape[0] != C or beta.shape[0] != C:
        raise ValueError("per-channel arrays must have one entry per channel")
    _no_source(&S, mask_mode, 0)
    if N * C * M:
        S.src, S.mu, S.inv_sigma, S.beta = &src[0, 0, 0], &mu[0], &inv_sigma[0], &beta[0]
        S.mask = &mask[0, 0, 0] if mask_mode == 2 else NULL
    _backward_call(&S, gy, scale, batch_stats, gx, ggamma, gbeta, part, phase, n0, n1, threads)


def bn_backward_codes(const float[:, :, ::1] gy,       # IN:  (N, C, M) output gradient of the unit (gh)
                      const unsigned char[::1] packed,  # IN:  paper-scheme codes of the unit's y
                      const int32_t[::1] s,             # IN:  (C,) first positive code
                      const float[::1] x_step,          # IN:  (C,) xhat decode map
                      const float[::1] x_off,           # IN:  (C,)
                      int bits,
                      const float[::1] scale,           # IN:  (C,) gamma * inv_sigma
                      bint batch_stats,
                      float[:, :, ::1] gx,              # OUT: (N, C, M) or None (may be gy itself)
                      double[::1] ggamma,               # OUT: (C,) (IN in phase 2)
                      double[::1] gbeta,                # OUT: (C,) (IN in phase 2)
                      double[:, :, ::1] part=None,      # (2, N, C) row sums: OUT in phase 1
                      int phase=0, Py_ssize_t n0=0, Py_ssize_t n1=-1, int threads=1):
    """``bn_backward`` of a BN -> ReLU unit straight from its K-bit codes: xhat and the
    mask are rebuilt per block of 1024 values on the stack, never as arrays. The
    same arithmetic in the same order as decoding first (``paper_decode``,
    ``paper_mask``) and calling ``bn_backward`` with src = xhat, mu = 0,
    inv_sigma = 1, mask_mode 2, so the same bytes. Phases as ``bn_backward``."""
    cdef Py_ssize_t N = gy.shape[0], C = gy.shape[1], M = gy.shape[2]
    cdef Source S
    if bits not in (1, 2, 4, 8):
        raise ValueError("bits must be 1, 2, 4 or 8")
    if packed.shape[0] != (N * C * M * bits + 7) // 8:
        raise ValueError("packed does not hold N*C*M codes")
    if s.shape[0] != C or x_step.shape[0] != C or x_off.shape[0] != C:
        raise ValueError("per-channel arrays must have one entry per channel")
    _no_source(&S, SRC_CODES, bits)
    if N * C * M:
        S.packed, S.s, S.step, S.off = &packed[0], &s[0], &x_step[0], &x_off[0]
    _backward_call(&S, gy, scale, batch_stats, gx, ggamma, gbeta, part, phase, n0, n1, threads)
