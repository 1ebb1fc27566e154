/* quant.cu -- the storage kernels in CUDA (npapprox.kernels.gpu loads this file).
 *
 * The byte contract is npapprox/kernels/reference.py (docs/kernels.md): these
 * kernels produce the SAME BYTES as the NumPy reference and the Cython kernels
 * (src/_quant.pyx) for every input -- NaN, +-inf, -0.0, subnormals, empty and
 * odd-sized arrays included.
 *
 * One file, two compilers:
 *   * nvcc / NVRTC (CuPy RawModule, options --fmad=false -std=c++17; CuPy itself
 *     appends -ftz=true, see "Float primitives" below): the kernels, nothing else;
 *   * g++ as plain C++ with cuda_shim.h (-O2 -ffp-contract=off): the same
 *     kernels become host functions, and the launchers at the bottom loop over
 *     the grid, so tests/test_cuda.py compares their bytes with the reference on
 *     a machine without a GPU.
 *
 * Rules the code keeps, so that the two builds and the reference agree:
 *   * every float operation is float32 with one rounding (the BN sums: float64
 *     additions of float32 terms), written as an npx_* primitive (inline PTX on
 *     the device, plain C on the host): no fused multiply-add and no
 *     flush-to-zero, whatever the compiler flags;
 *   * clamps are min(max(u, lo), hi) with IEEE maxNum / minNum: a NaN u
 *     becomes lo; float -> int conversions only see finite, clamped, integral
 *     values; "v > 0" is decided from the bits;
 *   * min / max per group run on integer order keys (order-independent; the
 *     sign of a zero extreme is normalised by + 0.0f afterwards);
 *   * threads never talk to each other: packing is one thread per output byte
 *     (no atomics, no shared memory), reductions are written per thread to
 *     arrays that the caller sums (non-finite counts) or combines in a second
 *     kernel (partial min / max, partial BN sums: in a fixed order);
 *   * every kernel checks its bounds; arrays are flat and C-contiguous; sizes
 *     and indices are 64-bit (long long), scalars have explicit types.
 *
 * Sections, in the order (and with the helper names, npx_ prefixed) of
 * kernels/reference.py and src/_quant.pyx: bit packing, the counter-based noise
 * (npx_uniform), the paper scheme (npx_paper_code), then the fused BN -> ReLU
 * passes of kernels/bn.py and src/_bn.pyx (npx_bn_*: BN's contract, element-wise
 * bits given the per-channel constants, sums in float64), the generic quantizer
 * (npx_group_params, npx_generic_code); before them the float primitives and
 * thread indices this file needs, after them the host-build launchers.
 *
 * Kernel arguments (gpu.py passes NumPy scalars of exactly these types):
 *   long long <-> np.int64, int <-> np.int32, unsigned int <-> np.uint32,
 *   pointers <-> cupy arrays of float32 / int32 / uint8 / int64.
 */
#if !defined(__CUDACC__) && !defined(__CUDACC_RTC__)
#include "cuda_shim.h"
#endif

#define NPX_QNAN_BITS 0x7fc00000u   /* the quiet NaN of the contract (np.float32(np.nan)) */

/* ------------------------------------------------------------------------- */
/* Float primitives: one IEEE float32 operation each, round to nearest even,  */
/* subnormal inputs and results KEPT.                                         */
/*                                                                            */
/* CUDA: inline PTX without the .ftz modifier. CuPy compiles every RawModule  */
/* with -ftz=true, appended after the caller's options (so it wins over a     */
/* --ftz=false), and under it __fadd_rn, fmaxf, ceilf, comparisons, ... all   */
/* flush subnormals to zero: the bytes would then differ from the reference   */
/* for tiny inputs (y = 1e-45 would get a negative code, a group with a       */
/* subnormal range would lose its scale). PTX written out is immune to flags  */
/* (--fmad, -ftz, --prec-div, --use_fast_math) and never fused.               */
/* Host (cuda_shim.h): the same operations in plain C (-ffp-contract=off).    */
/* ------------------------------------------------------------------------- */
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
/* name(a, b) / name(a): the one PTX instruction op; K, KR, KA are the operands'
 * constraint letters ("f": .f32 register, "d": .f64 register). */
#define NPX_PTX2(name, T, K, op)                                               \
    static __device__ __forceinline__ T name(T a, T b)                         \
    {                                                                          \
        T r;                                                                   \
        asm(op " %0, %1, %2;" : "=" K(r) : K(a), K(b));                        \
        return r;                                                              \
    }
#define NPX_PTX1(name, TR, KR, TA, KA, op)                                     \
    static __device__ __forceinline__ TR name(TA a)                            \
    {                                                                          \
        TR r;                                                                  \
        asm(op " %0, %1;" : "=" KR(r) : KA(a));                                \
        return r;                                                              \
    }
