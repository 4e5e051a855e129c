/* Fused SwiGLU activation for CPU: one pass forward, one pass backward.
 *
 * h      [n, 2f]  pre-activation rows: gate | up
 * w      [n]      per-row scale (the route's combine weight) or NULL (= 1)
 * fwd:   act[i, j] = silu(gate) * up * w[i]
 * bwd:   given d_act [n, f] (act_w is saved from the forward for the down
 *        projection's weight gradient, so it is not recomputed here):
 *          a      = silu(gate) * up
 *          d_up   = d_act * w * silu(gate)
 *          d_gate = d_act * w * up * sig * (1 + gate * (1 - sig))
 *          d_w[i] = sum_j d_act[i, j] * a[i, j]
 * bwd_inplace: the same, for a backward that needs neither buffer afterwards: d_h is written over h
 *        and the weighted activation act * w (the down projection's weight-gradient input) over
 *        d_act, so the forward keeps no activation for backward and the backward allocates no
 *        second [n, 2f] buffer (whose first write would also fetch every line it overwrites).
 *        Each element is read before it is overwritten, at the same index.  The activation is
 *        the forward's expression (sigmoid_of, act_of below); -ffast-math may still associate the
 *        product differently in the two loops, so it equals the forward's to within one rounding.
 * Rows [r0, r1).  Plain C on raw pointers: no torch headers, so it compiles in
 * about a second.  Built with -ffast-math so GCC vectorises expf through glibc's
 * vector math library.  Single-threaded on purpose: measured in one process, an
 * OpenMP build sharing torch's libgomp was 7% slower per MoE step (the kernel is
 * memory-bound and waking the team costs more than it saves).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* One expression for the activation in every loop.  The exponent is capped: below g = -88 expf(-g) is
 * inf, and under -ffast-math 1 / (1 + inf) is a reciprocal estimate refined by a Newton step,
 * inf * 0 = NaN, so silu(-100) came out NaN (torch: -0).  With the cap the sigmoid is at most
 * 1 / (1 + e^87), ~1.6e-38, still a normal float, and silu(g) = g * s is ~1e-36 in absolute terms. */
static inline float sigmoid_of(float g) { return 1.0f / (1.0f + expf(fminf(-g, 87.0f))); }
static inline float act_of(float silu_u, float scale) { return silu_u * scale; }

#if defined(__AVX512F__)
/* The float32 loops with AVX-512 intrinsics.  GCC vectorises the plain loops below too, but calls glibc's
 * vector expf through the PLT once per 16 lanes, and as all vector registers are caller-saved there, spills
 * and reloads around each call: measured on 512 x 512 rows in L2, forward 0.40 -> 0.34 ns an element and the
 * in-place backward 32 % faster with the exp inlined.  exp(x) = 2^n e^r, n = round(x / ln 2), r = x - n ln 2
 * in two parts (Cody-Waite), e^r by the Cephes degree-7 polynomial, 2^n by scalef (which also underflows to
 * 0 cleanly); 1 / (1 + e) by a reciprocal estimate and one Newton step.  The sigmoid's relative error is
 * below 2.4e-7 (4 ulp) over [-87, 87] (tests/test_grouped_experts.py checks the activation against torch's).
 * A row's tail is a masked load and store, so every element goes through the same arithmetic. */
static inline __m512 sigmoid16(__m512 g) {
  /* -g capped at 87 as in sigmoid_of; and at -104 from below, where e^x is 0 in float, so that g = +inf gives
   * r = x - n ln 2 = -inf + inf = NaN nowhere (silu(inf) = inf, as torch).  A NaN g passes min and max as
   * the bound and comes back through g * s. */
  const __m512 x = _mm512_max_ps(_mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), g), _mm512_set1_ps(87.0f)),
                                 _mm512_set1_ps(-104.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512 d = _mm512_add_ps(_mm512_scalef_ps(p, n), _mm512_set1_ps(1.0f));
  const __m512 y = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(y, _mm512_fnmadd_ps(d, y, _mm512_set1_ps(2.0f)));
}
static inline __mmask16 tail16(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }

void swiglu_fwd_f32(const float *restrict h, const float *restrict w, float *restrict act,
                    int64_t r0, int64_t r1, int64_t f) {
  for (int64_t i = r0; i < r1; ++i) {
    const float *gate = h + i * 2 * f, *up = gate + f;
    float *out = act + i * f;
    const __m512 scale = _mm512_set1_ps(w ? w[i] : 1.0f);
    for (int64_t j = 0; j < f; j += 16) {
      const __mmask16 m = tail16(f - j);
      const __m512 g = _mm512_maskz_loadu_ps(m, gate + j), u = _mm512_maskz_loadu_ps(m, up + j);
      const __m512 a = _mm512_mul_ps(_mm512_mul_ps(g, sigmoid16(g)), u);
      _mm512_mask_storeu_ps(out + j, m, _mm512_mul_ps(a, scale));
    }
  }
}

