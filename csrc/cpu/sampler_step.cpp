// CPU kernel for flashcore_C::sampler_step: the noise-corrected DDIM update with CFG
// in one pass over memory (Imagine Flash, arXiv 2405.05224; DDIM; DDIL's x0 clamp).
//
// Notation: x_t = a_t x0 + s_t eps. Per element, in fp32 (fp64 for fp64 inputs):
//   1. e   = eps_u + w (eps_c - eps_u)      (e = eps_c without eps_u)
//   2. x0  = (x_t - s_t e) / a_t
//   3. x0  = clamp(x0, -clip, clip)          (clip > 0 only)
//   4. d   = x_T if noise_correction else e
//   5. x_s = a_s x0 + s_s d
// Outputs (x_s, x0) in the input dtype, each allocated once (like x_t's layout).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>

#include "vec.h"

namespace flashcore::cpu {
namespace {

template <typename T, bool NC>
void sampler_kernel(const T* xt, const T* ec, const T* eu, const T* xT, T* xs, T* x0o, int64_t n,
                    acc_t<T> a_t, acc_t<T> s_t, acc_t<T> a_s, acc_t<T> s_s, acc_t<T> w, acc_t<T> clip) {
  using A = acc_t<T>;
  at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) {
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) {
      const A u = cvt<A>(eu[i]);
      const A e = u + w * (cvt<A>(ec[i]) - u);                // 1. (exact e_c when eu == ec, w == 1)
      A x0 = (cvt<A>(xt[i]) - s_t * e) / a_t;                 // 2.
      x0 = x0 < -clip ? -clip : x0;                           // 3. clip = inf when off; NaN passes
      x0 = x0 > clip ? clip : x0;
      const A d = NC ? cvt<A>(xT[i]) : e;                     // 4.
      xs[i] = cvt<T>(a_s * x0 + s_s * d);                     // 5.
      x0o[i] = cvt<T>(x0);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> sampler_step_cpu(const at::Tensor& x_t, const at::Tensor& eps_c,
                                                     const std::optional<at::Tensor>& eps_u,
                                                     const std::optional<at::Tensor>& x_T, double a_t,
                                                     double s_t, double a_s, double s_s, double guidance,
                                                     bool noise_correction, double clip) {
  constexpr const char* op = "sampler_step";
  check_float(op, "x_t", x_t);
  check_same(op, "eps_c", eps_c, "x_t", x_t);
  if (eps_u) check_same(op, "eps_u", *eps_u, "x_t", x_t);
  TORCH_CHECK(!noise_correction || x_T.has_value(), op, ": x_T is required when noise_correction=True");
  if (noise_correction) check_same(op, "x_T", *x_T, "x_t", x_t);
  for (auto [name, v] : std::initializer_list<std::pair<const char*, double>>{
           {"a_t", a_t}, {"s_t", s_t}, {"a_s", a_s}, {"s_s", s_s}, {"guidance", guidance}, {"clip", clip}})
    check_finite(op, name, v);
  TORCH_CHECK(a_t > 0, op, ": a_t must be > 0, got ", a_t);

  auto x_next = at::empty_like(x_t);                          // dense, x_t's permutation
  auto x0 = at::empty_like(x_next);
  const auto xt = conform(x_t, x_next), ec = conform(eps_c, x_next);
  // Without eps_u, feed eps_c as eps_u with w = 1: step 1 then gives eps_c exactly.
  const auto eu = eps_u ? conform(*eps_u, x_next) : ec;
  const double w = eps_u ? guidance : 1.0;
  const auto xT = noise_correction ? conform(*x_T, x_next) : xt;
  const double c = clip > 0 ? clip : std::numeric_limits<double>::infinity();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_t.scalar_type(), op, [&] {
    using A = acc_t<scalar_t>;
    auto p = [](const at::Tensor& t) { return t.const_data_ptr<scalar_t>(); };
    auto run = noise_correction ? sampler_kernel<scalar_t, true> : sampler_kernel<scalar_t, false>;
    run(p(xt), p(ec), p(eu), p(xT), x_next.mutable_data_ptr<scalar_t>(), x0.mutable_data_ptr<scalar_t>(),
        x_next.numel(), A(a_t), A(s_t), A(a_s), A(s_s), A(w), A(c));
  });
  return {x_next, x0};
}

}  // namespace
}  // namespace flashcore::cpu

TORCH_LIBRARY_IMPL(flashcore_C, CPU, m) { m.impl("sampler_step", &flashcore::cpu::sampler_step_cpu); }
