#include "simd.h"

#include <atomic>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SPARSELORA_X86 1
#endif

namespace sparselora {
namespace {

int best_simd_level() {
#ifdef SPARSELORA_X86
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return 0;
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl");
  return avx512 ? 2 : 1;
#else
  return 0;
#endif
}

std::atomic<int> level{best_simd_level()};

// ---- portable versions ----

int64_t scan_bits_scalar(const uint32_t* bits, int64_t n, bool absolute, uint32_t lo, uint32_t hi, uint8_t* keep,
                         bool packed, int64_t* below, int64_t* inside, int64_t* nonfinite, uint32_t* found) {
  if (keep && packed) std::memset(keep, 0, static_cast<size_t>((n + 7) / 8));
  int64_t b = 0, in = 0, nf = 0, written = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = bits[i];
    const uint32_t key = score_key(u, absolute);
    nf += is_nonfinite_bits(u);
    b += key < lo;
    const bool is_in = key >= lo && key <= hi;
    in += is_in;
    if (keep && packed)
      keep[i >> 3] |= static_cast<uint8_t>((key > hi) << (i & 7));
    else if (keep)
      keep[i] = key > hi;
    if (found && is_in) found[written++] = static_cast<uint32_t>(i);
  }
  *below += b;
  *inside += in;
  *nonfinite += nf;
  return written;
}

// A key inside the bracket: counts it in its bucket and returns the bucket's mask byte.
inline uint8_t note_inside(uint32_t key, uint32_t lo, int shift, int64_t* hist, uint32_t* bucket_min,
                           uint32_t* bucket_max) {
  const uint32_t bucket = (key - lo) >> shift;
  ++hist[bucket];
  bucket_min[bucket] = std::min(bucket_min[bucket], key);
  bucket_max[bucket] = std::max(bucket_max[bucket], key);
  return static_cast<uint8_t>(2 + bucket);
}

void scan_bytes_scalar(const void* data, bool bf16, int64_t n, bool absolute, uint32_t lo, uint32_t hi, int shift,
                       uint8_t* out, int64_t* below, int64_t* above, int64_t* hist, uint32_t* bucket_min,
                       uint32_t* bucket_max, uint32_t* max_abs) {
  int64_t b = 0, a = 0;
  uint32_t top = *max_abs;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = bf16 ? bf16_to_float_bits(static_cast<const uint16_t*>(data)[i])
                            : static_cast<const uint32_t*>(data)[i];
    top = std::max(top, u & 0x7fffffffu);
    const uint32_t key = score_key(u, absolute);
    if (key < lo) {
      out[i] = 0;
      ++b;
    } else if (key > hi) {
      out[i] = 1;
      ++a;
    } else {
      out[i] = note_inside(key, lo, shift, hist, bucket_min, bucket_max);
    }
  }
  *below += b;
  *above += a;
  *max_abs = top;
}

// a byte holding the pivot bucket: listed, or settled by the tie quota
inline void settle_pivot(uint8_t* out, int64_t i, int64_t* quota, uint32_t* found, int64_t* written) {
  if (found) {
    found[(*written)++] = static_cast<uint32_t>(i);
  } else if (*quota > 0) {
    out[i] = 0;
    --*quota;
  } else {
    out[i] = 1;
  }
}

int64_t settle_bytes_scalar(uint8_t* out, int64_t n, uint8_t pivot, int64_t* quota, uint32_t* found,
                            int64_t* zeros) {
  int64_t written = 0, z = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t b = out[i];
    if (b >= 2) {
      if (b == pivot)
        settle_pivot(out, i, quota, found, &written);
      else
        out[i] = b > pivot;
    }
    z += out[i] == 0;
  }
  *zeros += z;
  return written;
}

#ifdef SPARSELORA_X86
#define AVX2 __attribute__((target("avx2,fma")))

AVX2 inline __m256i keys8(__m256i u, bool absolute) {
  if (absolute) return _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
  const __m256i top = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i flipped = _mm256_xor_si256(u, _mm256_or_si256(_mm256_srai_epi32(u, 31), top));
  const __m256i is_zero = _mm256_cmpeq_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_setzero_si256());
  return _mm256_blendv_epi8(flipped, top, is_zero);
}