NPX_PTX2(npx_add, float, "f", "add.rn.f32")
NPX_PTX2(npx_sub, float, "f", "sub.rn.f32")
NPX_PTX2(npx_mul, float, "f", "mul.rn.f32")
NPX_PTX2(npx_fdiv, float, "f", "div.rn.f32")
/* max.f32 / min.f32: a NaN operand yields the other operand (IEEE maxNum / minNum) */
NPX_PTX2(npx_max, float, "f", "max.f32")
NPX_PTX2(npx_min, float, "f", "min.f32")
NPX_PTX1(npx_ceil, float, "f", float, "f", "cvt.rpi.f32.f32")
NPX_PTX1(npx_floor, float, "f", float, "f", "cvt.rmi.f32.f32")
/* float64 sums of float32 terms (the BN reductions): widening keeps subnormals, the
 * narrowing of a per-channel constant rounds once to nearest even */
NPX_PTX1(npx_widen, double, "d", float, "f", "cvt.f64.f32")
NPX_PTX1(npx_narrow, float, "f", double, "d", "cvt.rn.f32.f64")
NPX_PTX2(npx_dadd, double, "d", "add.rn.f64")
NPX_PTX2(npx_ddiv, double, "d", "div.rn.f64")
#else
static inline float npx_add(float a, float b) { return __fadd_rn(a, b); }
static inline float npx_sub(float a, float b) { return __fsub_rn(a, b); }
static inline float npx_mul(float a, float b) { return __fmul_rn(a, b); }
static inline float npx_fdiv(float a, float b) { return __fdiv_rn(a, b); }
static inline float npx_max(float a, float b) { return fmaxf(a, b); }
static inline float npx_min(float a, float b) { return fminf(a, b); }
static inline float npx_ceil(float a) { return ceilf(a); }
static inline float npx_floor(float a) { return floorf(a); }
static inline double npx_widen(float a) { return (double)a; }
static inline float npx_narrow(double a) { return (float)a; }
static inline double npx_dadd(double a, double b) { return a + b; }
static inline double npx_ddiv(double a, double b) { return a / b; }
#endif

/* v > 0 from the bits (flag-independent): +0 < v <= +inf; false for -0.0 and NaN. */
static __device__ __forceinline__ bool npx_positive(float v)
{
    return __float_as_uint(v) - 1u < 0x7f800000u;
}

/* Every NaN a kernel writes is the contract's quiet NaN: float arithmetic gives
 * 0x7fffffff on the GPU and the input's payload (or 0xffc00000) on x86. */
static __device__ __forceinline__ float npx_canonical_nan(float v)
{
    return (__float_as_uint(v) & 0x7fffffffu) > 0x7f800000u ? __uint_as_float(NPX_QNAN_BITS) : v;
}

/* NaN or +-inf: exponent bits all ones. */
static __device__ __forceinline__ unsigned int npx_nonfinite(float v)
{
    return (__float_as_uint(v) & 0x7f800000u) == 0x7f800000u ? 1u : 0u;
}

/* ------------------------------------------------------------------------- */
/* Threads and indices                                                       */
/* ------------------------------------------------------------------------- */
static __device__ __forceinline__ long long npx_thread_index()
{
    return (long long)blockIdx.x * (long long)blockDim.x + (long long)threadIdx.x;
}

/* a / b for a >= 0, b >= 1; 32-bit division when both fit (much cheaper on a GPU). */
static __device__ __forceinline__ long long npx_idiv(long long a, long long b)
{
    if ((((unsigned long long)a) | ((unsigned long long)b)) <= 0xffffffffull)
        return (long long)((unsigned int)a / (unsigned int)b);
    return a / b;
}

static __device__ __forceinline__ int npx_imin(int a, int b) { return a < b ? a : b; }
static __device__ __forceinline__ int npx_imax(int a, int b) { return a > b ? a : b; }

/* ------------------------------------------------------------------------- */
/* Bit packing: V = 8 / bits values per byte, the first in the low bits      */
/* ------------------------------------------------------------------------- */

/* log2(8 / bits): value i lives in byte i >> npx_lg_values(bits). */
static __device__ __forceinline__ int npx_lg_values(int bits)
{
    return bits == 8 ? 0 : bits == 4 ? 1 : bits == 2 ? 2 : 3;
}

/* The output byte this thread packs, one thread per output byte of n values: byte b
 * holds values [i, i + V), i = b * V, V = 8 / bits (the last byte fewer when n ends
 * inside it); b = -1 for an extra thread. */
struct npx_byte_job {
    long long b, i;
    int V;
};

static __device__ __forceinline__ npx_byte_job npx_byte_of_thread(long long n, int bits)
{
    const int lg = npx_lg_values(bits);
    const long long b = npx_thread_index();
    npx_byte_job job = {b < ((n + (1 << lg) - 1) >> lg) ? b : -1, b << lg, 1 << lg};
    return job;
}

