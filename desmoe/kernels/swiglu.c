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

/* One expression for the activation in every loop.  The exponent is capped: below g = -88 expf(-g) is
 * inf, and under -ffast-math 1 / (1 + inf) is a reciprocal estimate refined by a Newton step,
 * inf * 0 = NaN, so silu(-100) came out NaN (torch: -0).  With the cap the sigmoid is at most
 * 1 / (1 + e^87), ~1.6e-38, still a normal float, and silu(g) = g * s is ~1e-36 in absolute terms. */
static inline float sigmoid_of(float g) { return 1.0f / (1.0f + expf(fminf(-g, 87.0f))); }
static inline float act_of(float silu_u, float scale) { return silu_u * scale; }

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
