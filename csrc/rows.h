// Selection inside small groups of scores: N:M runs and per-row top-k.
//
// Both prune by the same rule as a stable ascending sort: the lowest scores go first and,
// among equal scores, the lowest index first. Scores are compared as order-preserving
// integer keys (a float's sign and magnitude read as a two's complement integer), so the
// comparison is exact for every dtype, float64 included, and -0 equals +0.
#pragma once

#include "common.h"

namespace sparselora {

// dtype code of float64; only these kernels read it.
constexpr int kFloat64 = 3;

// Keep-mask (one byte per score) of `numel` scores, numel a multiple of m: in every run of
// m consecutive scores the n highest stay. Returns the count of NaN/inf scores (the mask
// is then unspecified).
int64_t nm_mask(const void* data, int dtype, int64_t numel, int64_t n, int64_t m, bool absolute, uint8_t* keep,
                int threads);

struct RowSelect {
  int64_t nonfinite;  // NaN/inf scores among the weights `prior` keeps
  int64_t bad_row;    // >= 0: the first row where `prior` prunes more than k (mask unspecified)
  int64_t bad_count;  // how many `prior` prunes in that row
};

// Keep-mask (one byte per score) of a row-major rows x cols block pruning exactly k scores
// of every row. `prior` (bytes, may be null): weights it marks 0 are pruned first and count
// towards k.
RowSelect row_mask(const void* data, int dtype, int64_t rows, int64_t cols, int64_t k, bool absolute,
                   const uint8_t* prior, uint8_t* keep, int threads);

}  // namespace sparselora
