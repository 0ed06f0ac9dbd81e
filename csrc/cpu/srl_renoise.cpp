// CPU kernel: chi = a * x0 + s * noise, one pass, float32 accumulation.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

namespace flashcore {

template <typename T>
static void renoise_kernel(const T* x0, const T* noise, T* out, int64_t n, float a, float s) {
  at::parallel_for(0, n, 1 << 16, [&](int64_t lo, int64_t hi) {
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i)
      out[i] = static_cast<T>(a * static_cast<float>(x0[i]) + s * static_cast<float>(noise[i]));
  });
}

at::Tensor srl_renoise_cpu(const at::Tensor& x0, const at::Tensor& noise, double a, double s) {
  TORCH_CHECK(x0.device().is_cpu() && noise.device().is_cpu(), "srl_renoise: tensors must be on the CPU");
  TORCH_CHECK(x0.sizes() == noise.sizes(), "srl_renoise: x0 and noise shapes differ");
  TORCH_CHECK(x0.scalar_type() == noise.scalar_type(), "srl_renoise: x0 and noise dtypes differ");
  auto x = x0.contiguous(), e = noise.contiguous();
  auto out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "srl_renoise", [&] {
    renoise_kernel<scalar_t>(x.data_ptr<scalar_t>(), e.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                             x.numel(), static_cast<float>(a), static_cast<float>(s));
  });
  return out;
}

}  // namespace flashcore

TORCH_LIBRARY_IMPL(flashcore_C, CPU, m) { m.impl("srl_renoise", &flashcore::srl_renoise_cpu); }
