// N:M and per-row selection on order-preserving integer keys.
//
// N:M: the rank of each score in its run is counted by pairwise comparison (m <= 64; for
// the usual m the runs are transposed in blocks so each comparison vectorises across
// runs); longer runs use nth_element on (key, index) pairs.
// Rows: one pass finds the row's key range, a second bins every key into at most 2048
// buckets of that range and counts them; the bucket holding the k-th key is the only one
// left to resolve, exactly, over its few keys in index order. A row stays in cache, so
// only the first pass reads memory, and the next row is prefetched meanwhile.
//
// The kernels (rows_impl.h) are compiled twice, portable and AVX2, and picked at run
// time like the other SIMD kernels (set_simd(false) forces the portable copy). Both do
// integer work only, so they agree bit for bit.
#include "rows.h"
#include "simd.h"

#include <algorithm>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef __SSE2__
#include <emmintrin.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#endif
#ifdef __linux__
#include <sys/mman.h>
#endif

namespace sparselora {

namespace rows_portable {
#include "rows_impl.h"
}  // namespace rows_portable

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPARSELORA_ROWS_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2")
#define SPARSELORA_ROWS_AVX2_BODY 1
namespace rows_avx2 {
#include "rows_impl.h"
}  // namespace rows_avx2
#undef SPARSELORA_ROWS_AVX2_BODY
#pragma GCC pop_options
#endif

namespace {

bool use_avx2() {
#ifdef SPARSELORA_ROWS_AVX2
  return simd_enabled();
#else
  return false;
#endif
}

}  // namespace

int64_t nm_mask(const void* data, int dtype, int64_t numel, int64_t n, int64_t m, bool absolute, uint8_t* keep,
                int threads) {
  if (m < 1 || n < 0 || n > m || numel < 0 || numel % m) throw std::invalid_argument("need 0 <= n <= m and numel % m == 0");
  advise_huge_pages(keep, numel);
#ifdef SPARSELORA_ROWS_AVX2
  if (use_avx2()) return rows_avx2::nm_mask_impl(data, dtype, numel, n, m, absolute, keep, threads);
#endif
  return rows_portable::nm_mask_impl(data, dtype, numel, n, m, absolute, keep, threads);
}

RowSelect row_mask(const void* data, int dtype, int64_t rows, int64_t cols, int64_t k, bool absolute,
                   const uint8_t* prior, uint8_t* keep, int threads) {
  if (rows < 0 || cols < 0 || k < 0 || k > cols) throw std::invalid_argument("need 0 <= k <= cols");
  if (cols >= (int64_t(1) << 32)) throw std::invalid_argument("rows of 2^32 or more scores are not supported");
  advise_huge_pages(keep, rows * cols);
#ifdef SPARSELORA_ROWS_AVX2
  if (use_avx2()) return rows_avx2::row_mask_impl(data, dtype, rows, cols, k, absolute, prior, keep, threads);
#endif
  return rows_portable::row_mask_impl(data, dtype, rows, cols, k, absolute, prior, keep, threads);
}

}  // namespace sparselora
