/* Row permutation between token order and expert order, for the MoE dispatch and combine.
 *
 * gather:      dst[i] = src[idx[i]]                      (any dtype: rows are copied as bytes)
 * gather_sum:  dst[t] = sum_j src[pos[j * s + t]], j < k  (pos < 0: a dropped route, adds nothing)
 *              accumulated in fp32 in choice order, stored once in dst's dtype
 * scatter_add: acc[idx[i]] += src[i]                      (fp32 accumulator; src fp32 or bf16)
 *
 * The dispatch's gather and its backward (a sum over each token's k routes), and the combine and its
 * backward (a gather), are all one of these two passes.  torch's path for the same math is a gather
 * (index_select) and, for each sum, a zero-filled buffer plus a scatter (index_add_): an extra pass over
 * the output and a read-modify-write per route.  Single-threaded, like swiglu.c (memory-bound).
 *
 * gather and scatter_add also serve the experts' loop (desmoe/moe/grouped.py, token mode), which
 * gathers one expert's rows into a cache-sized scratch just before its first GEMM and adds its last
 * GEMM's rows into the token-order output just after: the expert-order [N, d] buffers of the
 * dispatch and the combine are then never written to memory and read back.
 */
#include <stdint.h>
#include <string.h>

#include "bf16.h"

/* The rows a gather or scatter visits next are known (idx) but not sequential, so the hardware prefetcher
 * cannot guess them: each pass asks for the row ROWS_AHEAD ahead while it copies this one. */
#define ROWS_AHEAD 4
static inline void prefetch_row(const char *row, int64_t row_bytes, int write) {
  for (int64_t b = 0; b < row_bytes; b += 64) {
    if (write) __builtin_prefetch(row + b, 1);
    else __builtin_prefetch(row + b, 0);
  }
}

void rows_gather(const char *restrict src, const int64_t *restrict idx, char *restrict dst, int64_t n,
                 int64_t row_bytes) {
  for (int64_t i = 0; i < n; ++i) {
    if (i + ROWS_AHEAD < n) prefetch_row(src + idx[i + ROWS_AHEAD] * row_bytes, row_bytes, 0);
    memcpy(dst + i * row_bytes, src + idx[i] * row_bytes, (size_t)row_bytes);
  }
}

void rows_gather_sum_f32(const float *restrict src, const int64_t *restrict pos, float *restrict dst, int64_t s,
                         int64_t k, int64_t d) {
  for (int64_t t = 0; t < s; ++t) {
    float *restrict out = dst + t * d;
    int64_t first = 0;
    while (first < k && pos[first * s + t] < 0) ++first;
    if (first == k) {
      memset(out, 0, (size_t)d * sizeof(float));
      continue;
    }
    memcpy(out, src + pos[first * s + t] * d, (size_t)d * sizeof(float));
    for (int64_t j = first + 1; j < k; ++j) {
      const int64_t p = pos[j * s + t];
      if (p < 0) continue;
      const float *restrict row = src + p * d;
      for (int64_t c = 0; c < d; ++c) out[c] += row[c];
    }
  }
}

#define ROWS_CHUNK 512
void rows_gather_sum_bf16(const uint16_t *restrict src, const int64_t *restrict pos, uint16_t *restrict dst,
                          int64_t s, int64_t k, int64_t d) {
  for (int64_t t = 0; t < s; ++t) {
    for (int64_t c0 = 0; c0 < d; c0 += ROWS_CHUNK) {
      const int64_t m = d - c0 < ROWS_CHUNK ? d - c0 : ROWS_CHUNK;
      float acc[ROWS_CHUNK];
      for (int64_t c = 0; c < m; ++c) acc[c] = 0.0f;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t p = pos[j * s + t];
        if (p < 0) continue;
        const uint16_t *restrict row = src + p * d + c0;
        for (int64_t c = 0; c < m; ++c) acc[c] += bf16_to_f32(row[c]);
      }
      for (int64_t c = 0; c < m; ++c) dst[t * d + c0 + c] = f32_to_bf16(acc[c]);
    }
  }
}

/* scatter_add into a buffer that starts unset: seen[t] (zero at the start) marks the rows written so far,
 * so the first row for a token is stored and later ones added, a sum in row order equal to the one into
 * zeros (0 + a is a), without a pass of zeros over the whole buffer first; rows_zero_unseen then zeroes
 * the tokens no row reached (every route dropped by capacity). */
static inline float load_f32(float v) { return v; }

#define ROWS_SCATTER_ADD(NAME, T, LOAD)                                                                        \
  void NAME(const T *restrict src, const int64_t *restrict idx, uint8_t *restrict seen, float *restrict acc,  \
            int64_t n, int64_t d) {                                                                            \
    for (int64_t i = 0; i < n; ++i) {                                                                          \
      const int64_t t = idx[i];                                                                                \
      if (i + ROWS_AHEAD < n) prefetch_row((const char *)(acc + idx[i + ROWS_AHEAD] * d), d * 4, 1);         \
      float *restrict out = acc + t * d;                                                                       \
      const T *restrict row = src + i * d;                                                                     \
      if (!seen[t]) {                                                                                          \
        for (int64_t c = 0; c < d; ++c) out[c] = LOAD(row[c]);                                                 \
        seen[t] = 1;                                                                                           \
      } else {                                                                                                 \
        for (int64_t c = 0; c < d; ++c) out[c] += LOAD(row[c]);                                                \
      }                                                                                                        \
    }                                                                                                          \
  }

ROWS_SCATTER_ADD(rows_scatter_add_f32, float, load_f32)
ROWS_SCATTER_ADD(rows_scatter_add_bf16, uint16_t, bf16_to_f32)

void rows_zero_unseen(const uint8_t *restrict seen, char *restrict acc, int64_t s, int64_t row_bytes) {
  for (int64_t t = 0; t < s; ++t)
    if (!seen[t]) memset(acc + t * row_bytes, 0, (size_t)row_bytes);
}