// unsigned a > b on 32-bit lanes
AVX2 inline __m256i gt_u32(__m256i a, __m256i b) {
  const __m256i bias = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  return _mm256_cmpgt_epi32(_mm256_xor_si256(a, bias), _mm256_xor_si256(b, bias));
}

AVX2 int64_t scan_bits_avx2(const uint32_t* bits, int64_t n, bool absolute, uint32_t lo, uint32_t hi, uint8_t* keep,
                            bool packed, int64_t* below, int64_t* inside, int64_t* nonfinite, uint32_t* found) {
  int64_t written = 0;
  const __m256i vlo = _mm256_set1_epi32(static_cast<int>(lo)), vhi = _mm256_set1_epi32(static_cast<int>(hi));
  const __m256i exp_mask = _mm256_set1_epi32(0x7f800000);
  int64_t i = 0;
  while (i + 8 <= n) {
    // int32 lane counters, flushed every 2^20 vectors
    __m256i cb = _mm256_setzero_si256(), cin = _mm256_setzero_si256(), cnf = _mm256_setzero_si256();
    const int64_t stop = std::min(n - 7, i + (int64_t(8) << 20));
    for (; i < stop; i += 8) {
      const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits + i));
      const __m256i key = keys8(u, absolute);
      const __m256i lt_lo = gt_u32(vlo, key);
      const __m256i gt_hi = gt_u32(key, vhi);
      cb = _mm256_sub_epi32(cb, lt_lo);
      const __m256i in = _mm256_andnot_si256(_mm256_or_si256(lt_lo, gt_hi), _mm256_set1_epi32(-1));
      cin = _mm256_sub_epi32(cin, in);
      if (found) {
        for (int m = _mm256_movemask_ps(_mm256_castsi256_ps(in)); m; m &= m - 1)
          found[written++] = static_cast<uint32_t>(i + __builtin_ctz(m));
      }
      cnf = _mm256_sub_epi32(cnf, _mm256_cmpeq_epi32(_mm256_and_si256(u, exp_mask), exp_mask));
      if (keep && packed) {
        keep[i >> 3] = static_cast<uint8_t>(_mm256_movemask_ps(_mm256_castsi256_ps(gt_hi)));
      } else if (keep) {
        const __m256i ones = _mm256_srli_epi32(gt_hi, 31);
        const __m256i w16 = _mm256_packus_epi32(ones, ones);
        const __m256i w8 = _mm256_packus_epi16(w16, w16);
        const uint32_t low = static_cast<uint32_t>(_mm_cvtsi128_si32(_mm256_castsi256_si128(w8)));
        const uint32_t high = static_cast<uint32_t>(_mm_cvtsi128_si32(_mm256_extracti128_si256(w8, 1)));
        std::memcpy(keep + i, &low, 4);
        std::memcpy(keep + i + 4, &high, 4);
      }
    }
    alignas(32) int32_t lanes[3][8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[0]), cb);
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[1]), cin);
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[2]), cnf);
    for (int l = 0; l < 8; ++l) {
      *below += lanes[0][l];
      *inside += lanes[1][l];
      *nonfinite += lanes[2][l];
    }
  }
  uint8_t* keep_tail = keep ? (packed ? keep + (i >> 3) : keep + i) : nullptr;
  const int64_t tail = scan_bits_scalar(bits + i, n - i, absolute, lo, hi, keep_tail, packed, below, inside,
                                        nonfinite, found ? found + written : nullptr);
  if (found)
    for (int64_t t = 0; t < tail; ++t) found[written + t] += static_cast<uint32_t>(i);
  return written + tail;
}

// bytes ahead of the streaming loops' reads to prefetch (prefetching past the end is harmless)
constexpr int64_t kPrefetchAhead = 4096;

// 8 scores as fp32 bits, from fp32 or bf16
AVX2 inline __m256i load_bits8(const void* data, bool bf16, int64_t i) {
  if (bf16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(data) + i));
    return _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
  }
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint32_t*>(data) + i));
}

