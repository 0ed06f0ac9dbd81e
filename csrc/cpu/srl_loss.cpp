// CPU kernel for flashcore_C::srl_loss: Shifted Reconstruction Loss and its gradient in
// one pass (Imagine Flash, arXiv 2405.05224).
//
// Notation: x_t = a_t x0 + s_t eps; eps_S the student's prediction, x0_T the target.
//   1. x0_S   = (x_t - s_t eps_S) / a_t
//   2. loss   = mean((x0_S - x0_T)^2)                     fp32 scalar (fp64 for fp64)
//   3. grad   = -(s_t / a_t) 2 (x0_S - x0_T) / N           d loss / d eps_S, input dtype
//
// The sum is deterministic: the tensor is cut into fixed chunks of kChunk elements
// whatever the thread count, each chunk sums its own squares, and the chunk sums are
// added in chunk order, all in fp64. Thread scheduling only decides who computes a chunk.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "vec.h"

namespace flashcore::cpu {
namespace {

constexpr int64_t kChunk = kGrain;

// One chunk: writes its part of the gradient, returns its sum of squares. Out of line on
// purpose: inlined into the loop over chunks, GCC 12 vectorised that outer loop instead
// (one chunk a lane, gathers and scatters 128 KB apart), about 6x slower than this loop.
template <typename T>
__attribute__((noinline)) double srl_chunk(const T* __restrict xt, const T* __restrict eps,
                                           const T* __restrict tgt, T* __restrict grad, int64_t n,
                                           acc_t<T> a_t, acc_t<T> s_t, acc_t<T> coef) {
  using A = acc_t<T>;
  double sum = 0;  // fp64 per chunk: as accurate as torch's pairwise sum, still memory-bound
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    const A x0s = (cvt<A>(xt[i]) - s_t * cvt<A>(eps[i])) / a_t;   // 1.
    const A diff = x0s - cvt<A>(tgt[i]);
    sum += static_cast<double>(diff * diff);                      // 2.
    grad[i] = cvt<T>(coef * diff);                                // 3.
  }
  return sum;
}

template <typename T>
double srl_kernel(const T* xt, const T* eps, const T* tgt, T* grad, int64_t n, acc_t<T> a_t, acc_t<T> s_t,
                  acc_t<T> coef) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> part(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t lo = c * kChunk, m = std::min(n - lo, kChunk);
      part[c] = srl_chunk<T>(xt + lo, eps + lo, tgt + lo, grad + lo, m, a_t, s_t, coef);
    }
  });
  double total = 0;
  for (int64_t c = 0; c < chunks; ++c) total += part[c];
  return total;
}

std::tuple<at::Tensor, at::Tensor> srl_loss_cpu(const at::Tensor& x_t, const at::Tensor& eps_s,
                                                 const at::Tensor& x0_target, double a_t, double s_t) {
  constexpr const char* op = "srl_loss";
  check_float(op, "x_t", x_t);
  check_same(op, "eps_s", eps_s, "x_t", x_t);
  check_same(op, "x0_target", x0_target, "x_t", x_t);
  check_finite(op, "a_t", a_t);
  check_finite(op, "s_t", s_t);
  TORCH_CHECK(a_t > 0 && s_t > 0, op, ": a_t and s_t must be > 0, got a_t=", a_t, ", s_t=", s_t);

  const bool fp64 = x_t.scalar_type() == at::kDouble;
  auto grad = at::empty_like(x_t);
  auto loss = at::empty({}, x_t.options().dtype(fp64 ? at::kDouble : at::kFloat));
  const auto xt = conform(x_t, grad), eps = conform(eps_s, grad), tgt = conform(x0_target, grad);
  const int64_t n = grad.numel();
  // mean over zero elements is NaN, as in the reference
  const double coef = -(s_t / a_t) * 2.0 / static_cast<double>(n);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_t.scalar_type(), op, [&] {
    using A = acc_t<scalar_t>;
    const double total = srl_kernel<scalar_t>(xt.const_data_ptr<scalar_t>(), eps.const_data_ptr<scalar_t>(),
                                              tgt.const_data_ptr<scalar_t>(), grad.mutable_data_ptr<scalar_t>(),
                                              n, A(a_t), A(s_t), A(coef));
    const double mean = total / static_cast<double>(n);
    if (fp64) loss.fill_(mean);
    else loss.fill_(static_cast<float>(mean));
  });
  return {loss, grad};
}

}  // namespace
}  // namespace flashcore::cpu

TORCH_LIBRARY_IMPL(flashcore_C, CPU, m) { m.impl("srl_loss", &flashcore::cpu::srl_loss_cpu); }
