#include "merge_tiles.h"

#include "simd.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SPARSELORA_X86 1
#endif

namespace sparselora {
namespace {

// ---- portable versions ----

void delta_tile_scalar(const float* A, int64_t cols, int64_t r, const float* b, int64_t rows, int64_t c0, int64_t n,
                       float* acc) {
  for (int64_t x = 0; x < kTileRows * kTileCols; ++x) acc[x] = 0.0f;
  for (int64_t p = 0; p < r; ++p)
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < n; ++j)
        acc[i * kTileCols + j] = std::fma(b[i * r + p], A[p * cols + c0 + j], acc[i * kTileCols + j]);
}

uint64_t keep_bits_scalar(const uint8_t* mask, int layout, int64_t at, int64_t n) {
  uint64_t bits = 0;
  if (layout == kBoolBytes) {
    for (int64_t j = 0; j < n; ++j) bits |= uint64_t(mask[at + j] != 0) << j;
  } else if ((at & 7) == 0) {  // whole bytes: element 8k+i is bit i of byte k, as in the word
    const uint8_t* p = mask + (at >> 3);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    if (n == 64) {
      std::memcpy(&bits, p, 8);  // one load: the bytes in memory order are the word's
      return bits;
    }
#endif
    for (int64_t k = 0; k < (n + 7) / 8; ++k) bits |= uint64_t(p[k]) << (8 * k);
  } else {
    for (int64_t j = 0; j < n; ++j) bits |= uint64_t((mask[(at + j) >> 3] >> ((at + j) & 7)) & 1u) << j;
  }
  return n == 64 ? bits : bits & ((uint64_t(1) << n) - 1);
}

inline float load_value(int dtype, const void* w, int64_t j) {
  if (w == nullptr) return 0.0f;
  if (dtype == kFloat32) return static_cast<const float*>(w)[j];
  const uint16_t h = static_cast<const uint16_t*>(w)[j];
  return bits_float(dtype == kBFloat16 ? bf16_to_float_bits(h) : half_to_float_bits(h));
}

inline void store_value(int dtype, void* dst, int64_t j, float v) {
  if (dtype == kFloat32)
    static_cast<float*>(dst)[j] = v;
  else
    static_cast<uint16_t*>(dst)[j] = dtype == kBFloat16 ? float_to_bf16(v) : float_to_half(v);
}

void finish_row_scalar(int dtype, const void* w, const float* acc, uint64_t keep, int64_t n, void* dst, float* sums) {
  float dropped = 0.0f, update = 0.0f, merged = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    const float d = acc[j], v = load_value(dtype, w, j) + d;
    const bool kept = (keep >> j) & 1u;
    if (dst) store_value(dtype, dst, j, kept ? v : 0.0f);  // a pruned slot is an exact 0, even when v is NaN
    update += d * d;
    merged += v * v;
    if (!kept) dropped += d * d;
  }
  if (sums) {
    sums[0] += dropped;
    sums[kSumLanes] += update;
    sums[2 * kSumLanes] += merged;
  }
}

#ifdef SPARSELORA_X86
#define AVX2 __attribute__((target("avx2,fma")))
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))

// ---- AVX2/FMA ----

AVX2 void delta_tile_avx2(const float* A, int64_t cols, int64_t r, const float* b, int64_t rows, int64_t c0, int64_t n,
                          float* acc) {
  if (rows != kTileRows || n != kTileCols) {
    delta_tile_scalar(A, cols, r, b, rows, c0, n, acc);
    return;
  }
  for (int64_t s = 0; s < kTileCols; s += 16) {  // 4 rows x 16 columns: 8 accumulators in registers
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
    for (int64_t p = 0; p < r; ++p) {
      const float* row = A + p * cols + c0 + s;
      const __m256 x0 = _mm256_loadu_ps(row), x1 = _mm256_loadu_ps(row + 8);
      __m256 bi = _mm256_broadcast_ss(b + p);
      a00 = _mm256_fmadd_ps(bi, x0, a00);
      a01 = _mm256_fmadd_ps(bi, x1, a01);
      bi = _mm256_broadcast_ss(b + r + p);
      a10 = _mm256_fmadd_ps(bi, x0, a10);
      a11 = _mm256_fmadd_ps(bi, x1, a11);
      bi = _mm256_broadcast_ss(b + 2 * r + p);
      a20 = _mm256_fmadd_ps(bi, x0, a20);
      a21 = _mm256_fmadd_ps(bi, x1, a21);
      bi = _mm256_broadcast_ss(b + 3 * r + p);
      a30 = _mm256_fmadd_ps(bi, x0, a30);
      a31 = _mm256_fmadd_ps(bi, x1, a31);
    }
    _mm256_storeu_ps(acc + s, a00);
    _mm256_storeu_ps(acc + s + 8, a01);
    _mm256_storeu_ps(acc + 64 + s, a10);
    _mm256_storeu_ps(acc + 64 + s + 8, a11);
    _mm256_storeu_ps(acc + 128 + s, a20);
    _mm256_storeu_ps(acc + 128 + s + 8, a21);
    _mm256_storeu_ps(acc + 192 + s, a30);
    _mm256_storeu_ps(acc + 192 + s + 8, a31);
  }
}

