// AVX2/FMA (and, for the merge, AVX-512) versions of the innermost loops, chosen at run time when the CPU has them.
// Each has a portable scalar twin that gives bit-identical results; set_simd(false)
// forces the scalar ones (tests run both).
#pragma once

#include "common.h"

namespace sparselora {

bool simd_enabled();
void set_simd(bool on);

// 0: portable, 1: AVX2/FMA, 2: AVX-512 (F, BW, VL) where the merge has kernels for it.
// set_simd_level clamps to what the CPU has and returns the level now in use.
int simd_level();
int set_simd_level(int wanted);

// Scan of fp32 bit patterns against a bracket [lo, hi]: adds to below (key < lo),
// inside (lo <= key <= hi) and nonfinite; writes keep = key > hi when keep != null, as bytes
// or, with `packed`, as bits (LSB first; n must be a multiple of 8 except at a tensor's end),
// and the offsets of in-bracket elements to `found` (room for n) when found != null.
// Returns how many offsets it wrote.
int64_t scan_bits(const uint32_t* bits, int64_t n, bool absolute, uint32_t lo, uint32_t hi, uint8_t* keep,
                  bool packed, int64_t* below, int64_t* inside, int64_t* nonfinite, uint32_t* found);

// The bool-mask select pass over n scores (fp32 bits, or bf16 when `bf16`): out[i] = 0 when
// key < lo, 1 when key > hi, and 2 + ((key - lo) >> shift) (at most 254 by the caller's
// choice of shift) inside [lo, hi], counted in hist[out[i] - 2]. Adds to below / above and
// raises *max_abs to the largest |bits| seen (>= 0x7f800000 means a non-finite score).
// bucket_min / bucket_max (253 each) track the smallest and largest key of each bucket.
void scan_bytes(const void* data, bool bf16, int64_t n, bool absolute, uint32_t lo, uint32_t hi, int shift,
                uint8_t* out, int64_t* below, int64_t* above, int64_t* hist, uint32_t* bucket_min,
                uint32_t* bucket_max, uint32_t* max_abs);

// Settles the bytes scan_bytes left undecided: a byte b >= 2 becomes 0 when b < pivot and 1
// when b > pivot. Bytes equal to pivot: with `found`, they stay and their offsets go there
// (room for n); without, the first *quota of them become 0 (counted down) and the rest 1.
// Adds to *zeros how many of the n bytes are 0 when it returns (listed pivot bytes are not).
// Returns how many offsets it wrote.
int64_t settle_bytes(uint8_t* out, int64_t n, uint8_t pivot, int64_t* quota, uint32_t* found, int64_t* zeros);

}  // namespace sparselora
