// FlashAttention-2 backward, CUDA C++ (Dao 2023, Algorithm 2), in three launches
// so that no output is accumulated with atomics:
//   0. Delta = rowsum(dO * O)                              (one warp per query row)
//   1. per block of 64 keys, streaming query tiles:
//        P^T = 2^(c2 K Q^T - lse log2 e);  dV += P^T dO
//        dS^T = P^T (V dO^T - Delta);       dK += c dS^T Q
//   2. per block of 64 queries, streaming key tiles:
//        P = 2^(c2 Q K^T - lse log2 e);  dS = P (dO V^T - Delta);  dQ += c dS K
// Warps own 16 rows and keep their dK/dV (or dQ) accumulators in registers;
// the probability and dS strips pass through shared memory to feed the tensor
// cores (attention_common.cuh). Padded queries get P = 0, padded keys P = 0.
#include <cmath>

#include "attention_common.cuh"

namespace flashcore {
namespace cuda {

template <typename T, int D_PAD>
struct BwdSmem {   // shared by both kernels: 64 owned rows (a, b), a streamed tile (c, d) of STEP rows
  using C = Tile<D_PAD>;
  static constexpr int a = 0;
  static constexpr int b = a + tile_bytes<T>(C::ROWS, C::LD);
  static constexpr int c = b + tile_bytes<T>(C::ROWS, C::LD);
  static constexpr int d = c + tile_bytes<T>(C::STEP, C::LD);
  static constexpr int rowstat = d + tile_bytes<T>(C::STEP, C::LD);     // 2 x STEP floats: lse2, Delta
  static constexpr int strip = rowstat + 2 * C::STEP * 4;                // per warp: 2 strips 16 x LDS
  static constexpr int strip_bytes = tile_bytes<T>(16, C::LDS);
  static constexpr int scratch = strip + kWarps * 2 * strip_bytes;      // per warp: 16 x 16 floats
  static constexpr int bytes = scratch + kWarps * 256 * 4;
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    attn_bwd_delta_kernel(const T* __restrict__ o, const T* __restrict__ dout, float* __restrict__ delta,
                          int64_t rows, int D) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= rows) return;   // whole warps leave together: no barrier follows
  float acc = 0.f;
  for (int d = threadIdx.x % 32; d < D; d += 32) acc += to_f32(o[row * D + d]) * to_f32(dout[row * D + d]);
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (threadIdx.x % 32 == 0) delta[row] = acc;                                            // 0.
}

// Writes the lane's accumulator rows (layout of attention_common.cuh) scaled by `mult`.
template <typename T, int ND>
__device__ __forceinline__ void store_rows(T* __restrict__ out, const float (&acc)[ND][8], int row, int n, int D,
                                           float mult) {
  if (row >= n) return;
  const int half = threadIdx.x & 1;
#pragma unroll
  for (int jd = 0; jd < ND; ++jd)
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int d = jd * 16 + half * 8 + i;
      if (d < D) out[static_cast<int64_t>(row) * D + d] = from_f32<T>(acc[jd][i] * mult);
    }
}

