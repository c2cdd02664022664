#include "masks.h"

namespace sparselora {
namespace {
constexpr int64_t kBlockBytes = int64_t(1) << 14;  // packed bytes per parallel work item
}

void pack_bits(const uint8_t* bools, int64_t n, uint8_t* packed, int threads) {
  const int64_t full = n / 8;
  parallel_for(full, threads, [&](int64_t j, int) {
    uint8_t byte = 0;
    for (int b = 0; b < 8; ++b) byte |= static_cast<uint8_t>((bools[8 * j + b] != 0) << b);
    packed[j] = byte;
  });
  if (n & 7) {
    uint8_t byte = 0;
    for (int64_t i = full * 8; i < n; ++i) byte |= static_cast<uint8_t>((bools[i] != 0) << (i & 7));
    packed[full] = byte;
  }
}

void unpack_bits(const uint8_t* packed, int64_t n, uint8_t* bools, int threads) {
  parallel_for(n, threads, [&](int64_t i, int) { bools[i] = (packed[i >> 3] >> (i & 7)) & 1u; });
}

void apply_mask(void* weights, int dtype, int64_t n, const uint8_t* mask, int layout, int threads) {
  check_dtype(dtype);
  const int64_t blocks = (n + kBlockBytes * 8 - 1) / (kBlockBytes * 8);
  const int size = dtype_size(dtype);
  parallel_for(blocks, threads, [&](int64_t b, int) {
    const int64_t begin = b * kBlockBytes * 8, end = std::min(n, begin + kBlockBytes * 8);
    if (size == 4) {
      uint32_t* w = static_cast<uint32_t*>(weights);
      if (layout == kBoolBytes)
        for (int64_t i = begin; i < end; ++i) w[i] = mask[i] ? w[i] : 0u;
      else
        for (int64_t i = begin; i < end; ++i) w[i] = ((mask[i >> 3] >> (i & 7)) & 1u) ? w[i] : 0u;
    } else {
      uint16_t* w = static_cast<uint16_t*>(weights);
      if (layout == kBoolBytes)
        for (int64_t i = begin; i < end; ++i) w[i] = mask[i] ? w[i] : uint16_t(0);
      else
        for (int64_t i = begin; i < end; ++i) w[i] = ((mask[i >> 3] >> (i & 7)) & 1u) ? w[i] : uint16_t(0);
    }
  });
}

}  // namespace sparselora
