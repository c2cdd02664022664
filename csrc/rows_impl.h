// The N:M and row kernels, included once per instruction set by rows.cpp (inside a
// namespace of its own, so no include guard). The scans are plain loops written for the
// compiler to vectorise; rows.cpp compiles a second copy for AVX2, which also gets the
// hand-written fp32 4-run kernel (SPARSELORA_ROWS_AVX2_BODY).

// How a dtype's bit pattern becomes a key: Key is signed and wide enough for -|x|.
template <typename B, typename K, B Inf>
struct Format {
  using Bits = B;
  using Key = K;
  using UKey = std::make_unsigned_t<K>;
  static constexpr B kMag = static_cast<B>(~(B(1) << (8 * sizeof(B) - 1)));
  static constexpr B kInf = Inf;  // |bits| at or above this: inf or NaN
};
using F32 = Format<uint32_t, int32_t, 0x7f800000u>;
using F16 = Format<uint16_t, int32_t, 0x7c00u>;
using BF16 = Format<uint16_t, int32_t, 0x7f80u>;
using F64 = Format<uint64_t, int64_t, 0x7ff0000000000000ull>;

// Calls f(Format{}) for a dtype code.
template <typename Fn>
auto dispatch_format(int dtype, Fn&& f) {
  switch (dtype) {
    case kFloat32: return f(F32{});
    case kFloat16: return f(F16{});
    case kBFloat16: return f(BF16{});
    case kFloat64: return f(F64{});
  }
  throw std::invalid_argument("dtype code must be 0 (float32), 1 (float16), 2 (bfloat16) or 3 (float64)");
}

// Sign and magnitude to two's complement: the key orders like the float, and -0 == +0.
template <typename F, bool ABS>
inline typename F::Key order_key(typename F::Bits b) {
  using Key = typename F::Key;
  const Key mag = static_cast<Key>(b & F::kMag);
  if constexpr (ABS) return mag;
  const Key neg = -static_cast<Key>(b >> (8 * sizeof(b) - 1));
  return (mag ^ neg) - neg;
}

template <typename F>
inline int nonfinite(typename F::Bits b) {
  return (b & F::kMag) >= F::kInf;
}

// NaN/inf among n scores (those `live` marks, when given): only run once one was seen.
template <typename F>
int64_t count_nonfinite(const typename F::Bits* src, int64_t n, const uint8_t* live) {
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += (live == nullptr || live[i]) && nonfinite<F>(src[i]);
  return count;
}

// Calls f(std::true_type / std::false_type) for a runtime flag, so loops compile per case.
template <typename Fn>
auto dispatch_bool(bool flag, Fn&& f) {
  return flag ? f(std::true_type{}) : f(std::false_type{});
}

// ---- N:M --------------------------------------------------------------------------------

constexpr int kMaxCountedRun = 64;  // longer runs: nth_element instead of pairwise counts
constexpr int64_t kRunBlock = 1 << 13;  // runs per parallel work item

// Rank of every score of a run among (key, index) pairs; keep those ranked >= prune.
// Blocks of runs are transposed so that each comparison is one loop across runs.
template <typename F, bool ABS, int M>
int64_t nm_fixed(const typename F::Bits* src, int64_t runs, int prune, uint8_t* keep) {
  using Key = typename F::Key;
  constexpr int kRuns = 64;
  alignas(64) Key key[M][kRuns];
  alignas(64) Key rank[M][kRuns];
  Key bad = 0;  // an OR of lane-wide flags: counting here would widen every lane to 64 bits
  for (int64_t r0 = 0; r0 < runs; r0 += kRuns) {
    const int nr = static_cast<int>(std::min<int64_t>(kRuns, runs - r0));
    const typename F::Bits* s = src + r0 * M;
    for (int r = 0; r < nr; ++r)
      for (int j = 0; j < M; ++j) {
        bad |= static_cast<Key>(nonfinite<F>(s[r * M + j]));
        key[j][r] = order_key<F, ABS>(s[r * M + j]);
        rank[j][r] = 0;
      }
    for (int i = 0; i < M; ++i)
      for (int j = i + 1; j < M; ++j)
        for (int r = 0; r < kRuns; ++r) {
          const Key later_first = key[j][r] < key[i][r];  // equal keys: the earlier index goes first
          rank[i][r] += later_first;
          rank[j][r] += 1 - later_first;
        }
    uint8_t* out = keep + r0 * M;
    for (int r = 0; r < nr; ++r)
      for (int j = 0; j < M; ++j) out[r * M + j] = rank[j][r] >= prune;
  }
  return bad ? count_nonfinite<F>(src, runs * M, nullptr) : 0;
}

