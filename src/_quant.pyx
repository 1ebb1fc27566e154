"""Compiled storage kernels (module ``npapprox._quant``).

The byte contract, the naive loops and the argument checks live in
``npapprox/kernels/reference.py`` (and docs/kernels.md); these kernels must give
**identical bytes** to it for every input, including NaN, +-inf, -0.0, empty
and odd-sized arrays. ``npapprox/kernels/cpu.py`` validates, allocates the
outputs and calls the functions at the bottom of this file on flat (1-D,
C-contiguous) views.

Organisation

* The flat index range is cut into *pieces* of ``PIECE`` elements (a multiple
  of 8, so every piece starts on a byte boundary for every K). ``prange`` runs
  over pieces (``schedule="guided"``: a core busy with another process does not
  hold the others back), so each thread writes whole output bytes (packing) or
  whole output ranges (decoding): no races, no atomics, and the bytes do not
  depend on the thread count or the schedule. A single piece runs without a
  parallel region.
* Inside a piece, the elements are cut again into *segments* of constant
  parameters (one channel plane of the paper scheme, one group of the generic
  one). A tight loop encodes a segment into a per-thread buffer of codes (a stack
  array), which is then packed into bytes; decoding unpacks the piece into the
  buffer first. At K = 8 the codes are the bytes, so the buffer is skipped.
* The tight loops are written to be vectorised by the C compiler at the
  baseline ISA (SSE2 on x86-64; the build adds no -march): no libm call, ceil /
  floor of a value already clamped to a small range are an ``int`` conversion
  (truncation) plus a compare, clamps are ``a > b ? a : b`` (MAXPS / MINPS, and
  a NaN falls to the bound like fmaxf), and a value is never computed only to
  be selected under a condition (GCC does not if-convert that under the default
  -ftrapping-math; the ReLU decode therefore selects its operands, not its result).
* Generic quantizer: min / max per group is a first pass. For small groups
  (``lcm(group, 8) <= FUSED_MAX``) it is fused with the encoding: a parallel
  chunk holds whole groups, and each group's min / max is computed right before
  its elements are encoded, while they are still in cache (one read of ``x``
  from memory). Larger groups use two passes: partial min / max over sub-ranges
  of ``SUB`` elements in parallel, combined per group, then a parallel encoding.
  min / max run on integer order keys of the floats (a vectorisable integer
  reduction); they are order-independent (non-finite groups are flagged by a
  count, and ``+ 0.0f`` turns a -0.0 extreme into +0.0), so both paths and any
  thread count agree.

Compiler directives (boundscheck=False, wraparound=False, cdivision=True, ...)
and flags (-O3 -ffp-contract=off: no fused multiply-add; never -ffast-math;
OpenMP when available) are set once, in setup.py.
"""
from cython.parallel cimport prange
from libc.math cimport NAN
from libc.stdint cimport int32_t, uint8_t, uint32_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset


cdef enum:
    PIECE = 4096        # elements per piece (multiple of 8): the unit of parallel work
    SERIAL_MAX = 1 << 18  # paper_decode: up to this many values, one thread (no fork / join)
    CHUNK = 16384       # generic, fused path: target elements per parallel chunk
    FUSED_MAX = 16384   # generic: fused path when lcm(group, 8) <= FUSED_MAX
    SUB = 16384         # generic, two-pass path: elements per partial min/max task
    KEY_MAX = 0x7FFFFFFF
    KEY_MIN = -0x7FFFFFFF - 1


# --------------------------------------------------------------------------- #
# Bit packing of a piece
# --------------------------------------------------------------------------- #
cdef inline void _pack(const uint8_t* c, Py_ssize_t nbytes, int bits, uint8_t* out) noexcept nogil:
    """out[b] = OR_j c[b*V + j] << (j*bits); c holds nbytes*V codes (zero padded)."""
    cdef Py_ssize_t b
    if bits == 8:
        memcpy(out, c, nbytes)
    elif bits == 4:
        for b in range(nbytes):
            out[b] = <uint8_t>(c[2 * b] | (c[2 * b + 1] << 4))
    elif bits == 2:
        for b in range(nbytes):
            out[b] = <uint8_t>(c[4 * b] | (c[4 * b + 1] << 2) | (c[4 * b + 2] << 4) | (c[4 * b + 3] << 6))
    else:
        for b in range(nbytes):
            out[b] = <uint8_t>(c[8 * b] | (c[8 * b + 1] << 1) | (c[8 * b + 2] << 2) | (c[8 * b + 3] << 3)
                               | (c[8 * b + 4] << 4) | (c[8 * b + 5] << 5) | (c[8 * b + 6] << 6)
                               | (c[8 * b + 7] << 7))


