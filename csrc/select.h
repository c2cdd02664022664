// Exact selection of the k lowest scores over many tensors, and the mask writer.
#pragma once

#include "common.h"

namespace sparselora {

// Where a comparison group is cut: every key below `key` is pruned, and so are the first
// `ties` keys equal to it in flat order (tensors in order, row-major inside each).
struct Cut {
  uint32_t key;
  int64_t ties;
  int64_t nonfinite;  // > 0: the scores hold NaN/inf and nothing else is meaningful
};

// 65536-bin histogram of (key >> 16), or of (key & 0xffff) among keys with
// (key >> 16) == high when high >= 0. Histograms of disjoint inputs add up.
void key_histogram(const std::vector<Buffer>& tensors, bool absolute, int64_t high, int64_t* counts,
                   int64_t* nonfinite, int threads);

// The cut pruning exactly k (1 <= k <= total) of the scores.
Cut find_cut(const std::vector<Buffer>& tensors, int64_t k, bool absolute, int threads);

// Writes the keep-mask of one tensor under `cut`, pruning at most `ties_left` tied keys
// (first in flat order); returns how many ties it pruned.
int64_t write_mask(const Buffer& tensor, uint32_t cut_key, int64_t ties_left, bool absolute, void* out,
                   int layout, int threads);

// find_cut + write_mask for every tensor, fused into one read of the scores when possible.
// Returns the count of non-finite scores (masks are unspecified when it is not 0). pruned (null:
// not wanted) gets each tensor's count of pruned weights where the selection's own sweep could
// count them (bool masks, the fused path), -1 elsewhere.
int64_t select_masks(const std::vector<Buffer>& tensors, int64_t k, bool absolute, const std::vector<void*>& outs,
                     int layout, int threads, int64_t* pruned);

}  // namespace sparselora
