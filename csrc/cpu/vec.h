// Helpers shared by flashcore's CPU kernels: dtype conversion, a vectorisable exp,
// layout conforming for element-wise kernels, argument checks.
//
// The conversions are written on raw bits so that loops under `#pragma omp simd`
// vectorise with -O3 -march=native; c10's BFloat16 operators contain branches that
// keep GCC from doing that.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

namespace flashcore::cpu {

// Accumulation type: fp32 for every float type but fp64.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

inline float bf16_to_f(c10::BFloat16 x) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(__builtin_bit_cast(uint16_t, x)) << 16);
}

// Round to nearest even, NaN kept a (quiet) NaN: the same result as c10's conversion.
inline c10::BFloat16 f_to_bf16(float x) {
  uint32_t u = __builtin_bit_cast(uint32_t, x);
  uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  uint16_t b = (x != x) ? uint16_t(0x7fc0) : static_cast<uint16_t>(r);
  return __builtin_bit_cast(c10::BFloat16, b);
}

template <typename To, typename From>
inline To cvt(From x) {
  if constexpr (std::is_same_v<To, From>) {
    return x;
  } else if constexpr (std::is_same_v<From, c10::BFloat16>) {
    return static_cast<To>(bf16_to_f(x));
  } else if constexpr (std::is_same_v<To, c10::BFloat16>) {
    return f_to_bf16(static_cast<float>(x));
  } else {
    return static_cast<To>(x);
  }
}

// exp for float, written so that GCC vectorises it inside simd loops (libm's expf is
// only vectorised under -ffast-math, which setup.py does not pass). Cephes' expf:
// x = n ln2 + r, |r| <= ln2/2, e^r by Cephes' minimax polynomial, 2^n through the exponent
// bits; about 1 ulp. Inputs below -87.3 give ~1e-38 rather than 0, which is below
// anything a softmax sum can see.
// exp_in_range is the polynomial core, for x already in [-87.3, 88.3].
inline float exp_in_range(float x) {
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.f) - 12582912.f;  // round to nearest without a libm call
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, e);
}
inline float exp_f(float x) {
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.3f ? 88.3f : x;
  return exp_in_range(x);
}
inline double exp_f(double x) { return std::exp(x); }

// exp for arguments <= 0 (softmax after the row max is taken out): one clamp fewer.
// NaN still comes out NaN; +inf is not expected here.
inline float exp_nonpos(float x) {
  return exp_in_range(x < -87.3f ? -87.3f : x);
}
inline double exp_nonpos(double x) { return std::exp(x); }

// Element-wise kernels walk memory flat. That is valid when all tensors share the
// strides of an output that is non-overlapping and dense (any permutation of a
// contiguous layout, e.g. channels-last or a transposed view): element i of one sits
// at the same offset as element i of the others. Inputs with other strides are copied
// into that layout first; the common contiguous case costs nothing.
inline at::Tensor conform(const at::Tensor& t, const at::Tensor& out) {
  if (t.strides() == out.strides()) return t;
  return at::empty_like(out).copy_(t);
}

inline void check_same(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has ", ref.scalar_type());
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " has shape ", t.sizes(), " but ", ref_name,
              " has ", ref.sizes());
}

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf, op, ": ",
              name, " must be float16/bfloat16/float32/float64, got ", s);
}

inline void check_finite(const char* op, const char* name, double v) {
  TORCH_CHECK(std::isfinite(v), op, ": ", name, " must be finite, got ", v);
}

// Element-wise work below this many elements stays on the calling thread: waking the
// pool costs more than it saves.
constexpr int64_t kGrain = 1 << 15;

// Do two tensors share any byte of memory? Conservative for strided views of one
// storage (their byte extents are compared, not the exact elements), exact otherwise.
inline bool may_share_memory(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.storage().is_alias_of(b.storage())) return false;
  auto extent = [](const at::Tensor& t) {
    int64_t lo = 0, hi = 0;  // element offsets of the first and last element touched
    for (int64_t d = 0; d < t.dim(); ++d) {
      const int64_t span = (t.size(d) - 1) * t.stride(d);
      (span < 0 ? lo : hi) += span;
    }
    const auto* p = static_cast<const char*>(t.const_data_ptr());
    return std::pair<const char*, const char*>{p + lo * t.element_size(), p + (hi + 1) * t.element_size()};
  };
  const auto [a0, a1] = extent(a);
  const auto [b0, b1] = extent(b);
  return a0 < b1 && b0 < a1;
}

// Do two elements of t share memory? at::has_internal_overlap is sure only of "no" (a
// dense tensor) and "yes" (a stride-0 dimension); its "too hard" (a stepped slice, an
// as_strided view) is decided here, exactly. Sorted by stride, a dimension whose stride
// steps past everything the smaller ones span cannot meet them (slices pass this);
// the rare layouts that fail it have their element offsets counted.
inline bool has_internal_overlap_exact(const at::Tensor& t) {
  const auto o = at::has_internal_overlap(t);
  if (o != at::MemOverlap::TooHard) return o == at::MemOverlap::Yes;
  if (t.numel() == 0) return false;
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dims of size > 1
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t span = 0;
  bool separated = true;
  for (const auto& [st, n] : dims) {
    if (st <= span) {
      separated = false;
      break;
    }
    span += (n - 1) * st;
  }
  if (separated) return false;
  at::Tensor off = at::zeros({1}, at::kLong);
  for (int64_t d = 0; d < t.dim(); ++d)
    off = (off.unsqueeze(1) + at::arange(t.size(d), at::kLong) * t.stride(d)).flatten();
  return std::get<0>(at::_unique(off, /*sorted=*/false)).numel() < t.numel();
}

// An out= tensor: on the CPU, of the input's dtype and shape, no two elements at one
// address (an expanded or overlapping view: one of two writes would be lost), and
// sharing no memory with the inputs (checked by the caller).
inline void check_out(const char* op, const char* name, const at::Tensor& out, const char* ref_name,
                      const at::Tensor& ref) {
  check_same(op, name, out, ref_name, ref);
  TORCH_CHECK(!has_internal_overlap_exact(out), op, ": ", name,
              " has elements that share memory (an expanded, broadcast or overlapping view); "
              "pass a tensor whose elements are distinct");
}

inline void check_no_alias(const char* op, const char* name, const at::Tensor& out, const char* other_name,
                           const at::Tensor& other) {
  TORCH_CHECK(!may_share_memory(out, other), op, ": ", name, " shares memory with ", other_name,
              "; the out= tensors must not alias the inputs or each other (pass separate buffers)");
}

}  // namespace flashcore::cpu