/* The code of flat value i: bits [(i % V) * bits, ...) of byte i / V. */
static __device__ __forceinline__ int npx_code_at(const unsigned char* __restrict__ packed,
                                                  long long i, int bits)
{
    const int lg = npx_lg_values(bits);
    const int lane = (int)(i & (long long)((1 << lg) - 1));
    return (packed[i >> lg] >> (lane * bits)) & ((1 << bits) - 1);
}

/* One thread per output byte: out[b] = OR_j codes[b*V + j] << (j * bits), truncated
 * to 8 bits (like the reference's uint8 shifts; codes should be < 2^bits). */
extern "C" __global__ void npx_pack_bits(const unsigned char* __restrict__ codes,  /* IN  (n,) */
                                         long long n, int bits,
                                         unsigned char* __restrict__ out)          /* OUT (nbytes,) */
{
    const npx_byte_job job = npx_byte_of_thread(n, bits);
    if (job.b < 0)
        return;
    long long i = job.i;
    unsigned int byte = 0;
    for (int j = 0; j < job.V && i < n; ++j, ++i)
        byte |= (unsigned int)codes[i] << (j * bits);
    out[job.b] = (unsigned char)byte;
}

/* One thread per element: codes[i] = (packed[i / V] >> ((i % V) * bits)) & (2^bits - 1). */
extern "C" __global__ void npx_unpack_bits(const unsigned char* __restrict__ packed,  /* IN  (nbytes,) */
                                           long long n, int bits,
                                           unsigned char* __restrict__ codes)         /* OUT (n,) */
{
    const long long i = npx_thread_index();
    if (i >= n)
        return;
    codes[i] = (unsigned char)npx_code_at(packed, i, bits);
}

/* ------------------------------------------------------------------------- */
/* Counter-based noise (lowbias32)                                           */
/* ------------------------------------------------------------------------- */

/* Counter-based noise, lowbias32 of i * 0x9E3779B9 + seed (uint32 wraps), in [0, 1). */
static __device__ __forceinline__ float npx_uniform(unsigned int i, unsigned int seed)
{
    unsigned int h = i * 0x9E3779B9u + seed;
    h ^= h >> 16;
    h *= 0x7feb352du;
    h ^= h >> 15;
    h *= 0x846ca68bu;
    h ^= h >> 16;
    return npx_mul(__uint2float_rn(h >> 8), 5.9604644775390625e-08f);   /* exact: 24 bits * 2^-24 */
}

/* One thread per element: out[i] = npx_uniform(i mod 2^32, seed). */
extern "C" __global__ void npx_counter_uniform(long long n, unsigned int seed,
                                               float* __restrict__ out)     /* OUT (n,) */
{
    const long long i = npx_thread_index();
    if (i >= n)
        return;
    out[i] = npx_uniform((unsigned int)i, seed);
}

/* ------------------------------------------------------------------------- */
/* Paper scheme ("BN window"), per channel: flat index i, channel (i / HW) % C */
/* ------------------------------------------------------------------------- */

/* The paper code of v (reference.paper_pack), literally: NB = 2^bits. */
static __device__ __forceinline__ int npx_paper_code(float v, float k, int s, int nb)
{
    const float lim = (float)(nb + 1);
    float u = npx_mul(v, k);
    u = npx_min(npx_max(u, -lim), lim);          /* NaN -> -(NB + 1) */
    int code = s - 1 + (int)npx_ceil(u);         /* u in (0, 1] -> s, (-1, 0] -> s - 1 */
    code = npx_imin(npx_imax(code, 0), nb - 1);
    return npx_positive(v) ? npx_imax(code, s) : npx_imin(code, s - 1);   /* exact mask; NaN: else */
}

/* The value a paper code decodes to (reference.paper_decode without relu):
 * (float(code - s) + 0.5) * step + off, two roundings, no FMA. */
static __device__ __forceinline__ float npx_paper_value(int code, int s, float step, float off)
{
    const float t = npx_add(__int2float_rn(code - s), 0.5f);
    return npx_add(npx_mul(t, step), off);
}

/* Where flat index i of an (N, C, HW) tensor lies: its channel c = (i / HW) % C and its
 * position r inside the channel plane; npx_plane_next moves to i + 1 without a division. */
struct npx_plane_pos {
    long long r, c;
};

static __device__ __forceinline__ npx_plane_pos npx_plane_of(long long i, long long C, long long HW)
{
    const long long plane = npx_idiv(i, HW);
    npx_plane_pos p = {i - plane * HW, plane - npx_idiv(plane, C) * C};
    return p;
}

static __device__ __forceinline__ void npx_plane_next(npx_plane_pos* p, long long C, long long HW)
{
    if (++p->r == HW) {                           /* next channel plane */
        p->r = 0;
        if (++p->c == C)
            p->c = 0;
    }
}

/* The element this thread handles, one thread per element of an (N, C, HW) tensor of
 * n values, and its channel *c; -1 for an extra thread. */