// Any run length up to kMaxCountedRun, one run at a time.
template <typename F, bool ABS>
int64_t nm_counted(const typename F::Bits* src, int64_t runs, int m, int prune, uint8_t* keep) {
  using Key = typename F::Key;
  int64_t nf = 0;
  for (int64_t r = 0; r < runs; ++r) {
    const typename F::Bits* s = src + r * m;
    Key key[kMaxCountedRun];
    int rank[kMaxCountedRun];
    for (int j = 0; j < m; ++j) {
      nf += nonfinite<F>(s[j]);
      key[j] = order_key<F, ABS>(s[j]);
      rank[j] = 0;
    }
    for (int i = 0; i < m; ++i)
      for (int j = i + 1; j < m; ++j) {
        const int later_first = key[j] < key[i];
        rank[i] += later_first;
        rank[j] += 1 - later_first;
      }
    for (int j = 0; j < m; ++j) keep[r * m + j] = rank[j] >= prune;
  }
  return nf;
}

template <typename F, bool ABS>
int64_t nm_sorted(const typename F::Bits* src, int64_t runs, int64_t m, int64_t prune, uint8_t* keep) {
  using Key = typename F::Key;
  std::vector<std::pair<Key, int64_t>> run(static_cast<size_t>(m));
  int64_t nf = 0;
  for (int64_t r = 0; r < runs; ++r) {
    for (int64_t j = 0; j < m; ++j) {
      nf += nonfinite<F>(src[r * m + j]);
      run[j] = {order_key<F, ABS>(src[r * m + j]), j};
      keep[r * m + j] = 1;
    }
    if (prune == 0) continue;
    std::nth_element(run.begin(), run.begin() + (prune - 1), run.end());  // pairs: ties by index
    for (int64_t j = 0; j < prune; ++j) keep[r * m + run[j].second] = 0;
  }
  return nf;
}

#ifdef SPARSELORA_ROWS_AVX2_BODY
// fp32 runs of 4 in registers: two runs per vector, each score compared with the other
// three of its run through in-lane rotations (no transposition). Handles runs - runs % 8.
template <bool ABS>
int64_t nm4_f32(const uint32_t* src, int64_t runs, int prune, uint8_t* keep, bool* bad) {
  const __m256i magnitude = _mm256_set1_epi32(0x7fffffff), finite_max = _mm256_set1_epi32(0x7f7fffff);
  const __m256i threshold = _mm256_set1_epi32(prune - 1), one = _mm256_set1_epi8(1);
  // element p's partner (p + d) % 4 has the lower index when p + d >= 4
  const __m256i earlier1 = _mm256_setr_epi32(0, 0, 0, -1, 0, 0, 0, -1);
  const __m256i earlier2 = _mm256_setr_epi32(0, 0, -1, -1, 0, 0, -1, -1);
  const __m256i earlier3 = _mm256_setr_epi32(0, -1, -1, -1, 0, -1, -1, -1);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256i nonfinite = _mm256_setzero_si256();
  auto kept = [&](const uint32_t* at) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at));
    const __m256i mag = _mm256_and_si256(x, magnitude);
    nonfinite = _mm256_or_si256(nonfinite, _mm256_cmpgt_epi32(mag, finite_max));
    __m256i key = mag;
    if (!ABS) {
      const __m256i sign = _mm256_srai_epi32(x, 31);
      key = _mm256_sub_epi32(_mm256_xor_si256(mag, sign), sign);
    }
    __m256i rank = _mm256_setzero_si256();
    auto partner = [&](__m256i other, __m256i earlier) {  // rank -= (other goes first) ? -1 : 0
      const __m256i first = _mm256_or_si256(_mm256_cmpgt_epi32(key, other),
                                            _mm256_and_si256(_mm256_cmpeq_epi32(key, other), earlier));
      rank = _mm256_sub_epi32(rank, first);
    };
    partner(_mm256_shuffle_epi32(key, _MM_SHUFFLE(0, 3, 2, 1)), earlier1);
    partner(_mm256_shuffle_epi32(key, _MM_SHUFFLE(1, 0, 3, 2)), earlier2);
    partner(_mm256_shuffle_epi32(key, _MM_SHUFFLE(2, 1, 0, 3)), earlier3);
    return _mm256_cmpgt_epi32(rank, threshold);
  };
  const int64_t full = runs - runs % 8;
  for (int64_t r = 0; r < full; r += 8) {
    const uint32_t* at = src + r * 4;
    // 4 KiB ahead: the hardware prefetcher alone leaves this loop waiting on memory
    __builtin_prefetch(reinterpret_cast<const char*>(at) + 4096);
    __builtin_prefetch(reinterpret_cast<const char*>(at) + 4096 + 64);
    const __m256i a = _mm256_packs_epi32(kept(at), kept(at + 8));
    const __m256i b = _mm256_packs_epi32(kept(at + 16), kept(at + 24));
    const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(a, b), order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(keep + r * 4), _mm256_and_si256(bytes, one));
  }
  *bad = !_mm256_testz_si256(nonfinite, nonfinite);
  return full;
}
#endif

