// Host emulation of the small part of CUDA that flashcore's kernels use, so the
// very same kernel source runs on a CPU in tests (compiled by g++ with
// -DFLASHCORE_HOST_EMU). Not a simulator of timing or memory ordering: it runs
// each thread of a block as a cooperative fiber (ucontext) and switches only at
// barriers, which makes every run deterministic and lets it check what matters
// for correctness on one core:
//   - __syncthreads / __syncwarp are real barriers that every thread of the
//     block / warp must reach (one that some threads skip or exit before is
//     reported as a deadlock instead of hanging);
//   - __shfl_xor_sync / __shfl_down_sync exchange values between lanes;
//   - between barriers the threads run in index order or in reverse
//     (reverse_order()), so a missing barrier is seen as a read of shared
//     memory not yet written, or already overwritten, in one of the two;
//   - dynamic shared memory is filled with NaN bytes at every block start, so a
//     read of shared memory the kernel never wrote poisons the result;
//   - nvcuda::wmma fragments follow the documented API (the per-lane layout is
//     opaque in CUDA too, so the kernels never depend on it);
//   - __half / __nv_bfloat16 round to nearest even like the hardware.
// Blocks of a grid run one after the other; `__shared__` is a function-local
// static, shared by the fibers of the running block.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3() = default;
  dim3(unsigned x_, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 { unsigned x, y, z, w; };

typedef int cudaError_t;
typedef void* cudaStream_t;
enum { cudaSuccess = 0, cudaErrorLaunchFailure = 719 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return cudaSuccess; }

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace fc_emu {

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
  int wait = 0;            // 0 running, 1 at the block barrier, 2 at its warp barrier
  uint64_t gen = 0;        // barrier generation it waits to see pass
};

struct Block {
  int n = 0;
  std::vector<Fiber> fibers;
  ucontext_t sched;
  int cur = -1;
  int block_arrived = 0;
  uint64_t block_gen = 0;
  std::vector<int> warp_arrived;
  std::vector<uint64_t> warp_gen;
  std::vector<uint64_t> shfl;              // one exchange slot per thread
  std::vector<unsigned char> smem;
  const std::function<void()>* body = nullptr;
  int warp_size(int w) const { return n - 32 * w < 32 ? n - 32 * w : 32; }
};

// Order in which the scheduler resumes a block's threads between barriers. Threads
// run to the next barrier one after the other, so a missing barrier shows up as a
// read of data not yet written (or already overwritten) by a thread that runs
// later; running the same test in both orders covers both directions.
inline bool& reverse_order() {
  static bool r = false;
  return r;
}

inline Block*& current() {
  static Block* b = nullptr;
  return b;
}

inline int tid() { return static_cast<int>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)); }

inline void yield() {
  Block* b = current();
  swapcontext(&b->fibers[b->cur].ctx, &b->sched);
}

// Release the barriers that every thread of the block (of the warp) has reached.
// Strict on purpose: a thread that exits never arrives, so a barrier inside a
// branch that not all threads take ends as a reported deadlock, as the CUDA
// programming guide says it may hang on hardware.
inline void release_ready(Block* b) {
  if (b->block_arrived == b->n) {
    b->block_arrived = 0;
    ++b->block_gen;
  }
  for (size_t w = 0; w < b->warp_arrived.size(); ++w) {
    if (b->warp_arrived[w] == b->warp_size(static_cast<int>(w))) {
      b->warp_arrived[w] = 0;
      ++b->warp_gen[w];
    }
  }
}

inline void block_barrier() {
  Block* b = current();
  Fiber& f = b->fibers[b->cur];
  f.gen = b->block_gen;
  ++b->block_arrived;
  release_ready(b);
  if (b->block_gen != f.gen) return;
  f.wait = 1;
  yield();
}

inline void warp_barrier() {
  Block* b = current();
  Fiber& f = b->fibers[b->cur];
  const int w = b->cur / 32;
  f.gen = b->warp_gen[w];
  ++b->warp_arrived[w];
  release_ready(b);
  if (b->warp_gen[w] != f.gen) return;
  f.wait = 2;
  yield();
}

inline void fiber_entry() {
  Block* b = current();
  (*b->body)();
  b->fibers[b->cur].done = true;
}   // returns to b->sched through uc_link

inline bool released(const Block& b, const Fiber& f, int t) {
  if (f.wait == 1) return b.block_gen != f.gen;
  if (f.wait == 2) return b.warp_gen[t / 32] != f.gen;
  return true;
}

