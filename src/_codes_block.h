/* A block of the codes backward's loop (src/_bn.pyx, ``_load_block``) in AVX-512, for
 * K <= 4: xhat = tab[code] with the channel's 16-entry decode table in one register
 * (vpermps, where the loop computes float32(float32(code - s) + 0.5) * step + off: the
 * table holds those very values, so the same bits), and g = code >= s ? gy : gy * 0;
 * then g and xhat are stored, or, given po, po = scale * (g - a - xhat * k), the
 * batch-statistics gx, in the loop's order of operations. Returns how many of the nb
 * values it did (a multiple of 16; 0 without AVX-512): the caller does the rest. */
#ifndef NPAPPROX_CODES_BLOCK_H
#define NPAPPROX_CODES_BLOCK_H

#include <stdint.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static inline Py_ssize_t npa_codes_block16(const uint8_t *cb, const float *gy, const float *tab, int s,
                                           Py_ssize_t nb, float *g, float *xh, float *po,
                                           float scale, float a, float k) {
#if defined(__AVX512F__)
    Py_ssize_t i = 0;
    __m512 t = _mm512_loadu_ps(tab), zero = _mm512_setzero_ps();
    __m512 vscale = _mm512_set1_ps(scale), va = _mm512_set1_ps(a), vk = _mm512_set1_ps(k);
    __m512i vs = _mm512_set1_epi32(s);
    for (; i + 16 <= nb; i += 16) {
        __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(cb + i)));
        __m512 x = _mm512_permutexvar_ps(c, t);
        __m512 gv = _mm512_loadu_ps(gy + i);
        gv = _mm512_mask_mul_ps(gv, _mm512_cmplt_epi32_mask(c, vs), gv, zero);  /* gy * 0 where code < s */
        if (po != NULL) {
            _mm512_storeu_ps(po + i, _mm512_mul_ps(vscale, _mm512_sub_ps(_mm512_sub_ps(gv, va),
                                                                         _mm512_mul_ps(x, vk))));
        } else {
            _mm512_storeu_ps(g + i, gv);
            _mm512_storeu_ps(xh + i, x);
        }
    }
    return i;
#else
    (void)cb; (void)gy; (void)tab; (void)s; (void)nb; (void)g; (void)xh; (void)po;
    (void)scale; (void)a; (void)k;
    return 0;
#endif
}

#endif