static __device__ __forceinline__ long long npx_element_of_thread(long long n, long long C, long long HW,
                                                                  long long* c)
{
    const long long i = npx_thread_index();
    if (i >= n)
        return -1;
    *c = npx_plane_of(i, C, HW).c;
    return i;
}

/* A per-element kernel's first line: declares i and c (npx_element_of_thread), and
 * returns from an extra thread. */
#define NPX_ELEMENT_AND_CHANNEL(n, C, HW)                                      \
    long long c;                                                               \
    const long long i = npx_element_of_thread(n, C, HW, &c);                   \
    if (i < 0)                                                                 \
        return

/* The body of the paper packing kernels, one thread per output byte b: encodes the
 * values [b*V, b*V + V), value(i, c) giving flat value i (of channel c), and writes
 * out[b] and nonfinite[b] (how many of them are NaN or +-inf; the caller sums it). */
template <typename Value>
static __device__ __forceinline__ void npx_paper_pack_byte(Value value, const float* __restrict__ k,
                                                           const int* __restrict__ s, long long n, long long C,
                                                           long long HW, int bits,
                                                           unsigned char* __restrict__ out,
                                                           unsigned char* __restrict__ nonfinite)
{
    const npx_byte_job job = npx_byte_of_thread(n, bits);
    if (job.b < 0)
        return;
    const int nb = 1 << bits;
    long long i = job.i;
    npx_plane_pos p = npx_plane_of(i, C, HW);
    unsigned int byte = 0, bad = 0;
    for (int j = 0; j < job.V && i < n; ++j, ++i) {
        const float v = value(i, p.c);
        bad += npx_nonfinite(v);
        byte |= (unsigned int)npx_paper_code(v, k[p.c], s[p.c], nb) << (j * bits);
        npx_plane_next(&p, C, HW);
    }
    out[job.b] = (unsigned char)byte;
    nonfinite[job.b] = (unsigned char)bad;
}

/* One thread per output byte (nbytes = ceil(n / V) threads): the codes of y. */
extern "C" __global__ void npx_paper_pack(const float* __restrict__ y,     /* IN  (n,) */
                                          const float* __restrict__ k,     /* IN  (C,) */
                                          const int* __restrict__ s,       /* IN  (C,) in [1, NB-1] */
                                          long long n, long long C, long long HW, int bits,
                                          unsigned char* __restrict__ out,        /* OUT (nbytes,) */
                                          unsigned char* __restrict__ nonfinite)  /* OUT (nbytes,) */
{
    npx_paper_pack_byte([&](long long i, long long) { return y[i]; }, k, s, n, C, HW, bits, out, nonfinite);
}

/* One thread per element: out = (float(code - s) + 0.5) * step + off, +0.0 where relu and code < s. */
extern "C" __global__ void npx_paper_decode(const unsigned char* __restrict__ packed,  /* IN  (nbytes,) */
                                            const int* __restrict__ s,        /* IN  (C,) */
                                            const float* __restrict__ step,   /* IN  (C,) */
                                            const float* __restrict__ off,    /* IN  (C,) */
                                            long long n, long long C, long long HW, int bits, int relu,
                                            float* __restrict__ out)          /* OUT (n,) */
{
    NPX_ELEMENT_AND_CHANNEL(n, C, HW);
    const int code = npx_code_at(packed, i, bits);
    const int sc = s[c];
    float v = npx_paper_value(code, sc, step[c], off[c]);
    if (relu && code < sc)
        v = 0.0f;
    out[i] = npx_canonical_nan(v);
}

/* One thread per element: out = code >= s (bool storage: 0 or 1). */
extern "C" __global__ void npx_paper_mask(const unsigned char* __restrict__ packed,  /* IN  (nbytes,) */
                                          const int* __restrict__ s,          /* IN  (C,) */
                                          long long n, long long C, long long HW, int bits,
                                          unsigned char* __restrict__ out)    /* OUT (n,) */
{
    NPX_ELEMENT_AND_CHANNEL(n, C, HW);
    out[i] = npx_code_at(packed, i, bits) >= s[c] ? 1 : 0;
}

/* ------------------------------------------------------------------------- */
/* Fused BN -> ReLU unit passes (kernels/bn.py): (N, C, M) tensors, M = H*W,  */
/* channel (i / M) % C; element-wise results bit-identical to bn.py's given   */
/* the same per-channel constants, reductions in float64                      */
/* ------------------------------------------------------------------------- */

/* The forward of a unit and its storage in one pass: y = (x - mu) * scale + beta
 * (bn.bn_apply: three roundings, scale = gamma * inv_sigma), h = y * (y > 0) (-0.0
 * where y < 0, NaN stays NaN), and the paper codes of y (npx_paper_pack's bytes and
 * non-finite counts). One thread per output byte of codes; y is never stored. */
