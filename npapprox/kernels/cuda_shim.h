/* cuda_shim.h -- compile a CUDA kernel file as plain C++ on the host.
 *
 * npapprox/kernels/quant.cu includes this header only when it is NOT compiled by
 * nvcc / NVRTC (``#if !defined(__CUDACC__) && !defined(__CUDACC_RTC__)``). It
 *
 *   * defines the CUDA qualifiers away (__global__, __device__, __host__,
 *     __forceinline__), so each kernel becomes an ordinary ``extern "C"``
 *     function of its arguments;
 *   * provides blockIdx, threadIdx, blockDim, gridDim as (thread-local)
 *     variables, which npx_host_launch() sets while it loops over the grid:
 *     every block, then every thread of the block, one kernel call each
 *     (valid for kernels whose threads do not talk to each other: no shared
 *     memory, no __syncthreads, no warp intrinsics, no atomics -- the storage
 *     kernels are written that way);
 *   * gives host versions of the device intrinsics the kernels use, with the
 *     device meaning: __fadd_rn / __fsub_rn / __fmul_rn / __fdiv_rn are one
 *     IEEE float32 operation with round-to-nearest-even (compile with
 *     -ffp-contract=off so nothing fuses them, and never -ffast-math);
 *     fminf / fmaxf / ceilf / floorf come from <math.h> with the same IEEE
 *     meaning as CUDA's (fmaxf(NaN, b) == b); the bit casts are memcpy.
 *
 * Build (what tests/test_cuda.py does):
 *   g++ -O2 -ffp-contract=off -fPIC -shared -x c++ -std=c++17 quant.cu -o libnpx_quant.so
 */
#ifndef NPAPPROX_CUDA_SHIM_H
#define NPAPPROX_CUDA_SHIM_H

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#error "cuda_shim.h is for host (non-CUDA) builds only"
#endif
#if defined(__FAST_MATH__)
#error "the storage kernels must not be built with -ffast-math (bit-identical rounding)"
#endif

#include <float.h>
#include <math.h>
#include <string.h>

#if !defined(FLT_EVAL_METHOD) || FLT_EVAL_METHOD != 0
#error "float expressions must be evaluated in float (FLT_EVAL_METHOD == 0), e.g. SSE on x86-64"
#endif

/* ---- qualifiers ---------------------------------------------------------- */
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
/* __restrict__ is understood by g++ and clang++ as it is */

/* ---- the launch geometry ------------------------------------------------- */
struct npx_dim3 {
    unsigned int x, y, z;
};
static thread_local npx_dim3 blockIdx = {0, 0, 0};
static thread_local npx_dim3 threadIdx = {0, 0, 0};
static thread_local npx_dim3 blockDim = {1, 1, 1};
static thread_local npx_dim3 gridDim = {1, 1, 1};

/* Run ``body()`` once per (block, thread) of a 1-D grid, blocks in order. */
template <typename Body>
static void npx_host_launch(unsigned int grid, unsigned int block, Body body)
{
    gridDim.x = grid;
    blockDim.x = block;
    for (unsigned int bx = 0; bx < grid; ++bx) {
        blockIdx.x = bx;
        for (unsigned int tx = 0; tx < block; ++tx) {
            threadIdx.x = tx;
            body();
        }
    }
}

/* ---- intrinsics ---------------------------------------------------------- */
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }

static inline unsigned int __float_as_uint(float f)
{
    unsigned int u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float __uint_as_float(unsigned int u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float __uint2float_rn(unsigned int u) { return (float)u; }
static inline float __int2float_rn(int i) { return (float)i; }

#endif /* NPAPPROX_CUDA_SHIM_H */