AVX2 void scan_bytes_avx2(const void* data, bool bf16, int64_t n, bool absolute, uint32_t lo, uint32_t hi, int shift,
                          uint8_t* out, int64_t* below, int64_t* above, int64_t* hist, uint32_t* bucket_min,
                          uint32_t* bucket_max, uint32_t* max_abs) {
  // Keys are compared as signed ints: score_key ^ 0x80000000 in general; for |x| the key
  // is below 2^31 already. The bracket moves the same way.
  const uint32_t flip = absolute ? 0u : 0x80000000u;
  const uint32_t hi_clamped = absolute ? std::min(hi, 0x7fffffffu) : hi;
  const __m256i vlo = _mm256_set1_epi32(static_cast<int>(lo ^ flip));
  const __m256i vhi = _mm256_set1_epi32(static_cast<int>(hi_clamped ^ flip));
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff), ones = _mm256_set1_epi32(-1), two = _mm256_set1_epi32(2);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256i cb = _mm256_setzero_si256(), ca = cb, top = cb;
  int64_t i = 0;
  // the hardware prefetcher alone leaves this loop waiting on memory (measured: a fifth
  // faster with software prefetch 4 KiB ahead)
  const char* ahead = static_cast<const char*>(data) + kPrefetchAhead;
  for (; i + 32 <= n; i += 32) {
    _mm_prefetch(ahead + i * (bf16 ? 2 : 4), _MM_HINT_T0);
    if (!bf16) _mm_prefetch(ahead + i * 4 + 64, _MM_HINT_T0);
    __m256i val[4];
    uint32_t outside = 0;
    for (int v = 0; v < 4; ++v) {
      const __m256i u = load_bits8(data, bf16, i + 8 * v);
      const __m256i mag = _mm256_and_si256(u, abs_mask);
      top = _mm256_max_epi32(top, mag);
      __m256i key = mag;
      if (!absolute) {  // sign flip for negatives, then -0 (now -1) onto +0
        key = _mm256_xor_si256(u, _mm256_srli_epi32(_mm256_srai_epi32(u, 31), 1));
        key = _mm256_sub_epi32(key, _mm256_cmpeq_epi32(key, ones));
      }
      const __m256i lt = _mm256_cmpgt_epi32(vlo, key), gt = _mm256_cmpgt_epi32(key, vhi);
      cb = _mm256_sub_epi32(cb, lt);
      ca = _mm256_sub_epi32(ca, gt);
      val[v] = _mm256_add_epi32(_mm256_add_epi32(two, _mm256_add_epi32(lt, lt)), gt);  // 0, 1 or 2
      outside |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_or_si256(lt, gt)))) << (8 * v);
    }
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(val[0], val[1]), _mm256_packs_epi32(val[2], val[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm256_permutevar8x32_epi32(bytes, order));
    // keys inside the bracket are rare (well under 1%): a branch per 32 scores is cheaper
    // than gathering them without one
    for (uint32_t inside = ~outside; inside; inside &= inside - 1) {
      const int64_t j = i + __builtin_ctz(inside);
      const uint32_t u = bf16 ? bf16_to_float_bits(static_cast<const uint16_t*>(data)[j])
                              : static_cast<const uint32_t*>(data)[j];
      out[j] = note_inside(score_key(u, absolute), lo, shift, hist, bucket_min, bucket_max);
    }
  }
  alignas(32) int32_t lanes[3][8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[0]), cb);
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[1]), ca);
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[2]), top);
  for (int l = 0; l < 8; ++l) {
    *below += lanes[0][l];
    *above += lanes[1][l];
    *max_abs = std::max(*max_abs, static_cast<uint32_t>(lanes[2][l]));
  }
  const void* rest = bf16 ? static_cast<const void*>(static_cast<const uint16_t*>(data) + i)
                          : static_cast<const void*>(static_cast<const uint32_t*>(data) + i);
  scan_bytes_scalar(rest, bf16, n - i, absolute, lo, hi, shift, out + i, below, above, hist, bucket_min, bucket_max,
                    max_abs);
}

