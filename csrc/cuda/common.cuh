// What every flashcore CUDA kernel file includes: the CUDA headers (or, under
// FLASHCORE_HOST_EMU, their host emulation), float conversions for the three
// storage types, and the launch macro. No ATen or c10 header: kernels and their
// raw-pointer launchers compile with nvcc alone, and on the host with g++.
#pragma once

#include <cstdint>

#ifdef FLASHCORE_HOST_EMU
#include "host_emu.h"
#define FC_DYNAMIC_SMEM(name) unsigned char* name = fc_emu::dynamic_smem()
// kernel<<<grid, block, smem, stream>>>(args...) run as a host loop over blocks
#define FC_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ((void)(stream), fc_emu::launch((grid), (block), (smem), [&] { kernel(__VA_ARGS__); }))
// small grids exercise the grid-stride loops of the element-wise kernels on the host
#define FC_MAX_BLOCKS 3
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#define FC_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#define FC_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), static_cast<cudaStream_t>(stream)>>>(__VA_ARGS__)
#define FC_MAX_BLOCKS 65535
#endif

#define FC_HD __host__ __device__ __forceinline__

#include "flashcore_cuda.h"

namespace flashcore {
namespace cuda {

FC_HD float to_f32(float x) { return x; }
FC_HD float to_f32(__half x) { return __half2float(x); }
FC_HD float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
FC_HD T from_f32(float x);
template <>
FC_HD float from_f32<float>(float x) { return x; }
template <>
FC_HD __half from_f32<__half>(float x) { return __float2half(x); }
template <>
FC_HD __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for a grid-stride loop over n elements, BLOCK threads each.
inline unsigned grid_for(int64_t n, int block) {
  const int64_t g = ceil_div(n, block);
  return static_cast<unsigned>(g < 1 ? 1 : (g > FC_MAX_BLOCKS ? FC_MAX_BLOCKS : g));
}

}  // namespace cuda
}  // namespace flashcore

// Runs the statements with `T` bound to the storage type of an fc_dtype;
// returns FC_ERR_DTYPE for any other value.
#define FC_DISPATCH_DTYPE(dtype, ...)                    \
  switch (dtype) {                                       \
    case FC_F16: { using T = __half; __VA_ARGS__ }       \
    case FC_BF16: { using T = __nv_bfloat16; __VA_ARGS__ } \
    case FC_F32: { using T = float; __VA_ARGS__ }        \
    default: return FC_ERR_DTYPE;                        \
  }

namespace flashcore {
namespace cuda {

inline int last_error() {
#ifdef FLASHCORE_HOST_EMU
  return 0;
#else
  return static_cast<int>(cudaGetLastError());
#endif
}

}  // namespace cuda
}  // namespace flashcore