// bit k set where byte k of 32 bool bytes is 0 (pruned)
AVX2 inline uint64_t zero_bytes32(const uint8_t* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(v, _mm256_setzero_si256())));
}

AVX2 uint64_t keep_bits_avx2(const uint8_t* mask, int layout, int64_t at, int64_t n) {
  if (layout != kBoolBytes || n != 64) return keep_bits_scalar(mask, layout, at, n);
  return ~(zero_bytes32(mask + at) | (zero_bytes32(mask + at + 32) << 32));
}

// all-ones lanes where bit i of `byte` is set
AVX2 inline __m256 lanes_of(uint32_t byte) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(byte)), bit), bit));
}

// fp32 -> bf16 bits in the low half of each lane: round to nearest even, NaN kept quiet
AVX2 inline __m256i bf16_round8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  const __m256i is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                            _mm256_set1_epi32(0x7f800000));
  return _mm256_blendv_epi8(rounded, quiet, is_nan);
}

AVX2 void finish_row_avx2(int dtype, const void* w, const float* acc, uint64_t keep, int64_t n, void* dst,
                          float* sums) {
  if (dtype == kFloat16) {
    finish_row_scalar(dtype, w, acc, keep, n, dst, sums);
    return;
  }
  const bool bf16 = dtype == kBFloat16;
  __m256 dropped = _mm256_setzero_ps(), update = dropped, merged = dropped;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 d = _mm256_loadu_ps(acc + j);
    __m256 base = _mm256_setzero_ps();
    if (w && bf16) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + j));
      base = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else if (w) {
      base = _mm256_loadu_ps(static_cast<const float*>(w) + j);
    }
    const __m256 v = _mm256_add_ps(base, d);
    const __m256 kept = lanes_of(static_cast<uint32_t>(keep >> j) & 0xffu);
    if (sums) {
      update = _mm256_fmadd_ps(d, d, update);
      merged = _mm256_fmadd_ps(v, v, merged);
      const __m256 lost = _mm256_andnot_ps(kept, d);
      dropped = _mm256_fmadd_ps(lost, lost, dropped);
    }
    if (dst && bf16) {
      const __m256i out = _mm256_and_si256(bf16_round8(v), _mm256_castps_si256(kept));
      const __m256i narrow = _mm256_permute4x64_epi64(_mm256_packus_epi32(out, out), 0x08);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(dst) + j), _mm256_castsi256_si128(narrow));
    } else if (dst) {
      _mm256_storeu_ps(static_cast<float*>(dst) + j, _mm256_and_ps(v, kept));
    }
  }
  if (sums) {  // lane by lane: the horizontal sum is the caller's, once per tile
    const __m256* lanes[3] = {&dropped, &update, &merged};
    for (int k = 0; k < 3; ++k)
      _mm256_storeu_ps(sums + k * kSumLanes, _mm256_add_ps(_mm256_loadu_ps(sums + k * kSumLanes), *lanes[k]));
  }
  if (j < n) {
    const int size = dtype_size(dtype);
    finish_row_scalar(dtype, w ? static_cast<const char*>(w) + j * size : nullptr, acc + j, keep >> j, n - j,
                      dst ? static_cast<char*>(dst) + j * size : nullptr, sums);
  }
}

// ---- AVX-512 (F, BW, VL) ----

AVX512 void delta_tile_avx512(const float* A, int64_t cols, int64_t r, const float* b, int64_t rows, int64_t c0,
                              int64_t n, float* acc) {
  if (rows != kTileRows || n != kTileCols) {
    delta_tile_scalar(A, cols, r, b, rows, c0, n, acc);
    return;
  }
  // 4 rows x 64 columns: 16 accumulators, each A vector loaded once for the 4 rows
  __m512 a[4][4];
  for (auto& row : a)
    for (auto& v : row) v = _mm512_setzero_ps();
  for (int64_t p = 0; p < r; ++p) {
    const float* src = A + p * cols + c0;
    const __m512 x0 = _mm512_loadu_ps(src), x1 = _mm512_loadu_ps(src + 16), x2 = _mm512_loadu_ps(src + 32),
                 x3 = _mm512_loadu_ps(src + 48);
    for (int i = 0; i < 4; ++i) {
      const __m512 bi = _mm512_set1_ps(b[i * r + p]);
      a[i][0] = _mm512_fmadd_ps(bi, x0, a[i][0]);
      a[i][1] = _mm512_fmadd_ps(bi, x1, a[i][1]);
      a[i][2] = _mm512_fmadd_ps(bi, x2, a[i][2]);
      a[i][3] = _mm512_fmadd_ps(bi, x3, a[i][3]);
    }
  }
  for (int i = 0; i < 4; ++i)
    for (int k = 0; k < 4; ++k) _mm512_storeu_ps(acc + i * kTileCols + 16 * k, a[i][k]);
}

