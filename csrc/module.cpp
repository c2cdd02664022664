// Python bindings of sparselora._C. Tensors cross as (address, element count, dtype code);
// the Python side (sparselora/ops/cpp.py) checks devices, dtypes and contiguity.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <tuple>

#include "masks.h"
#include "merge.h"
#include "rows.h"
#include "select.h"
#include "simd.h"

namespace py = pybind11;
using namespace sparselora;

namespace {

template <typename T = void>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

std::vector<Buffer> buffers(const std::vector<uintptr_t>& addresses, const std::vector<int64_t>& sizes,
                            const std::vector<int>& dtypes) {
  if (addresses.size() != sizes.size() || sizes.size() != dtypes.size())
    throw std::invalid_argument("addresses, sizes and dtypes must have the same length");
  std::vector<Buffer> out;
  for (size_t i = 0; i < addresses.size(); ++i) out.push_back({ptr<const void>(addresses[i]), sizes[i], dtypes[i]});
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sparselora compiled kernels (CPU, multi-threaded, no libtorch)";
  m.attr("BOOL_BYTES") = static_cast<int>(kBoolBytes);
  m.attr("PACKED_BITS") = static_cast<int>(kPackedBits);

  m.def("simd_enabled", &simd_enabled, "whether the AVX2/FMA kernels are in use");
  m.def("simd_level", &simd_level, "0: portable kernels, 1: AVX2/FMA, 2: AVX-512 (the merge)");
  m.def("set_simd_level", &set_simd_level, "use kernels up to this level (clamped to the CPU's); returns the level");
  m.def("set_simd", &set_simd, "use the AVX2/FMA kernels when the CPU has them (True) or the portable ones",
        py::arg("on"));

  m.def(
      "find_cut",
      [](const std::vector<uintptr_t>& addresses, const std::vector<int64_t>& sizes, const std::vector<int>& dtypes,
         int64_t k, bool absolute, int threads) {
        const Cut cut = find_cut(buffers(addresses, sizes, dtypes), k, absolute, threads);
        // a std::tuple: Python objects are built after the GIL is taken back
        return std::make_tuple(static_cast<double>(key_to_float(cut.key, absolute)), cut.ties, cut.nonfinite);
      },
      "(value, ties, nonfinite) cutting exactly k (>= 1) of the scores", py::arg("addresses"), py::arg("sizes"),
      py::arg("dtypes"), py::arg("k"), py::arg("absolute"), py::arg("threads"),
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "write_mask",
      [](uintptr_t address, int64_t size, int dtype, double value, int64_t ties_left, bool absolute, uintptr_t out,
         int layout, int threads) {
        const uint32_t key = score_key(float_bits(static_cast<float>(value)), absolute);
        return write_mask({ptr<const void>(address), size, dtype}, key, ties_left, absolute, ptr(out), layout, threads);
      },
      "write one tensor's keep-mask under a cut; returns the ties it pruned",
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "select_masks",
      [](const std::vector<uintptr_t>& addresses, const std::vector<int64_t>& sizes, const std::vector<int>& dtypes,
         int64_t k, bool absolute, const std::vector<uintptr_t>& outs, int layout, int threads, uintptr_t pruned) {
        std::vector<void*> out_ptrs;
        for (uintptr_t o : outs) out_ptrs.push_back(ptr(o));
        return select_masks(buffers(addresses, sizes, dtypes), k, absolute, out_ptrs, layout, threads,
                            pruned ? ptr<int64_t>(pruned) : nullptr);
      },
      "keep-masks pruning exactly the k lowest scores; returns the count of non-finite scores. pruned (0: none): "
      "int64 per tensor, its pruned count where the fused pass counted it, else -1",
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "key_histogram",
      [](const std::vector<uintptr_t>& addresses, const std::vector<int64_t>& sizes, const std::vector<int>& dtypes,
         bool absolute, int64_t high, uintptr_t counts, int threads) {
        int64_t nonfinite = 0;
        key_histogram(buffers(addresses, sizes, dtypes), absolute, high, ptr<int64_t>(counts), &nonfinite, threads);
        return nonfinite;
      },
      "65536-bin histogram of score keys (high half, or low half within one high bucket)",
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "nm_mask",
      [](uintptr_t address, int dtype, int64_t numel, int64_t n, int64_t m, bool absolute, uintptr_t keep,
         int threads) { return nm_mask(ptr<const void>(address), dtype, numel, n, m, absolute, ptr<uint8_t>(keep), threads); },
      "N:M keep-mask (bool bytes): the n highest of every m consecutive scores; returns the count of non-finite scores",
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "row_mask",
      [](uintptr_t address, int dtype, int64_t rows, int64_t cols, int64_t k, bool absolute, uintptr_t prior,
         uintptr_t keep, int threads) {
        const RowSelect r = row_mask(ptr<const void>(address), dtype, rows, cols, k, absolute,
                                     prior ? ptr<const uint8_t>(prior) : nullptr, ptr<uint8_t>(keep), threads);
        return std::make_tuple(r.nonfinite, r.bad_row, r.bad_count);
      },
      "per-row keep-mask (bool bytes) pruning the k lowest scores of every row; returns "
      "(non-finite count, first row prior over-prunes or -1, its prior prunes)",
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "pack_bits",
      [](uintptr_t bools, int64_t n, uintptr_t packed, int threads) {
        pack_bits(ptr<const uint8_t>(bools), n, ptr<uint8_t>(packed), threads);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "unpack_bits",
      [](uintptr_t packed, int64_t n, uintptr_t bools, int threads) {
        unpack_bits(ptr<const uint8_t>(packed), n, ptr<uint8_t>(bools), threads);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "apply_mask",
      [](uintptr_t weights, int dtype, int64_t n, uintptr_t mask, int layout, int threads) {
        apply_mask(ptr(weights), dtype, n, ptr<const uint8_t>(mask), layout, threads);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "merge_lora",
      [](uintptr_t W, int dtype, int64_t rows, int64_t cols, std::tuple<uintptr_t, int, int64_t, int64_t> A,
         std::tuple<uintptr_t, int, int64_t, int64_t> B, int64_t r, double scaling, uintptr_t mask, int layout,
         uintptr_t dst, int threads, uintptr_t sums) {
        const auto matrix = [](const std::tuple<uintptr_t, int, int64_t, int64_t>& m) {
          return Matrix{ptr<const void>(std::get<0>(m)), std::get<1>(m), std::get<2>(m), std::get<3>(m)};
        };
        merge_lora(W ? ptr<const void>(W) : nullptr, dtype, rows, cols, matrix(A), matrix(B), r,
                   static_cast<float>(scaling), mask ? ptr<const uint8_t>(mask) : nullptr, layout,
                   dst ? ptr(dst) : nullptr, threads, sums ? ptr<double>(sums) : nullptr);
      },
      "dst = (W + scaling * B @ A) * mask (dst 0: not stored), fp32 accumulation, one pass; A and B as (address, "
      "dtype, row stride, column stride); sums (0: none) += [|(s*B@A) * ~mask|^2, |s*B@A|^2, |W + s*B@A|^2] as "
      "3 float64",
      py::call_guard<py::gil_scoped_release>());
}
