"""Compiled storage kernels (module ``npapprox._quant``).

The byte contract, the naive loops and the argument checks live in
``npapprox/kernels/reference.py`` (and docs/kernels.md); these kernels must give
**identical bytes** to it for every input, including NaN, +-inf, -0.0, empty
and odd-sized arrays. ``npapprox/kernels/cpu.py`` validates, allocates the
outputs and calls the functions at the bottom of this file on flat (1-D,
C-contiguous) views.

Organisation

* Sections, in the order (and with the helper names) of
  ``npapprox/kernels/reference.py`` and ``kernels/quant.cu``: bit packing, the
  counter-based noise (``_uniform``), the paper scheme (``_paper_codes``), the
  generic quantizer (``_group_params``, ``_generic_codes``); before them the
  parallel runner, after them the Python-visible entry points.
* The flat index range is cut into *pieces* of ``PIECE`` elements (a multiple
  of 8, so every piece starts on a byte boundary for every K). One runner,
  :func:`_run`, is the only parallel loop of the file: it calls a *task*
  function (a piece, a chunk of whole groups, a partial min / max) for every
  task index under ``prange`` (``schedule="guided"``: a core busy with another
  process does not hold the others back), or directly when there is one task.
  Each task writes whole output bytes (packing) or whole output ranges
  (decoding): no races, no atomics, and the bytes do not depend on the thread
  count or the schedule. A task reads its arguments from a :class:`Job`.
* Inside a piece, the elements are cut again into *segments* of constant
  parameters (one channel plane of the paper scheme, one group of the generic
  one). A tight loop encodes a segment into a per-thread buffer of codes (a stack
  array), which is then packed into bytes; decoding unpacks the piece into the
  buffer first. At K = 8 the codes are the bytes, so the buffer is skipped.
* The tight loops are written to be vectorised by the C compiler at any ISA
  (setup.py adds -march=native unless NPAPPROX_PORTABLE=1; SSE2 suffices): no libm call, ceil /
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
# Pieces and the parallel runner
# --------------------------------------------------------------------------- #
cdef struct Job:
    # the arguments of one kernel call (each kernel reads the fields it needs)
    const float* x            # float input: y (paper) or x (generic), (n,)
    const uint8_t* packed     # packed codes (decode, mask, unpack) or codes (pack_bits)
    const float* k            # paper: (C,)
    const int32_t* s          # paper: (C,)
    const float* step         # paper decode: (C,)
    const float* off          # paper decode: (C,)
    float* lo                 # generic: (ngroups,), written by the encoder, read by the decoder
    float* scale              # generic: (ngroups,)
    float* inv                # generic, two-pass: (ngroups,)
    int32_t* kmin             # generic, two-pass: partial min / max keys and non-finite counts
    int32_t* kmax
    Py_ssize_t* nonfinite
    uint8_t* out8             # uint8 output (packed codes, codes, mask)
    float* outf               # float32 output (decoded values, noise)
    Py_ssize_t n, C, HW, G, chunk, nsub
    int bits
    bint relu, stochastic
    uint32_t seed


ctypedef Py_ssize_t (*Task)(const Job* job, Py_ssize_t t) noexcept nogil


cdef Py_ssize_t _run(Task task, const Job* job, Py_ssize_t ntasks, bint parallel=True) noexcept nogil:
    """Sum of ``task(job, t)`` over ``t < ntasks``: in parallel, or inline for one
    task or when not ``parallel``."""
    cdef Py_ssize_t t, total = 0
    if ntasks == 1 or not parallel:          # small tensors: no parallel region
        for t in range(ntasks):
            total += task(job, t)
        return total
    for t in prange(ntasks, schedule="guided"):
        total += task(job, t)
    return total


cdef inline Py_ssize_t _piece_end(Py_ssize_t a, Py_ssize_t n) noexcept nogil:
    """End of the piece that starts at a: min(a + PIECE, n)."""
    return a + PIECE if a + PIECE < n else n


cdef inline Py_ssize_t _plane_end(Py_ssize_t e, Py_ssize_t b, Py_ssize_t C, Py_ssize_t HW,
                                  Py_ssize_t* c) noexcept nogil:
    """Paper scheme: the segment [e, end) of one channel plane, end <= b; c = its channel."""
    cdef Py_ssize_t plane = e // HW
    c[0] = plane % C
    return (plane + 1) * HW if (plane + 1) * HW < b else b


cdef inline Py_ssize_t _group_end(Py_ssize_t e, Py_ssize_t b, Py_ssize_t G, Py_ssize_t* g) noexcept nogil:
    """Generic quantizer: the segment [e, end) of one group, end <= b; g = its group."""
    g[0] = e // G
    return (g[0] + 1) * G if (g[0] + 1) * G < b else b


# --------------------------------------------------------------------------- #
# Bit packing
# --------------------------------------------------------------------------- #
include "_codes.pxi"   # _pack, _unpack, _paper_code(s), _nonfinite (shared with src/_bn.pyx)


cdef inline void _pack_piece(uint8_t* codes, Py_ssize_t m, int bits, uint8_t* out) noexcept nogil:
    """Pack m codes from the piece buffer (zero-padding it to whole bytes) to out."""
    cdef Py_ssize_t v = 8 // bits
    cdef Py_ssize_t nbytes = (m + v - 1) // v
    if nbytes * v > m:
        memset(codes + m, 0, nbytes * v - m)
    _pack(codes, nbytes, bits, out)

cdef inline const uint8_t* _piece_codes(const uint8_t* packed, Py_ssize_t a, Py_ssize_t b, int bits,
                                        uint8_t* buf) noexcept nogil:
    """The codes of elements [a, b) (a piece): unpacked into buf, or the bytes themselves at K = 8."""
    cdef Py_ssize_t v = 8 // bits
    if bits == 8:
        return packed + a
    _unpack(packed + a // v, (b - a + v - 1) // v, bits, buf)
    return buf


cdef Py_ssize_t _pack_bits_piece(const Job* job, Py_ssize_t p) noexcept nogil:
    cdef uint8_t buf[PIECE]
    cdef Py_ssize_t v = 8 // job.bits
    cdef Py_ssize_t a = p * PIECE
    cdef Py_ssize_t b = _piece_end(a, job.n)
    if b - a == PIECE:
        _pack(job.packed + a, PIECE // v, job.bits, job.out8 + a // v)
    else:                                    # the last piece: zero-padded in buf
        memcpy(buf, job.packed + a, b - a)
        _pack_piece(buf, b - a, job.bits, job.out8 + a // v)
    return 0


cdef Py_ssize_t _unpack_bits_piece(const Job* job, Py_ssize_t p) noexcept nogil:
    cdef uint8_t buf[PIECE]
    cdef Py_ssize_t v = 8 // job.bits
    cdef Py_ssize_t a = p * PIECE
    cdef Py_ssize_t b = _piece_end(a, job.n)
    _unpack(job.packed + a // v, (b - a + v - 1) // v, job.bits, buf)
    memcpy(job.out8 + a, buf, b - a)
    return 0


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

cdef Py_ssize_t _counter_uniform_piece(const Job* job, Py_ssize_t p) noexcept nogil:
    cdef Py_ssize_t i, a = p * PIECE
    cdef Py_ssize_t b = _piece_end(a, job.n)
    for i in range(a, b):
        job.outf[i] = _uniform(<uint32_t>i, job.seed)
    return 0


# --------------------------------------------------------------------------- #
# The paper's scheme ("BN window"), per channel
# --------------------------------------------------------------------------- #
cdef Py_ssize_t _paper_pack_piece(const Job* job, Py_ssize_t p) noexcept nogil:
    cdef uint8_t buf[PIECE]
    cdef int bits = job.bits
    cdef Py_ssize_t a = p * PIECE
    cdef Py_ssize_t b = _piece_end(a, job.n)
    cdef Py_ssize_t e = a, end, c, nf = 0
    cdef uint8_t* codes = job.out8 + a if bits == 8 else buf   # K = 8: the codes are the bytes
    while e < b:                             # segments of one channel plane
        end = _plane_end(e, b, job.C, job.HW, &c)
        nf += _paper_codes(job.x + e, end - e, job.k[c], job.s[c], 1 << bits, codes + (e - a))
        e = end
    if bits != 8:
        _pack_piece(codes, b - a, bits, job.out8 + a // (8 // bits))
    return nf


cdef inline void _paper_values(const uint8_t* cs, Py_ssize_t m, int sc, float st, float of, bint relu,
                               float* o) noexcept nogil:
    """o[j] = (cs[j] - s + 0.5) * step + off for one channel's segment; under ``relu``
    +0.0 where cs[j] < s. Every NaN is 0x7fc00000 (the contract)."""
    cdef Py_ssize_t j
    cdef float t, r, half = 0.5, zero = 0, qnan = NAN
    if relu:
        # where code < s, step and off are replaced by 0: t * 0 + 0 == +0.0 exactly
        # (t is finite; -0.0 + +0.0 == +0.0), elsewhere the same two roundings. Selecting
        # the operands, not the result, keeps the loop if-convertible (GCC does not
        # if-convert a select on a value computed only for it, under -ftrapping-math).
        for j in range(m):
            t = <float>(cs[j] - sc) + half
            r = t * (st if cs[j] >= sc else zero) + (of if cs[j] >= sc else zero)
            o[j] = r if r == r else qnan
    else:
        for j in range(m):
            t = <float>(cs[j] - sc) + half
            r = t * st + of                  # two float32 roundings (-ffp-contract=off)
            o[j] = r if r == r else qnan


cdef Py_ssize_t _paper_decode_piece(const Job* job, Py_ssize_t p) noexcept nogil:
    """paper_decode (values into ``job.outf``) or, with ``job.outf`` NULL, paper_mask
    (``job.out8[i] = code >= s``, the exact ReLU mask y > 0) of piece p."""
    cdef uint8_t buf[PIECE]
    cdef Py_ssize_t a = p * PIECE
    cdef Py_ssize_t b = _piece_end(a, job.n)
    cdef const uint8_t* codes = _piece_codes(job.packed, a, b, job.bits, buf)
    cdef Py_ssize_t e = a, end, c, j
    while e < b:                             # segments of one channel plane
        end = _plane_end(e, b, job.C, job.HW, &c)
        if job.outf == NULL:
            for j in range(e, end):
                job.out8[j] = codes[j - a] >= job.s[c]
        else:
            _paper_values(codes + (e - a), end - e, job.s[c], job.step[c], job.off[c], job.relu, job.outf + e)
        e = end
    return 0


# --------------------------------------------------------------------------- #
# Generic per-group quantizer
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


cdef Py_ssize_t _generic_fused_chunk(const Job* job, Py_ssize_t ch) noexcept nogil:
    """Fused path: chunk ch, elements [a, b) of whole groups, a a multiple of 8. Min/max of
    each group right before its encoding (cache-hot), pieces of PIECE codes packed as they fill."""
    cdef uint8_t buf[PIECE]
    cdef uint8_t* codes
    cdef int bits = job.bits, levels = (1 << bits) - 1
    cdef Py_ssize_t v = 8 // bits, n = job.n, G = job.G
    cdef Py_ssize_t a = ch * job.chunk
    cdef Py_ssize_t b = a + job.chunk if a + job.chunk < n else n
    cdef Py_ssize_t pa = a, pb, e, end, g, gs, ge, cur = -1, gnf, nf = 0
    cdef int32_t kmn, kmx
    cdef float cur_lo = 0, cur_inv = 0
    while pa < b:
        pb = pa + PIECE if pa + PIECE < b else b
        codes = job.out8 + pa if bits == 8 else buf   # K = 8: the codes are the bytes
        e = pa
        while e < pb:
            end = _group_end(e, pb, G, &g)
            if g != cur:                      # first time we meet group g: its range
                gs = g * G
                ge = gs + G if gs + G < n else n
                kmn = KEY_MAX
                kmx = KEY_MIN
                gnf = _minmax(job.x + gs, ge - gs, &kmn, &kmx)
                nf += gnf
                _group_params(kmn, kmx, gnf, levels, &job.lo[g], &job.scale[g], &cur_inv)
                cur_lo = job.lo[g]
                cur = g
            _generic_codes(job.x + e, end - e, e, cur_lo, cur_inv, levels, job.stochastic, job.seed,
                           codes + (e - pa))
            e = end
        if bits != 8:
            _pack_piece(codes, pb - pa, bits, job.out8 + pa // v)
        pa = pb
    return nf


cdef Py_ssize_t _generic_minmax_task(const Job* job, Py_ssize_t task) noexcept nogil:
    """Two-pass path, pass 1: partial min / max keys of sub-range j of group g."""
    cdef Py_ssize_t g = task // job.nsub
    cdef Py_ssize_t j = task - g * job.nsub
    cdef Py_ssize_t a = g * job.G + j * SUB
    cdef Py_ssize_t b = a + SUB
    if b > g * job.G + job.G:
        b = g * job.G + job.G
    if b > job.n:
        b = job.n
    job.kmin[task] = KEY_MAX
    job.kmax[task] = KEY_MIN
    job.nonfinite[task] = _minmax(job.x + a, b - a, &job.kmin[task], &job.kmax[task]) if b > a else 0
    return 0


cdef Py_ssize_t _generic_params_task(const Job* job, Py_ssize_t g) noexcept nogil:
    """Two-pass path, pass 2: combine group g's partials into lo, scale, inv; returns its #non-finite."""
    cdef Py_ssize_t j, gnf = 0
    cdef int32_t kmn = KEY_MAX, kmx = KEY_MIN
    for j in range(g * job.nsub, (g + 1) * job.nsub):
        kmn = job.kmin[j] if job.kmin[j] < kmn else kmn
        kmx = job.kmax[j] if job.kmax[j] > kmx else kmx
        gnf = gnf + job.nonfinite[j]
    _group_params(kmn, kmx, gnf, (1 << job.bits) - 1, &job.lo[g], &job.scale[g], &job.inv[g])
    return gnf