extern "C" __global__ void npx_bn_apply_pack(const float* __restrict__ x,      /* IN  (n,) */
                                             const float* __restrict__ mu,     /* IN  (C,) */
                                             const float* __restrict__ scale,  /* IN  (C,) */
                                             const float* __restrict__ beta,   /* IN  (C,) */
                                             const float* __restrict__ k,      /* IN  (C,) */
                                             const int* __restrict__ s,        /* IN  (C,) in [1, NB-1] */
                                             long long n, long long C, long long M, int bits,
                                             float* __restrict__ h,                  /* OUT (n,) */
                                             unsigned char* __restrict__ out,        /* OUT (nbytes,) */
                                             unsigned char* __restrict__ nonfinite)  /* OUT (nbytes,) */
{
    npx_paper_pack_byte([&](long long i, long long c) {
        const float y = npx_add(npx_mul(npx_sub(x[i], mu[c]), scale[c]), beta[c]);
        h[i] = npx_mul(y, npx_positive(y) ? 1.0f : 0.0f);
        return y;
    }, k, s, n, C, M, bits, out, nonfinite);
}

/* What the backward of a unit reads at flat index i, rebuilt from its code: returns
 * g = gy * mask as NumPy's gy * bool (gy where code >= s, gy * 0.0 elsewhere: -0.0,
 * NaN kept) and sets *xhat to the paper_decode value of the code (NaN canonical). */
static __device__ __forceinline__ float npx_unit_g(float gy, const unsigned char* __restrict__ packed,
                                                   long long i, int bits, int s, float step, float off,
                                                   float* xhat)
{
    const int code = npx_code_at(packed, i, bits);
    *xhat = npx_canonical_nan(npx_paper_value(code, s, step, off));
    return code >= s ? gy : npx_mul(gy, 0.0f);
}

/* Backward pass 1: partial sums. Channel c's N*M values are split into nsub
 * interleaved tasks: task t = c * nsub + j adds, in float64 and in increasing q, the
 * values at channel positions q = j, j + nsub, j + 2 nsub, ... (q = n*M + m: adjacent
 * threads read adjacent addresses) of g and of the float32 product g * xhat (the
 * reference's terms, bit for bit). C * nsub threads. */
extern "C" __global__ void npx_bn_codes_sums(const float* __restrict__ gy,             /* IN  (N*C*M,) */
                                             const unsigned char* __restrict__ packed, /* IN  (nbytes,) */
                                             const int* __restrict__ s,         /* IN  (C,) */
                                             const float* __restrict__ x_step,  /* IN  (C,) */
                                             const float* __restrict__ x_off,   /* IN  (C,) */
                                             long long N, long long C, long long M, int bits, long long nsub,
                                             double* __restrict__ part_g,       /* OUT (C*nsub,) */
                                             double* __restrict__ part_gx)      /* OUT (C*nsub,) */
{
    const long long t = npx_thread_index();
    if (t >= C * nsub)
        return;
    const long long c = npx_idiv(t, nsub);
    const int sc = s[c];
    const float step = x_step[c], off = x_off[c];
    double sg = 0.0, sgx = 0.0;
    for (long long q = t - c * nsub; q < N * M; q += nsub) {
        const long long n = npx_idiv(q, M);
        const long long i = (n * C + c) * M + (q - n * M);
        float xhat;
        const float g = npx_unit_g(gy[i], packed, i, bits, sc, step, off, &xhat);
        sg = npx_dadd(sg, npx_widen(g));
        sgx = npx_dadd(sgx, npx_widen(npx_mul(g, xhat)));
    }
    part_g[t] = sg;
    part_gx[t] = sgx;
}

/* Backward pass 2, one thread per channel: gbeta = sum g and ggamma = sum g * xhat
 * (the nsub partials added in order j = 0, 1, ...), and the constants of pass 3,
 * a = float32(gbeta / count), kk = float32(ggamma / count) (0 with running statistics). */
extern "C" __global__ void npx_bn_codes_finish(const double* __restrict__ part_g,   /* IN  (C*nsub,) */
                                               const double* __restrict__ part_gx,  /* IN  (C*nsub,) */
                                               long long C, long long nsub, long long count, int batch_stats,
                                               double* __restrict__ gbeta,          /* OUT (C,) */
                                               double* __restrict__ ggamma,         /* OUT (C,) */
                                               float* __restrict__ a,               /* OUT (C,) */
                                               float* __restrict__ kk)              /* OUT (C,) */
{
    const long long c = npx_thread_index();
    if (c >= C)
        return;
    double sg = 0.0, sgx = 0.0;
    for (long long j = c * nsub; j < (c + 1) * nsub; ++j) {
        sg = npx_dadd(sg, part_g[j]);
        sgx = npx_dadd(sgx, part_gx[j]);
    }
    gbeta[c] = sg;
    ggamma[c] = sgx;
    a[c] = batch_stats ? npx_narrow(npx_ddiv(sg, (double)count)) : 0.0f;
    kk[c] = batch_stats ? npx_narrow(npx_ddiv(sgx, (double)count)) : 0.0f;
}