template <typename T, int D_PAD>
__global__ void __launch_bounds__(kThreads)
    attn_bwd_dkdv_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                         const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                         T* __restrict__ dk, T* __restrict__ dv, int Nq, int Nk, int D, float c, float c2, bool vec) {
  using C = Tile<D_PAD>;
  using S = BwdSmem<T, D_PAD>;
  constexpr int NB = C::STEP / 16, ND = D_PAD / 16;
  FC_DYNAMIC_SMEM(smem);
  T* sK = reinterpret_cast<T*>(smem + S::a);
  T* sV = reinterpret_cast<T*>(smem + S::b);
  T* sQ = reinterpret_cast<T*>(smem + S::c);
  T* sdO = reinterpret_cast<T*>(smem + S::d);
  float* sL = reinterpret_cast<float*>(smem + S::rowstat);
  float* sDelta = sL + C::STEP;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, half = lane & 1, r = lane >> 1;
  T* sPt = reinterpret_cast<T*>(smem + S::strip + warp * 2 * S::strip_bytes);
  T* sdSt = reinterpret_cast<T*>(smem + S::strip + (warp * 2 + 1) * S::strip_bytes);
  float* scratch = reinterpret_cast<float*>(smem + S::scratch) + warp * 256;
  const int64_t bh = blockIdx.y;
  const int n0 = blockIdx.x * C::ROWS;
  const T* qb = q + bh * Nq * D;
  const T* dob = dout + bh * Nq * D;

  load_tile<T, D_PAD, C::LD>(sK, k + bh * Nk * D, n0, C::ROWS, Nk, D, vec);
  load_tile<T, D_PAD, C::LD>(sV, v + bh * Nk * D, n0, C::ROWS, Nk, D, vec);
  float acc_dk[ND][8] = {}, acc_dv[ND][8] = {};
  const T* kw = sK + warp * 16 * C::LD;
  const T* vw = sV + warp * 16 * C::LD;
  for (int m0 = 0; m0 < Nq; m0 += C::STEP) {
    __syncthreads();   // the previous query tile is consumed (and sK/sV are written)
    load_tile<T, D_PAD, C::LD>(sQ, qb, m0, C::STEP, Nq, D, vec);
    load_tile<T, D_PAD, C::LD>(sdO, dob, m0, C::STEP, Nq, D, vec);
    for (int i = threadIdx.x; i < C::STEP; i += kThreads) {
      const bool ok = m0 + i < Nq;
      sL[i] = ok ? lse[bh * Nq + m0 + i] * kLog2e : 0.f;
      sDelta[i] = ok ? delta[bh * Nq + m0 + i] : 0.f;
    }
    __syncthreads();
    float pt[NB][8] = {}, dpt[NB][8] = {};
#pragma unroll
    for (int j = 0; j < NB; ++j) {   // S^T = K Q^T and dP^T = V dO^T: 16 keys x 16 queries per j
      warp_mma<T, true, D_PAD>(kw, C::LD, sQ + j * 16 * C::LD, C::LD, scratch, pt[j]);
      warp_mma<T, true, D_PAD>(vw, C::LD, sdO + j * 16 * C::LD, C::LD, scratch, dpt[j]);
    }
#pragma unroll
    for (int j = 0; j < NB; ++j)
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int col = j * 16 + half * 8 + i;
        const float p = m0 + col < Nq ? exp2f(pt[j][i] * c2 - sL[col]) : 0.f;                   // 1.
        sPt[r * C::LDS + col] = from_f32<T>(p);
        sdSt[r * C::LDS + col] = from_f32<T>(p * (dpt[j][i] - sDelta[col]));
      }
    __syncwarp();   // both strips complete
#pragma unroll
    for (int jd = 0; jd < ND; ++jd) {
      warp_mma<T, false, C::STEP>(sPt, C::LDS, sdO + jd * 16, C::LD, scratch, acc_dv[jd]);     // dV += P^T dO
      warp_mma<T, false, C::STEP>(sdSt, C::LDS, sQ + jd * 16, C::LD, scratch, acc_dk[jd]);     // dK += dS^T Q
    }
    __syncwarp();
  }
  const int row = n0 + warp * 16 + r;
  store_rows<T, ND>(dk + bh * Nk * D, acc_dk, row, Nk, D, c);
  store_rows<T, ND>(dv + bh * Nk * D, acc_dv, row, Nk, D, 1.f);
}

template <typename T, int D_PAD>
__global__ void __launch_bounds__(kThreads)
    attn_bwd_dq_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                       const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                       T* __restrict__ dq, int Nq, int Nk, int D, float c, float c2, bool vec) {
  using C = Tile<D_PAD>;
  using S = BwdSmem<T, D_PAD>;
  constexpr int NB = C::STEP / 16, ND = D_PAD / 16;
  FC_DYNAMIC_SMEM(smem);
  T* sQ = reinterpret_cast<T*>(smem + S::a);
  T* sdO = reinterpret_cast<T*>(smem + S::b);
  T* sK = reinterpret_cast<T*>(smem + S::c);
  T* sV = reinterpret_cast<T*>(smem + S::d);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, half = lane & 1, r = lane >> 1;
  T* sdS = reinterpret_cast<T*>(smem + S::strip + warp * 2 * S::strip_bytes);
  float* scratch = reinterpret_cast<float*>(smem + S::scratch) + warp * 256;
  const int64_t bh = blockIdx.y;
  const int m0 = blockIdx.x * C::ROWS;
  const int row = m0 + warp * 16 + r;
  const T* kb = k + bh * Nk * D;
  const T* vb = v + bh * Nk * D;

  load_tile<T, D_PAD, C::LD>(sQ, q + bh * Nq * D, m0, C::ROWS, Nq, D, vec);
  load_tile<T, D_PAD, C::LD>(sdO, dout + bh * Nq * D, m0, C::ROWS, Nq, D, vec);
  const float lse2 = row < Nq ? lse[bh * Nq + row] * kLog2e : 0.f;
  const float dlt = row < Nq ? delta[bh * Nq + row] : 0.f;
  float acc[ND][8] = {};
  const T* qw = sQ + warp * 16 * C::LD;
  const T* dow = sdO + warp * 16 * C::LD;
  for (int n0 = 0; n0 < Nk; n0 += C::STEP) {
    __syncthreads();
    load_tile<T, D_PAD, C::LD>(sK, kb, n0, C::STEP, Nk, D, vec);
    load_tile<T, D_PAD, C::LD>(sV, vb, n0, C::STEP, Nk, D, vec);
    __syncthreads();
    float s[NB][8] = {}, dp[NB][8] = {};
#pragma unroll
    for (int j = 0; j < NB; ++j) {
      warp_mma<T, true, D_PAD>(qw, C::LD, sK + j * 16 * C::LD, C::LD, scratch, s[j]);      // S = Q K^T
      warp_mma<T, true, D_PAD>(dow, C::LD, sV + j * 16 * C::LD, C::LD, scratch, dp[j]);    // dP = dO V^T
    }
#pragma unroll
    for (int j = 0; j < NB; ++j)
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int col = j * 16 + half * 8 + i;
        const float p = n0 + col < Nk ? exp2f(s[j][i] * c2 - lse2) : 0.f;
        sdS[r * C::LDS + col] = from_f32<T>(p * (dp[j][i] - dlt));                               // 2.
      }
    __syncwarp();
#pragma unroll
    for (int jd = 0; jd < ND; ++jd)
      warp_mma<T, false, C::STEP>(sdS, C::LDS, sK + jd * 16, C::LD, scratch, acc[jd]);         // dQ += dS K
    __syncwarp();
  }
  store_rows<T, ND>(dq + bh * Nq * D, acc, row, Nq, D, c);
}