cdef inline void _unpack(const uint8_t* p, Py_ssize_t nbytes, int bits, uint8_t* c) noexcept nogil:
    """c[b*V + j] = (p[b] >> (j*bits)) & (2**bits - 1) for b < nbytes, j < V."""
    cdef Py_ssize_t b, j
    cdef uint8_t x
    if bits == 8:
        memcpy(c, p, nbytes)
    elif bits == 4:
        for b in range(nbytes):
            x = p[b]
            c[2 * b] = x & 15
            c[2 * b + 1] = x >> 4
    elif bits == 2:
        for b in range(nbytes):
            x = p[b]
            c[4 * b] = x & 3
            c[4 * b + 1] = (x >> 2) & 3
            c[4 * b + 2] = (x >> 4) & 3
            c[4 * b + 3] = x >> 6
    else:
        for b in range(nbytes):
            x = p[b]
            for j in range(8):
                c[8 * b + j] = (x >> j) & 1


cdef inline void _pack_piece(uint8_t* codes, Py_ssize_t m, int bits, uint8_t* out) noexcept nogil:
    """Pack m codes from the piece buffer (zero-padding it to whole bytes) to out."""
    cdef Py_ssize_t v = 8 // bits
    cdef Py_ssize_t nbytes = (m + v - 1) // v
    if nbytes * v > m:
        memset(codes + m, 0, nbytes * v - m)
    _pack(codes, nbytes, bits, out)


# --------------------------------------------------------------------------- #
# Counter-based noise (lowbias32)
# --------------------------------------------------------------------------- #
cdef inline float _uniform(uint32_t i, uint32_t seed) noexcept nogil:
    """r in [0, 1): lowbias32(i * 0x9E3779B9 + seed) >> 8, times 2**-24 (uint32 wraps)."""
    cdef uint32_t golden = 0x9E3779B9u, m1 = 0x7FEB352Du, m2 = 0x846CA68Bu
    cdef float two_m24 = 1.0 / 16777216.0
    cdef uint32_t h = i * golden + seed
    h = h ^ (h >> 16)
    h = h * m1
    h = h ^ (h >> 15)
    h = h * m2
    h = h ^ (h >> 16)
    return <float><int32_t>(h >> 8) * two_m24      # < 2**24: the signed conversion is exact


# --------------------------------------------------------------------------- #
# Paper scheme: per-segment (one channel) loops
# --------------------------------------------------------------------------- #
cdef inline Py_ssize_t _paper_codes(const float* y, Py_ssize_t m, float k, int s, int nb,
                                    uint8_t* codes) noexcept nogil:
    """codes[j] = the paper code of y[j] (see reference.paper_pack); returns #non-finite.

    Same codes as the reference's sequence of clamps, with fewer operations:

        code = s - 1 + ceil(clamp(v * k, lower, upper))
        lower, upper = (1, NB - s) if v > 0 else (1 - s, 0)     # clamp: NaN -> lower

    Why equal: for integer bounds ``a <= b``, ``ceil(clamp(u, a, b)) ==
    clamp(ceil(u), a, b)``; the reference clamps ``ceil(u)`` to ``[-(NB+1), NB+1]``
    (through u), then to ``[1-s, NB-s]`` (code in ``[0, NB-1]``), then to
    ``[1, NB-s]`` or ``[1-s, 0]`` (the mask step); nested clamps compose to the
    innermost interval, each non-empty because ``1 <= s <= NB-1``. A NaN product
    (NaN or inf * 0) lands on ``lower`` in both (the reference: ``-(NB+1)``,
    clamped up to ``1-s`` or ``1``). The parity tests check it bit for bit.
    """
    cdef Py_ssize_t j
    cdef int nf = 0                          # m <= PIECE: an int cannot overflow
    cdef float v, u, lower, upper, zero = 0
    cdef float pos_lo = 1, pos_hi = <float>(nb - s)
    cdef float neg_lo = <float>(1 - s), neg_hi = 0
    cdef int t, sm1 = s - 1
    for j in range(m):
        v = y[j]
        nf += not (v - v == zero)            # NaN or +-inf (v - v is NaN exactly then)
        lower = pos_lo if v > zero else neg_lo   # exact mask: code >= s  <=>  v > 0
        upper = pos_hi if v > zero else neg_hi
        u = v * k
        u = u if u > lower else lower        # NaN -> lower (like fmaxf)
        u = u if u < upper else upper
        t = <int>u                           # truncation; |u| < NB so no overflow
        t = t + (<float>t < u)               # == ceil(u) (also for -0.0 and integers)
        codes[j] = <uint8_t>(sm1 + t)
    return nf


