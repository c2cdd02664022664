// Fused merge-with-mask: dst = (W + scaling * B @ A) ⊙ M in one pass over W, and the
// squared norms that say what the mask drops, from the same pass.
#pragma once

#include "common.h"

namespace sparselora {

// A matrix of fp32, fp16 or bf16 elements with element strides (any layout: a transposed view too).
struct Matrix {
  const void* data;
  int dtype;
  int64_t row_stride, col_stride;
};

// W: rows x cols of `dtype`, or null for a zero base (the masked delta alone); A: r x cols; B: rows x r;
// mask: rows*cols elements in `layout`, or null for no mask; dst: rows x cols of `dtype`, may be W itself, or null
// to store nothing. sums (null: not computed): adds ‖(s·BA) ⊙ ¬M‖², ‖s·BA‖² and ‖W + s·BA‖² to sums[0..2].
// Accumulates in fp32 per tile and fp64 across tiles; no rows x cols temporary.
void merge_lora(const void* W, int dtype, int64_t rows, int64_t cols, const Matrix& lora_A, const Matrix& lora_B,
                int64_t r, float scaling, const uint8_t* mask, int layout, void* dst, int threads, double* sums);

}  // namespace sparselora
