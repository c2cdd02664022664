// Row blocks of kRows rows are split across threads; inside a block, tiles of kCols
// columns accumulate B_blk @ A_tile in registers, then add W, mask and store.
#include "merge.h"

namespace sparselora {
namespace {

constexpr int64_t kRows = 4;
constexpr int64_t kCols = 64;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SPARSELORA_MULTIVERSION __attribute__((target_clones("arch=haswell", "default")))
#else
#define SPARSELORA_MULTIVERSION
#endif

// acc[i][j] = sum_p b[i][p] * A[p][c0 + j] for a kRows x kCols tile (fewer at the edges).
SPARSELORA_MULTIVERSION
void delta_tile(const float* A, int64_t cols, int64_t r, const float* b, int64_t n_rows, int64_t c0, int64_t n_cols,
                float* acc) {
  for (int64_t x = 0; x < kRows * kCols; ++x) acc[x] = 0.0f;
  for (int64_t p = 0; p < r; ++p) {
    const float* a = A + p * cols + c0;
    for (int64_t i = 0; i < n_rows; ++i) {
      const float bi = b[i * r + p];
      float* row = acc + i * kCols;
      for (int64_t j = 0; j < n_cols; ++j) row[j] += bi * a[j];
    }
  }
}

inline bool kept(const uint8_t* mask, int layout, int64_t i) {
  return layout == kBoolBytes ? mask[i] != 0 : ((mask[i >> 3] >> (i & 7)) & 1u) != 0;
}

template <int D>
void merge_block(const void* W, int64_t row0, int64_t n_rows, int64_t cols, const float* A, const float* B,
                 int64_t r, float scaling, const uint8_t* mask, int layout, void* dst) {
  alignas(64) float acc[kRows * kCols];
  std::vector<float> b(static_cast<size_t>(kRows * r));
  for (int64_t i = 0; i < n_rows; ++i)
    for (int64_t p = 0; p < r; ++p) b[i * r + p] = scaling * B[(row0 + i) * r + p];
  for (int64_t c0 = 0; c0 < cols; c0 += kCols) {
    const int64_t n_cols = std::min(kCols, cols - c0);
    delta_tile(A, cols, r, b.data(), n_rows, c0, n_cols, acc);
    for (int64_t i = 0; i < n_rows; ++i) {
      const int64_t base = (row0 + i) * cols + c0;
      for (int64_t j = 0; j < n_cols; ++j) {
        const int64_t at = base + j;
        const bool keep = mask == nullptr || kept(mask, layout, at);
        // a pruned slot is written as an exact 0, even when W or the delta is NaN
        const float base = W ? load_float<D>(W, at) : 0.0f;
        store_float<D>(dst, at, keep ? base + acc[i * kCols + j] : 0.0f);
      }
    }
  }
}

}  // namespace

void merge_lora(const void* W, int dtype, int64_t rows, int64_t cols, const float* A, const float* B, int64_t r,
                float scaling, const uint8_t* mask, int layout, void* dst, int threads) {
  check_dtype(dtype);
  const int64_t blocks = (rows + kRows - 1) / kRows;
  parallel_for(blocks, threads, [&](int64_t blk, int) {
    const int64_t row0 = blk * kRows, n_rows = std::min(kRows, rows - row0);
    dispatch_dtype(dtype, [&](auto tag) {
      merge_block<decltype(tag)::value>(W, row0, n_rows, cols, A, B, r, scaling, mask, layout, dst);
      return 0;
    });
  });
}

}  // namespace sparselora