cdef Py_ssize_t _paper_pack_piece(const float* y, const float* k, const int32_t* s,
                                  Py_ssize_t C, Py_ssize_t HW, int bits, Py_ssize_t n,
                                  Py_ssize_t p, uint8_t* out) noexcept nogil:
    cdef uint8_t buf[PIECE]
    cdef Py_ssize_t a = p * PIECE
    cdef Py_ssize_t b = a + PIECE if a + PIECE < n else n
    cdef Py_ssize_t e = a, end, plane, c, nf = 0
    cdef uint8_t* codes = out + a if bits == 8 else buf   # K = 8: the codes are the bytes
    while e < b:                             # segments of one channel plane
        plane = e // HW
        c = plane % C
        end = (plane + 1) * HW
        if end > b:
            end = b
        nf += _paper_codes(y + e, end - e, k[c], s[c], 1 << bits, codes + (e - a))
        e = end
    if bits != 8:
        _pack_piece(codes, b - a, bits, out + a // (8 // bits))
    return nf


cdef void _paper_decode_piece(const uint8_t* packed, const int32_t* s, const float* step,
                              const float* off, Py_ssize_t C, Py_ssize_t HW, int bits,
                              Py_ssize_t n, Py_ssize_t p, bint relu, float* out) noexcept nogil:
    cdef uint8_t buf[PIECE]
    cdef const uint8_t* codes
    cdef Py_ssize_t v = 8 // bits
    cdef Py_ssize_t a = p * PIECE
    cdef Py_ssize_t b = a + PIECE if a + PIECE < n else n
    cdef Py_ssize_t e = a, end, plane, c, j, m
    cdef int sc
    cdef float st, of, t, r, half = 0.5, zero = 0, qnan = NAN
    cdef const uint8_t* cs
    cdef float* o
    if bits == 8:                            # K = 8: the bytes are the codes
        codes = packed + a
    else:
        _unpack(packed + a // v, (b - a + v - 1) // v, bits, buf)
        codes = buf
    while e < b:
        plane = e // HW
        c = plane % C
        end = (plane + 1) * HW
        if end > b:
            end = b
        sc = s[c]
        st = step[c]
        of = off[c]
        cs = codes + (e - a)
        o = out + e
        m = end - e
        if relu:
            # where code < s, step and off are replaced by 0: t * 0 + 0 == +0.0 exactly
            # (t is finite; -0.0 + +0.0 == +0.0), elsewhere the same two roundings. Selecting
            # the operands, not the result, keeps the loop if-convertible (GCC does not
            # if-convert a select on a value computed only for it, under -ftrapping-math).
            for j in range(m):
                t = <float>(cs[j] - sc) + half
                r = t * (st if cs[j] >= sc else zero) + (of if cs[j] >= sc else zero)
                o[j] = r if r == r else qnan     # every NaN is 0x7fc00000 (the contract)
        else:
            for j in range(m):
                t = <float>(cs[j] - sc) + half
                r = t * st + of              # two float32 roundings (-ffp-contract=off)
                o[j] = r if r == r else qnan
        e = end


cdef void _paper_mask_piece(const uint8_t* packed, const int32_t* s, Py_ssize_t C,
                            Py_ssize_t HW, int bits, Py_ssize_t n, Py_ssize_t p,
                            uint8_t* out) noexcept nogil:
    cdef uint8_t buf[PIECE]
    cdef const uint8_t* codes
    cdef Py_ssize_t v = 8 // bits
    cdef Py_ssize_t a = p * PIECE
    cdef Py_ssize_t b = a + PIECE if a + PIECE < n else n
    cdef Py_ssize_t e = a, end, plane, c, j
    cdef int sc
    if bits == 8:                            # K = 8: the bytes are the codes
        codes = packed + a
    else:
        _unpack(packed + a // v, (b - a + v - 1) // v, bits, buf)
        codes = buf
    while e < b:
        plane = e // HW
        c = plane % C
        end = (plane + 1) * HW
        if end > b:
            end = b
        sc = s[c]
        for j in range(e, end):
            out[j] = codes[j - a] >= sc
        e = end


# --------------------------------------------------------------------------- #
# Generic per-group quantizer: per-segment (one group) loops
# --------------------------------------------------------------------------- #
cdef inline float _unkey(int32_t key) noexcept nogil:
    """Float of an order key (see _minmax; the map bits <-> key is an involution)."""
    cdef float f
    key = key ^ ((key >> 31) & 0x7FFFFFFF)
    memcpy(&f, &key, 4)
    return f


cdef inline int _minmax(const float* x, Py_ssize_t m, int32_t* kmn_io, int32_t* kmx_io) noexcept nogil:
    """Update the running min / max keys with x[:m]; returns the number of non-finite x.

    Keys: the float's bits as an int32, with the magnitude bits flipped for
    negative floats, ``key = b ^ ((b >> 31) & 0x7FFFFFFF)``, ordered like the
    floats (-0.0 -> -1 < +0.0 -> 0). Integer keys make min / max a plain integer
    reduction, which the compiler vectorises (a float ``v < mn ? v : mn``
    reduction it may not reorder). Groups with a non-finite value are flagged by
    the count; their min / max are not used.
    """
    cdef Py_ssize_t j
    cdef int nf = 0                          # m <= max(FUSED_MAX, SUB): no overflow
    cdef int32_t b, key, kmn = kmn_io[0], kmx = kmx_io[0]
    for j in range(m):
        memcpy(&b, &x[j], 4)
        nf += (b & 0x7F800000) == 0x7F800000       # exponent all ones: NaN or +-inf
        key = b ^ ((b >> 31) & 0x7FFFFFFF)
        kmn = key if key < kmn else kmn
        kmx = key if key > kmx else kmx
    kmn_io[0] = kmn
    kmx_io[0] = kmx
    return nf


cdef inline void _group_params(int32_t kmn, int32_t kmx, Py_ssize_t nf, int levels,
                               float* lo, float* scale, float* inv) noexcept nogil:
    """lo, scale, inv of a group from its min / max keys and non-finite count (see the reference)."""
    cdef float zero = 0, levf = <float>levels, d
    cdef float mn = _unkey(kmn), mx = _unkey(kmx)
    if nf:                                   # untrusted group: defined anyway, codes all 0
        lo[0] = NAN
        scale[0] = NAN
        inv[0] = zero
        return
    mn = mn + zero                           # -0.0 -> +0.0: order-independent bytes
    mx = mx + zero
    d = mx - mn
    lo[0] = mn
    scale[0] = d / levf
    inv[0] = levf / d if mx != mn else zero


cdef inline void _generic_codes(const float* x, Py_ssize_t m, Py_ssize_t i0, float lo, float inv,
                                int levels, bint stochastic, uint32_t seed,
                                uint8_t* codes) noexcept nogil:
    """codes[j] = floor(clamp((x[j] - lo) * inv + r, 0, L)); r = 0.5 or noise(i0 + j).

    Clamping w to [0, L] before the floor gives the reference's
    ``min(floor(clamp(w, 0, L + 1)), L)`` (L is an integer; NaN -> 0 in both), and
    for w >= 0 the truncation is the floor.
    """
    cdef Py_ssize_t j
    cdef float v, w, zero = 0, half = 0.5
    cdef float top = <float>levels
    if stochastic:
        for j in range(m):
            v = (x[j] - lo) * inv
            w = v + _uniform(<uint32_t>(i0 + j), seed)
            w = w if w > zero else zero      # NaN -> 0 (like fmaxf)
            w = w if w < top else top
            codes[j] = <uint8_t><int>w
    else:
        for j in range(m):
            v = (x[j] - lo) * inv
            w = v + half
            w = w if w > zero else zero
            w = w if w < top else top
            codes[j] = <uint8_t><int>w


cdef Py_ssize_t _generic_fused_chunk(const float* x, Py_ssize_t n, Py_ssize_t G, int bits,
                                     bint stochastic, uint32_t seed, Py_ssize_t a, Py_ssize_t b,
                                     uint8_t* out, float* lo, float* scale) noexcept nogil:
    """Elements [a, b): whole groups, a a multiple of 8. Min/max of each group right
    before its encoding (cache-hot), pieces of PIECE codes packed as they fill."""
    cdef uint8_t buf[PIECE]
    cdef uint8_t* codes
    cdef int levels = (1 << bits) - 1
    cdef Py_ssize_t v = 8 // bits
    cdef Py_ssize_t pa = a, pb, e, end, g, gs, ge, cur = -1, gnf, nf = 0
    cdef int32_t kmn, kmx
    cdef float cur_lo = 0, cur_inv = 0
    while pa < b:
        pb = pa + PIECE if pa + PIECE < b else b
        codes = out + pa if bits == 8 else buf   # K = 8: the codes are the bytes
        e = pa
        while e < pb:
            g = e // G
            if g != cur:                      # first time we meet group g: its range
                gs = g * G
                ge = gs + G if gs + G < n else n
                kmn = KEY_MAX
                kmx = KEY_MIN
                gnf = _minmax(x + gs, ge - gs, &kmn, &kmx)
                nf += gnf
                _group_params(kmn, kmx, gnf, levels, &lo[g], &scale[g], &cur_inv)
                cur_lo = lo[g]
                cur = g
            end = (g + 1) * G
            if end > pb:
                end = pb
            _generic_codes(x + e, end - e, e, cur_lo, cur_inv, levels, stochastic, seed,
                           codes + (e - pa))
            e = end
        if bits != 8:
            _pack_piece(codes, pb - pa, bits, out + pa // v)
        pa = pb
    return nf


cdef void _generic_encode_piece(const float* x, Py_ssize_t n, Py_ssize_t G, int bits,
                                bint stochastic, uint32_t seed, Py_ssize_t p,
                                const float* lo, const float* inv, uint8_t* out) noexcept nogil:
    """Two-pass path, second pass: encode piece p with the groups' lo and inv known."""
    cdef uint8_t buf[PIECE]
    cdef int levels = (1 << bits) - 1
    cdef Py_ssize_t a = p * PIECE
    cdef Py_ssize_t b = a + PIECE if a + PIECE < n else n
    cdef Py_ssize_t e = a, end, g
    cdef uint8_t* codes = out + a if bits == 8 else buf   # K = 8: the codes are the bytes
    while e < b:
        g = e // G
        end = (g + 1) * G
        if end > b:
            end = b
        _generic_codes(x + e, end - e, e, lo[g], inv[g], levels, stochastic, seed, codes + (e - a))
        e = end
    if bits != 8:
        _pack_piece(codes, b - a, bits, out + a // (8 // bits))


cdef void _generic_decode_piece(const uint8_t* packed, const float* lo, const float* scale,
                                Py_ssize_t G, int bits, Py_ssize_t n, Py_ssize_t p,
                                float* out) noexcept nogil:
    cdef uint8_t buf[PIECE]
    cdef const uint8_t* codes
    cdef Py_ssize_t v = 8 // bits
    cdef Py_ssize_t a = p * PIECE
    cdef Py_ssize_t b = a + PIECE if a + PIECE < n else n
    cdef Py_ssize_t e = a, end, g, j, m
    cdef float gl, gs, r, qnan = NAN
    cdef const uint8_t* cs
    cdef float* o
    if bits == 8:                            # K = 8: the bytes are the codes
        codes = packed + a
    else:
        _unpack(packed + a // v, (b - a + v - 1) // v, bits, buf)
        codes = buf
    while e < b:
        g = e // G
        end = (g + 1) * G
        if end > b:
            end = b
        gl = lo[g]
        gs = scale[g]
        cs = codes + (e - a)
        o = out + e
        m = end - e
        for j in range(m):
            r = gl + <float>cs[j] * gs       # two float32 roundings (-ffp-contract=off)
            o[j] = r if r == r else qnan     # every NaN is 0x7fc00000 (the contract)
        e = end


# --------------------------------------------------------------------------- #
# Python-visible kernels (arguments already validated by npapprox.kernels.cpu;
# the checks here only guard memory safety)
# --------------------------------------------------------------------------- #
cdef int _check_bits(int bits) except -1:
    if bits != 1 and bits != 2 and bits != 4 and bits != 8:
        raise ValueError(f"bits must be 1, 2, 4 or 8, got {bits}")
    return 8 // bits


cdef _check_len(Py_ssize_t got, Py_ssize_t want, str name):
    if got != want:
        raise ValueError(f"{name} has {got} entries, expected {want}")


cdef _check_paper(Py_ssize_t n, Py_ssize_t C, Py_ssize_t HW, const int32_t[::1] s, int bits):
    cdef Py_ssize_t c
    if C < 0 or HW < 0 or (n and (C == 0 or HW == 0 or n % (C * HW))):
        raise ValueError(f"{n} elements do not form (N, {C}, {HW}) planes")
    _check_len(s.shape[0], C, "s")
    for c in range(C):
        if s[c] < 1 or s[c] > (1 << bits) - 1:
            raise ValueError(f"s[{c}] = {s[c]} outside [1, {(1 << bits) - 1}]")


def paper_pack(const float[::1] y,          # IN:  (n,) BN outputs, flat (N, C, HW) order
               const float[::1] k,          # IN:  (C,) 1 / (D |gamma|), 0 where gamma == 0
               const int32_t[::1] s,        # IN:  (C,) code of the first positive bin, in [1, 2**bits-1]
               int bits, Py_ssize_t C, Py_ssize_t HW,
               uint8_t[::1] out):           # OUT: (ceil(n / V),) packed codes, fully overwritten
    """Paper scheme encode; returns the number of non-finite y."""
    cdef Py_ssize_t v = _check_bits(bits)
    cdef Py_ssize_t n = y.shape[0], npieces = (n + PIECE - 1) // PIECE, p, nf = 0
    _check_paper(n, C, HW, s, bits)
    _check_len(k.shape[0], C, "k")
    _check_len(out.shape[0], (n + v - 1) // v, "out")
    if n == 0:
        return 0
    cdef const float* yp = &y[0]
    cdef const float* kp = &k[0]
    cdef const int32_t* sp = &s[0]
    cdef uint8_t* op = &out[0]
    with nogil:
        if npieces == 1:                     # small tensors: no parallel region
            nf = _paper_pack_piece(yp, kp, sp, C, HW, bits, n, 0, op)
        else:
            for p in prange(npieces, schedule="guided"):
                nf += _paper_pack_piece(yp, kp, sp, C, HW, bits, n, p, op)
    return nf


def paper_decode(const uint8_t[::1] packed,  # IN:  (ceil(n / V),) codes from paper_pack
                 const int32_t[::1] s,       # IN:  (C,)
                 const float[::1] step,      # IN:  (C,)
                 const float[::1] off,       # IN:  (C,)
                 int bits, Py_ssize_t C, Py_ssize_t HW, bint relu,
                 float[::1] out):            # OUT: (n,) decoded values, fully overwritten
    """out[i] = ((code - s) + 0.5) * step + off; 0 where relu and code < s."""
    cdef Py_ssize_t v = _check_bits(bits)
    cdef Py_ssize_t n = out.shape[0], npieces = (n + PIECE - 1) // PIECE, p
    _check_paper(n, C, HW, s, bits)
    _check_len(step.shape[0], C, "step")
    _check_len(off.shape[0], C, "off")
    _check_len(packed.shape[0], (n + v - 1) // v, "packed")
    if n == 0:
        return
    cdef const uint8_t* pp = &packed[0]
    cdef const int32_t* sp = &s[0]
    cdef const float* stp = &step[0]
    cdef const float* ofp = &off[0]
    cdef float* op = &out[0]
    with nogil:
        if n <= SERIAL_MAX:      # a conv chunk's few samples: a parallel region costs more than it saves
            for p in range(npieces):
                _paper_decode_piece(pp, sp, stp, ofp, C, HW, bits, n, p, relu, op)
        else:
            for p in prange(npieces, schedule="guided"):
                _paper_decode_piece(pp, sp, stp, ofp, C, HW, bits, n, p, relu, op)


def paper_mask(const uint8_t[::1] packed,    # IN:  (ceil(n / V),) codes from paper_pack
               const int32_t[::1] s,         # IN:  (C,)
               int bits, Py_ssize_t C, Py_ssize_t HW,
               uint8_t[::1] out):            # OUT: (n,) 1 where code >= s (bool storage)
    """out[i] = code[i] >= s[c]: the exact ReLU mask y > 0."""
    cdef Py_ssize_t v = _check_bits(bits)
    cdef Py_ssize_t n = out.shape[0], npieces = (n + PIECE - 1) // PIECE, p
    _check_paper(n, C, HW, s, bits)
    _check_len(packed.shape[0], (n + v - 1) // v, "packed")
    if n == 0:
        return
    cdef const uint8_t* pp = &packed[0]
    cdef const int32_t* sp = &s[0]
    cdef uint8_t* op = &out[0]
    with nogil:
        if npieces == 1:
            _paper_mask_piece(pp, sp, C, HW, bits, n, 0, op)
        else:
            for p in prange(npieces, schedule="guided"):
                _paper_mask_piece(pp, sp, C, HW, bits, n, p, op)


def generic_pack(const float[::1] x,         # IN:  (n,) values, flat
                 int bits, Py_ssize_t G, bint stochastic, uint32_t seed,
                 uint8_t[::1] out,           # OUT: (ceil(n / V),) packed codes, fully overwritten
                 float[::1] lo,              # OUT: (ceil(n / G),) group minimum (+0.0 for zero)
                 float[::1] scale):          # OUT: (ceil(n / G),) (max - min) / (2**bits - 1)
    """Per-group min/max K-bit encode; returns the number of non-finite x."""
    cdef Py_ssize_t v = _check_bits(bits)
    if G < 1:
        raise ValueError(f"group must be >= 1, got {G}")
    cdef Py_ssize_t n = x.shape[0], ng = (n + G - 1) // G
    _check_len(out.shape[0], (n + v - 1) // v, "out")
    _check_len(lo.shape[0], ng, "lo")
    _check_len(scale.shape[0], ng, "scale")
    if n == 0:
        return 0
    cdef const float* xp = &x[0]
    cdef uint8_t* op = &out[0]
    cdef float* lop = &lo[0]
    cdef float* scp = &scale[0]
    cdef Py_ssize_t a8 = G, r = 8, t, unit, chunk, nchunks, ch, a, b, nf = 0
    while r:                                 # unit = lcm(G, 8): whole groups, whole bytes
        t = a8 % r
        a8 = r
        r = t
    unit = G // a8 * 8
    if unit <= FUSED_MAX:
        chunk = (CHUNK // unit if CHUNK >= unit else 1) * unit
        nchunks = (n + chunk - 1) // chunk
        with nogil:
            if nchunks == 1:
                nf = _generic_fused_chunk(xp, n, G, bits, stochastic, seed, 0, n, op, lop, scp)
            else:
                for ch in prange(nchunks, schedule="guided"):
                    a = ch * chunk
                    b = a + chunk if a + chunk < n else n
                    nf += _generic_fused_chunk(xp, n, G, bits, stochastic, seed, a, b, op, lop, scp)
        return nf
    return _generic_pack_two_pass(xp, n, G, bits, stochastic, seed, op, lop, scp)


cdef Py_ssize_t _generic_pack_two_pass(const float* x, Py_ssize_t n, Py_ssize_t G, int bits,
                                       bint stochastic, uint32_t seed, uint8_t* out,
                                       float* lo, float* scale) except -1:
    cdef Py_ssize_t glen = G if G < n else n  # a group holds at most n values
    cdef Py_ssize_t ng = (n + G - 1) // G, nsub = (glen + SUB - 1) // SUB
    cdef Py_ssize_t ntasks = ng * nsub, npieces = (n + PIECE - 1) // PIECE
    cdef Py_ssize_t task, g, j, a, b, p, nf = 0, gnf
    cdef int levels = (1 << bits) - 1
    cdef int32_t kmn, kmx
    cdef int32_t* pmn = <int32_t*>malloc(ntasks * sizeof(int32_t))
    cdef int32_t* pmx = <int32_t*>malloc(ntasks * sizeof(int32_t))
    cdef Py_ssize_t* pnf = <Py_ssize_t*>malloc(ntasks * sizeof(Py_ssize_t))
    cdef float* inv = <float*>malloc(ng * sizeof(float))
    try:
        if not (pmn and pmx and pnf and inv):
            raise MemoryError()
        with nogil:
            for task in prange(ntasks, schedule="guided"):   # partial min/max
                g = task // nsub
                j = task - g * nsub
                a = g * G + j * SUB
                b = a + SUB
                if b > g * G + G:
                    b = g * G + G
                if b > n:
                    b = n
                pmn[task] = KEY_MAX
                pmx[task] = KEY_MIN
                pnf[task] = _minmax(x + a, b - a, &pmn[task], &pmx[task]) if b > a else 0
            for g in prange(ng, schedule="static"):          # combine per group
                kmn = KEY_MAX
                kmx = KEY_MIN
                gnf = 0
                for j in range(nsub):
                    kmn = pmn[g * nsub + j] if pmn[g * nsub + j] < kmn else kmn
                    kmx = pmx[g * nsub + j] if pmx[g * nsub + j] > kmx else kmx
                    gnf = gnf + pnf[g * nsub + j]
                nf += gnf
                _group_params(kmn, kmx, gnf, levels, &lo[g], &scale[g], &inv[g])
            for p in prange(npieces, schedule="guided"):     # encode
                _generic_encode_piece(x, n, G, bits, stochastic, seed, p, lo, inv, out)
    finally:
        free(pmn)
        free(pmx)
        free(pnf)
        free(inv)
    return nf


def generic_decode(const uint8_t[::1] packed,  # IN:  (ceil(n / V),) codes from generic_pack
                   const float[::1] lo,        # IN:  (ceil(n / G),)
                   const float[::1] scale,     # IN:  (ceil(n / G),)
                   int bits, Py_ssize_t G,
                   float[::1] out):            # OUT: (n,) lo + code * scale, fully overwritten
    """out[i] = lo[g] + float(code[i]) * scale[g], g = i // G."""
    cdef Py_ssize_t v = _check_bits(bits)
    if G < 1:
        raise ValueError(f"group must be >= 1, got {G}")
    cdef Py_ssize_t n = out.shape[0], npieces = (n + PIECE - 1) // PIECE, p
    _check_len(packed.shape[0], (n + v - 1) // v, "packed")
    _check_len(lo.shape[0], (n + G - 1) // G, "lo")
    _check_len(scale.shape[0], (n + G - 1) // G, "scale")
    if n == 0:
        return
    cdef const uint8_t* pp = &packed[0]
    cdef const float* lop = &lo[0]
    cdef const float* scp = &scale[0]
    cdef float* op = &out[0]
    with nogil:
        if npieces == 1:
            _generic_decode_piece(pp, lop, scp, G, bits, n, 0, op)
        else:
            for p in prange(npieces, schedule="guided"):
                _generic_decode_piece(pp, lop, scp, G, bits, n, p, op)


def pack_bits(const uint8_t[::1] codes,      # IN:  (n,) codes < 2**bits
              int bits,
              uint8_t[::1] out):             # OUT: (ceil(n / V),), fully overwritten
    """out[i // V] |= codes[i] << ((i % V) * bits)."""
    cdef Py_ssize_t v = _check_bits(bits)
    cdef Py_ssize_t n = codes.shape[0], npieces = (n + PIECE - 1) // PIECE, p, a, b
    _check_len(out.shape[0], (n + v - 1) // v, "out")
    if n == 0:
        return
    cdef const uint8_t* cp = &codes[0]
    cdef uint8_t* op = &out[0]
    with nogil:
        for p in prange(npieces, schedule="static"):
            a = p * PIECE
            b = a + PIECE if a + PIECE < n else n
            if b - a == PIECE:
                _pack(cp + a, PIECE // v, bits, op + a // v)
            else:
                _pack_tail(cp + a, b - a, bits, op + a // v)


cdef void _pack_tail(const uint8_t* c, Py_ssize_t m, int bits, uint8_t* out) noexcept nogil:
    cdef uint8_t codes[PIECE]
    memcpy(codes, c, m)
    _pack_piece(codes, m, bits, out)


def unpack_bits(const uint8_t[::1] packed,   # IN:  (ceil(n / V),)
                int bits,
                uint8_t[::1] out):           # OUT: (n,) codes, fully overwritten
    """out[i] = (packed[i // V] >> ((i % V) * bits)) & (2**bits - 1)."""
    cdef Py_ssize_t v = _check_bits(bits)
    cdef Py_ssize_t n = out.shape[0], npieces = (n + PIECE - 1) // PIECE, p, a, b
    _check_len(packed.shape[0], (n + v - 1) // v, "packed")
    if n == 0:
        return
    cdef const uint8_t* pp = &packed[0]
    cdef uint8_t* op = &out[0]
    with nogil:
        for p in prange(npieces, schedule="static"):
            a = p * PIECE
            b = a + PIECE if a + PIECE < n else n
            _unpack_tail(pp + a // v, b - a, bits, op + a)


cdef void _unpack_tail(const uint8_t* p, Py_ssize_t m, int bits, uint8_t* out) noexcept nogil:
    cdef uint8_t codes[PIECE]
    cdef Py_ssize_t v = 8 // bits
    _unpack(p, (m + v - 1) // v, bits, codes)
    memcpy(out, codes, m)


def counter_uniform(uint32_t seed,
                    float[::1] out):         # OUT: (n,) r[i] = noise(i, seed), fully overwritten
    """The counter-based noise of stochastic rounding (see reference.counter_uniform)."""
    cdef Py_ssize_t n = out.shape[0], i
    if n == 0:
        return
    cdef float* op = &out[0]
    with nogil:
        if n <= PIECE:
            for i in range(n):
                op[i] = _uniform(<uint32_t>i, seed)
        else:
            for i in prange(n, schedule="static"):
                op[i] = _uniform(<uint32_t>i, seed)