template <typename F, bool ABS>
int64_t nm_block(const typename F::Bits* src, int64_t runs, int64_t m, int64_t prune, uint8_t* keep) {
  const int p = static_cast<int>(std::min<int64_t>(prune, kMaxCountedRun));
#ifdef SPARSELORA_ROWS_AVX2_BODY
  if constexpr (std::is_same_v<F, F32>) {
    if (m == 4) {
      bool bad = false;
      const int64_t done = nm4_f32<ABS>(src, runs, p, keep, &bad);
      const int64_t rest = nm_fixed<F, ABS, 4>(src + done * 4, runs - done, p, keep + done * 4);
      return bad ? count_nonfinite<F>(src, runs * 4, nullptr) : rest;
    }
  }
#endif
  switch (m) {
    case 2: return nm_fixed<F, ABS, 2>(src, runs, p, keep);
    case 4: return nm_fixed<F, ABS, 4>(src, runs, p, keep);
    case 8: return nm_fixed<F, ABS, 8>(src, runs, p, keep);
    case 16: return nm_fixed<F, ABS, 16>(src, runs, p, keep);
  }
  if (m <= kMaxCountedRun) return nm_counted<F, ABS>(src, runs, static_cast<int>(m), p, keep);
  return nm_sorted<F, ABS>(src, runs, m, prune, keep);
}

// ---- rows -------------------------------------------------------------------------------

constexpr int kMaxBinBits = 11;  // at most 2048 buckets per row (+1 for prior-pruned keys)

// Per-worker buffers, reused row after row.
template <typename Key>
struct RowSpace {
  std::vector<uint16_t> bin;
  std::vector<uint32_t> hist;
  std::vector<uint32_t> where;
  std::vector<Key> keys, sorted;
};

template <typename Key>
struct RowScan {
  int64_t nonfinite = 0, dead = 0;  // NaN/inf among live scores; scores prior prunes
  Key lo = std::numeric_limits<Key>::max(), hi = std::numeric_limits<Key>::min();  // live key range
};

// Pass 1: the live keys' range, non-finite live scores and prior-pruned count.
template <typename F, bool ABS, bool PRIOR>
RowScan<typename F::Key> scan_row(const typename F::Bits* src, const uint8_t* prior, int64_t cols) {
  using Key = typename F::Key;
  // lane-wide flags and counts, so the loop vectorises without widening (cols < 2^32)
  using Count = std::make_unsigned_t<Key>;
  Key lo = std::numeric_limits<Key>::max(), hi = std::numeric_limits<Key>::min();
  Count bad = 0, dead = 0;
  for (int64_t i = 0; i < cols; ++i) {
    const Key key = order_key<F, ABS>(src[i]);
    const Count live = PRIOR ? (prior[i] != 0) : 1;
    bad |= live & static_cast<Count>(nonfinite<F>(src[i]));
    dead += 1 - live;
    lo = std::min(lo, live ? key : std::numeric_limits<Key>::max());
    hi = std::max(hi, live ? key : std::numeric_limits<Key>::min());
  }
  RowScan<Key> out;
  out.nonfinite = bad ? count_nonfinite<F>(src, cols, prior) : 0;
  out.dead = static_cast<int64_t>(dead);
  out.lo = lo;
  out.hi = hi;
  return out;
}

// Pass 2: bucket 1 + ((key - lo) >> shift) of every live key, 0 for prior-pruned ones.
template <typename F, bool ABS, bool PRIOR>
void bin_row(const typename F::Bits* src, const uint8_t* prior, int64_t cols, typename F::Key lo, int shift,
             uint16_t* bin) {
  using UKey = typename F::UKey;
  for (int64_t i = 0; i < cols; ++i) {
    const UKey offset = static_cast<UKey>(order_key<F, ABS>(src[i])) - static_cast<UKey>(lo);
    const uint16_t b = static_cast<uint16_t>(1 + (offset >> shift));
    bin[i] = PRIOR ? (prior[i] ? b : uint16_t(0)) : b;
  }
}