/* Backward pass 3, one thread per element: gx = scale * ((g - a) - xhat * kk) with
 * batch statistics, scale * g with running ones (bn.bn_backward's formula, its order). */
extern "C" __global__ void npx_bn_codes_grad(const float* __restrict__ gy,             /* IN  (n,) */
                                             const unsigned char* __restrict__ packed, /* IN  (nbytes,) */
                                             const int* __restrict__ s,         /* IN  (C,) */
                                             const float* __restrict__ x_step,  /* IN  (C,) */
                                             const float* __restrict__ x_off,   /* IN  (C,) */
                                             const float* __restrict__ scale,   /* IN  (C,) gamma * inv_sigma */
                                             const float* __restrict__ a,       /* IN  (C,) */
                                             const float* __restrict__ kk,      /* IN  (C,) */
                                             long long n, long long C, long long M, int bits, int batch_stats,
                                             float* __restrict__ gx)            /* OUT (n,) */
{
    NPX_ELEMENT_AND_CHANNEL(n, C, M);
    float xhat;
    const float g = npx_unit_g(gy[i], packed, i, bits, s[c], x_step[c], x_off[c], &xhat);
    gx[i] = batch_stats ? npx_mul(scale[c], npx_sub(npx_sub(g, a[c]), npx_mul(xhat, kk[c])))
                        : npx_mul(scale[c], g);
}

/* ------------------------------------------------------------------------- */
/* Generic per-group quantizer: group g = i / G (G <= n, the caller clamps)  */
/* ------------------------------------------------------------------------- */

/* Integer order key of a float (bits <-> key is an involution), ordered like the floats. */
static __device__ __forceinline__ int npx_key(float v)
{
    const int b = (int)__float_as_uint(v);
    return b ^ ((b >> 31) & 0x7fffffff);
}

static __device__ __forceinline__ float npx_unkey(int key)
{
    return __uint_as_float((unsigned int)(key ^ ((key >> 31) & 0x7fffffff)));
}

/* lo, scale, inv of a group from its min / max keys and non-finite count (reference
 * _group_params). A group with a non-finite value gets lo = scale = NaN (0x7fc00000)
 * and inv = 0 (all its codes 0). */
static __device__ __forceinline__ void npx_group_params(int kmn, int kmx, long long bad, int levels,
                                                        float* lo, float* scale, float* inv)
{
    if (bad) {
        *lo = __uint_as_float(NPX_QNAN_BITS);
        *scale = __uint_as_float(NPX_QNAN_BITS);
        *inv = 0.0f;
        return;
    }
    const float levf = (float)levels;
    const float fmn = npx_add(npx_unkey(kmn), 0.0f);    /* -0.0 -> +0.0: order-independent bytes */
    const float fmx = npx_add(npx_unkey(kmx), 0.0f);
    const float d = npx_sub(fmx, fmn);
    *lo = fmn;
    *scale = npx_fdiv(d, levf);
    /* fmx != fmn, compared as bits (flag-independent; both finite, zeros are +0.0) */
    *inv = __float_as_uint(fmx) != __float_as_uint(fmn) ? npx_fdiv(levf, d) : 0.0f;
}

/* The generic code of x (reference.generic_pack): floor(clamp((x - lo) * inv + r, 0, L + 1)), <= L. */
static __device__ __forceinline__ int npx_generic_code(float x, float lo, float inv, float r, int levels)
{
    const float v = npx_mul(npx_sub(x, lo), inv);
    float w = npx_add(v, r);
    w = npx_min(npx_max(w, 0.0f), (float)(levels + 1));   /* NaN -> 0 */
    return npx_imin((int)npx_floor(w), levels);
}

/* Pass 1: partial min / max. Group g is split into nsub interleaved tasks
 * (task t = g * nsub + j reads elements g*G + j, g*G + j + nsub, ...: adjacent
 * threads read adjacent addresses); each writes its min / max order keys and
 * its count of non-finite values. ntasks = ngroups * nsub threads. */
extern "C" __global__ void npx_generic_minmax(const float* __restrict__ x,       /* IN  (n,) */
                                              long long n, long long G, long long nsub, long long ntasks,
                                              int* __restrict__ kmin,           /* OUT (ntasks,) */
                                              int* __restrict__ kmax,           /* OUT (ntasks,) */
                                              int* __restrict__ nonfinite)      /* OUT (ntasks,) */
{
    const long long t = npx_thread_index();
    if (t >= ntasks)
        return;
    const long long g = npx_idiv(t, nsub);
    const long long j = t - g * nsub;
    const long long gs = g * G;
    const long long ge = (n - gs < G) ? n : gs + G;
    int mn = 0x7fffffff, mx = -0x7fffffff - 1, bad = 0;
    for (long long i = gs + j; i < ge; i += nsub) {
        const float v = x[i];
        const int key = npx_key(v);
        bad += (int)npx_nonfinite(v);
        mn = key < mn ? key : mn;
        mx = key > mx ? key : mx;
    }
    kmin[t] = mn;
    kmax[t] = mx;
    nonfinite[t] = bad;
}