/* The backward of one 16-lane block: returns d * a (for d_w), writes d_up and d_gate, and the weighted
 * activation when act_out is given (the in-place form). */
static inline __m512 bwd16(__m512 g, __m512 u, __m512 d, __m512 scale, float *dg, float *du, float *act_out,
                           __mmask16 m) {
  const __m512 s = sigmoid16(g), silu = _mm512_mul_ps(g, s), a = _mm512_mul_ps(silu, u), dw = _mm512_mul_ps(d, scale);
  const __m512 one = _mm512_set1_ps(1.0f);
  if (act_out) _mm512_mask_storeu_ps(act_out, m, _mm512_mul_ps(a, scale));
  _mm512_mask_storeu_ps(du, m, _mm512_mul_ps(dw, silu));
  const __m512 t = _mm512_fmadd_ps(g, _mm512_sub_ps(one, s), one);  /* 1 + g (1 - s) */
  _mm512_mask_storeu_ps(dg, m, _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(dw, u), s), t));
  return _mm512_mul_ps(d, a);
}

void swiglu_bwd_f32(const float *restrict h, const float *restrict w, const float *restrict d_act,
                    float *restrict d_h, float *restrict d_w, int64_t r0, int64_t r1, int64_t f) {
  for (int64_t i = r0; i < r1; ++i) {
    const float *gate = h + i * 2 * f, *up = gate + f, *da = d_act + i * f;
    float *dg = d_h + i * 2 * f, *du = dg + f;
    const __m512 scale = _mm512_set1_ps(w ? w[i] : 1.0f);
    __m512 dot = _mm512_setzero_ps();
    for (int64_t j = 0; j < f; j += 16) {
      const __mmask16 m = tail16(f - j);
      dot = _mm512_add_ps(dot, bwd16(_mm512_maskz_loadu_ps(m, gate + j), _mm512_maskz_loadu_ps(m, up + j),
                                     _mm512_maskz_loadu_ps(m, da + j), scale, dg + j, du + j, NULL, m));
    }
    if (d_w) d_w[i] = _mm512_reduce_add_ps(dot);
  }
}

void swiglu_bwd_inplace_f32(float *h, const float *restrict w, float *d_act, float *restrict d_w,
                            int64_t r0, int64_t r1, int64_t f) {
  for (int64_t i = r0; i < r1; ++i) {
    float *gate = h + i * 2 * f, *up = gate + f, *da = d_act + i * f;
    const __m512 scale = _mm512_set1_ps(w ? w[i] : 1.0f);
    __m512 dot = _mm512_setzero_ps();
    for (int64_t j = 0; j < f; j += 16) {  /* each block is loaded whole before any of it is overwritten */
      const __mmask16 m = tail16(f - j);
      dot = _mm512_add_ps(dot, bwd16(_mm512_maskz_loadu_ps(m, gate + j), _mm512_maskz_loadu_ps(m, up + j),
                                     _mm512_maskz_loadu_ps(m, da + j), scale, gate + j, up + j, da + j, m));
    }
    if (d_w) d_w[i] = _mm512_reduce_add_ps(dot);
  }
}
#else
void swiglu_fwd_f32(const float *restrict h, const float *restrict w, float *restrict act,
                    int64_t r0, int64_t r1, int64_t f) {
  for (int64_t i = r0; i < r1; ++i) {
    const float *restrict gate = h + i * 2 * f, *restrict up = gate + f;
    float *restrict out = act + i * f;
    const float scale = w ? w[i] : 1.0f;
    for (int64_t j = 0; j < f; ++j) {
      const float g = gate[j];
      const float a = g * sigmoid_of(g) * up[j];
      out[j] = act_of(a, scale);
    }
  }
}

void swiglu_bwd_f32(const float *restrict h, const float *restrict w, const float *restrict d_act,
                    float *restrict d_h, float *restrict d_w,
                    int64_t r0, int64_t r1, int64_t f) {
  for (int64_t i = r0; i < r1; ++i) {
    const float *restrict gate = h + i * 2 * f, *restrict up = gate + f, *restrict da = d_act + i * f;
    float *restrict dg = d_h + i * 2 * f, *restrict du = dg + f;
    const float scale = w ? w[i] : 1.0f;
    float dot = 0.0f;
    for (int64_t j = 0; j < f; ++j) {
      const float g = gate[j], u = up[j];
      const float s = sigmoid_of(g);
      const float silu = g * s, a = silu * u, d = da[j], dw = d * scale;
      dot += d * a;
      du[j] = dw * silu;
      dg[j] = dw * u * s * (1.0f + g * (1.0f - s));
    }
    if (d_w) d_w[i] = dot;
  }
}

