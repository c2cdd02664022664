// Shared helpers of the sparselora kernels: dtype codes, exact fp16/bf16 <-> fp32
// conversions, order-preserving 32-bit keys, and chunked parallel loops.
//
// Kernels see raw buffers only (pointer, element count, dtype code): no libtorch.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include <thread>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace sparselora {

// Asks for transparent huge pages on a fresh output buffer: first writes then fault 2 MiB
// at a time instead of 4 KiB (a bool mask of 100M weights is 25,000 small faults).
inline void advise_huge_pages(void* p, int64_t bytes) {
#ifdef __linux__
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // a hint: errors ignored
#else
  (void)p;
  (void)bytes;
#endif
}

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Mask layouts: one byte per element (torch.bool), or 8 elements per byte, element 8*j+i
// in bit i of byte j (least significant bit first, numpy's bitorder="little").
enum MaskLayout : int { kBoolBytes = 0, kPackedBits = 1 };

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// fp16 bit pattern -> fp32 bit pattern (exact; every half is a float).
inline uint32_t half_to_float_bits(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    if (mant == 0) return sign;
    return sign | float_bits(static_cast<float>(mant) * 5.9604644775390625e-8f);  // mant * 2^-24
  }
  if (exp == 31) return sign | 0x7f800000u | (mant << 13);
  return sign | ((exp + 112u) << 23) | (mant << 13);
}

// fp32 -> fp16 with round-to-nearest-even (what torch does).
inline uint16_t float_to_half(float f) {
  uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u >= 0x7f800000u) return sign | 0x7c00u | (u > 0x7f800000u ? 0x200u : 0u);
  if (u >= 0x477ff000u) return sign | 0x7c00u;  // rounds past 65504: inf
  if (u < 0x38800000u) {                         // below 2^-14: subnormal half
    const float scaled = bits_float(u) * 16777216.0f;  // exact: times 2^24
    return sign | static_cast<uint16_t>(std::nearbyint(scaled));
  }
  const uint32_t rounded = u + 0xfffu + ((u >> 13) & 1u);
  return sign | static_cast<uint16_t>((rounded >> 13) - (112u << 10));
}

inline uint32_t bf16_to_float_bits(uint16_t b) { return static_cast<uint32_t>(b) << 16; }

// fp32 -> bf16 with round-to-nearest-even, NaN kept quiet (what torch does).
inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

template <int D>
inline uint32_t load_bits(const void* data, int64_t i) {
  if constexpr (D == kFloat32) {
    return static_cast<const uint32_t*>(data)[i];
  } else if constexpr (D == kFloat16) {
    return half_to_float_bits(static_cast<const uint16_t*>(data)[i]);
  } else {
    return bf16_to_float_bits(static_cast<const uint16_t*>(data)[i]);
  }
}

inline bool is_nonfinite_bits(uint32_t u) { return (u & 0x7f800000u) == 0x7f800000u; }

// Order-preserving key: a < b as floats  <=>  key(a) < key(b) as unsigned.
// absolute: the key of |x| (its bits without the sign). Otherwise the usual sign flip,
// with -0 mapped onto +0 so that equal floats get equal keys.
inline uint32_t score_key(uint32_t u, bool absolute) {
  if (absolute) return u & 0x7fffffffu;
  if ((u & 0x7fffffffu) == 0) return 0x80000000u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

inline float key_to_float(uint32_t key, bool absolute) {
  if (absolute) return bits_float(key);
  return bits_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// Converts n elements of `dtype` at data[begin...] to fp32 bit patterns.
inline void to_float_bits(const void* data, int dtype, int64_t begin, int64_t n, uint32_t* bits) {
  if (dtype == kFloat32) {
    std::memcpy(bits, static_cast<const uint32_t*>(data) + begin, static_cast<size_t>(n) * 4);
  } else if (dtype == kBFloat16) {
    const uint16_t* src = static_cast<const uint16_t*>(data) + begin;
    for (int64_t i = 0; i < n; ++i) bits[i] = bf16_to_float_bits(src[i]);
  } else {
    const uint16_t* src = static_cast<const uint16_t*>(data) + begin;
    for (int64_t i = 0; i < n; ++i) bits[i] = half_to_float_bits(src[i]);
  }
}

inline int dtype_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

inline void check_dtype(int dtype) {
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16)
    throw std::invalid_argument("dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16)");
}

template <int D>
using DTypeTag = std::integral_constant<int, D>;

// Calls f(DTypeTag<D>{}) with D the compile-time dtype; f reads it as decltype(tag)::value.
template <typename F>
inline auto dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: return f(DTypeTag<kFloat32>{});
    case kFloat16: return f(DTypeTag<kFloat16>{});
    case kBFloat16: return f(DTypeTag<kBFloat16>{});
  }
  throw std::invalid_argument("dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16)");
}

inline int clamp_threads(int threads) { return threads < 1 ? 1 : threads; }

// Runs body(i, worker) for every i in [0, n), split into `threads` contiguous ranges
// (worker 0 is the calling thread), i ascending within each. Callers rely on this static
// split: two calls with the same n and threads give worker w the same range, so counts
// made per worker in one pass can steer tie quotas in flat order in the next. std::thread rather than OpenMP: a process forked
// after a kernel ran (multiprocessing's default on Linux) must still be able to run one.
template <typename F>
void parallel_for(int64_t n, int threads, F&& body) {
  const int workers = static_cast<int>(std::min<int64_t>(clamp_threads(threads), std::max<int64_t>(n, 1)));
  auto run = [&](int w) {
    const int64_t begin = n * w / workers, end = n * (w + 1) / workers;
    for (int64_t i = begin; i < end; ++i) body(i, w);
  };
  if (workers == 1) {
    run(0);
    return;
  }
  // an exception in any worker is rethrown here after every thread has joined (a joinable
  // std::thread destroyed during unwinding would abort the process)
  std::vector<std::exception_ptr> errors(static_cast<size_t>(workers));
  auto guarded = [&](int w) {
    try {
      run(w);
    } catch (...) {
      errors[static_cast<size_t>(w)] = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(workers - 1));
  try {
    for (int w = 1; w < workers; ++w) pool.emplace_back(guarded, w);
  } catch (...) {
    for (auto& t : pool) t.join();
    throw;
  }
  guarded(0);
  for (auto& t : pool) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

// A tensor as the kernels see it.
struct Buffer {
  const void* data;
  int64_t numel;
  int dtype;
};

// A contiguous range of one tensor; chunk sizes are multiples of 8 so that packed
// masks of different chunks never share a byte.
struct Chunk {
  int tensor;
  int64_t begin;
  int64_t end;
};

inline std::vector<Chunk> make_chunks(const std::vector<Buffer>& tensors, int64_t chunk_size) {
  std::vector<Chunk> chunks;
  for (int t = 0; t < static_cast<int>(tensors.size()); ++t)
    for (int64_t b = 0; b < tensors[t].numel; b += chunk_size)
      chunks.push_back({t, b, std::min(b + chunk_size, tensors[t].numel)});
  return chunks;
}

}  // namespace sparselora
