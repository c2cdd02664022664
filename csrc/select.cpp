// Exact global threshold at memory speed.
//
// find_cut / select_masks first bracket the k-th smallest key with a strided sample, then
// make one pass over the scores: keys below the bracket are pruned, keys above it kept,
// and the few keys inside it are resolved exactly. For bool masks the undecided keys wait
// in the mask itself (select_bool_masks); otherwise they are collected (nth_element). When
// the bracket misses or holds too many keys, a two-pass radix select on the 16-bit halves
// of the keys decides instead. Either way the result is exact and the same for any thread
// count: only integer counts cross threads.
#include "select.h"
#include "simd.h"

#include <atomic>
#include <cmath>


#ifdef __linux__
#include <sys/mman.h>
#endif

namespace sparselora {
namespace {

constexpr int64_t kChunk = int64_t(1) << 15;  // elements per parallel work item (multiple of 8)
constexpr int64_t kBins = 65536;

struct Candidate {
  uint32_t offset;  // within its chunk
  uint32_t key;
};

inline void write_keep(void* out, int layout, int64_t i, bool keep) {
  if (layout == kBoolBytes) {
    static_cast<uint8_t*>(out)[i] = keep;
  } else {
    uint8_t* byte = static_cast<uint8_t*>(out) + (i >> 3);
    const uint8_t bit = static_cast<uint8_t>(1u << (i & 7));
    *byte = keep ? (*byte | bit) : (*byte & ~bit);
  }
}

// Keys of one chunk: below-bracket count, in-bracket keys (collected when `collect`),
// keep-mask written as key > hi when `out` is set.
struct ChunkScan {
  int64_t below = 0;
  int64_t inside = 0;
  int64_t nonfinite = 0;
};

constexpr int64_t kBlock = 4096;  // elements converted / scanned at a time (multiple of 8)

ChunkScan scan(const Buffer& t, const Chunk& c, bool absolute, uint32_t lo, uint32_t hi, void* out, int layout,
               std::vector<Candidate>* collect) {
  ChunkScan s;
  alignas(64) uint32_t converted[kBlock];
  uint32_t offsets[kBlock];
  for (int64_t begin = c.begin; begin < c.end; begin += kBlock) {
    const int64_t n = std::min(kBlock, c.end - begin);
    const uint32_t* bits = converted;
    if (t.dtype == kFloat32)
      bits = static_cast<const uint32_t*>(t.data) + begin;
    else
      to_float_bits(t.data, t.dtype, begin, n, converted);
    uint8_t* keep = nullptr;
    if (out) keep = static_cast<uint8_t*>(out) + (layout == kBoolBytes ? begin : (begin >> 3));
    const int64_t found = scan_bits(bits, n, absolute, lo, hi, keep, layout == kPackedBits, &s.below, &s.inside,
                                    &s.nonfinite, collect ? offsets : nullptr);
    for (int64_t f = 0; f < found; ++f)
      collect->push_back({static_cast<uint32_t>(begin + offsets[f] - c.begin), score_key(bits[offsets[f]], absolute)});
  }
  return s;
}

uint32_t key_at(const std::vector<Buffer>& tensors, const std::vector<int64_t>& starts, int64_t pos, bool absolute) {
  const int t = static_cast<int>(std::upper_bound(starts.begin(), starts.end(), pos) - starts.begin()) - 1;
  const int64_t i = pos - starts[t];
  return dispatch_dtype(tensors[t].dtype, [&](auto tag) {
    return score_key(load_bits<decltype(tag)::value>(tensors[t].data, i), absolute);
  });
}

int64_t sample_size(int64_t total) { return total <= kBins ? total : std::max<int64_t>(kBins, total >> 7); }
constexpr int64_t kRun = 16;
constexpr int64_t kAheadRuns = 8;

// The r_lo-th and r_hi-th smallest (from 0, r_lo <= r_hi) of m keys: a histogram of the
// high halves finds their bins, whose few keys are gathered and selected among. `work`
// has room for kBins counts and the keys of both bins (at most m).
void sample_ranks(const uint32_t* keys, int64_t m, int64_t r_lo, int64_t r_hi, uint32_t* at_lo, uint32_t* at_hi,
                  uint32_t* work) {
  uint32_t* counts = work;
  std::fill(counts, counts + kBins, 0u);
  for (int64_t i = 0; i < m; ++i) ++counts[keys[i] >> 16];
  auto bin_of = [&](int64_t r, int64_t* rank_in_bin) {
    uint32_t bin = 0;
    while (r >= counts[bin]) r -= counts[bin++];
    *rank_in_bin = r;
    return bin;
  };
  int64_t in_lo, in_hi;
  const uint32_t bin_lo = bin_of(r_lo, &in_lo), bin_hi = bin_of(r_hi, &in_hi);
  uint32_t* lo_keys = work + kBins;
  uint32_t* hi_keys = lo_keys + counts[bin_lo];
  int64_t n_lo = 0, n_hi = 0;
  for (int64_t i = 0; i < m; ++i) {
    const uint32_t bin = keys[i] >> 16;
    if (bin == bin_lo) lo_keys[n_lo++] = keys[i];
    else if (bin == bin_hi) hi_keys[n_hi++] = keys[i];
  }
  std::nth_element(lo_keys, lo_keys + in_lo, lo_keys + n_lo);
  *at_lo = lo_keys[in_lo];
  uint32_t* in = bin_hi == bin_lo ? lo_keys : hi_keys;
  const int64_t n_in = bin_hi == bin_lo ? n_lo : n_hi;
  std::nth_element(in, in + in_hi, in + n_in);
  *at_hi = in[in_hi];
}

// [lo, hi] that holds the k-th smallest key with overwhelming probability.
// The sample and the work of sample_ranks go to `scratch` (room for 2m + kBins keys) when
// given, else to a vector of their own.
void bracket(const std::vector<Buffer>& tensors, int64_t total, int64_t k, bool absolute, int threads, uint32_t* lo,
             uint32_t* hi, uint32_t* scratch = nullptr, int64_t scratch_room = 0) {
  std::vector<int64_t> starts;  // first flat index of each non-empty tensor
  std::vector<Buffer> nonempty;
  int64_t at = 0;
  for (const auto& t : tensors) {
    if (t.numel == 0) continue;
    starts.push_back(at);
    nonempty.push_back(t);
    at += t.numel;
  }
  const int64_t m = sample_size(total);
  std::vector<uint32_t> own;
  if (scratch_room < 2 * m + kBins) {
    own.resize(static_cast<size_t>(2 * m + kBins));
    scratch = own.data();
  }
  uint32_t* const sample = scratch;
  // runs of kRun neighbours: one cache line and one page walk serve kRun keys
  const int64_t runs = (m + kRun - 1) / kRun;
  // a sample of everything reads every key once; otherwise runs are spread evenly
  auto first_of = [&](int64_t run) {
    return m == total ? run * kRun : static_cast<int64_t>((static_cast<double>(run) * total) / runs);
  };
  auto tensor_of = [&](int64_t pos) {
    return static_cast<int>(std::upper_bound(starts.begin(), starts.end(), pos) - starts.begin()) - 1;
  };
  parallel_for(runs, threads, [&](int64_t run, int) {
    // each run is a cache miss and a page walk: start the one kAheadRuns later now
    if (run + kAheadRuns < runs) {
      const int64_t later = first_of(run + kAheadRuns);
      const int u = tensor_of(later);
      __builtin_prefetch(static_cast<const char*>(nonempty[u].data) + (later - starts[u]) * dtype_size(nonempty[u].dtype));
    }
    const int64_t first = first_of(run);
    const int64_t count = std::min(kRun, m - run * kRun);
    uint32_t* dst = sample + run * kRun;
    int t = tensor_of(first);
    const int64_t inside = std::min(count, starts[t] + nonempty[t].numel - first);
    dispatch_dtype(nonempty[t].dtype, [&](auto tag) {
      for (int64_t j = 0; j < inside; ++j)
        dst[j] = score_key(load_bits<decltype(tag)::value>(nonempty[t].data, first - starts[t] + j), absolute);
      return 0;
    });
    for (int64_t j = inside; j < count; ++j)  // the run crosses into the next tensors
      dst[j] = key_at(nonempty, starts, std::min(first + j, total - 1), absolute);
  });
  const double p = static_cast<double>(k) / total;
  const double target = p * m - 0.5;
  // 5 standard deviations of the sampled rank (neighbours in a run are not independent);
  // a miss only costs the radix fallback
  const double margin = m == total ? 0.0 : 5.0 * std::sqrt(m * p * (1.0 - p)) + 16.0;
  const int64_t r_lo = std::max<int64_t>(0, static_cast<int64_t>(std::floor(target - margin)));
  const int64_t r_hi = std::min<int64_t>(m - 1, static_cast<int64_t>(std::ceil(target + margin)));
  if (m == total) {  // the sample is everything: the bracket is the exact key
    std::nth_element(sample, sample + (k - 1), sample + m);
    *lo = *hi = sample[k - 1];
    return;
  }
  sample_ranks(sample, m, r_lo, r_hi, lo, hi, sample + m);
  if (r_lo == 0) *lo = 0u;
  if (r_hi == m - 1) *hi = 0xffffffffu;
}

struct BracketPass {
  int64_t below = 0;
  int64_t inside = 0;
  int64_t nonfinite = 0;
  bool overflow = false;
};

// One parallel pass over every chunk with bracket [lo, hi].
BracketPass bracket_pass(const std::vector<Buffer>& tensors, const std::vector<Chunk>& chunks, bool absolute,
                         uint32_t lo, uint32_t hi, const std::vector<void*>* outs, int layout, int64_t cap,
                         std::vector<std::vector<Candidate>>& found, int threads) {
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  std::atomic<int64_t> collected{0};
  std::atomic<bool> overflow{false};
  std::vector<ChunkScan> per_worker(clamp_threads(threads));
  parallel_for(n_chunks, threads, [&](int64_t c, int w) {
    const Chunk& ch = chunks[c];
    std::vector<Candidate>* collect = overflow.load(std::memory_order_relaxed) ? nullptr : &found[c];
    void* out = outs ? (*outs)[ch.tensor] : nullptr;
    const ChunkScan s = scan(tensors[ch.tensor], ch, absolute, lo, hi, out, layout, collect);
    per_worker[w].below += s.below;
    per_worker[w].inside += s.inside;
    per_worker[w].nonfinite += s.nonfinite;
    if (collect && collected.fetch_add(s.inside) + s.inside > cap) overflow = true;
  });
  BracketPass result;
  for (const ChunkScan& s : per_worker) {
    result.below += s.below;
    result.inside += s.inside;
    result.nonfinite += s.nonfinite;
  }
  result.overflow = overflow.load();
  return result;
}

Cut resolve_candidates(const std::vector<std::vector<Candidate>>& found, int64_t need) {
  std::vector<uint32_t> keys;
  for (const auto& f : found)
    for (const auto& cand : f) keys.push_back(cand.key);
  std::nth_element(keys.begin(), keys.begin() + (need - 1), keys.end());
  const uint32_t key = keys[need - 1];
  int64_t less = 0;
  for (uint32_t k : keys) less += k < key;
  return {key, need - less, 0};
}

Cut radix_cut(const std::vector<Buffer>& tensors, int64_t k, bool absolute, int threads) {
  std::vector<int64_t> hist(kBins);
  int64_t nonfinite = 0;
  key_histogram(tensors, absolute, -1, hist.data(), &nonfinite, threads);
  if (nonfinite) return {0, 0, nonfinite};
  int64_t before = 0, high = 0;
  while (before + hist[high] < k) before += hist[high++];
  const int64_t need = k - before;
  key_histogram(tensors, absolute, high, hist.data(), &nonfinite, threads);
  int64_t before_low = 0, low = 0;
  while (before_low + hist[low] < need) before_low += hist[low++];
  return {static_cast<uint32_t>((high << 16) | low), need - before_low, 0};
}

constexpr int kBuckets = 253;  // byte values 2..254 of an undecided key

// select_masks for bool masks, with nothing beside the masks but a few kilobytes:
//  1. the bracketing sample lives in the largest mask buffer, not yet written;
//  2. one pass writes 0 / 1 for keys outside the bracket and, for the keys inside it,
//     2 + their bucket of the bracket (253 buckets), counting each bucket and its key range;
//  3. the counts name the bucket holding the cut, and a sweep over the masks settles every
//     other undecided byte. A bucket of one key (ties, as in bf16) is settled by the tie
//     quota in the same sweep; otherwise its few positions are listed and resolved exactly.
// Returns false when the bracket missed or a bucket of many keys is too full: the caller
// then runs the radix select.
bool select_bool_masks(const std::vector<Buffer>& tensors, int64_t total, int64_t k, bool absolute,
                       const std::vector<void*>& outs, int threads, int64_t* nonfinite, int64_t* pruned) {
  size_t largest = 0;
  for (size_t t = 0; t < tensors.size(); ++t) {
    advise_huge_pages(outs[t], tensors[t].numel);
    if (tensors[t].numel > tensors[largest].numel) largest = t;
  }
  const bool aligned = reinterpret_cast<uintptr_t>(outs[largest]) % alignof(uint32_t) == 0;
  uint32_t lo, hi;
  bracket(tensors, total, k, absolute, threads, &lo, &hi, aligned ? static_cast<uint32_t*>(outs[largest]) : nullptr,
          aligned ? tensors[largest].numel / 4 : 0);
  int shift = 0;
  while (((hi - lo) >> shift) >= static_cast<uint32_t>(kBuckets)) ++shift;
  // the pass; each worker keeps its own counts, and its chunks are one contiguous run
  const std::vector<Chunk> chunks = make_chunks(tensors, kChunk);
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  struct Worker {
    int64_t below = 0, above = 0;
    uint32_t max_abs = 0;
    int64_t hist[kBuckets] = {};
    uint32_t bucket_min[kBuckets], bucket_max[kBuckets];
    Worker() {
      std::fill(bucket_min, bucket_min + kBuckets, 0xffffffffu);
      std::fill(bucket_max, bucket_max + kBuckets, 0u);
    }
  };
  std::vector<Worker> workers(clamp_threads(threads));
  parallel_for(n_chunks, threads, [&](int64_t c, int wi) {
    Worker& w = workers[wi];
    const Chunk& ch = chunks[c];
    const Buffer& t = tensors[ch.tensor];
    uint8_t* out = static_cast<uint8_t*>(outs[ch.tensor]);
    if (t.dtype != kFloat16) {
      const void* data = static_cast<const char*>(t.data) + ch.begin * dtype_size(t.dtype);
      scan_bytes(data, t.dtype == kBFloat16, ch.end - ch.begin, absolute, lo, hi, shift, out + ch.begin, &w.below,
                 &w.above, w.hist, w.bucket_min, w.bucket_max, &w.max_abs);
      return;
    }
    alignas(64) uint32_t converted[kBlock];
    for (int64_t begin = ch.begin; begin < ch.end; begin += kBlock) {
      const int64_t n = std::min(kBlock, ch.end - begin);
      to_float_bits(t.data, t.dtype, begin, n, converted);
      scan_bytes(converted, false, n, absolute, lo, hi, shift, out + begin, &w.below, &w.above, w.hist, w.bucket_min,
                 w.bucket_max, &w.max_abs);
    }
  });
  int64_t below = 0, above = 0, hist[kBuckets] = {};
  uint32_t max_abs = 0;
  for (const Worker& w : workers) {
    below += w.below;
    above += w.above;
    max_abs = std::max(max_abs, w.max_abs);
    for (int b = 0; b < kBuckets; ++b) hist[b] += w.hist[b];
  }
  if (max_abs >= 0x7f800000u) {  // count them for the error message
    std::vector<int64_t> counts(kBins);
    key_histogram(tensors, absolute, -1, counts.data(), nonfinite, threads);
    return true;
  }
  if (below >= k || total - above < k) return false;
  int64_t need = k - below;  // of the keys inside the bracket
  int pivot = 0;
  while (need > hist[pivot]) need -= hist[pivot++];
  uint32_t pivot_min = 0xffffffffu, pivot_max = 0;
  for (const Worker& w : workers) {
    pivot_min = std::min(pivot_min, w.bucket_min[pivot]);
    pivot_max = std::max(pivot_max, w.bucket_max[pivot]);
  }
  const bool one_key = pivot_min == pivot_max;  // every key of the bucket ties at the cut
  if (!one_key && hist[pivot] > std::max<int64_t>(int64_t(1) << 16, total / 256)) return false;

  // the sweep, over the same worker runs: tie quotas follow flat order run by run
  std::vector<int64_t> quota(workers.size(), 0);
  int64_t left = need;
  for (size_t w = 0; w < workers.size(); ++w) {
    quota[w] = std::min(left, workers[w].hist[pivot]);
    left -= quota[w];
  }
  // (tensor, index) of each key of the cut's bucket, per worker run, in flat order
  struct Position {
    int32_t tensor;
    int64_t index;
  };
  std::vector<std::vector<Position>> found(one_key ? 0 : workers.size());
  // the sweep touches every byte of every mask: it counts each tensor's pruned weights too
  const size_t n_tensors = tensors.size();
  std::vector<int64_t> zeros(workers.size() * n_tensors, 0);
  parallel_for(n_chunks, threads, [&](int64_t c, int wi) {
    const Chunk& ch = chunks[c];
    uint32_t offsets[kBlock];
    uint8_t* out = static_cast<uint8_t*>(outs[ch.tensor]);
    int64_t* counted = &zeros[wi * n_tensors + ch.tensor];
    for (int64_t begin = ch.begin; begin < ch.end; begin += kBlock) {
      const int64_t n = std::min(kBlock, ch.end - begin);
      const int64_t got = settle_bytes(out + begin, n, static_cast<uint8_t>(2 + pivot), &quota[wi],
                                       one_key ? nullptr : offsets, counted);
      for (int64_t f = 0; f < got; ++f) found[wi].push_back({ch.tensor, begin + offsets[f]});
    }
  });
  if (pruned) {
    std::fill(pruned, pruned + n_tensors, 0);
    for (size_t w = 0; w < workers.size(); ++w)
      for (size_t t = 0; t < n_tensors; ++t) pruned[t] += zeros[w * n_tensors + t];
  }
  if (one_key) return true;

  // several keys in the cut's bucket: resolve them exactly, ties pruned in flat order
  std::vector<uint32_t> keys;
  keys.reserve(static_cast<size_t>(hist[pivot]));
  for (const auto& run : found)
    for (const Position& at : run) {
      const Buffer& t = tensors[at.tensor];
      keys.push_back(dispatch_dtype(t.dtype, [&](auto tag) {
        return score_key(load_bits<decltype(tag)::value>(t.data, at.index), absolute);
      }));
    }
  std::vector<uint32_t> sorted(keys);
  std::nth_element(sorted.begin(), sorted.begin() + (need - 1), sorted.end());
  const uint32_t cut = sorted[need - 1];
  int64_t ties = need;
  for (uint32_t key : keys) ties -= key < cut;
  size_t next = 0;
  for (const auto& run : found)
    for (const Position& at : run) {
      const uint32_t key = keys[next++];
      bool keep = key > cut;
      if (key == cut) {
        keep = ties <= 0;
        ties -= !keep;
      }
      static_cast<uint8_t*>(outs[at.tensor])[at.index] = keep;
      if (pruned && !keep) ++pruned[at.tensor];  // listed bytes were counted as kept
    }
  return true;
}

int64_t count_total(const std::vector<Buffer>& tensors) {
  int64_t total = 0;
  for (const auto& t : tensors) {
    check_dtype(t.dtype);
    total += t.numel;
  }
  return total;
}

}  // namespace

void key_histogram(const std::vector<Buffer>& tensors, bool absolute, int64_t high, int64_t* counts,
                   int64_t* nonfinite, int threads) {
  threads = clamp_threads(threads);
  count_total(tensors);
  const std::vector<Chunk> chunks = make_chunks(tensors, kChunk);
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  // Per worker: uint32 counters (256 KiB, cache-resident), folded into int64 totals before
  // any can overflow. kWays > 1 interleaves sub-histograms against runs of equal keys; on
  // weight-like data one way measured fastest.
  constexpr int kWays = 1;
  struct Worker {
    std::vector<uint32_t> sub;
    std::vector<int64_t> total;
    int64_t pending = 0;
    int64_t nonfinite = 0;
  };
  std::vector<Worker> workers(threads);
  auto fold = [](Worker& w) {
    if (w.total.empty()) w.total.assign(kBins, 0);
    for (int64_t b = 0; b < kBins; ++b) {
      int64_t sum = 0;
      for (int way = 0; way < kWays; ++way) {
        sum += w.sub[way * kBins + b];
        w.sub[way * kBins + b] = 0;
      }
      w.total[b] += sum;
    }
    w.pending = 0;
  };
  parallel_for(n_chunks, threads, [&](int64_t c, int wi) {
    Worker& w = workers[wi];
    if (w.sub.empty()) w.sub.assign(kWays * kBins, 0);
    if (w.pending > (int64_t(1) << 31)) fold(w);
    const Chunk& ch = chunks[c];
    const Buffer& t = tensors[ch.tensor];
    alignas(64) uint32_t converted[4096];
    uint32_t* h = w.sub.data();
    const uint32_t want = static_cast<uint32_t>(high);
    if (t.dtype == kBFloat16 && absolute && high < 0) {
      // |bf16|: the key's high half is the bf16 pattern without its sign, no conversion
      const uint16_t* src = static_cast<const uint16_t*>(t.data);
      int64_t nf = 0;
      for (int64_t i = ch.begin; i < ch.end; ++i) {
        const uint32_t b = src[i] & 0x7fffu;
        nf += b >= 0x7f80u;
        ++h[(i & (kWays - 1)) * kBins + b];
      }
      w.nonfinite += nf;
      w.pending += ch.end - ch.begin;
      return;
    }
    for (int64_t begin = ch.begin; begin < ch.end; begin += 4096) {
      const int64_t n = std::min<int64_t>(4096, ch.end - begin);
      const uint32_t* bits = converted;
      if (t.dtype == kFloat32)
        bits = static_cast<const uint32_t*>(t.data) + begin;
      else
        to_float_bits(t.data, t.dtype, begin, n, converted);
      int64_t nf = 0;
      for (int64_t i = 0; i < n; ++i) {
        const uint32_t u = bits[i];
        nf += is_nonfinite_bits(u);
        const uint32_t key = score_key(u, absolute);
        uint32_t* way = h + (i & (kWays - 1)) * kBins;
        if (high < 0)
          ++way[key >> 16];
        else if ((key >> 16) == want)
          ++way[key & 0xffffu];
      }
      w.nonfinite += nf;
    }
    w.pending += ch.end - ch.begin;
  });
  std::fill(counts, counts + kBins, int64_t(0));
  *nonfinite = 0;
  for (Worker& w : workers) {
    if (w.sub.empty()) continue;
    fold(w);
    for (int64_t b = 0; b < kBins; ++b) counts[b] += w.total[b];
    *nonfinite += w.nonfinite;
  }
}

Cut find_cut(const std::vector<Buffer>& tensors, int64_t k, bool absolute, int threads) {
  threads = clamp_threads(threads);
  const int64_t total = count_total(tensors);
  if (k < 1 || k > total) throw std::invalid_argument("k must be in [1, total number of scores]");
  uint32_t lo, hi;
  bracket(tensors, total, k, absolute, threads, &lo, &hi);
  const std::vector<Chunk> chunks = make_chunks(tensors, kChunk);
  std::vector<std::vector<Candidate>> found(chunks.size());
  const int64_t cap = std::max<int64_t>(int64_t(1) << 16, total / 8);
  const BracketPass pass = bracket_pass(tensors, chunks, absolute, lo, hi, nullptr, kBoolBytes, cap, found, threads);
  if (pass.nonfinite) return {0, 0, pass.nonfinite};
  if (pass.overflow || pass.below >= k || pass.below + pass.inside < k) return radix_cut(tensors, k, absolute, threads);
  return resolve_candidates(found, k - pass.below);
}

int64_t write_mask(const Buffer& tensor, uint32_t cut_key, int64_t ties_left, bool absolute, void* out, int layout,
                   int threads) {
  threads = clamp_threads(threads);
  check_dtype(tensor.dtype);
  const std::vector<Buffer> one{tensor};
  const std::vector<Chunk> chunks = make_chunks(one, kChunk);
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  std::vector<int64_t> tied(n_chunks, 0);
  // pass 1: keep key > cut (ties pruned for now), count ties per chunk and remember where
  // they are unless a chunk is dense with them (then pass 2 rescans that chunk)
  std::vector<std::vector<Candidate>> where(n_chunks);
  constexpr size_t kRemember = kChunk / 8;
  parallel_for(n_chunks, threads, [&](int64_t c, int) {
    tied[c] = scan(tensor, chunks[c], absolute, cut_key, cut_key, out, layout, &where[c]).inside;
    if (where[c].size() > kRemember) std::vector<Candidate>().swap(where[c]);
  });
  // the first `ties_left` tied keys in flat order stay pruned; later ones are kept
  std::vector<int64_t> quota(n_chunks, 0);
  int64_t remaining = ties_left;
  for (int64_t c = 0; c < n_chunks; ++c) {
    quota[c] = std::min(tied[c], remaining);
    remaining -= quota[c];
  }
  // pass 2, only over chunks holding ties to keep
  parallel_for(n_chunks, threads, [&](int64_t c, int) {
    if (tied[c] == quota[c]) return;
    int64_t skip = quota[c];
    if (static_cast<int64_t>(where[c].size()) == tied[c]) {
      for (const Candidate& t : where[c]) {
        if (skip > 0)
          --skip;
        else
          write_keep(out, layout, chunks[c].begin + t.offset, true);
      }
      return;
    }
    dispatch_dtype(tensor.dtype, [&](auto tag) {
      constexpr int D = decltype(tag)::value;
      for (int64_t i = chunks[c].begin; i < chunks[c].end; ++i) {
        if (score_key(load_bits<D>(tensor.data, i), absolute) != cut_key) continue;
        if (skip > 0)
          --skip;
        else
          write_keep(out, layout, i, true);
      }
      return 0;
    });
  });
  return ties_left - remaining;
}

namespace {

// The exact two-pass radix select, then the mask writer: the fallback of both select paths.
int64_t radix_masks(const std::vector<Buffer>& tensors, int64_t k, bool absolute, const std::vector<void*>& outs,
                    int layout, int threads) {
  const Cut cut = radix_cut(tensors, k, absolute, threads);
  if (cut.nonfinite) return cut.nonfinite;
  int64_t ties = cut.ties;
  for (size_t t = 0; t < tensors.size(); ++t)
    ties -= write_mask(tensors[t], cut.key, ties, absolute, outs[t], layout, threads);
  return 0;
}

}  // namespace

int64_t select_masks(const std::vector<Buffer>& tensors, int64_t k, bool absolute, const std::vector<void*>& outs,
                     int layout, int threads, int64_t* pruned) {
  threads = clamp_threads(threads);
  const int64_t total = count_total(tensors);
  if (outs.size() != tensors.size()) throw std::invalid_argument("one output buffer per tensor is needed");
  if (k < 0 || k > total) throw std::invalid_argument("k must be in [0, total number of scores]");
  if (pruned) std::fill(pruned, pruned + tensors.size(), int64_t(-1));  // not counted, unless a path below does
  if (k > 0 && layout == kBoolBytes) {
    int64_t nonfinite = 0;
    if (select_bool_masks(tensors, total, k, absolute, outs, threads, &nonfinite, pruned)) return nonfinite;
    if (pruned) std::fill(pruned, pruned + tensors.size(), int64_t(-1));
    return radix_masks(tensors, k, absolute, outs, layout, threads);
  }
  const std::vector<Chunk> chunks = make_chunks(tensors, kChunk);
  std::vector<std::vector<Candidate>> found(chunks.size());
  if (k == 0) {  // keep everything; still reject non-finite scores
    const BracketPass pass = bracket_pass(tensors, chunks, absolute, 0, 0, nullptr, layout, -1, found, threads);
    for (size_t t = 0; t < tensors.size(); ++t) {
      const int64_t bytes = layout == kBoolBytes ? tensors[t].numel : (tensors[t].numel + 7) / 8;
      if (bytes) std::memset(outs[t], layout == kBoolBytes ? 1 : 0xff, static_cast<size_t>(bytes));
      if (layout == kPackedBits && (tensors[t].numel & 7))
        static_cast<uint8_t*>(outs[t])[bytes - 1] = static_cast<uint8_t>((1u << (tensors[t].numel & 7)) - 1);
    }
    return pass.nonfinite;
  }
  uint32_t lo, hi;
  bracket(tensors, total, k, absolute, threads, &lo, &hi);
  const int64_t cap = std::max<int64_t>(int64_t(1) << 16, total / 8);
  const BracketPass pass = bracket_pass(tensors, chunks, absolute, lo, hi, &outs, layout, cap, found, threads);
  if (pass.nonfinite) return pass.nonfinite;
  if (pass.overflow || pass.below >= k || pass.below + pass.inside < k)
    return radix_masks(tensors, k, absolute, outs, layout, threads);
  // the pass pruned every key <= hi; settle the bracketed ones exactly, in flat order
  const Cut cut = resolve_candidates(found, k - pass.below);
  int64_t ties = cut.ties;
  for (size_t c = 0; c < chunks.size(); ++c) {
    for (const Candidate& cand : found[c]) {
      bool keep = cand.key > cut.key;
      if (cand.key == cut.key) {
        keep = ties <= 0;
        ties -= !keep;
      }
      write_keep(outs[chunks[c].tensor], layout, chunks[c].begin + cand.offset, keep);
    }
  }
  return 0;
}

}  // namespace sparselora
