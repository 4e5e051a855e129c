/* bf16 <-> fp32 for the CPU kernels (included by swiglu.c and rows.c). */
#ifndef DESMOE_BF16_H
#define DESMOE_BF16_H
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t v) {
  uint32_t bits = (uint32_t)v << 16;
  float out;
  memcpy(&out, &bits, 4);
  return out;
}

static inline uint16_t f32_to_bf16(float v) { /* round to nearest even; NaN stays a NaN, as torch's */
  uint32_t bits;
  memcpy(&bits, &v, 4);
  if ((bits & 0x7F800000u) == 0x7F800000u && (bits & 0x007FFFFFu)) return 0x7FC0u;
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return (uint16_t)(bits >> 16);
}
#endif