// Runs one block to completion; throws on deadlock.
inline void run_block(Block& b, dim3 block) {
  for (int t = 0; t < b.n; ++t) {
    Fiber& f = b.fibers[t];
    f.done = false;
    f.wait = 0;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &b.sched;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  for (;;) {
    bool progress = false, all_done = true;
    for (int i = 0; i < b.n; ++i) {
      const int t = reverse_order() ? b.n - 1 - i : i;
      Fiber& f = b.fibers[t];
      if (f.done) continue;
      all_done = false;
      if (!released(b, f, t)) continue;
      f.wait = 0;
      threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      b.cur = t;
      swapcontext(&b.sched, &f.ctx);
      progress = true;
    }
    if (all_done) return;
    if (!progress) throw std::runtime_error("host emulation: deadlock (a barrier not reached by every thread)");
  }
}

inline unsigned char* dynamic_smem() { return current()->smem.data(); }

template <typename F>
void launch(dim3 grid, dim3 block, size_t smem_bytes, F&& kernel_call) {
  Block b;
  b.n = static_cast<int>(block.x * block.y * block.z);
  b.fibers.resize(b.n);
  for (auto& f : b.fibers) f.stack.resize(256 * 1024);
  b.warp_arrived.assign((b.n + 31) / 32, 0);
  b.warp_gen.assign((b.n + 31) / 32, 0);
  b.shfl.assign(b.n, 0);
  std::function<void()> body = kernel_call;
  b.body = &body;
  struct Current {   // reset even when a deadlock throws out of run_block
    explicit Current(Block* b) { current() = b; }
    ~Current() { current() = nullptr; }
  } scope(&b);
  gridDim = grid;
  blockDim = block;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = dim3(x, y, z);
        b.smem.assign(smem_bytes + 128, 0xFF);   // NaN bytes: unwritten shared memory poisons results
        run_block(b, block);
      }
}

template <typename T>
T shfl_from(T v, int src_lane) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  Block* b = current();
  const int t = b->cur;
  std::memcpy(&b->shfl[t], &v, sizeof(T));
  warp_barrier();
  T out = v;
  if (src_lane >= 0 && src_lane < 32 && (t & ~31) + src_lane < b->n)
    std::memcpy(&out, &b->shfl[(t & ~31) + src_lane], sizeof(T));
  warp_barrier();   // nobody overwrites a slot before every lane has read it
  return out;
}

}  // namespace fc_emu

inline void __syncthreads() { fc_emu::block_barrier(); }
inline void __syncwarp(unsigned = 0xffffffffu) { fc_emu::warp_barrier(); }
template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask, int = 32) { return fc_emu::shfl_from(v, (fc_emu::tid() & 31) ^ lane_mask); }
template <typename T>
T __shfl_down_sync(unsigned, T v, unsigned delta, int = 32) {
  const int src = (fc_emu::tid() & 31) + static_cast<int>(delta);
  return fc_emu::shfl_from(v, src < 32 ? src : -1);
}

// ---- 16-bit floats, round to nearest even ----
struct __half { uint16_t x; };
struct __nv_bfloat16 { uint16_t x; };

inline uint32_t fc_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float fc_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline __half __float2half(float f) {
  const uint32_t u = fc_bits(f), sign = (u >> 16) & 0x8000u, mant = u & 0x7fffffu;
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>(sign | 0x7e00u)};   // NaN
  const int e = static_cast<int>((u >> 23) & 0xffu) - 127 + 15;
  if (e >= 31) return {static_cast<uint16_t>(sign | 0x7c00u)};                         // inf / overflow
  if (e <= 0) {                                                                         // subnormal or zero
    if (e < -10) return {static_cast<uint16_t>(sign)};
    const uint32_t m = mant | 0x800000u, shift = static_cast<uint32_t>(14 - e);
    uint32_t h = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (h & 1u))) ++h;
    return {static_cast<uint16_t>(sign | h)};
  }
  uint32_t h = (static_cast<uint32_t>(e) << 10) | (mant >> 13);
  const uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;   // a carry may round up to inf: correct
  return {static_cast<uint16_t>(sign | h)};
}

inline float __half2float(__half h) {
  const uint32_t sign = (h.x & 0x8000u) << 16, e = (h.x >> 10) & 0x1fu, m = h.x & 0x3ffu;
  if (e == 0) return (sign ? -1.f : 1.f) * std::ldexp(static_cast<float>(m), -24);
  if (e == 31) return fc_float(sign | 0x7f800000u | (m << 13));
  return fc_float(sign | ((e + 112) << 23) | (m << 13));
}

inline __nv_bfloat16 __float2bfloat16(float f) {
  const uint32_t u = fc_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40u)};
  return {static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
inline float __bfloat162float(__nv_bfloat16 b) { return fc_float(static_cast<uint32_t>(b.x) << 16); }

// ---- nvcuda::wmma, 16x16x16 only: every lane holds the whole tile ----
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "host emulation supports 16x16x16 fragments only");
  float v[256];
};

inline float emu_f32(float x) { return x; }
inline float emu_f32(__half x) { return __half2float(x); }
inline float emu_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  constexpr bool row = std::is_same<Layout, row_major>::value;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.v[i * 16 + j] = emu_f32(row ? p[i * ldm + j] : p[j * ldm + i]);
}
inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float x) {
  for (float& e : f.v) e = x;
}
template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[256];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float acc = c.v[i * 16 + j];
      for (int k = 0; k < 16; ++k) acc += a.v[i * 16 + k] * b.v[k * 16 + j];
      out[i * 16 + j] = acc;
    }
  std::memcpy(d.v, out, sizeof(out));
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) (layout == mem_row_major ? p[i * ldm + j] : p[j * ldm + i]) = f.v[i * 16 + j];
}
}  // namespace wmma
}  // namespace nvcuda
