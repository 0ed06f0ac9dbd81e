// CPU kernel for flashcore_C::srl_renoise: the student's x0 re-noised to the teacher
// time tau (Imagine Flash, arXiv 2405.05224, Shifted Reconstruction Loss).
//
// Notation: chi = a_tau x0_S + s_tau eps', one pass, fp32 arithmetic (fp64 for fp64),
// output in the input dtype with x0's layout.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vec.h"

namespace flashcore::cpu {
namespace {

template <typename T>
void renoise_kernel(const T* x0, const T* noise, T* out, int64_t n, acc_t<T> a, acc_t<T> s) {
  using A = acc_t<T>;
  at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) {
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) out[i] = cvt<T>(a * cvt<A>(x0[i]) + s * cvt<A>(noise[i]));
  });
}

at::Tensor srl_renoise_cpu(const at::Tensor& x0, const at::Tensor& noise, double a, double s) {
  constexpr const char* op = "srl_renoise";
  check_float(op, "x0", x0);
  check_same(op, "noise", noise, "x0", x0);
  check_finite(op, "a", a);
  check_finite(op, "s", s);
  auto out = at::empty_like(x0);
  const auto x = conform(x0, out), e = conform(noise, out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x0.scalar_type(), op, [&] {
    using A = acc_t<scalar_t>;
    renoise_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), e.const_data_ptr<scalar_t>(),
                             out.mutable_data_ptr<scalar_t>(), out.numel(), A(a), A(s));
  });
  return out;
}

}  // namespace
}  // namespace flashcore::cpu

TORCH_LIBRARY_IMPL(flashcore_C, CPU, m) { m.impl("srl_renoise", &flashcore::cpu::srl_renoise_cpu); }
