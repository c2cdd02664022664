// AVX2/FMA versions of the innermost loops, chosen at run time when the CPU has them.
// Each has a portable scalar twin that gives bit-identical results; set_simd(false)
// forces the scalar ones (tests run both).
#pragma once

#include "common.h"

namespace sparselora {

bool simd_enabled();
void set_simd(bool on);

// Scan of fp32 bit patterns against a bracket [lo, hi]: adds to below (key < lo),
// inside (lo <= key <= hi) and nonfinite; writes keep = key > hi when keep != null, as bytes
// or, with `packed`, as bits (LSB first; n must be a multiple of 8 except at a tensor's end),
// and the offsets of in-bracket elements to `found` (room for n) when found != null.
// Returns how many offsets it wrote.
int64_t scan_bits(const uint32_t* bits, int64_t n, bool absolute, uint32_t lo, uint32_t hi, uint8_t* keep,
                  bool packed, int64_t* below, int64_t* inside, int64_t* nonfinite, uint32_t* found);

// acc[i*64 + j] = sum_p b[i*r + p] * A[p*cols + c0 + j] for i < rows (<= 4), j < n_cols (<= 64).
void delta_tile(const float* A, int64_t cols, int64_t r, const float* b, int64_t rows, int64_t c0, int64_t n_cols,
                float* acc);

// dst[j] = keep[j] ? (w ? w[j] : 0) + acc[j] : 0 for fp32 / bf16 (as uint16) rows.
void finish_f32(const float* w, const float* acc, const uint8_t* keep, int64_t n, float* dst);
void finish_bf16(const uint16_t* w, const float* acc, const uint8_t* keep, int64_t n, uint16_t* dst);

}  // namespace sparselora
