/* The loop backend's whole expert loop in one C call, fp32, forward and backward.
 *
 * Per expert, on its block of rows: (gather its rows) -> GEMM -> SwiGLU -> GEMM -> (add into the token-order
 * output); the backward runs the four GEMMs, the in-place activation backward and the row passes in the
 * same order as desmoe/moe/grouped.py's Python loop (GroupedSwiGLU), which this replaces where torch's
 * BLAS is MKL (desmoe/kernels/experts.py).  Two things that loop could not do:
 *
 * - no Python between the steps: it made about 13 calls per expert (torch.mm with out=, slicing, ctypes),
 *   2-3 % of the step at the toy shape and 7-10 % at 64-128 experts;
 * - row tiles through the forward's chain: each expert's two weights are packed once (MKL's
 *   cblas_sgemm_pack: the copy its sgemm makes inside every call) and its rows go through gather -> GEMM ->
 *   activation -> GEMM -> combine a tile at a time, so the activation reads the pre-activations the GEMM has
 *   just written, from cache, instead of an expert-sized buffer from memory (forward 1.06-1.15x at the
 *   toy shape; where tiles pay, and where not, at expert_tile below).  With torch.mm each tile was a whole
 *   sgemm call that packed the weight again: tiles were slower there (docs/performance.md).  The backward
 *   stays whole-expert: tiled the same way it measured 0.97-0.99x (its activation pass reads
 *   pre-activations saved long before, from memory, either way).
 *
 * The backward's GEMMs and the weight-gradient GEMMs (sums over all of an expert's rows) are sgemm_ calls.
 * Everything is looked up in torch's own library at run time (experts_set_blas).  Row-major helpers below;
 * a row-major [m, n] buffer is the column-major [n, m] matrix.
 *
 * token_order 0: x / grad_out / out / grad_x are in expert order ([N, d], EP > 1), tok unused; else token
 * order ([S, d]), row i of the blocks is x[tok[i]], and out / grad_x are fp32 sums over each token's rows
 * (rows.c's scatter_add; a flag, not tok != NULL: an empty tensor's data pointer may be NULL).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef void (*sgemm_t)(const char *ta, const char *tb, const int *m, const int *n, const int *k, const float *alpha,
                        const float *a, const int *lda, const float *b, const int *ldb, const float *beta, float *c,
                        const int *ldc);
typedef size_t (*pack_size_t)(int identifier, int m, int n, int k);
typedef void (*pack_t)(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float *src,
                       int ld, float *dest);
typedef void (*compute_t)(int layout, int transa, int transb, int m, int n, int k, const float *a, int lda,
                          const float *b, int ldb, float beta, float *c, int ldc);
static sgemm_t sgemm_ptr;
static pack_size_t pack_size_ptr;
static pack_t pack_ptr;
static compute_t compute_ptr;
enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112, PACKED = 151, B_MATRIX = 162 };  /* MKL's CBLAS values */
/* Rows per tile: a tile's x, pre-activations, activation and output rows ((2 d + 3 f) floats a row) in about
 * TILE_BYTES.  Measured at the toy shape (d 256, f 512, 512 rows an expert), forward: tiles of 32 / 64 / 128 /
 * 256 rows 1.06 / 1.09 / 1.09 / 1.07x one tile per expert.  A tile only pays where the expert's rows, whole,
 * spill out of L2 (else the activation reads them from cache anyway: a quarter of Qwen3-30B-A3B at 128 rows
 * an expert, 1.00x) and its two packed weights fit in L2 (each tile reads them again: a quarter of
 * DeepSeek-V2-Lite, 2.1 MB of weights, measured 0.92x with 63-row tiles), with at least MIN_TILE_ROWS rows
 * (a quarter of Mixtral's width, 16-row tiles: 0.82x).  Elsewhere an expert runs as one tile. */