template <typename K>
int opt_in_smem(K kern, int bytes) {
#ifndef FLASHCORE_HOST_EMU
  if (bytes > 48 * 1024)   // above 48 KB a kernel must opt in
    return static_cast<int>(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
#else
  (void)kern;
  (void)bytes;
#endif
  return 0;
}

template <typename T, int D_PAD>
int launch_bwd(const void* dout, const void* q, const void* k, const void* v, const void* o, const float* lse,
               void* dq, void* dk, void* dv, float* delta, int B, int H, int Nq, int Nk, int D, float scale,
               bool vec, void* stream) {
  using C = Tile<D_PAD>;
  const int64_t rows = static_cast<int64_t>(B) * H * Nq;
  auto pre = attn_bwd_delta_kernel<T>;
  FC_LAUNCH(pre, static_cast<unsigned>(ceil_div(rows, kWarps)), kThreads, 0, stream, static_cast<const T*>(o),
            static_cast<const T*>(dout), delta, rows, D);
  const int smem = BwdSmem<T, D_PAD>::bytes;
  auto kdkdv = attn_bwd_dkdv_kernel<T, D_PAD>;
  auto kdq = attn_bwd_dq_kernel<T, D_PAD>;
  if (int e = opt_in_smem(kdkdv, smem)) return e;
  if (int e = opt_in_smem(kdq, smem)) return e;
  const float c2 = scale * kLog2e;
  const unsigned bhs = static_cast<unsigned>(B * H);
  FC_LAUNCH(kdkdv, dim3(static_cast<unsigned>(ceil_div(Nk, C::ROWS)), bhs), kThreads, smem, stream,
            static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), static_cast<const T*>(dout),
            lse, delta, static_cast<T*>(dk), static_cast<T*>(dv), Nq, Nk, D, scale, c2, vec);
  FC_LAUNCH(kdq, dim3(static_cast<unsigned>(ceil_div(Nq, C::ROWS)), bhs), kThreads, smem, stream,
            static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), static_cast<const T*>(dout),
            lse, delta, static_cast<T*>(dq), Nq, Nk, D, scale, c2, vec);
  return last_error();
}

}  // namespace cuda
}  // namespace flashcore

extern "C" int fc_attention_bwd(const void* dout, const void* q, const void* k, const void* v, const void* o,
                                const float* lse, void* dq, void* dk, void* dv, float* delta, int B, int H, int Nq,
                                int Nk, int D, int dtype, float scale, void* stream) {
  using namespace flashcore::cuda;
  if (B <= 0 || H <= 0 || Nq <= 0 || Nk <= 0 || D <= 0) return FC_ERR_SHAPE;
  const bool vec = vec_ok(q, D, dtype) && vec_ok(k, D, dtype) && vec_ok(v, D, dtype) && vec_ok(dout, D, dtype);
  FC_DISPATCH_DTYPE(dtype, {
    FC_DISPATCH_HEAD_DIM(D, {
      return launch_bwd<T, D_PAD>(dout, q, k, v, o, lse, dq, dk, dv, delta, B, H, Nq, Nk, D, scale, vec, stream);
    })
  })
}

extern "C" int fc_attention_bwd_smem(int dtype, int D) {
  using namespace flashcore::cuda;
  FC_DISPATCH_DTYPE(dtype, { FC_DISPATCH_HEAD_DIM(D, { return BwdSmem<T, D_PAD>::bytes; }) })
}
