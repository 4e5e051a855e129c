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

void swiglu_fwd_f32(const float *restrict h, const float *restrict w, float *restrict act,
                    int64_t r0, int64_t r1, int64_t f) {
  for (int64_t i = r0; i < r1; ++i) {
    const float *restrict gate = h + i * 2 * f, *restrict up = gate + f;
    float *restrict out = act + i * f;
    const float scale = w ? w[i] : 1.0f;
    for (int64_t j = 0; j < f; ++j) {
      const float g = gate[j];
      out[j] = g / (1.0f + expf(-g)) * up[j] * scale;
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
      const float s = 1.0f / (1.0f + expf(-g));
      const float silu = g * s, a = silu * u, d = da[j], dw = d * scale;
      dot += d * a;
      du[j] = dw * silu;
      dg[j] = dw * u * s * (1.0f + g * (1.0f - s));
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
      for (int64_t j = 0; j < m; ++j) g[j] = g[j] / (1.0f + expf(-g[j])) * u[j] * scale;
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
      const float s = 1.0f / (1.0f + expf(-g));
      const float silu = g * s, a = silu * u, d = bf16_to_f32(d_act[i * f + j]), dw = d * scale;
      dot += d * a;
      d_h[i * 2 * f + f + j] = f32_to_bf16(dw * silu);
      d_h[i * 2 * f + j] = f32_to_bf16(dw * u * s * (1.0f + g * (1.0f - s)));
    }
    if (d_w) d_w[i] = dot;
  }
}
