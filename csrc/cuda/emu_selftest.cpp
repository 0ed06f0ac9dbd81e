// Checks of the host emulation itself (host_emu.h), built only into the test
// library (g++ -DFLASHCORE_HOST_EMU), never into the extension: setup.py and the
// nvcc checks take csrc/cuda/*.cu only. The kernel tests trust the emulator's
// barriers, shuffles and 16-bit rounding, so these pin them down first.
#include "common.cuh"

namespace {

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 16) __syncthreads();   // a bug: half of the block never arrives
  out[threadIdx.x] = 1;
}

__global__ void reverse_through_shared_kernel(const int* in, int* out) {
  __shared__ int buf[64];
  buf[threadIdx.x] = in[threadIdx.x];
  __syncthreads();   // without this barrier a fiber would read slots not yet written
  out[threadIdx.x] = buf[blockDim.x - 1 - threadIdx.x];
}

__global__ void reverse_without_barrier_kernel(const int* in, int* out) {
  __shared__ int buf[64];
  buf[threadIdx.x] = in[threadIdx.x];   // a bug: no __syncthreads before reading others' slots
  out[threadIdx.x] = buf[blockDim.x - 1 - threadIdx.x];
}

__global__ void butterfly_sum_kernel(const float* in, float* out) {
  float v = in[threadIdx.x];
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  out[threadIdx.x] = v;
}

}  // namespace

extern "C" {

// 0: threads resume in index order between barriers, 1: in reverse order.
void fc_emu_set_reverse_order(int reverse) { fc_emu::reverse_order() = reverse != 0; }

void fc_emu_float_to_half(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __float2half(in[i]).x;
}
void fc_emu_half_to_float(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __half2float(__half{in[i]});
}
void fc_emu_float_to_bf16(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __float2bfloat16(in[i]).x;
}

// 1 when the emulator reports the divergent barrier as a deadlock.
int fc_emu_detects_deadlock(void) {
  int out[32] = {};
  try {
    auto kern = divergent_barrier_kernel;
    FC_LAUNCH(kern, 1, 32, 0, nullptr, out);
  } catch (const std::runtime_error&) {
    return 1;
  }
  return 0;
}

void fc_emu_reverse(const int* in, int* out, int n) {
  auto kern = reverse_through_shared_kernel;
  FC_LAUNCH(kern, 1, n, 0, nullptr, in, out);
}

void fc_emu_reverse_without_barrier(const int* in, int* out, int n) {
  auto kern = reverse_without_barrier_kernel;
  FC_LAUNCH(kern, 1, n, 0, nullptr, in, out);
}

void fc_emu_warp_sums(const float* in, float* out, int n) {
  auto kern = butterfly_sum_kernel;
  FC_LAUNCH(kern, 1, n, 0, nullptr, in, out);
}

}  // extern "C"