#define TILE_BYTES (512 << 10)
#define MIN_TILE_ROWS 64
static int64_t l2_bytes(void) {
  const long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
  return v > 0 ? (int64_t)v : (int64_t)1 << 20;  /* unknown (some VMs): 1 MiB, a common server L2 */
}
/* rows per tile for an expert of n rows; tile_bytes > 0 forces tiles of that many bytes (the tests') */
static int64_t expert_tile(int64_t n, int64_t d, int64_t f, int64_t tile_bytes, int64_t l2) {
  const int64_t row = (2 * d + 3 * f) * (int64_t)sizeof(float), weights = 3 * f * d * (int64_t)sizeof(float);
  if (tile_bytes > 0) return tile_bytes / row > 16 ? tile_bytes / row : 16;
  const int64_t t = TILE_BYTES / row;
  if (n * row <= l2 || weights > l2 || t < MIN_TILE_ROWS) return n;
  return t;
}

int experts_set_blas(void *sgemm, void *pack_size, void *pack, void *compute) {
  sgemm_ptr = (sgemm_t)sgemm;
  pack_size_ptr = (pack_size_t)pack_size;
  pack_ptr = (pack_t)pack;
  compute_ptr = (compute_t)compute;
  return sgemm && pack_size && pack && compute;
}

void rows_gather(const char *src, const int64_t *idx, char *dst, int64_t n, int64_t row_bytes);
void rows_scatter_add_f32(const float *src, const int64_t *idx, uint8_t *seen, float *acc, int64_t n, int64_t d);
void rows_zero_unseen(const uint8_t *seen, char *acc, int64_t s, int64_t row_bytes);
void swiglu_fwd_f32(const float *h, const float *w, float *act, int64_t r0, int64_t r1, int64_t f);
void swiglu_bwd_inplace_f32(float *h, const float *w, float *d_act, float *d_w, int64_t r0, int64_t r1, int64_t f);

/* Column-major sgemm_ with alpha 1, beta 0 */
static void gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, const float *a, int64_t lda, const float *b,
                 int64_t ldb, float *c, int64_t ldc) {
  const float one = 1.0f, zero = 0.0f;
  const int m_ = (int)m, n_ = (int)n, k_ = (int)k, lda_ = (int)lda, ldb_ = (int)ldb, ldc_ = (int)ldc;
  sgemm_ptr(&ta, &tb, &m_, &n_, &k_, &one, a, &lda_, b, &ldb_, &zero, c, &ldc_);
}
/* C[m, n] = A[k, m]^T B[k, n]; k = 0 writes zeros (an expert without rows has zero weight gradients) */
static void mm_tn(const float *a, const float *b, float *c, int64_t m, int64_t n, int64_t k) {
  if (k == 0) memset(c, 0, (size_t)(m * n) * sizeof(float));
  else gemm('N', 'T', n, m, k, b, n, a, m, c, n);
}
/* C[m, n] = A[m, k] B[n, k]^T */
static void mm_nt(const float *a, const float *b, float *c, int64_t m, int64_t n, int64_t k) {
  gemm('T', 'N', n, m, k, b, k, a, k, c, n);
}
/* C[m, n] = A[m, k] B[k, n] */
static void mm_nn(const float *a, const float *b, float *c, int64_t m, int64_t n, int64_t k) {
  gemm('N', 'N', n, m, k, b, n, a, k, c, n);
}
/* Pack a row-major weight for C[t, n] = A[t, k] op(W): W [n, k] with trans, or [k, n] without. */
static void pack_weight(const float *w, int trans, int64_t tile, int64_t n, int64_t k, float *dest) {
  pack_ptr(ROW_MAJOR, B_MATRIX, trans, (int)tile, (int)n, (int)k, 1.0f, w, trans == TRANS ? (int)k : (int)n, dest);
}
/* C[t, n] = A[t, k] op(W), W packed by pack_weight */
static void mm_packed(const float *a, const float *packed, float *c, int64_t t, int64_t n, int64_t k) {
  compute_ptr(ROW_MAJOR, NO_TRANS, PACKED, (int)t, (int)n, (int)k, a, (int)k, packed, (int)n, 0.0f, c, (int)n);
}

