// Row blocks of kRows rows are split across threads; inside a block, tiles of kCols
// columns accumulate B_blk @ A_tile in registers, then add W, mask and store.
#include "merge.h"
#include "masks.h"
#include "simd.h"

namespace sparselora {
namespace {

constexpr int64_t kRows = 4;
constexpr int64_t kCols = 64;

void finish_f16(const uint16_t* w, const float* acc, const uint8_t* keep, int64_t n, uint16_t* dst) {
  for (int64_t j = 0; j < n; ++j) {
    const float v = (w ? bits_float(half_to_float_bits(w[j])) : 0.0f) + acc[j];
    dst[j] = keep[j] ? float_to_half(v) : uint16_t(0);
  }
}

void merge_block(const void* W, int dtype, int64_t row0, int64_t n_rows, int64_t cols, const float* A,
                 const float* B, int64_t r, float scaling, const uint8_t* mask, int layout, void* dst) {
  alignas(64) float acc[kRows * kCols];
  uint8_t keep[kCols];
  std::vector<float> b(static_cast<size_t>(kRows * r));
  for (int64_t i = 0; i < n_rows; ++i)
    for (int64_t p = 0; p < r; ++p) b[i * r + p] = scaling * B[(row0 + i) * r + p];
  const int size = dtype_size(dtype);
  for (int64_t c0 = 0; c0 < cols; c0 += kCols) {
    const int64_t n_cols = std::min(kCols, cols - c0);
    delta_tile(A, cols, r, b.data(), n_rows, c0, n_cols, acc);
    for (int64_t i = 0; i < n_rows; ++i) {
      const int64_t at = (row0 + i) * cols + c0;
      const uint8_t* k = keep;
      if (mask == nullptr) {
        std::memset(keep, 1, sizeof(keep));
      } else if (layout == kBoolBytes) {
        k = mask + at;
      } else {
        expand_bits(mask, at, n_cols, keep);
      }
      const char* w = W ? static_cast<const char*>(W) + at * size : nullptr;
      char* d = static_cast<char*>(dst) + at * size;
      const float* a = acc + i * kCols;
      if (dtype == kFloat32)
        finish_f32(reinterpret_cast<const float*>(w), a, k, n_cols, reinterpret_cast<float*>(d));
      else if (dtype == kBFloat16)
        finish_bf16(reinterpret_cast<const uint16_t*>(w), a, k, n_cols, reinterpret_cast<uint16_t*>(d));
      else
        finish_f16(reinterpret_cast<const uint16_t*>(w), a, k, n_cols, reinterpret_cast<uint16_t*>(d));
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
    merge_block(W, dtype, row0, n_rows, cols, A, B, r, scaling, mask, layout, dst);
  });
}

}  // namespace sparselora