AVX2 inline int64_t zero_bytes(__m256i v) {
  return __builtin_popcount(static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(v, _mm256_setzero_si256()))));
}

AVX2 int64_t settle_bytes_avx2(uint8_t* out, int64_t n, uint8_t pivot, int64_t* quota, uint32_t* found,
                               int64_t* zeros) {
  const __m256i one = _mm256_set1_epi8(1), two = _mm256_set1_epi8(2), p = _mm256_set1_epi8(static_cast<char>(pivot));
  const int64_t quota_before = *quota;
  int64_t written = 0, i = 0, z = 0;
  for (; i + 32 <= n; i += 32) {
    if ((i & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(out + i) + kPrefetchAhead, _MM_HINT_T0);
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(out + i));
    const __m256i undecided = _mm256_cmpeq_epi8(_mm256_max_epu8(v, two), v);  // v >= 2
    if (_mm256_testz_si256(undecided, undecided)) {
      z += zero_bytes(v);
      continue;
    }
    const __m256i at_most_pivot = _mm256_cmpeq_epi8(_mm256_max_epu8(v, p), p);
    const __m256i is_pivot = _mm256_cmpeq_epi8(v, p);
    // above the pivot: 1; below: 0; the pivot itself stays for the exact resolve
    const __m256i settled = _mm256_or_si256(_mm256_andnot_si256(at_most_pivot, one), _mm256_and_si256(is_pivot, v));
    const __m256i result = _mm256_blendv_epi8(v, settled, undecided);
    z += zero_bytes(result);  // pivot bytes are still non-zero here; the quota's zeros are added below
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), result);
    for (uint32_t m = static_cast<uint32_t>(_mm256_movemask_epi8(is_pivot)); m; m &= m - 1)
      settle_pivot(out, i + __builtin_ctz(m), quota, found, &written);
  }
  *zeros += z + (quota_before - *quota);
  const int64_t tail = settle_bytes_scalar(out + i, n - i, pivot, quota, found ? found + written : nullptr, zeros);
  if (found)
    for (int64_t t = 0; t < tail; ++t) found[written + t] += static_cast<uint32_t>(i);
  return written + tail;
}

#endif

}  // namespace

bool simd_enabled() { return level.load() > 0; }

void set_simd(bool on) { level = on ? best_simd_level() : 0; }

int simd_level() { return level.load(std::memory_order_relaxed); }

int set_simd_level(int wanted) {
  level = std::max(0, std::min(wanted, best_simd_level()));
  return level.load();
}

#ifdef SPARSELORA_X86
#define SPARSELORA_PICK(name, ...) (level.load(std::memory_order_relaxed) > 0 ? name##_avx2(__VA_ARGS__) : name##_scalar(__VA_ARGS__))
#else
#define SPARSELORA_PICK(name, ...) name##_scalar(__VA_ARGS__)
#endif

int64_t scan_bits(const uint32_t* bits, int64_t n, bool absolute, uint32_t lo, uint32_t hi, uint8_t* keep,
                  bool packed, int64_t* below, int64_t* inside, int64_t* nonfinite, uint32_t* found) {
  return SPARSELORA_PICK(scan_bits, bits, n, absolute, lo, hi, keep, packed, below, inside, nonfinite, found);
}

void scan_bytes(const void* data, bool bf16, int64_t n, bool absolute, uint32_t lo, uint32_t hi, int shift,
                uint8_t* out, int64_t* below, int64_t* above, int64_t* hist, uint32_t* bucket_min, uint32_t* bucket_max,
                uint32_t* max_abs) {
  SPARSELORA_PICK(scan_bytes, data, bf16, n, absolute, lo, hi, shift, out, below, above, hist, bucket_min, bucket_max,
                  max_abs);
}

int64_t settle_bytes(uint8_t* out, int64_t n, uint8_t pivot, int64_t* quota, uint32_t* found, int64_t* zeros) {
  return SPARSELORA_PICK(settle_bytes, out, n, pivot, quota, found, zeros);
}

}  // namespace sparselora