typedef struct { float *p[6]; uint8_t *seen; } scratch_t;
static void scratch_free(scratch_t *s) {
  for (int i = 0; i < 6; ++i) free(s->p[i]);
  free(s->seen);
}
/* Allocates sizes[i] floats each (0: none) and s zeroed seen flags; returns 0, or -2 when out of memory. */
static int scratch_alloc(scratch_t *s, const size_t *sizes, int64_t seen) {
  memset(s, 0, sizeof(*s));
  int ok = 1;
  for (int i = 0; i < 6; ++i)
    if (sizes[i]) ok &= (s->p[i] = malloc(sizes[i] * sizeof(float))) != NULL;
  if (seen) ok &= (s->seen = calloc((size_t)seen, 1)) != NULL;
  if (!ok) scratch_free(s);
  return ok ? 0 : -2;
}
static size_t packed_floats(int64_t tile, int64_t n, int64_t k) {
  return pack_size_ptr(B_MATRIX, (int)tile, (int)n, (int)k) / sizeof(float) + 16;
}

int experts_fwd_f32(const float *x, const int64_t *tok, int64_t token_order, const int64_t *counts, int64_t num_experts,
                    const float *const *w13, const float *const *w2, const float *route_w, int64_t d, int64_t f,
                    float *h_all, float *out, int64_t s, int64_t tile_bytes) {
  if (!compute_ptr) return -1;
  int64_t m = 1;  /* the scratches hold one tile: at most the largest expert's rows */
  for (int64_t e = 0; e < num_experts; ++e) m = counts[e] > m ? counts[e] : m;
  const int64_t l2 = l2_bytes();
  int any_tiled = 0;  /* the packed weights' buffers only where some expert runs in tiles */
  for (int64_t e = 0; e < num_experts; ++e) any_tiled |= expert_tile(counts[e], d, f, tile_bytes, l2) < counts[e];
  scratch_t sc;
  const size_t sizes[6] = {any_tiled ? packed_floats(m, 2 * f, d) : 0, any_tiled ? packed_floats(m, d, f) : 0,
                           (size_t)(m * f), (size_t)(m * d), (size_t)(m * d), 0};
  if (scratch_alloc(&sc, sizes, token_order ? s : 0)) return -2;
  float *pk13 = sc.p[0], *pk2 = sc.p[1], *act = sc.p[2], *x_rows = sc.p[3], *y_rows = sc.p[4];
  int64_t start = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t n = counts[e];
    if (n == 0) continue;  /* nothing to compute; its weight gradients are zeros */
    const int64_t tile = expert_tile(n, d, f, tile_bytes, l2);
    const int tiled = tile < n;  /* one tile: plain sgemm, which picks its own packing (packing a weight
                                  * fully for few rows cost 1.18x the forward at a quarter of Mixtral) */
    if (tiled) {
      pack_weight(w13[e], TRANS, tile, 2 * f, d, pk13);
      pack_weight(w2[e], TRANS, tile, d, f, pk2);
    }
    for (int64_t r0 = start; r0 < start + n; r0 += tile) {
      const int64_t t = start + n - r0 < tile ? start + n - r0 : tile;
      const float *xt = x + r0 * d;
      float *yt = out + r0 * d, *h = h_all + r0 * 2 * f;
      if (token_order) {
        rows_gather((const char *)x, tok + r0, (char *)x_rows, t, d * (int64_t)sizeof(float));
        xt = x_rows;
        yt = y_rows;
      }
      if (tiled) mm_packed(xt, pk13, h, t, 2 * f, d);
      else mm_nt(xt, w13[e], h, t, 2 * f, d);
      swiglu_fwd_f32(h, route_w ? route_w + r0 : NULL, act, 0, t, f);
      if (tiled) mm_packed(act, pk2, yt, t, d, f);
      else mm_nt(act, w2[e], yt, t, d, f);
      if (token_order) rows_scatter_add_f32(y_rows, tok + r0, sc.seen, out, t, d);
    }
    start += n;
  }
  if (token_order) rows_zero_unseen(sc.seen, (char *)out, s, d * (int64_t)sizeof(float));
  scratch_free(&sc);
  return 0;
}