void swiglu_bwd_inplace_f32(float *h, const float *restrict w, float *d_act, float *restrict d_w,
                            int64_t r0, int64_t r1, int64_t f) {
  for (int64_t i = r0; i < r1; ++i) {
    float *gate = h + i * 2 * f, *up = gate + f, *da = d_act + i * f;
    const float scale = w ? w[i] : 1.0f;
    float dot = 0.0f;
#pragma GCC ivdep
    for (int64_t j = 0; j < f; ++j) {
      const float g = gate[j], u = up[j], d = da[j];
      const float s = sigmoid_of(g), silu = g * s, a = silu * u, dw = d * scale;
      dot += d * a;
      da[j] = act_of(a, scale);
      up[j] = dw * silu;
      gate[j] = dw * u * s * (1.0f + g * (1.0f - s));
    }
    if (d_w) d_w[i] = dot;
  }
}

#endif

/* bf16 storage, fp32 math: rows are widened into a small stack buffer. */
#define CHUNK 256
void swiglu_fwd_bf16(const uint16_t *restrict h, const uint16_t *restrict w, uint16_t *restrict act,
                     int64_t r0, int64_t r1, int64_t f) {
  for (int64_t i = r0; i < r1; ++i) {
    float g[CHUNK], u[CHUNK];
    const float scale = w ? bf16_to_f32(w[i]) : 1.0f;
    for (int64_t j0 = 0; j0 < f; j0 += CHUNK) {
      const int64_t m = f - j0 < CHUNK ? f - j0 : CHUNK;
      for (int64_t j = 0; j < m; ++j) {
        g[j] = bf16_to_f32(h[i * 2 * f + j0 + j]);
        u[j] = bf16_to_f32(h[i * 2 * f + f + j0 + j]);
      }
      for (int64_t j = 0; j < m; ++j) g[j] = act_of(g[j] * sigmoid_of(g[j]) * u[j], scale);
      for (int64_t j = 0; j < m; ++j) act[i * f + j0 + j] = f32_to_bf16(g[j]);
    }
  }
}

void swiglu_bwd_bf16(const uint16_t *restrict h, const uint16_t *restrict w, const uint16_t *restrict d_act,
                     uint16_t *restrict d_h, float *restrict d_w,
                     int64_t r0, int64_t r1, int64_t f) {
  for (int64_t i = r0; i < r1; ++i) {
    const float scale = w ? bf16_to_f32(w[i]) : 1.0f;
    float dot = 0.0f;
    for (int64_t j = 0; j < f; ++j) {
      const float g = bf16_to_f32(h[i * 2 * f + j]), u = bf16_to_f32(h[i * 2 * f + f + j]);
      const float s = sigmoid_of(g);
      const float silu = g * s, a = silu * u, d = bf16_to_f32(d_act[i * f + j]), dw = d * scale;
      dot += d * a;
      d_h[i * 2 * f + f + j] = f32_to_bf16(dw * silu);
      d_h[i * 2 * f + j] = f32_to_bf16(dw * u * s * (1.0f + g * (1.0f - s)));
    }
    if (d_w) d_w[i] = dot;
  }
}

void swiglu_bwd_inplace_bf16(uint16_t *h, const uint16_t *restrict w, uint16_t *d_act, float *restrict d_w,
                             int64_t r0, int64_t r1, int64_t f) {
  for (int64_t i = r0; i < r1; ++i) {
    const float scale = w ? bf16_to_f32(w[i]) : 1.0f;
    uint16_t *gate = h + i * 2 * f, *up = gate + f, *da = d_act + i * f;
    float dot = 0.0f;
    for (int64_t j = 0; j < f; ++j) {
      const float g = bf16_to_f32(gate[j]), u = bf16_to_f32(up[j]), d = bf16_to_f32(da[j]);
      const float s = sigmoid_of(g), silu = g * s, a = silu * u, dw = d * scale;
      dot += d * a;
      da[j] = f32_to_bf16(act_of(a, scale));
      up[j] = f32_to_bf16(dw * silu);
      gate[j] = f32_to_bf16(dw * u * s * (1.0f + g * (1.0f - s)));
    }
    if (d_w) d_w[i] = dot;
  }
}