/* Pass 2: per group, combine its nsub partials into lo, scale, inv (one thread
 * per group, npx_group_params). */
extern "C" __global__ void npx_generic_params(const int* __restrict__ kmin,        /* IN  (ngroups*nsub,) */
                                              const int* __restrict__ kmax,        /* IN  (ngroups*nsub,) */
                                              const int* __restrict__ nonfinite,   /* IN  (ngroups*nsub,) */
                                              long long ngroups, long long nsub, int bits,
                                              float* __restrict__ lo,              /* OUT (ngroups,) */
                                              float* __restrict__ scale,           /* OUT (ngroups,) */
                                              float* __restrict__ inv,             /* OUT (ngroups,) */
                                              long long* __restrict__ group_nonfinite)  /* OUT (ngroups,) */
{
    const long long g = npx_thread_index();
    if (g >= ngroups)
        return;
    int mn = 0x7fffffff, mx = -0x7fffffff - 1;
    long long bad = 0;
    for (long long j = g * nsub; j < (g + 1) * nsub; ++j) {
        mn = kmin[j] < mn ? kmin[j] : mn;
        mx = kmax[j] > mx ? kmax[j] : mx;
        bad += nonfinite[j];
    }
    group_nonfinite[g] = bad;
    npx_group_params(mn, mx, bad, (1 << bits) - 1, &lo[g], &scale[g], &inv[g]);
}

/* Pass 3: one thread per output byte, values [b*V, b*V + V) with their group's
 * lo and inv; stochastic rounding draws npx_uniform(i mod 2^32, seed). */
extern "C" __global__ void npx_generic_encode(const float* __restrict__ x,        /* IN  (n,) */
                                              const float* __restrict__ lo,       /* IN  (ngroups,) */
                                              const float* __restrict__ inv,      /* IN  (ngroups,) */
                                              long long n, long long G, int bits, int stochastic,
                                              unsigned int seed,
                                              unsigned char* __restrict__ out)    /* OUT (nbytes,) */
{
    const npx_byte_job job = npx_byte_of_thread(n, bits);
    if (job.b < 0)
        return;
    const int levels = (1 << bits) - 1;
    long long i = job.i;
    long long g = npx_idiv(i, G);
    long long r = i - g * G;                      /* position inside the group */
    float glo = lo[g], ginv = inv[g];
    unsigned int byte = 0;
    for (int j = 0; j < job.V && i < n; ++j, ++i) {
        const float noise = stochastic ? npx_uniform((unsigned int)i, seed) : 0.5f;
        byte |= (unsigned int)npx_generic_code(x[i], glo, ginv, noise, levels) << (j * bits);
        if (++r == G) {                           /* next group */
            r = 0;
            ++g;
            if (i + 1 < n) {
                glo = lo[g];
                ginv = inv[g];
            }
        }
    }
    out[job.b] = (unsigned char)byte;
}

/* One thread per element: out = lo[g] + float(code) * scale[g] (two roundings). */
extern "C" __global__ void npx_generic_decode(const unsigned char* __restrict__ packed,  /* IN  (nbytes,) */
                                              const float* __restrict__ lo,       /* IN  (ngroups,) */
                                              const float* __restrict__ scale,    /* IN  (ngroups,) */
                                              long long n, long long G, int bits,
                                              float* __restrict__ out)            /* OUT (n,) */
{
    const long long i = npx_thread_index();
    if (i >= n)
        return;
    const long long g = npx_idiv(i, G);
    const float code = __int2float_rn(npx_code_at(packed, i, bits));
    out[i] = npx_canonical_nan(npx_add(lo[g], npx_mul(code, scale[g])));
}

/* ------------------------------------------------------------------------- */
/* Host build only: launchers that run a kernel over a (grid, block) geometry */
/* (the tests call these through ctypes; any geometry that covers the work    */
/* gives the same bytes, extra threads return at the bounds checks)           */
/* ------------------------------------------------------------------------- */
#if !defined(__CUDACC__) && !defined(__CUDACC_RTC__)

extern "C" int npx_host_abi_version(void) { return 1; }

extern "C" void npx_host_pack_bits(unsigned int grid, unsigned int block, const unsigned char* codes,
                                   long long n, int bits, unsigned char* out)
{
    npx_host_launch(grid, block, [&] { npx_pack_bits(codes, n, bits, out); });
}

extern "C" void npx_host_unpack_bits(unsigned int grid, unsigned int block, const unsigned char* packed,
                                     long long n, int bits, unsigned char* codes)
{
    npx_host_launch(grid, block, [&] { npx_unpack_bits(packed, n, bits, codes); });
}

