// Shifted Reconstruction Loss with its gradient, and the re-noising, CUDA.
//
// srl_loss, two launches, deterministic (no atomics):
//   1. grid-stride pass: r = x0_S - x0_T (srl_residual), grad = g r with
//      g = -(s_t / a_t) 2 / N, and each block's sum of r^2 -> workspace[block]
//   2. one block sums the per-block partials in a fixed order: loss = sum / N
// The grid size depends only on N, so the same input gives the same bits.
// srl_renoise: chi = a x0 + s eps', one grid-stride pass.
#include "elementwise.cuh"

namespace flashcore {
namespace cuda {

constexpr int kLossThreads = 256;
constexpr int kLossMaxBlocks = 1024;   // partials; the second launch reduces them in one block

// Sum over the block; the result is valid in thread 0.
__device__ __forceinline__ float block_sum(float v, float* red /* 32 floats of shared memory */) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = threadIdx.x < blockDim.x / 32 ? red[threadIdx.x] : 0.f;
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kLossThreads)
    srl_loss_kernel(const T* __restrict__ xt, const T* __restrict__ es, const T* __restrict__ tgt,
                    T* __restrict__ grad, float* __restrict__ partial, int64_t n, float a_t, float s_t, float g) {
  __shared__ float red[32];
  float acc = 0.f;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float r = srl_residual(to_f32(xt[i]), to_f32(es[i]), to_f32(tgt[i]), a_t, s_t);   // 1.
    grad[i] = from_f32<T>(g * r);
    acc += r * r;
  }
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

__global__ void __launch_bounds__(kLossThreads)
    srl_loss_finish(const float* __restrict__ partial, int n_partial, float inv_n, float* __restrict__ loss) {
  __shared__ float red[32];
  float acc = 0.f;
  for (int i = threadIdx.x; i < n_partial; i += blockDim.x) acc += partial[i];
  acc = block_sum(acc, red);                                                               // 2.
  if (threadIdx.x == 0) *loss = acc * inv_n;
}

template <typename T>
__global__ void __launch_bounds__(kLossThreads)
    srl_renoise_kernel(const T* __restrict__ x0, const T* __restrict__ e, T* __restrict__ out, int64_t n,
                       float a, float s) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = from_f32<T>(renoise_elem(to_f32(x0[i]), to_f32(e[i]), a, s));
}

inline unsigned loss_blocks(int64_t n) {
  const unsigned g = grid_for(n, kLossThreads);
  return g > static_cast<unsigned>(kLossMaxBlocks) ? static_cast<unsigned>(kLossMaxBlocks) : g;
}

}  // namespace cuda
}  // namespace flashcore

extern "C" int64_t fc_srl_loss_workspace(int64_t n) { return flashcore::cuda::loss_blocks(n); }

extern "C" int fc_srl_loss(const void* x_t, const void* eps_s, const void* x0_target, void* grad, float* loss,
                           float* workspace, int64_t n, int dtype, float a_t, float s_t, void* stream) {
  using namespace flashcore::cuda;
  if (n <= 0) return FC_ERR_SHAPE;
  const unsigned blocks = loss_blocks(n);
  const float g = -(s_t / a_t) * 2.0f / static_cast<float>(n);
  FC_DISPATCH_DTYPE(dtype, {
    auto kern = srl_loss_kernel<T>;
    FC_LAUNCH(kern, blocks, kLossThreads, 0, stream, static_cast<const T*>(x_t), static_cast<const T*>(eps_s),
              static_cast<const T*>(x0_target), static_cast<T*>(grad), workspace, n, a_t, s_t, g);
    auto fin = srl_loss_finish;
    FC_LAUNCH(fin, 1, kLossThreads, 0, stream, workspace, static_cast<int>(blocks),
              static_cast<float>(1.0 / static_cast<double>(n)), loss);
    return last_error();
  })
}

extern "C" int fc_srl_renoise(const void* x0, const void* noise, void* out, int64_t n, int dtype, float a,
                              float s, void* stream) {
  using namespace flashcore::cuda;
  if (n < 0) return FC_ERR_SHAPE;
  if (n == 0) return 0;
  FC_DISPATCH_DTYPE(dtype, {
    auto kern = srl_renoise_kernel<T>;
    FC_LAUNCH(kern, grid_for(n, kLossThreads), kLossThreads, 0, stream, static_cast<const T*>(x0),
              static_cast<const T*>(noise), static_cast<T*>(out), n, a, s);
    return last_error();
  })
}