inline int bit_length(uint64_t x) {
  int n = 0;
  while (x) {
    ++n;
    x >>= 1;
  }
  return n;
}

// Pass 3: keep the buckets above `cut`, list the positions inside it.
inline int64_t split_row(const uint16_t* bin, int64_t cols, uint16_t cut, uint8_t* keep, uint32_t* where) {
  for (int64_t i = 0; i < cols; ++i) keep[i] = bin[i] > cut;
  int64_t found = 0, i = 0;
#ifdef __SSE2__
  // the bucket is sparse: test 8 bins at once and look closer only at a hit
  const __m128i want = _mm_set1_epi16(static_cast<short>(cut));
  for (; i + 8 <= cols; i += 8) {
    const __m128i hit = _mm_cmpeq_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bin + i)), want);
    if (!_mm_movemask_epi8(hit)) continue;
    for (int64_t j = i; j < i + 8; ++j) {
      where[found] = static_cast<uint32_t>(j);
      found += bin[j] == cut;
    }
  }
#endif
  for (; i < cols; ++i) {
    where[found] = static_cast<uint32_t>(i);
    found += bin[i] == cut;
  }
  return found;
}

// The `need` lowest (key, index) of the listed positions are pruned, the rest kept.
template <typename F, bool ABS>
void resolve_bucket(const typename F::Bits* src, const uint32_t* where, int64_t found, int64_t need, uint8_t* keep,
                    RowSpace<typename F::Key>& ws) {
  using Key = typename F::Key;
  ws.keys.resize(static_cast<size_t>(found));
  for (int64_t c = 0; c < found; ++c) ws.keys[c] = order_key<F, ABS>(src[where[c]]);
  ws.sorted.assign(ws.keys.begin(), ws.keys.end());
  std::nth_element(ws.sorted.begin(), ws.sorted.begin() + (need - 1), ws.sorted.end());
  const Key cut = ws.sorted[need - 1];
  int64_t ties = need;  // equal to the cut and still to prune, first in index order
  for (int64_t c = 0; c < found; ++c) ties -= ws.keys[c] < cut;
  for (int64_t c = 0; c < found; ++c) {
    const Key key = ws.keys[c];
    bool kept = key > cut;
    if (key == cut) {
      kept = ties <= 0;
      ties -= !kept;
    }
    keep[where[c]] = kept;
  }
}

// Counts the buckets while the next row streams into cache: its first pass then reads
// from cache rather than waiting on memory (a row's passes in between would leave the
// hardware prefetcher idle). next_rows is false on the last row.
template <typename Bits>
void count_bins(const uint16_t* bin, int64_t cols, uint32_t* hist, const Bits* next, const uint8_t* next_prior,
                bool next_rows) {
  constexpr int64_t kPerLine = 64 / sizeof(Bits);
  int64_t i = 0;
  if (next_rows) {
    for (; i + kPerLine <= cols; i += kPerLine) {
      __builtin_prefetch(next + i);
      if (next_prior && i % 64 == 0) __builtin_prefetch(next_prior + i);
      for (int64_t j = i; j < i + kPerLine; ++j) ++hist[bin[j]];
    }
  }
  for (; i < cols; ++i) ++hist[bin[i]];
}

// The bucket holding the k-th lowest (k <= the buckets' total) and how many lie below it:
// whole blocks of 32 buckets are skipped by their (vectorised) sums first.
inline size_t find_bucket(const uint32_t* hist, size_t buckets, int64_t k, int64_t* below) {
  constexpr size_t kBlock = 32;
  size_t at = 0;
  int64_t sum = 0;
  for (; at + kBlock <= buckets; at += kBlock) {
    uint32_t block = 0;
    for (size_t b = 0; b < kBlock; ++b) block += hist[at + b];
    if (sum + block >= k) break;
    sum += block;
  }
  while (sum + hist[at] < k) sum += hist[at++];
  *below = sum;
  return at;
}