AVX512 uint64_t keep_bits_avx512(const uint8_t* mask, int layout, int64_t at, int64_t n) {
  if (layout != kBoolBytes) return keep_bits_scalar(mask, layout, at, n);
  const __mmask64 lanes = n == 64 ? ~__mmask64(0) : (__mmask64(1) << n) - 1;
  const __m512i v = _mm512_maskz_loadu_epi8(lanes, mask + at);
  return _mm512_test_epi8_mask(v, v);
}

AVX512 void finish_row_avx512(int dtype, const void* w, const float* acc, uint64_t keep, int64_t n, void* dst,
                              float* sums) {
  if (dtype == kFloat16) {
    finish_row_scalar(dtype, w, acc, keep, n, dst, sums);
    return;
  }
  const bool bf16 = dtype == kBFloat16;
  __m512 dropped = _mm512_setzero_ps(), update = dropped, merged = dropped;
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = n - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - j)) - 1);
    const __mmask16 kept = static_cast<__mmask16>(keep >> j) & lanes;
    const __m512 d = _mm512_maskz_loadu_ps(lanes, acc + j);
    __m512 base = _mm512_setzero_ps();
    if (w && bf16) {
      const __m256i h = _mm256_maskz_loadu_epi16(lanes, static_cast<const uint16_t*>(w) + j);
      base = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else if (w) {
      base = _mm512_maskz_loadu_ps(lanes, static_cast<const float*>(w) + j);
    }
    const __m512 v = _mm512_add_ps(base, d);
    if (sums) {
      update = _mm512_fmadd_ps(d, d, update);
      merged = _mm512_fmadd_ps(v, v, merged);
      const __m512 lost = _mm512_maskz_mov_ps(static_cast<__mmask16>(~kept), d);
      dropped = _mm512_fmadd_ps(lost, lost, dropped);
    }
    if (dst && bf16) {
      // round to nearest even; a NaN (rare: tested once per vector) keeps its top bits, made quiet
      const __m512i u = _mm512_castps_si512(v);
      const __m512i top = _mm512_srli_epi32(u, 16);
      const __m512i lsb = _mm512_and_si512(top, _mm512_set1_epi32(1));
      __m512i out = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
      const __mmask16 is_nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      if (is_nan) out = _mm512_mask_or_epi32(out, is_nan, top, _mm512_set1_epi32(0x40));
      out = _mm512_maskz_mov_epi32(kept, out);
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(dst) + j, lanes, _mm512_cvtepi32_epi16(out));
    } else if (dst) {
      _mm512_mask_storeu_ps(static_cast<float*>(dst) + j, lanes, _mm512_maskz_mov_ps(kept, v));
    }
  }
  if (sums) {  // lane by lane: the horizontal sum is the caller's, once per tile
    _mm512_storeu_ps(sums, _mm512_add_ps(_mm512_loadu_ps(sums), dropped));
    _mm512_storeu_ps(sums + kSumLanes, _mm512_add_ps(_mm512_loadu_ps(sums + kSumLanes), update));
    _mm512_storeu_ps(sums + 2 * kSumLanes, _mm512_add_ps(_mm512_loadu_ps(sums + 2 * kSumLanes), merged));
  }
}

#define SPARSELORA_PICK(name, ...)                                                                  \
  (simd_level() >= 2 ? name##_avx512(__VA_ARGS__)                                                  \
                     : simd_level() == 1 ? name##_avx2(__VA_ARGS__) : name##_scalar(__VA_ARGS__))
#else
#define SPARSELORA_PICK(name, ...) name##_scalar(__VA_ARGS__)
#endif

}  // namespace

void delta_tile(const float* A, int64_t cols, int64_t r, const float* b, int64_t rows, int64_t c0, int64_t n,
                float* acc) {
  SPARSELORA_PICK(delta_tile, A, cols, r, b, rows, c0, n, acc);
}

uint64_t keep_bits(const uint8_t* mask, int layout, int64_t at, int64_t n) {
  if (mask == nullptr) return n == 64 ? ~uint64_t(0) : (uint64_t(1) << n) - 1;
  return SPARSELORA_PICK(keep_bits, mask, layout, at, n);
}

void finish_row(int dtype, const void* w, const float* acc, uint64_t keep, int64_t n, void* dst, float* sums) {
  SPARSELORA_PICK(finish_row, dtype, w, acc, keep, n, dst, sums);
}

}  // namespace sparselora
