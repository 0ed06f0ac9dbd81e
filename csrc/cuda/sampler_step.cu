// The fused few-step sampler update (Imagine Flash noise correction, DDIM),
// CUDA. One grid-stride pass: reads x_t, eps_c (+ eps_u, + x_T), writes x_next
// and x0; arithmetic in float32 through sampler_step_elem (elementwise.cuh).
// The CFG / noise-correction / clip switches are uniform across the grid, so
// they stay runtime flags rather than template instances.
#include "elementwise.cuh"

namespace flashcore {
namespace cuda {

constexpr int kStepThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kStepThreads)
    sampler_step_kernel(const T* __restrict__ xt, const T* __restrict__ ec, const T* __restrict__ eu,
                        const T* __restrict__ xT, T* __restrict__ x_next, T* __restrict__ x0, int64_t n,
                        StepCoef k) {
  const bool has_u = eu != nullptr, nc = xT != nullptr;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const StepOut r = sampler_step_elem(to_f32(xt[i]), to_f32(ec[i]), has_u ? to_f32(eu[i]) : 0.f,
                                        nc ? to_f32(xT[i]) : 0.f, has_u, nc, k);
    x_next[i] = from_f32<T>(r.x_next);
    x0[i] = from_f32<T>(r.x0);
  }
}

}  // namespace cuda
}  // namespace flashcore

extern "C" int fc_sampler_step(const void* x_t, const void* eps_c, const void* eps_u, const void* x_T,
                               void* x_next, void* x0, int64_t n, int dtype, float a_t, float s_t, float a_s,
                               float s_s, float guidance, float clip, void* stream) {
  using namespace flashcore::cuda;
  if (n < 0) return FC_ERR_SHAPE;
  if (n == 0) return 0;
  const StepCoef k{a_t, s_t, a_s, s_s, guidance, clip};
  FC_DISPATCH_DTYPE(dtype, {
    auto kern = sampler_step_kernel<T>;
    FC_LAUNCH(kern, grid_for(n, kStepThreads), kStepThreads, 0, stream, static_cast<const T*>(x_t),
              static_cast<const T*>(eps_c), static_cast<const T*>(eps_u), static_cast<const T*>(x_T),
              static_cast<T*>(x_next), static_cast<T*>(x0), n, k);
    return last_error();
  })
}
