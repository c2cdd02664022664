// Bit-packed masks (8 elements per byte, element 8*j+i in bit i of byte j) and applying
// masks to weights in place.
#pragma once

#include "common.h"

namespace sparselora {

void pack_bits(const uint8_t* bools, int64_t n, uint8_t* packed, int threads);
void unpack_bits(const uint8_t* packed, int64_t n, uint8_t* bools, int threads);
// Zero weights[i] wherever mask element i is 0 (NaN and inf included).
void apply_mask(void* weights, int dtype, int64_t n, const uint8_t* mask, int layout, int threads);

}  // namespace sparselora