cdef Py_ssize_t _generic_encode_piece(const Job* job, Py_ssize_t p) noexcept nogil:
    """Two-pass path, pass 3: encode piece p with the groups' lo and inv known."""
    cdef uint8_t buf[PIECE]
    cdef int bits = job.bits, levels = (1 << bits) - 1
    cdef Py_ssize_t a = p * PIECE
    cdef Py_ssize_t b = _piece_end(a, job.n)
    cdef Py_ssize_t e = a, end, g
    cdef uint8_t* codes = job.out8 + a if bits == 8 else buf   # K = 8: the codes are the bytes
    while e < b:
        end = _group_end(e, b, job.G, &g)
        _generic_codes(job.x + e, end - e, e, job.lo[g], job.inv[g], levels, job.stochastic, job.seed,
                       codes + (e - a))
        e = end
    if bits != 8:
        _pack_piece(codes, b - a, bits, job.out8 + a // (8 // bits))
    return 0


cdef Py_ssize_t _generic_decode_piece(const Job* job, Py_ssize_t p) noexcept nogil:
    cdef uint8_t buf[PIECE]
    cdef Py_ssize_t a = p * PIECE
    cdef Py_ssize_t b = _piece_end(a, job.n)
    cdef const uint8_t* codes = _piece_codes(job.packed, a, b, job.bits, buf)
    cdef Py_ssize_t e = a, end, g, j, m
    cdef float gl, gs, r, qnan = NAN
    cdef const uint8_t* cs
    cdef float* o
    while e < b:
        end = _group_end(e, b, job.G, &g)
        gl = job.lo[g]
        gs = job.scale[g]
        cs = codes + (e - a)
        o = job.outf + e
        m = end - e
        for j in range(m):
            r = gl + <float>cs[j] * gs       # two float32 roundings (-ffp-contract=off)
            o[j] = r if r == r else qnan     # every NaN is 0x7fc00000 (the contract)
        e = end
    return 0


# --------------------------------------------------------------------------- #
# Python-visible entry points (arguments already validated by npapprox.kernels.cpu;
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

cdef inline Py_ssize_t _npieces(Py_ssize_t n) noexcept nogil:
    return (n + PIECE - 1) // PIECE


cdef _bits_kernel(Task task, const uint8_t[::1] src, int bits, uint8_t[::1] dst, Py_ssize_t n,
                  Py_ssize_t nbytes, str name):
    """pack_bits / unpack_bits: n codes, nbytes packed bytes (checked), src -> dst."""
    cdef Py_ssize_t v = _check_bits(bits)
    cdef Job job
    _check_len(nbytes, (n + v - 1) // v, name)
    if n == 0:
        return
    job.n = n
    job.packed = &src[0]
    job.bits = bits
    job.out8 = &dst[0]
    with nogil:
        _run(task, &job, _npieces(n))


def pack_bits(const uint8_t[::1] codes,      # IN:  (n,) codes < 2**bits
              int bits,
              uint8_t[::1] out):             # OUT: (ceil(n / V),), fully overwritten
    """out[i // V] |= codes[i] << ((i % V) * bits)."""
    _bits_kernel(_pack_bits_piece, codes, bits, out, codes.shape[0], out.shape[0], "out")


def unpack_bits(const uint8_t[::1] packed,   # IN:  (ceil(n / V),)
                int bits,
                uint8_t[::1] out):           # OUT: (n,) codes, fully overwritten
    """out[i] = (packed[i // V] >> ((i % V) * bits)) & (2**bits - 1)."""
    _bits_kernel(_unpack_bits_piece, packed, bits, out, out.shape[0], packed.shape[0], "packed")


def counter_uniform(uint32_t seed,
                    float[::1] out):         # OUT: (n,) r[i] = noise(i, seed), fully overwritten
    """The counter-based noise of stochastic rounding (see reference.counter_uniform)."""
    cdef Job job
    job.n = out.shape[0]
    if job.n == 0:
        return
    job.seed = seed
    job.outf = &out[0]
    with nogil:
        _run(_counter_uniform_piece, &job, _npieces(job.n))


cdef bint _paper_job(Job* job, Py_ssize_t n, Py_ssize_t C, Py_ssize_t HW, const int32_t[::1] s, int bits,
                     Py_ssize_t nbytes, str name) except -1:
    """The checks and the common Job fields of the paper kernels; False when n == 0 (nothing to do)."""
    cdef Py_ssize_t v = _check_bits(bits)
    _check_paper(n, C, HW, s, bits)
    _check_len(nbytes, (n + v - 1) // v, name)
    job.n = n
    job.C = C
    job.HW = HW
    job.bits = bits
    if n == 0:
        return False
    job.s = &s[0]
    return True


def paper_pack(const float[::1] y,          # IN:  (n,) BN outputs, flat (N, C, HW) order
               const float[::1] k,          # IN:  (C,) 1 / (D |gamma|), 0 where gamma == 0
               const int32_t[::1] s,        # IN:  (C,) code of the first positive bin, in [1, 2**bits-1]
               int bits, Py_ssize_t C, Py_ssize_t HW,
               uint8_t[::1] out):           # OUT: (ceil(n / V),) packed codes, fully overwritten
    """Paper scheme encode; returns the number of non-finite y."""
    cdef Job job
    cdef Py_ssize_t nf
    _check_len(k.shape[0], C, "k")
    if not _paper_job(&job, y.shape[0], C, HW, s, bits, out.shape[0], "out"):
        return 0
    job.x = &y[0]
    job.k = &k[0]
    job.out8 = &out[0]
    with nogil:
        nf = _run(_paper_pack_piece, &job, _npieces(job.n))
    return nf


def paper_decode(const uint8_t[::1] packed,  # IN:  (ceil(n / V),) codes from paper_pack
                 const int32_t[::1] s,       # IN:  (C,)
                 const float[::1] step,      # IN:  (C,)
                 const float[::1] off,       # IN:  (C,)
                 int bits, Py_ssize_t C, Py_ssize_t HW, bint relu,
                 float[::1] out):            # OUT: (n,) decoded values, fully overwritten
    """out[i] = ((code - s) + 0.5) * step + off; 0 where relu and code < s."""
    cdef Job job
    _check_len(step.shape[0], C, "step")
    _check_len(off.shape[0], C, "off")
    if not _paper_job(&job, out.shape[0], C, HW, s, bits, packed.shape[0], "packed"):
        return
    job.packed = &packed[0]
    job.step = &step[0]
    job.off = &off[0]
    job.relu = relu
    job.outf = &out[0]
    with nogil:
        # a conv chunk's few samples (<= SERIAL_MAX values): a parallel region costs more than it saves
        _run(_paper_decode_piece, &job, _npieces(job.n), job.n > SERIAL_MAX)


def paper_mask(const uint8_t[::1] packed,    # IN:  (ceil(n / V),) codes from paper_pack
               const int32_t[::1] s,         # IN:  (C,)
               int bits, Py_ssize_t C, Py_ssize_t HW,
               uint8_t[::1] out):            # OUT: (n,) 1 where code >= s (bool storage)
    """out[i] = code[i] >= s[c]: the exact ReLU mask y > 0."""
    cdef Job job
    if not _paper_job(&job, out.shape[0], C, HW, s, bits, packed.shape[0], "packed"):
        return
    job.packed = &packed[0]
    job.out8 = &out[0]
    job.outf = NULL                          # the mask, not the values
    with nogil:
        _run(_paper_decode_piece, &job, _npieces(job.n))


cdef bint _generic_job(Job* job, Py_ssize_t n, Py_ssize_t G, int bits, Py_ssize_t nbytes, str name,
                       Py_ssize_t nlo, Py_ssize_t nscale) except -1:
    """The checks and the common Job fields of the generic kernels; False when n == 0 (nothing to do)."""
    cdef Py_ssize_t v = _check_bits(bits)
    if G < 1:
        raise ValueError(f"group must be >= 1, got {G}")
    _check_len(nbytes, (n + v - 1) // v, name)
    _check_len(nlo, (n + G - 1) // G, "lo")
    _check_len(nscale, (n + G - 1) // G, "scale")
    job.n = n
    job.G = G
    job.bits = bits
    return n != 0


cdef Py_ssize_t _generic_pack_two_pass(Job* job) except -1:
    """Groups larger than FUSED_MAX: partial min / max, per-group parameters, encoding."""
    cdef Py_ssize_t n = job.n, G = job.G
    cdef Py_ssize_t glen = G if G < n else n  # a group holds at most n values
    cdef Py_ssize_t ng = (n + G - 1) // G, nf
    job.nsub = (glen + SUB - 1) // SUB
    job.kmin = <int32_t*>malloc(ng * job.nsub * sizeof(int32_t))
    job.kmax = <int32_t*>malloc(ng * job.nsub * sizeof(int32_t))
    job.nonfinite = <Py_ssize_t*>malloc(ng * job.nsub * sizeof(Py_ssize_t))
    job.inv = <float*>malloc(ng * sizeof(float))
    try:
        if not (job.kmin and job.kmax and job.nonfinite and job.inv):
            raise MemoryError()
        with nogil:
            _run(_generic_minmax_task, job, ng * job.nsub)
            nf = _run(_generic_params_task, job, ng)
            _run(_generic_encode_piece, job, _npieces(n))
    finally:
        free(job.kmin)
        free(job.kmax)
        free(job.nonfinite)
        free(job.inv)
    return nf


def generic_pack(const float[::1] x,         # IN:  (n,) values, flat
                 int bits, Py_ssize_t G, bint stochastic, uint32_t seed,
                 uint8_t[::1] out,           # OUT: (ceil(n / V),) packed codes, fully overwritten
                 float[::1] lo,              # OUT: (ceil(n / G),) group minimum (+0.0 for zero)
                 float[::1] scale):          # OUT: (ceil(n / G),) (max - min) / (2**bits - 1)
    """Per-group min/max K-bit encode; returns the number of non-finite x."""
    cdef Job job
    cdef Py_ssize_t a8 = G, r = 8, t, unit, nf
    if not _generic_job(&job, x.shape[0], G, bits, out.shape[0], "out", lo.shape[0], scale.shape[0]):
        return 0
    job.x = &x[0]
    job.stochastic = stochastic
    job.seed = seed
    job.out8 = &out[0]
    job.lo = &lo[0]
    job.scale = &scale[0]
    while r:                                 # unit = lcm(G, 8): whole groups, whole bytes
        t = a8 % r
        a8 = r
        r = t
    unit = G // a8 * 8
    if unit > FUSED_MAX:
        return _generic_pack_two_pass(&job)
    job.chunk = (CHUNK // unit if CHUNK >= unit else 1) * unit
    with nogil:
        nf = _run(_generic_fused_chunk, &job, (job.n + job.chunk - 1) // job.chunk)
    return nf


def generic_decode(const uint8_t[::1] packed,  # IN:  (ceil(n / V),) codes from generic_pack
                   const float[::1] lo,        # IN:  (ceil(n / G),)
                   const float[::1] scale,     # IN:  (ceil(n / G),)
                   int bits, Py_ssize_t G,
                   float[::1] out):            # OUT: (n,) lo + code * scale, fully overwritten
    """out[i] = lo[g] + float(code[i]) * scale[g], g = i // G."""
    cdef Job job
    if not _generic_job(&job, out.shape[0], G, bits, packed.shape[0], "packed", lo.shape[0], scale.shape[0]):
        return
    job.packed = &packed[0]
    job.lo = <float*>&lo[0]                  # read only: the decoder never writes lo / scale
    job.scale = <float*>&scale[0]
    job.outf = &out[0]
    with nogil:
        _run(_generic_decode_piece, &job, _npieces(job.n))


# --------------------------------------------------------------------------- #
# The calling thread's OpenMP team size (npapprox.parallel's workers run every
# kernel on one thread: its pool, not a second one per worker, uses the cores)
# --------------------------------------------------------------------------- #
cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int npa_omp_swap(int n) { int old = omp_get_max_threads(); if (n > 0) omp_set_num_threads(n); return old; }
    #else
    static int npa_omp_swap(int n) { (void)n; return 1; }
    #endif
    """
    int npa_omp_swap(int n) noexcept nogil


cdef extern from *:
    """
    #if defined(__AVX512F__)
    #define NPA_SIMD "avx512f"
    #elif defined(__AVX2__)
    #define NPA_SIMD "avx2"
    #elif defined(__AVX__)
    #define NPA_SIMD "avx"
    #elif defined(__SSE2__) || defined(_M_X64)
    #define NPA_SIMD "sse2"
    #elif defined(__ARM_NEON)
    #define NPA_SIMD "neon"
    #else
    #define NPA_SIMD "none"
    #endif
    """
    const char* NPA_SIMD

#: the widest vector unit this build's kernels target (setup.py: -march=native,
#: NPAPPROX_MARCH, NPAPPROX_PORTABLE): "avx512f", "avx2", "avx", "sse2", "neon" or "none"
SIMD = NPA_SIMD.decode()


def omp_threads(int n=0):
    """The calling thread's OpenMP thread count for its next parallel regions (every
    compiled kernel shares one OpenMP runtime); set to ``n`` when ``n > 0``. Returns
    the previous count (1 without OpenMP)."""
    return npa_omp_swap(n)


# --------------------------------------------------------------------------- #
# Which OpenMP runtime serves this process
# --------------------------------------------------------------------------- #
cdef extern from *:
    """
    #include <dlfcn.h>     /* dladdr: Python.h defines _GNU_SOURCE */
    static const char* npa_omp_library(void) {
    #ifdef _OPENMP
        Dl_info info;
        if (dladdr((void*)&omp_get_max_threads, &info) && info.dli_fname) return info.dli_fname;
    #endif
        return "";
    }
    """
    const char* npa_omp_library() noexcept nogil


def omp_library():
    """Path of the OpenMP runtime the compiled kernels' parallel regions run on ("" without
    OpenMP). A process has one: torch's wheel bundles a libgomp with the system's soname,
    so whichever loads first serves torch and npapprox alike (docs/bridge.md)."""
    return npa_omp_library().decode()
