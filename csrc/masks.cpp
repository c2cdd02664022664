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

namespace {

// Lane masks for one packed byte: entry [byte][i] is all ones when bit i of byte is set.
// ANDing 8 weights with a row zeroes the pruned ones (NaN and inf included) in one
// vector operation instead of 8 shifts and selects.
template <typename T>
struct LaneMasks {
  T rows[256][8];
  LaneMasks() {
    for (int byte = 0; byte < 256; ++byte)
      for (int i = 0; i < 8; ++i) rows[byte][i] = ((byte >> i) & 1) ? static_cast<T>(~T(0)) : T(0);
  }
};

const LaneMasks<uint32_t>& lanes32() {
  static const LaneMasks<uint32_t> table;
  return table;
}
const LaneMasks<uint16_t>& lanes16() {
  static const LaneMasks<uint16_t> table;
  return table;
}
template <typename T>
void apply_packed(T* w, int64_t begin, int64_t end, const uint8_t* mask, const LaneMasks<T>& table) {
  // begin is a multiple of 8 (blocks are whole bytes); the last partial byte goes bit by bit
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    const T* lane = table.rows[mask[i >> 3]];
    for (int b = 0; b < 8; ++b) w[i + b] &= lane[b];
  }
  for (; i < end; ++i) w[i] = ((mask[i >> 3] >> (i & 7)) & 1u) ? w[i] : T(0);
}

}  // namespace

void apply_mask(void* weights, int dtype, int64_t n, const uint8_t* mask, int layout, int threads) {
  check_dtype(dtype);
  const int64_t blocks = (n + kBlockBytes * 8 - 1) / (kBlockBytes * 8);
  const int size = dtype_size(dtype);
  if (layout != kBoolBytes) {  // build the tables before the workers share them
    if (size == 4) lanes32(); else lanes16();
  }
  parallel_for(blocks, threads, [&](int64_t b, int) {
    const int64_t begin = b * kBlockBytes * 8, end = std::min(n, begin + kBlockBytes * 8);
    if (size == 4) {
      uint32_t* w = static_cast<uint32_t*>(weights);
      if (layout == kBoolBytes)
        for (int64_t i = begin; i < end; ++i) w[i] = mask[i] ? w[i] : 0u;
      else
        apply_packed(w, begin, end, mask, lanes32());
    } else {
      uint16_t* w = static_cast<uint16_t*>(weights);
      if (layout == kBoolBytes)
        for (int64_t i = begin; i < end; ++i) w[i] = mask[i] ? w[i] : uint16_t(0);
      else
        apply_packed(w, begin, end, mask, lanes16());
    }
  });
}

}  // namespace sparselora
