// The merge's innermost loops, one tile at a time, in portable, AVX2/FMA and AVX-512 forms
// (chosen by simd_level()). Every form gives bit-identical stored values: the delta is one
// fma per rank in rank order, and the add, the rounding and the mask are exact steps.
#pragma once

#include "common.h"

namespace sparselora {

constexpr int64_t kTileRows = 4;
constexpr int64_t kTileCols = 64;
constexpr int kSumLanes = 16;  // finish_row's sums: 3 groups of 16 lanes, summed across by the caller

// acc[i*64 + j] = sum_p b[i*r + p] * A[p*cols + c0 + j] for i < rows (<= 4), j < n (<= 64).
void delta_tile(const float* A, int64_t cols, int64_t r, const float* b, int64_t rows, int64_t c0, int64_t n,
                float* acc);

// Bit j set when element at + j (j < n <= 64) is kept; mask null: every element is kept.
uint64_t keep_bits(const uint8_t* mask, int layout, int64_t at, int64_t n);

// One tile row: v = (w ? w[j] : 0) + acc[j]; dst[j] = v where keep bit j is set, else an exact 0
// (even for a NaN v). dst null: nothing is stored. sums non-null (3 * kSumLanes floats): adds
// the squares of acc over pruned slots, of acc, and of v into the lanes of sums[0..15],
// sums[16..31] and sums[32..47] (any lane; the caller adds the lanes up).
void finish_row(int dtype, const void* w, const float* acc, uint64_t keep, int64_t n, void* dst, float* sums);

}  // namespace sparselora
