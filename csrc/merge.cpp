// Row blocks of kTileRows rows are split across threads; inside a block, tiles of
// kTileCols columns accumulate B_blk @ A_tile in registers, then add W, mask, store and
// (when asked) sum the squares the merge report needs.
#include "merge.h"

#include "merge_tiles.h"

namespace sparselora {
namespace {

constexpr int64_t kFlushTiles = 8;

void merge_block(const void* W, int dtype, int64_t row0, int64_t n_rows, int64_t cols, const float* A,
                 const float* B, int64_t r, float scaling, const uint8_t* mask, int layout, void* dst,
                 double* sums) {
  alignas(64) float acc[kTileRows * kTileCols];
  std::vector<float> b(static_cast<size_t>(kTileRows * r));
  for (int64_t i = 0; i < n_rows; ++i)
    for (int64_t p = 0; p < r; ++p) b[i * r + p] = scaling * B[(row0 + i) * r + p];
  const int size = dtype_size(dtype);
  double block_sums[3] = {0.0, 0.0, 0.0};  // one add per block into the worker's slot
  // the squares gather in fp32 lanes over kFlushTiles tiles (at most 128 values a lane), then fp64
  alignas(64) float lanes[3 * kSumLanes] = {};
  const auto flush = [&] {
    for (int k = 0; k < 3; ++k)
      for (int l = 0; l < kSumLanes; ++l) {
        block_sums[k] += lanes[k * kSumLanes + l];
        lanes[k * kSumLanes + l] = 0.0f;
      }
  };
  int64_t tiles = 0;
  for (int64_t c0 = 0; c0 < cols; c0 += kTileCols) {
    const int64_t n_cols = std::min(kTileCols, cols - c0);
    delta_tile(A, cols, r, b.data(), n_rows, c0, n_cols, acc);
    for (int64_t i = 0; i < n_rows; ++i) {
      const int64_t at = (row0 + i) * cols + c0;
      const void* w = W ? static_cast<const char*>(W) + at * size : nullptr;
      void* d = dst ? static_cast<char*>(dst) + at * size : nullptr;
      finish_row(dtype, w, acc + i * kTileCols, keep_bits(mask, layout, at, n_cols), n_cols, d,
                 sums ? lanes : nullptr);
    }
    if (sums && ++tiles % kFlushTiles == 0) flush();
  }
  if (sums) {
    flush();
    for (int k = 0; k < 3; ++k) sums[k] += block_sums[k];
  }
}

// A rows x cols matrix of `dtype` with element strides (row, col) as contiguous fp32: the data
// itself when it already is, else a copy in `buffer`. Adapters are small (r x cols): converting
// here, on the calling thread, keeps torch's worker threads (which spin after an op) off the cores
// the kernel is about to use.
const float* as_f32(const Matrix& m, int64_t rows, int64_t cols, std::vector<float>& buffer) {
  check_dtype(m.dtype);
  if (m.dtype == kFloat32 && m.col_stride == 1 && m.row_stride == cols) return static_cast<const float*>(m.data);
  buffer.resize(static_cast<size_t>(rows * cols));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t at = i * m.row_stride + j * m.col_stride;
      float v;
      if (m.dtype == kFloat32)
        v = static_cast<const float*>(m.data)[at];
      else {
        const uint16_t h = static_cast<const uint16_t*>(m.data)[at];
        v = bits_float(m.dtype == kBFloat16 ? bf16_to_float_bits(h) : half_to_float_bits(h));
      }
      buffer[i * cols + j] = v;
    }
  return buffer.data();
}

}  // namespace

void merge_lora(const void* W, int dtype, int64_t rows, int64_t cols, const Matrix& lora_A, const Matrix& lora_B,
                int64_t r, float scaling, const uint8_t* mask, int layout, void* dst, int threads, double* sums) {
  check_dtype(dtype);
  std::vector<float> a_buffer, b_buffer;
  const float* A = as_f32(lora_A, r, cols, a_buffer);
  const float* B = as_f32(lora_B, rows, r, b_buffer);
  const int64_t blocks = (rows + kTileRows - 1) / kTileRows;
  constexpr int kStride = 8;  // a 64-byte line per worker: workers never write a shared line
  std::vector<double> partial(static_cast<size_t>(kStride * clamp_threads(threads)), 0.0);
  parallel_for(blocks, threads, [&](int64_t blk, int worker) {
    const int64_t row0 = blk * kTileRows, n_rows = std::min(kTileRows, rows - row0);
    merge_block(W, dtype, row0, n_rows, cols, A, B, r, scaling, mask, layout, dst,
                sums ? partial.data() + kStride * worker : nullptr);
  });
  if (sums)
    for (size_t w = 0; w < partial.size(); w += kStride)
      for (int k = 0; k < 3; ++k) sums[k] += partial[w + k];
}

}  // namespace sparselora