/* dst[j] = src[i] for the kept rows i, in order (dst may be src: rows only move up) */
static int64_t compact_rows(const float *src, float *dst, const uint8_t *keep, int64_t n, int64_t width) {
  int64_t j = 0;
  for (int64_t i = 0; i < n; ++i)
    if (keep[i]) {
      if (dst + j * width != src + i * width) memmove(dst + j * width, src + i * width, (size_t)width * sizeof(float));
      ++j;
    }
  return j;
}

int experts_bwd_f32(const float *x, const int64_t *tok, int64_t token_order, const int64_t *counts, int64_t num_experts,
                    const float *const *w13, const float *const *w2, const float *route_w, int64_t d, int64_t f,
                    float *h_all, const float *grad_out, float *grad_x, int64_t s, float *d_route,
                    const uint8_t *keep, float *const *g13, float *const *g2) {
  if (!sgemm_ptr) return -1;
  int64_t m = 0;
  for (int64_t e = 0; e < num_experts; ++e) m = counts[e] > m ? counts[e] : m;
  scratch_t sc;
  /* act: the expert's d_act, then its activation (the down projection's weight-gradient input); dy, xr: its
   * rows of the incoming gradient and of x (gathered, or compacted copies under keep; xr first holds dx) */
  const size_t sizes[6] = {(size_t)(m * f), (size_t)(m * d), (size_t)(m * d), 0, 0, 0};
  if (scratch_alloc(&sc, sizes, token_order ? s : 0)) return -2;
  float *act = sc.p[0], *dy_rows = sc.p[1], *x_rows = sc.p[2];
  int64_t start = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t n = counts[e];
    float *d_h = h_all + start * 2 * f;
    const float *dy = token_order ? dy_rows : grad_out + start * d, *xr = token_order ? x_rows : x + start * d;
    if (n) {
      if (token_order) rows_gather((const char *)grad_out, tok + start, (char *)dy_rows, n, d * (int64_t)sizeof(float));
      mm_nn(dy, w2[e], act, n, f, d);  /* d_act */
      swiglu_bwd_inplace_f32(d_h, route_w ? route_w + start : NULL, act, d_route ? d_route + start : NULL,
                             0, n, f);  /* d_h over h, the activation over d_act */
      if (token_order) {
        mm_nn(d_h, w13[e], x_rows, n, d, 2 * f);
        rows_scatter_add_f32(x_rows, tok + start, sc.seen, grad_x, n, d);
      } else {
        mm_nn(d_h, w13[e], grad_x + start * d, n, d, 2 * f);
      }
    }
    if (token_order && n) rows_gather((const char *)x, tok + start, (char *)x_rows, n, d * (int64_t)sizeof(float));
    int64_t kept = n;
    if (keep && n) {  /* masked rows teach the expert nothing: the weight GEMMs over the kept rows only */
      const uint8_t *k = keep + start;
      compact_rows(d_h, d_h, k, n, 2 * f);
      compact_rows(act, act, k, n, f);
      compact_rows(dy, dy_rows, k, n, d);
      kept = compact_rows(xr, x_rows, k, n, d);
      dy = dy_rows;
      xr = x_rows;
    }
    if (g13[e]) mm_tn(d_h, xr, g13[e], 2 * f, d, kept);
    if (g2[e]) mm_tn(dy, act, g2[e], d, f, kept);
    start += n;
  }
  if (token_order) rows_zero_unseen(sc.seen, (char *)grad_x, s, d * (int64_t)sizeof(float));
  scratch_free(&sc);
  return 0;
}