// One row; returns its scan (the caller reports non-finite scores and overfull priors).
template <typename F, bool ABS, bool PRIOR>
RowScan<typename F::Key> select_row(const typename F::Bits* src, const uint8_t* prior, int64_t cols, int64_t k,
                                    uint8_t* keep, RowSpace<typename F::Key>& ws, bool next_rows) {
  using UKey = typename F::UKey;
  const RowScan<typename F::Key> scan = scan_row<F, ABS, PRIOR>(src, prior, cols);
  if (scan.nonfinite || scan.dead > k) return scan;
  if (k == scan.dead || k == cols) {  // nothing left to choose: only prior's prunes, or all
    for (int64_t i = 0; i < cols; ++i) keep[i] = k == cols ? 0 : (PRIOR ? prior[i] != 0 : 1);
    return scan;
  }
  const int bits = std::min(kMaxBinBits, std::max(1, bit_length(static_cast<uint64_t>(cols)) - 1));
  const uint64_t range = static_cast<UKey>(static_cast<UKey>(scan.hi) - static_cast<UKey>(scan.lo));
  const int shift = std::max(0, bit_length(range) - bits);
  const size_t buckets = static_cast<size_t>(range >> shift) + 2;
  ws.bin.resize(static_cast<size_t>(cols));
  ws.where.resize(static_cast<size_t>(cols));
  ws.hist.assign(buckets, 0);
  bin_row<F, ABS, PRIOR>(src, prior, cols, scan.lo, shift, ws.bin.data());
  count_bins(ws.bin.data(), cols, ws.hist.data(), src + cols, PRIOR ? prior + cols : nullptr, next_rows);
  // the bucket holding the k-th lowest; bucket 0 (prior's prunes) is below it since k > dead
  int64_t below = 0;
  const size_t cut = find_bucket(ws.hist.data(), buckets, k, &below);
  const int64_t found = split_row(ws.bin.data(), cols, static_cast<uint16_t>(cut), keep, ws.where.data());
  resolve_bucket<F, ABS>(src, ws.where.data(), found, k - below, keep, ws);
  return scan;
}

int64_t nm_mask_impl(const void* data, int dtype, int64_t numel, int64_t n, int64_t m, bool absolute, uint8_t* keep,
                     int threads) {
  threads = clamp_threads(threads);
  const int64_t runs = numel / m, blocks = (runs + kRunBlock - 1) / kRunBlock;
  std::vector<int64_t> nf(threads, 0);
  dispatch_format(dtype, [&](auto format) {
    using F = decltype(format);
    const auto* src = static_cast<const typename F::Bits*>(data);
    dispatch_bool(absolute, [&](auto abs_tag) {
      parallel_for(blocks, threads, [&](int64_t b, int w) {
        const int64_t first = b * kRunBlock, count = std::min(kRunBlock, runs - first);
        nf[w] += nm_block<F, decltype(abs_tag)::value>(src + first * m, count, m, m - n, keep + first * m);
      });
      return 0;
    });
    return 0;
  });
  int64_t total = 0;
  for (int64_t c : nf) total += c;
  return total;
}

RowSelect row_mask_impl(const void* data, int dtype, int64_t rows, int64_t cols, int64_t k, bool absolute,
                        const uint8_t* prior, uint8_t* keep, int threads) {
  threads = clamp_threads(threads);
  constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  std::vector<int64_t> nf(threads, 0), bad_row(threads, kNone), bad_count(threads, 0);
  dispatch_format(dtype, [&](auto format) {
    using F = decltype(format);
    const auto* src = static_cast<const typename F::Bits*>(data);
    std::vector<RowSpace<typename F::Key>> spaces(threads);
    dispatch_bool(absolute, [&](auto abs_tag) {
      return dispatch_bool(prior != nullptr, [&](auto prior_tag) {
        constexpr bool ABS = decltype(abs_tag)::value, PRIOR = decltype(prior_tag)::value;
        parallel_for(rows, threads, [&](int64_t r, int w) {
          const auto scan = select_row<F, ABS, PRIOR>(src + r * cols, PRIOR ? prior + r * cols : nullptr, cols, k,
                                                      keep + r * cols, spaces[w], r + 1 < rows);
          nf[w] += scan.nonfinite;
          if (scan.dead > k && bad_row[w] == kNone) {
            bad_row[w] = r;
            bad_count[w] = scan.dead;
          }
        });
        return 0;
      });
    });
    return 0;
  });
  RowSelect out{0, -1, 0};
  for (int w = 0; w < threads; ++w) {
    out.nonfinite += nf[w];
    if (bad_row[w] != kNone && (out.bad_row < 0 || bad_row[w] < out.bad_row)) {
      out.bad_row = bad_row[w];
      out.bad_count = bad_count[w];
    }
  }
  return out;
}