extern "C" void npx_host_counter_uniform(unsigned int grid, unsigned int block, long long n, unsigned int seed,
                                         float* out)
{
    npx_host_launch(grid, block, [&] { npx_counter_uniform(n, seed, out); });
}

extern "C" void npx_host_paper_pack(unsigned int grid, unsigned int block, const float* y, const float* k,
                                    const int* s, long long n, long long C, long long HW, int bits,
                                    unsigned char* out, unsigned char* nonfinite)
{
    npx_host_launch(grid, block, [&] { npx_paper_pack(y, k, s, n, C, HW, bits, out, nonfinite); });
}

extern "C" void npx_host_paper_decode(unsigned int grid, unsigned int block, const unsigned char* packed,
                                      const int* s, const float* step, const float* off, long long n,
                                      long long C, long long HW, int bits, int relu, float* out)
{
    npx_host_launch(grid, block, [&] { npx_paper_decode(packed, s, step, off, n, C, HW, bits, relu, out); });
}

extern "C" void npx_host_paper_mask(unsigned int grid, unsigned int block, const unsigned char* packed,
                                    const int* s, long long n, long long C, long long HW, int bits,
                                    unsigned char* out)
{
    npx_host_launch(grid, block, [&] { npx_paper_mask(packed, s, n, C, HW, bits, out); });
}

extern "C" void npx_host_bn_apply_pack(unsigned int grid, unsigned int block, const float* x, const float* mu,
                                       const float* scale, const float* beta, const float* k, const int* s,
                                       long long n, long long C, long long M, int bits, float* h,
                                       unsigned char* out, unsigned char* nonfinite)
{
    npx_host_launch(grid, block, [&] { npx_bn_apply_pack(x, mu, scale, beta, k, s, n, C, M, bits, h, out, nonfinite); });
}

extern "C" void npx_host_bn_codes_sums(unsigned int grid, unsigned int block, const float* gy,
                                       const unsigned char* packed, const int* s, const float* x_step,
                                       const float* x_off, long long N, long long C, long long M, int bits,
                                       long long nsub, double* part_g, double* part_gx)
{
    npx_host_launch(grid, block, [&] {
        npx_bn_codes_sums(gy, packed, s, x_step, x_off, N, C, M, bits, nsub, part_g, part_gx);
    });
}

extern "C" void npx_host_bn_codes_finish(unsigned int grid, unsigned int block, const double* part_g,
                                         const double* part_gx, long long C, long long nsub, long long count,
                                         int batch_stats, double* gbeta, double* ggamma, float* a, float* kk)
{
    npx_host_launch(grid, block, [&] {
        npx_bn_codes_finish(part_g, part_gx, C, nsub, count, batch_stats, gbeta, ggamma, a, kk);
    });
}

extern "C" void npx_host_bn_codes_grad(unsigned int grid, unsigned int block, const float* gy,
                                       const unsigned char* packed, const int* s, const float* x_step,
                                       const float* x_off, const float* scale, const float* a, const float* kk,
                                       long long n, long long C, long long M, int bits, int batch_stats, float* gx)
{
    npx_host_launch(grid, block, [&] {
        npx_bn_codes_grad(gy, packed, s, x_step, x_off, scale, a, kk, n, C, M, bits, batch_stats, gx);
    });
}

extern "C" void npx_host_generic_minmax(unsigned int grid, unsigned int block, const float* x, long long n,
                                       long long G, long long nsub, long long ntasks, int* kmin, int* kmax,
                                       int* nonfinite)
{
    npx_host_launch(grid, block, [&] { npx_generic_minmax(x, n, G, nsub, ntasks, kmin, kmax, nonfinite); });
}

extern "C" void npx_host_generic_params(unsigned int grid, unsigned int block, const int* kmin,
                                       const int* kmax, const int* nonfinite, long long ngroups,
                                       long long nsub, int bits, float* lo, float* scale, float* inv,
                                       long long* group_nonfinite)
{
    npx_host_launch(grid, block, [&] {
        npx_generic_params(kmin, kmax, nonfinite, ngroups, nsub, bits, lo, scale, inv, group_nonfinite);
    });
}

extern "C" void npx_host_generic_encode(unsigned int grid, unsigned int block, const float* x,
                                       const float* lo, const float* inv, long long n, long long G, int bits,
                                       int stochastic, unsigned int seed, unsigned char* out)
{
    npx_host_launch(grid, block, [&] { npx_generic_encode(x, lo, inv, n, G, bits, stochastic, seed, out); });
}

extern "C" void npx_host_generic_decode(unsigned int grid, unsigned int block, const unsigned char* packed,
                                       const float* lo, const float* scale, long long n, long long G, int bits,
                                       float* out)
{
    npx_host_launch(grid, block, [&] { npx_generic_decode(packed, lo, scale, n, G, bits, out); });
}

#endif /* host build */
